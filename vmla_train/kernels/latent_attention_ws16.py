"""Warp-specialised bf16 latent attention for Hopper, in Gluon: the function and operands of
``latent_attention.latent_attention`` (queries absorbed into latent space, keys ``[c ; rho]`` scored with a
per-key scale ``s``, the latent ``c`` reused as the value) on the schedule of ``latent_attention_ws``:

- a producer warp issues the TMA loads of each key tile (the latent in two power-of-two pieces, D0 + D1, and
  the RoPE key) into a stage ring with ``ready`` / ``empty`` mbarriers;
- two consumer warpgroups of 64 query rows each run Q.K^T -> softmax -> P.V on the same tiles independently;
  the latent tile is K for Q.K^T (a permuted view) and V for P.V (16-bit wgmma reads B in either order), so
  it is loaded once;
- the three Q.K^T pieces are waited for once, the per-key scale loads while they run.

Key tiles start at each range's first key (no alignment), as in the Triton kernel. TMA reads a key set as
rows of a 2-D view over the batch (row pitch = the tensor's batch stride): rows a tile reads past a
sequence's last key belong to the next sequence, or are zero past the tensor, and are masked out of the
softmax, but as V they are multiplied by P = 0, so they must be finite (KVCache buffers start zeroed).

Measured on an H100 (benchmarks/latent_attention_ws.py, 2026-11-23): correct (as close to float64 as the
Triton kernel), but 0.81x the Triton bf16 kernel's speed (3.92 vs 3.17 ms at 4680 x 21 + 3 frames, 160/64):
bf16 wgmma takes twice the 8-bit time per tile, so two warpgroups overlapping each other's softmax no longer
hide it; FA3 adds intra-warpgroup pipelining (the next tile's Q.K^T issued before this tile's softmax) and
ping-pong ordering between the warpgroups. ``attention.kernel16=gluon_ws`` runs it; ``auto`` does not.
"""

from __future__ import annotations

import functools

import torch

from . import latent_attention_ws as WS
from .latent_attention import LOG2E, SplitPlan, TileConfig, _check, _pieces, triton
from .latent_attention_ws import BLOCK_M, MAX_REGS, SMEM_BYTES, gluon

PROGRAMS_PER_SM16 = 9  # the split rule's target: the 8-bit Gluon kernel's (one CTA per SM, 2-4 splits measured)

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .latent_attention_ws import (_CONSUMER_REGS, _CONSUMERS, _PRODUCER_REGS, _WG_ROWS, _finish, _rows,
                                      _stage_queries)

    @gluon.jit
    def _n_tiles(lo, hi, BLOCK_N: gl.constexpr):
        return (gl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N

    @gluon.jit
    def _produce16(it, cd0, cd1, rd, smem, crow0, rrow0, r_col, lo, hi, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr):
        """TMA loads of the key tiles over [lo, hi) of one key set (``crow0``: the sequence's first latent row,
        ``rrow0``: its first RoPE-key row) into the stage ring."""
        _, _, _, c0_b, c1_b, r_b, ready, empty = smem
        nbytes: gl.constexpr = cd0.block_type.nbytes + cd1.block_type.nbytes + rd.block_type.nbytes
        for i in range(0, _n_tiles(lo, hi, BLOCK_N)):
            start = lo + i * BLOCK_N
            st = it % STAGES
            mbarrier.wait(empty.index(st), ((it // STAGES) & 1) ^ 1)  # both consumers gave the stage back
            bar = ready.index(st)
            mbarrier.expect(bar, nbytes)
            tma.async_copy_global_to_shared(cd0, [crow0 + start, 0], bar, c0_b.index(st))
            tma.async_copy_global_to_shared(cd1, [crow0 + start, 0], bar, c1_b.index(st))
            tma.async_copy_global_to_shared(rd, [rrow0 + start, r_col], bar, r_b.index(st))
            it += 1
        return it

    @gluon.jit
    def _consume16(acc0, acc1, m_i, l_i, it, q0, q1, qr, smem, s_base, lo, hi, qk_scale, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, s_layout: gl.constexpr, p0_layout: gl.constexpr,
                   p1_layout: gl.constexpr):
        """Online softmax in exp2 over the key tiles of [lo, hi) of one key set (``s_base``: its per-key
        scales); the tile that crosses ``hi`` masks its outside keys."""
        _, _, _, c0_b, c1_b, r_b, ready, empty = smem
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        ROWS: gl.constexpr = q0.shape[0]
        zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
        for i in range(0, _n_tiles(lo, hi, BLOCK_N)):
            start = lo + i * BLOCK_N
            st = it % STAGES
            mbarrier.wait(ready.index(st), (it // STAGES) & 1)
            c0 = c0_b.index(st)  # [BLOCK_N, D0]: K (permuted) and V
            c1 = c1_b.index(st)
            sc = warpgroup_mma(q0, c0.permute((1, 0)), zero, use_acc=False, is_async=True)
            sc = warpgroup_mma(q1, c1.permute((1, 0)), sc, is_async=True)
            sc = warpgroup_mma(qr, r_b.index(st).permute((1, 0)), sc, is_async=True)
            keys = start + cols
            kmask = keys < hi
            sk = gl.load(s_base + keys, mask=kmask, other=0.0) * qk_scale  # while the dots run
            qk = warpgroup_mma_wait(0, deps=(sc, ))
            y = qk * sk[None, :]
            if start + BLOCK_N > hi:
                y = gl.where(kmask[None, :], y, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(y, 1))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(y - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            p16 = gl.convert_layout(p.to(q0.dtype), p0_layout)
            a0 = gl.convert_layout(alpha, gl.SliceLayout(1, acc0.type.layout))
            a1 = gl.convert_layout(alpha, gl.SliceLayout(1, acc1.type.layout))
            acc0 = warpgroup_mma(p16, c0, acc0 * a0[:, None], is_async=True)
            acc1 = warpgroup_mma(gl.convert_layout(p16, p1_layout), c1, acc1 * a1[:, None], is_async=True)
            acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
            mbarrier.arrive(empty.index(st), count=1)
            it += 1
        return acc0, acc1, m_i, l_i, it

    @gluon.jit
    def _consume_ws16(wg: gl.constexpr, smem, scal, H: gl.constexpr, G: gl.constexpr, DC: gl.constexpr,
                      D0: gl.constexpr, D1: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      SPLITS: gl.constexpr):
        """Consumer warpgroup ``wg``: its 64 query rows against the program's key range (cached prefix, then
        the current chunk), then the normalised output, or the split's fp32 partial, and the LSE."""
        q0_s, q1_s, qr_s, _, _, _, _, _ = smem
        s_ptr, ss_b, o_ptr, lse_ptr, L, Lp, Ln, keys_per_split, n_rows, qk_scale, _, _, _ = scal
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o0_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, D0, 16])
        o1_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, D1, 16])
        p0_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o0_layout, k_width=2)
        p1_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o1_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        pid_m, pid_bg, split = gl.program_id(0), gl.program_id(1), gl.program_id(2)
        b = pid_bg // G
        g = pid_bg % G
        first = pid_m * (_WG_ROWS * _CONSUMERS) + wg * _WG_ROWS
        row, rmask = _rows(first, L, b, g, H, G, _WG_ROWS, row_layout)
        q0 = q0_s.slice(wg * _WG_ROWS, _WG_ROWS)
        q1 = q1_s.slice(wg * _WG_ROWS, _WG_ROWS)
        qr = qr_s.slice(wg * _WG_ROWS, _WG_ROWS)
        m_i = gl.full([_WG_ROWS], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([_WG_ROWS], gl.float32, row_layout)
        acc0 = gl.zeros([_WG_ROWS, D0], gl.float32, o0_layout)
        acc1 = gl.zeros([_WG_ROWS, D1], gl.float32, o1_layout)
        lo = split * keys_per_split
        hi = gl.minimum(lo + keys_per_split, Lp + Ln)
        s_b = s_ptr + b * ss_b
        acc0, acc1, m_i, l_i, it = _consume16(acc0, acc1, m_i, l_i, gl.to_tensor(0), q0, q1, qr, smem, s_b, lo,
                                              gl.minimum(hi, Lp), qk_scale, BLOCK_N, STAGES, s_layout, p0_layout,
                                              p1_layout)
        acc0, acc1, m_i, l_i, it = _consume16(acc0, acc1, m_i, l_i, it, q0, q1, qr, smem, s_b + Lp,
                                              gl.maximum(lo - Lp, 0), gl.maximum(hi - Lp, 0), qk_scale, BLOCK_N,
                                              STAGES, s_layout, p0_layout, p1_layout)
        _finish(acc0, acc1, m_i, l_i, 1.0, o_ptr, lse_ptr, row, rmask, first, L, b, g, split, n_rows, DC, D0, H, G,
                SPLITS)

    @gluon.jit
    def _consumer16_0(smem, descs, scal, H: gl.constexpr, G: gl.constexpr, DC: gl.constexpr, DRR: gl.constexpr,
                      D0: gl.constexpr, D1: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      SPLITS: gl.constexpr):
        _consume_ws16(0, smem, scal, H, G, DC, D0, D1, BLOCK_N, STAGES, SPLITS)

    @gluon.jit
    def _consumer16_1(smem, descs, scal, H: gl.constexpr, G: gl.constexpr, DC: gl.constexpr, DRR: gl.constexpr,
                      D0: gl.constexpr, D1: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      SPLITS: gl.constexpr):
        _consume_ws16(1, smem, scal, H, G, DC, D0, D1, BLOCK_N, STAGES, SPLITS)

    @gluon.jit
    def _producer16(smem, descs, scal, H: gl.constexpr, G: gl.constexpr, DC: gl.constexpr, DRR: gl.constexpr,
                    D0: gl.constexpr, D1: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                    SPLITS: gl.constexpr):
        """The producer warp: the consumers' two key ranges, in the same order."""
        cp0, cp1, cn0, cn1, rd = descs
        _, _, _, _, _, Lp, Ln, keys_per_split, _, _, rows_p, rows_n, rows_r = scal
        pid_bg, split = gl.program_id(1), gl.program_id(2)
        b = pid_bg // G
        g = pid_bg % G
        lo = split * keys_per_split
        hi = gl.minimum(lo + keys_per_split, Lp + Ln)
        it = _produce16(gl.to_tensor(0), cp0, cp1, rd, smem, b * rows_p, b * rows_r, g * DRR, lo, gl.minimum(hi, Lp),
                        BLOCK_N, STAGES)
        _produce16(it, cn0, cn1, rd, smem, b * rows_n, b * rows_r + Lp, g * DRR, gl.maximum(lo - Lp, 0),
                   gl.maximum(hi - Lp, 0), BLOCK_N, STAGES)

    @gluon.jit
    def _fwd16_ws(q_ptr, qr_ptr, s_ptr, cp0, cp1, cn0, cn1, rd, o_ptr, lse_ptr,
                  L, Lp, Ln, ss_b, rows_p, rows_n, rows_r, keys_per_split, n_rows, qk_scale,
                  H: gl.constexpr, G: gl.constexpr, DC: gl.constexpr, DRR: gl.constexpr, D0: gl.constexpr,
                  D1: gl.constexpr, DR: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  SPLITS: gl.constexpr):
        BM: gl.constexpr = _WG_ROWS * _CONSUMERS
        pid_m, pid_bg = gl.program_id(0), gl.program_id(1)
        b = pid_bg // G
        g = pid_bg % G
        # the program's query rows into shared memory, once (both consumers read their half as wgmma A)
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        row, rmask = _rows(pid_m * BM, L, b, g, H, G, BM, gl.SliceLayout(1, ld))
        q0_s = _stage_queries(q_ptr, row, rmask, DC, 0, D0, ld)
        q1_s = _stage_queries(q_ptr, row, rmask, DC, D0, D1, ld)
        qr_s = _stage_queries(qr_ptr, row, rmask, DRR, 0, DR, ld)
        c0_b = gl.allocate_shared_memory(cp0.dtype, [STAGES] + cp0.block_type.shape, cp0.layout)
        c1_b = gl.allocate_shared_memory(cp1.dtype, [STAGES] + cp1.block_type.shape, cp1.layout)
        r_b = gl.allocate_shared_memory(rd.dtype, [STAGES] + rd.block_type.shape, rd.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=_CONSUMERS)
        fence_async_shared()  # the query stores and barrier inits before any async-proxy access
        smem = (q0_s, q1_s, qr_s, c0_b, c1_b, r_b, ready, empty)
        descs = (cp0, cp1, cn0, cn1, rd)
        scal = (s_ptr, ss_b, o_ptr, lse_ptr, L, Lp, Ln, keys_per_split, n_rows, qk_scale, rows_p, rows_n, rows_r)
        gl.warp_specialize([
            (_consumer16_0, (smem, descs, scal, H, G, DC, DRR, D0, D1, BLOCK_N, STAGES, SPLITS)),
            (_consumer16_1, (smem, descs, scal, H, G, DC, DRR, D0, D1, BLOCK_N, STAGES, SPLITS)),
            (_producer16, (smem, descs, scal, H, G, DC, DRR, D0, D1, BLOCK_N, STAGES, SPLITS)),
        ], [4, 1], [_CONSUMER_REGS, _PRODUCER_REGS])


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
ALIGN16 = 8  # elements of 16 bits in the 16 bytes TMA wants for row strides and piece offsets


def smem_bytes16(dc: int, dr: int, block_n: int, stages: int) -> int:
    """Shared memory of one program: the queries (both consumers' rows) and ``stages`` key tiles, 2 bytes an
    element."""
    d0, d1, dr_p = _pieces(dc, dr)
    return 2 * (BLOCK_M + stages * block_n) * (d0 + d1 + dr_p) + 1024  # + barriers and the compiler's scratch


def default_config_ws16(dc: int, dr: int) -> TileConfig:
    """128 query rows (two consumer warpgroups) x 128-key tiles, as many stages (<= 3) as shared memory holds
    (2 at 160/64: 56 KB a stage)."""
    stages = 3
    while stages > 1 and smem_bytes16(dc, dr, 128, stages) > SMEM_BYTES:
        stages -= 1
    return TileConfig(BLOCK_M, 128, 4, stages)


def supports16(device: torch.device, dtype: torch.dtype, dc: int, dr: int) -> bool:
    """Whether ``latent_attention_ws16`` runs these widths (``dr`` per RoPE group) and dtype on ``device``."""
    return (gluon is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
            and dtype in (torch.bfloat16, torch.float16) and dc % ALIGN16 == 0 and dr % ALIGN16 == 0
            and smem_bytes16(dc, dr, 128, 2) <= SMEM_BYTES)  # one stage: no overlap (and 256/64 spills)


@functools.lru_cache(maxsize=None)
def _tile_blocks16(dtype: torch.dtype, d0: int, d1: int, dr_p: int, block_n: int) -> tuple:
    """(element type, TMA block, shared layout) of the latent pieces and the RoPE key tile of a key set."""
    el = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]
    return tuple((el, block, gl.NVMMASharedLayout.get_default_for(block, el))
                 for block in ([block_n, d0], [block_n, d1], [block_n, dr_p]))


def _pitch(t: torch.Tensor, name: str) -> int:
    """Rows between two sequences of ``t`` [B, n, ...] seen as a 2-D view of rows of stride ``t.stride(1)``."""
    if t.stride(0) % t.stride(1) or (t.stride(1) * t.element_size()) % 16 or t.data_ptr() % 16:
        raise ValueError(f"warp-specialised latent attention: {name} (strides {t.stride()}) must be rows of a "
                         "16-byte aligned 2-D view (batch stride a multiple of the row stride)")
    return t.stride(0) // t.stride(1)


def _latent_descriptors(c: torch.Tensor, d0: int, d1: int, dr_p: int, block_n: int, name: str) -> tuple[list, int]:
    """TMA descriptors of the two latent pieces of ``c`` [B, n, dc] over batch-flattened rows, and the pitch."""
    b, n, dc = c.shape
    pitch = _pitch(c, name)
    rows = (b - 1) * pitch + n
    (_, blk0, lay0), (_, blk1, lay1), _ = _tile_blocks16(c.dtype, d0, d1, dr_p, block_n)
    return [TensorDescriptor(c, [rows, dc], [c.stride(1), 1], blk0, lay0),
            TensorDescriptor(c[..., d0:], [rows, dc - d0], [c.stride(1), 1], blk1, lay1)], pitch


def latent_attention_ws16(q_lat: torch.Tensor, q_r: torch.Tensor, c_past: torch.Tensor, c_new: torch.Tensor,
                          rho: torch.Tensor, s: torch.Tensor, scale: float,
                          config: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``latent_attention.latent_attention``'s contract on the warp-specialised Gluon kernel (Hopper, 16-bit
    operands of one dtype)."""
    if gluon is None:
        raise RuntimeError("the warp-specialised latent attention kernel needs Triton with Gluon (triton >= 3.5)")
    if not q_lat.is_cuda or torch.cuda.get_device_capability(q_lat.device)[0] != 9:
        raise RuntimeError("the warp-specialised latent attention kernel runs on Hopper GPUs (sm_90) only; "
                           "latent_attention.latent_attention serves other devices")
    _check(q_lat, q_r, c_past, c_new, rho, s)
    b, l, h, dc = q_lat.shape
    g, dr = rho.shape[2], rho.shape[3]
    if any(t.dtype != q_lat.dtype for t in (q_r, c_past, c_new, rho)) or q_lat.dtype not in (torch.bfloat16,
                                                                                             torch.float16):
        raise ValueError("warp-specialised latent attention: q_lat, q_r, c_past, c_new and rho must share one "
                         f"16-bit dtype, got {[t.dtype for t in (q_lat, q_r, c_past, c_new, rho)]}")
    if dc % ALIGN16 or dr % ALIGN16 or rho.stride(2) != dr:
        raise ValueError(f"warp-specialised latent attention: dc={dc} and per-group dr={dr} must be multiples of "
                         f"{ALIGN16}, and rho's groups adjacent (strides {rho.stride()})")
    lp, ln = c_past.shape[1], c_new.shape[1]
    cfg = config or default_config_ws16(dc, dr)
    if cfg.block_m != BLOCK_M or smem_bytes16(dc, dr, cfg.block_n, cfg.num_stages) > SMEM_BYTES:
        raise ValueError(f"warp-specialised latent attention: block_m is {BLOCK_M} and the stages must fit "
                         f"{SMEM_BYTES} B of shared memory, got {cfg} "
                         f"({smem_bytes16(dc, dr, cfg.block_n, cfg.num_stages)} B)")
    d0, d1, dr_p = _pieces(dc, dr)
    q_lat, q_r = q_lat.contiguous(), q_r.contiguous()  # staged by row index (b * L + token) * H + head
    m_tiles = triton.cdiv(l * (h // g), BLOCK_M)
    plan = SplitPlan.make(cfg, m_tiles * b * g, lp + ln, b, l, h, dc, q_lat.device, q_lat.dtype, PROGRAMS_PER_SM16)
    cp, rows_p = _latent_descriptors(c_past if lp else c_new, d0, d1, dr_p, cfg.block_n, "c_past")
    cn, rows_n = _latent_descriptors(c_new, d0, d1, dr_p, cfg.block_n, "c_new")
    rows_r = _pitch(rho, "rho")
    _, _, (_, blk_r, lay_r) = _tile_blocks16(rho.dtype, d0, d1, dr_p, cfg.block_n)
    rd = TensorDescriptor(rho, [(b - 1) * rows_r + lp + ln, g * dr], [rho.stride(1), 1], blk_r, lay_r)
    _fwd16_ws[(m_tiles, b * g, plan.splits)](
        q_lat, q_r, s, *cp, *cn, rd, plan.o_buf, plan.lse_buf,
        l, lp, ln, s.stride(0), rows_p, rows_n, rows_r, plan.keys_per_split, b * l * h, scale * LOG2E,
        H=h, G=g, DC=dc, DRR=dr, D0=d0, D1=d1, DR=dr_p, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages,
        SPLITS=plan.splits, num_warps=4, maxnreg=MAX_REGS)
    return plan.finish()


def compile_report16(dc: int = 160, dr: int = 64, groups: int = 1, heads: int = 12, splits: int = 2,
                     config: TileConfig | None = None) -> dict:
    """``latent_attention_ws.compile_report`` for this kernel (bf16 operands): sm_90a, no GPU needed."""
    if config is None:
        isolated = WS.in_clean_process(__name__, "compile_report16", dc=dc, dr=dr, groups=groups, heads=heads,
                                       splits=splits)
        if isolated is not None:
            return isolated
    cfg = config or default_config_ws16(dc, dr)
    d0, d1, dr_p = _pieces(dc, dr)
    blocks = _tile_blocks16(torch.bfloat16, d0, d1, dr_p, cfg.block_n)
    descs = {name: WS.desc_type("bf16", block, layout)
             for names, (_, block, layout) in zip((("cp0", "cn0"), ("cp1", "cn1"), ("rd",)), blocks) for name in names}
    ptrs = {"q_ptr": "*bf16", "qr_ptr": "*bf16", "s_ptr": "*fp32", "lse_ptr": "*fp32",
            "o_ptr": "*fp32" if splits > 1 else "*bf16"}
    const = dict(H=heads, G=groups, DC=dc, DRR=dr, D0=d0, D1=d1, DR=dr_p, BLOCK_N=cfg.block_n,
                 STAGES=cfg.num_stages, SPLITS=splits)
    return WS.compile_sm90(_fwd16_ws, ptrs, descs, const)
