"""Warp-specialised bf16 latent attention for Hopper, in Gluon: the function and operands of
``latent_attention.latent_attention`` (queries absorbed into latent space, keys ``[c ; rho]`` scored with a
per-key scale ``s``, the latent ``c`` reused as the value), the kernel ``attention.kernel=auto`` runs on Hopper
(``kernels.dispatch``); ``gluon_common`` holds what it shares with the 8-bit Gluon kernel.

- a producer warp issues the TMA loads of each key tile (the latent in two power-of-two pieces, D0 + D1, the
  RoPE key and the tile's per-key scales) into a stage ring with ``ready`` / ``empty`` mbarriers;
- two consumer warpgroups of 64 query rows each walk the same tiles (prefix, then chunk) on FlashAttention-3's
  intra-warpgroup schedule: tile t's Q.K^T (three pieces) and tile t-1's P.V are issued back to back, tile t's
  softmax runs while that P.V is still in flight, then the accumulators are rescaled (``_consume16``);
- the latent tile is K for Q.K^T (a permuted view) and V for P.V (16-bit wgmma reads B in either order), so
  it is loaded once; the queries stay in shared memory as the wgmma A operand.

Key tiles start at each range's first key (no alignment), as in the Triton kernel. TMA reads a key set as
rows of a 2-D view over the batch (row pitch = the tensor's batch stride): rows a tile reads past a
sequence's last key belong to the next sequence, or are zero past the tensor, and are masked out of the
softmax, but as V they are multiplied by P = 0, so they must be finite (KVCache buffers start zeroed). The
scales come by a 1-D TMA whose start must be 16-byte aligned (``_scale_descriptor``, ``_split_start``).

Measured on an H200 (benchmarks/latent_attention_ws.py, 2026-12-04): 2.49 ms at 4680 queries x 21 + 3 frames
(160/64), 95 % of the bf16 GEMM rate measured in the same run and 1.31x the Triton bf16 kernel; as close to
float64 as the Triton kernel. The schedule and the TMA-staged scales were chosen by measurement
(benchmarks/NOTES-kernel.md): the earlier schedule (Q.K^T, wait, softmax, P.V, wait) ran 0.82x the Triton kernel.
"""

from __future__ import annotations

import functools

import torch

from .gluon_common import (BLOCK_M, MAX_REGS, SMEM_BYTES, compile_sm90, desc_type, gluon, in_clean_process,
                           is_hopper)
from .latent_attention import LOG2E, SplitPlan, TileConfig, check_operands, pieces, triton

PROGRAMS_PER_SM16 = 9  # the split rule's target: the 8-bit Gluon kernel's (one CTA per SM, 2-4 splits measured)
S_ALIGN = 4  # fp32 per-key scales in 16 bytes: TMA faults on a box whose innermost start is not 16-byte aligned

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .gluon_common import (GL_CONSUMER_REGS, GL_CONSUMERS, GL_PRODUCER_REGS, GL_WG_ROWS, epilogue,
                               query_rows, stage_queries)

    _S_ALIGN = gl.constexpr(S_ALIGN)

    @gluon.jit
    def _n_tiles(lo, hi, BLOCK_N: gl.constexpr):
        return (gl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N

    @gluon.jit
    def _split_start(split, keys_per_split, Lp):
        """The first key of a split: a multiple of ``keys_per_split`` (of BLOCK_N), moved up inside the chunk to the
        next key whose offset from the chunk's first key is a multiple of S_ALIGN, so that every tile's per-key
        scales start 16 bytes aligned (TMA). A split may end up empty (its consumers then wait for nothing)."""
        x = split * keys_per_split
        return gl.where(x > Lp, x + ((Lp - x) & (_S_ALIGN - 1)), x)

    @gluon.jit
    def _split_range(split, keys_per_split, Lp, Ln):
        return (_split_start(split, keys_per_split, Lp),
                gl.minimum(_split_start(split + 1, keys_per_split, Lp), Lp + Ln))

    @gluon.jit
    def _produce16(it, cd0, cd1, rd, sd, smem, crow0, rrow0, r_col, s0, lo, hi, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr):
        """TMA loads of the key tiles over [lo, hi) of one key set into the stage ring: the two latent pieces
        (``crow0``: the sequence's first latent row), the RoPE key (``rrow0``) and the per-key scales (``s0``:
        the set's first one in the flat scale vector)."""
        _, _, _, c0_b, c1_b, r_b, s_b, ready, empty = smem
        nbytes: gl.constexpr = (cd0.block_type.nbytes + cd1.block_type.nbytes + rd.block_type.nbytes
                                + sd.block_type.nbytes)
        for i in range(0, _n_tiles(lo, hi, BLOCK_N)):
            start = lo + i * BLOCK_N
            st = it % STAGES
            mbarrier.wait(empty.index(st), ((it // STAGES) & 1) ^ 1)  # both consumers gave the stage back
            bar = ready.index(st)
            mbarrier.expect(bar, nbytes)
            tma.async_copy_global_to_shared(cd0, [crow0 + start, 0], bar, c0_b.index(st))
            tma.async_copy_global_to_shared(cd1, [crow0 + start, 0], bar, c1_b.index(st))
            tma.async_copy_global_to_shared(rd, [rrow0 + start, r_col], bar, r_b.index(st))
            tma.async_copy_global_to_shared(sd, [s0 + start], bar, s_b.index(st))
            it += 1
        return it

    @gluon.jit
    def _tile16(t, n_p, lo, hi_p, lo_n, hi, BLOCK_N: gl.constexpr):
        """(first key, end of its key set's range) of the consumer's t-th tile, in the split's key coordinates
        (prefix keys, then the chunk's): the prefix's ``n_p`` tiles over [lo, hi_p), then the chunk's over
        [lo_n, hi)."""
        in_p = t < n_p
        return gl.where(in_p, lo + t * BLOCK_N, lo_n + (t - n_p) * BLOCK_N), gl.where(in_p, hi_p, hi)

    @gluon.jit
    def _scores16(q0, q1, qr, smem, st, zero):
        """Issue the three Q.K^T pieces on stage ``st``, the latent tile as K (three asynchronous wgmma groups)."""
        _, _, _, c0_b, c1_b, r_b, _, _, _ = smem
        sc = warpgroup_mma(q0, c0_b.index(st).permute((1, 0)), zero, use_acc=False, is_async=True)
        sc = warpgroup_mma(q1, c1_b.index(st).permute((1, 0)), sc, is_async=True)
        return warpgroup_mma(qr, r_b.index(st).permute((1, 0)), sc, is_async=True)

    @gluon.jit
    def _values16(p16, acc0, acc1, smem, st, p1_layout: gl.constexpr):
        """Issue O += P.V on stage ``st``, the same latent tile as V (two asynchronous wgmma groups)."""
        _, _, _, c0_b, c1_b, _, _, _, _ = smem
        acc0 = warpgroup_mma(p16, c0_b.index(st), acc0, is_async=True)
        acc1 = warpgroup_mma(gl.convert_layout(p16, p1_layout), c1_b.index(st), acc1, is_async=True)
        return acc0, acc1

    @gluon.jit
    def _softmax16(qk, sk, m_i, l_i, start, end, cols, dtype: gl.constexpr, p0_layout: gl.constexpr):
        """One online-softmax step in exp2 on a score tile (``sk``: per-key scales in log2 units): P in
        ``dtype`` as the P.V operand, the accumulator factor alpha, m, l. A tile that crosses ``end`` masks its
        outside keys."""
        BN: gl.constexpr = qk.shape[1]
        y = qk * sk[None, :]
        if start + BN > end:
            y = gl.where((cols < end - start)[None, :], y, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(y, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(y - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        return gl.convert_layout(p.to(dtype), p0_layout), alpha, m_new, l_i

    @gluon.jit
    def _rescale(acc0, acc1, alpha):
        a0 = gl.convert_layout(alpha, gl.SliceLayout(1, acc0.type.layout))
        a1 = gl.convert_layout(alpha, gl.SliceLayout(1, acc1.type.layout))
        return acc0 * a0[:, None], acc1 * a1[:, None]

    @gluon.jit
    def _consume16(acc0, acc1, m_i, l_i, q0, q1, qr, smem, n, n_p, lo, hi_p, lo_n, hi, qk_scale, cols, zero,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr, p0_layout: gl.constexpr, p1_layout: gl.constexpr):
        """Online softmax over the split's n >= 1 key tiles (the prefix's ``n_p`` over [lo, hi_p), then the
        chunk's over [lo_n, hi), split key coordinates) on FlashAttention-3's intra-warpgroup schedule: tile t's
        Q.K^T and tile t-1's P.V are issued back to back, and tile t's softmax runs while that P.V is in flight
        (P of both tiles live; the accumulators are rescaled once it lands). A block reads two stages (STAGES >=
        2). The per-key scales come with the stage (TMA), in log2 units once multiplied by ``qk_scale``."""
        _, _, _, _, _, _, s_b, ready, empty = smem
        col_layout: gl.constexpr = cols.type.layout
        # tile 0: Q.K^T alone
        mbarrier.wait(ready.index(0), 0)
        sc = _scores16(q0, q1, qr, smem, 0, zero)
        start, end = _tile16(0, n_p, lo, hi_p, lo_n, hi, BLOCK_N)
        sk = s_b.index(0).load(col_layout) * qk_scale
        qk = warpgroup_mma_wait(0, deps=(sc, ))
        p16, alpha, m_i, l_i = _softmax16(qk, sk, m_i, l_i, start, end, cols, q0.dtype, p0_layout)
        for t in range(1, n):
            st = t % STAGES
            prev = (t - 1) % STAGES
            mbarrier.wait(ready.index(st), (t // STAGES) & 1)
            sc = _scores16(q0, q1, qr, smem, st, zero)
            acc0, acc1 = _values16(p16, acc0, acc1, smem, prev, p1_layout)
            start, end = _tile16(t, n_p, lo, hi_p, lo_n, hi, BLOCK_N)
            qk = warpgroup_mma_wait(2, deps=(sc, ))  # Q.K^T landed; the two P.V groups still run
            sk = s_b.index(st).load(col_layout) * qk_scale
            p_next, alpha, m_i, l_i = _softmax16(qk, sk, m_i, l_i, start, end, cols, q0.dtype, p0_layout)
            acc0, acc1, p16 = warpgroup_mma_wait(0, deps=(acc0, acc1, p16))
            mbarrier.arrive(empty.index(prev), count=1)
            acc0, acc1 = _rescale(acc0, acc1, alpha)
            p16 = p_next
        last = (n - 1) % STAGES  # the last tile's P.V
        acc0, acc1 = _values16(p16, acc0, acc1, smem, last, p1_layout)
        acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
        mbarrier.arrive(empty.index(last), count=1)
        return acc0, acc1, m_i, l_i

    @gluon.jit
    def _consume_ws16(wg: gl.constexpr, smem, scal, H: gl.constexpr, G: gl.constexpr, DC: gl.constexpr,
                      D0: gl.constexpr, D1: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      SPLITS: gl.constexpr):
        """Consumer warpgroup ``wg``: its 64 query rows against the program's key range (cached prefix, then
        the current chunk), then the normalised output, or the split's fp32 partial, and the LSE."""
        q0_s, q1_s, qr_s, _, _, _, _, _, _ = smem
        o_ptr, lse_ptr, L, Lp, Ln, keys_per_split, n_rows, qk_scale, _, _, _, _, _ = scal
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o0_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, D0, 16])
        o1_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, D1, 16])
        p0_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o0_layout, k_width=2)
        p1_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o1_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        pid_bg, split = gl.program_id(1), gl.program_id(2)
        b = pid_bg // G
        g = pid_bg % G
        q0 = q0_s.slice(wg * GL_WG_ROWS, GL_WG_ROWS)
        q1 = q1_s.slice(wg * GL_WG_ROWS, GL_WG_ROWS)
        qr = qr_s.slice(wg * GL_WG_ROWS, GL_WG_ROWS)
        m_i = gl.full([GL_WG_ROWS], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([GL_WG_ROWS], gl.float32, row_layout)
        acc0 = gl.zeros([GL_WG_ROWS, D0], gl.float32, o0_layout)
        acc1 = gl.zeros([GL_WG_ROWS, D1], gl.float32, o1_layout)
        # split coordinates: the prefix's keys [lo, min(hi, Lp)), then the chunk's [max(lo, Lp), hi)
        lo, hi = _split_range(split, keys_per_split, Lp, Ln)
        hi_p, lo_n = gl.minimum(hi, Lp), gl.maximum(lo, Lp)
        n_p = _n_tiles(lo, hi_p, BLOCK_N)
        n = n_p + _n_tiles(lo_n, hi, BLOCK_N)
        if n > 0:  # an empty split (``_split_start``) leaves the state as it is
            cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            zero = gl.zeros([GL_WG_ROWS, BLOCK_N], gl.float32, s_layout)
            acc0, acc1, m_i, l_i = _consume16(acc0, acc1, m_i, l_i, q0, q1, qr, smem, n, n_p, lo, hi_p, lo_n, hi,
                                              qk_scale, cols, zero, BLOCK_N, STAGES, p0_layout, p1_layout)
        first = gl.program_id(0) * (GL_WG_ROWS * GL_CONSUMERS) + wg * GL_WG_ROWS  # after the loop: no register held
        row, rmask = query_rows(first, L, b, g, H, G, GL_WG_ROWS, row_layout)
        epilogue(acc0, acc1, m_i, l_i, 1.0, o_ptr, lse_ptr, row, rmask, first, L, b, g, split, n_rows, DC, D0, H, G,
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
        cp0, cp1, cn0, cn1, rd, sd = descs
        _, _, _, Lp, Ln, keys_per_split, _, _, ss_b, s_n, rows_p, rows_n, rows_r = scal
        pid_bg, split = gl.program_id(1), gl.program_id(2)
        b = pid_bg // G
        g = pid_bg % G
        lo, hi = _split_range(split, keys_per_split, Lp, Ln)
        it = _produce16(gl.to_tensor(0), cp0, cp1, rd, sd, smem, b * rows_p, b * rows_r, g * DRR, b * ss_b, lo,
                        gl.minimum(hi, Lp), BLOCK_N, STAGES)
        _produce16(it, cn0, cn1, rd, sd, smem, b * rows_n, b * rows_r + Lp, g * DRR, b * ss_b + s_n,
                   gl.maximum(lo - Lp, 0), gl.maximum(hi - Lp, 0), BLOCK_N, STAGES)

    @gluon.jit
    def _fwd16_ws(q_ptr, qr_ptr, cp0, cp1, cn0, cn1, rd, sd, o_ptr, lse_ptr,
                  L, Lp, Ln, ss_b, s_n, rows_p, rows_n, rows_r, keys_per_split, n_rows, qk_scale,
                  H: gl.constexpr, G: gl.constexpr, DC: gl.constexpr, DRR: gl.constexpr, D0: gl.constexpr,
                  D1: gl.constexpr, DR: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  SPLITS: gl.constexpr):
        BM: gl.constexpr = GL_WG_ROWS * GL_CONSUMERS
        pid_m, pid_bg = gl.program_id(0), gl.program_id(1)
        b = pid_bg // G
        g = pid_bg % G
        # the program's query rows into shared memory, once (both consumers read their half as wgmma A)
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        row, rmask = query_rows(pid_m * BM, L, b, g, H, G, BM, gl.SliceLayout(1, ld))
        q0_s = stage_queries(q_ptr, row, rmask, DC, 0, D0, ld)
        q1_s = stage_queries(q_ptr, row, rmask, DC, D0, D1, ld)
        qr_s = stage_queries(qr_ptr, row, rmask, DRR, 0, DR, ld)
        c0_b = gl.allocate_shared_memory(cp0.dtype, [STAGES] + cp0.block_type.shape, cp0.layout)
        c1_b = gl.allocate_shared_memory(cp1.dtype, [STAGES] + cp1.block_type.shape, cp1.layout)
        r_b = gl.allocate_shared_memory(rd.dtype, [STAGES] + rd.block_type.shape, rd.layout)
        s_b = gl.allocate_shared_memory(sd.dtype, [STAGES] + sd.block_type.shape, sd.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=GL_CONSUMERS)
        fence_async_shared()  # the query stores and barrier inits before any async-proxy access
        smem = (q0_s, q1_s, qr_s, c0_b, c1_b, r_b, s_b, ready, empty)
        descs = (cp0, cp1, cn0, cn1, rd, sd)
        scal = (o_ptr, lse_ptr, L, Lp, Ln, keys_per_split, n_rows, qk_scale, ss_b, s_n, rows_p, rows_n, rows_r)
        gl.warp_specialize([
            (_consumer16_0, (smem, descs, scal, H, G, DC, DRR, D0, D1, BLOCK_N, STAGES, SPLITS)),
            (_consumer16_1, (smem, descs, scal, H, G, DC, DRR, D0, D1, BLOCK_N, STAGES, SPLITS)),
            (_producer16, (smem, descs, scal, H, G, DC, DRR, D0, D1, BLOCK_N, STAGES, SPLITS)),
        ], [4, 1], [GL_CONSUMER_REGS, GL_PRODUCER_REGS])


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
ALIGN16 = 8  # elements of 16 bits in the 16 bytes TMA wants for row strides and piece offsets
MIN_STAGES16 = 2  # a wgmma block reads two stages: tile t's keys and tile t-1's values


def smem_bytes16(dc: int, dr: int, block_n: int, stages: int) -> int:
    """Shared memory of one program: the queries (both consumers' rows) and ``stages`` key tiles (16-bit latent
    and RoPE key, fp32 per-key scale)."""
    d0, d1, dr_p = pieces(dc, dr)
    stage = 2 * block_n * (d0 + d1 + dr_p) + 4 * block_n
    return 2 * BLOCK_M * (d0 + d1 + dr_p) + stages * stage + 1024  # + barriers and the compiler's scratch


def default_config_ws16(dc: int, dr: int) -> TileConfig:
    """128 query rows (two consumer warpgroups) x 128-key tiles, as many stages (<= 3) as shared memory holds
    (3 at 160/64: 56 KB a stage)."""
    stages = 3
    while stages > MIN_STAGES16 and smem_bytes16(dc, dr, 128, stages) > SMEM_BYTES:
        stages -= 1
    return TileConfig(BLOCK_M, 128, 4, stages)


def supports16(device: torch.device, dtype: torch.dtype, dc: int, dr: int) -> bool:
    """Whether ``latent_attention_ws16`` runs these widths (``dr`` per RoPE group) and dtype on ``device``."""
    return (is_hopper(device) and dtype in (torch.bfloat16, torch.float16) and dc % ALIGN16 == 0
            and dr % ALIGN16 == 0
            and smem_bytes16(dc, dr, 128, MIN_STAGES16) <= SMEM_BYTES)


@functools.lru_cache(maxsize=None)
def _tile_blocks16(dtype: torch.dtype, d0: int, d1: int, dr_p: int, block_n: int) -> tuple:
    """(element type, TMA block, shared layout) of a key set's tiles: the two latent pieces, the RoPE key and
    the per-key scales (fp32, one row: no swizzle)."""
    el = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]
    tiles = tuple((el, block, gl.NVMMASharedLayout.get_default_for(block, el))
                  for block in ([block_n, d0], [block_n, d1], [block_n, dr_p]))
    return tiles + ((gl.float32, [block_n], gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)),)


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
    (_, blk0, lay0), (_, blk1, lay1), _, _ = _tile_blocks16(c.dtype, d0, d1, dr_p, block_n)
    return [TensorDescriptor(c, [rows, dc], [c.stride(1), 1], blk0, lay0),
            TensorDescriptor(c[..., d0:], [rows, dc - d0], [c.stride(1), 1], blk1, lay1)], pitch


def _scale_descriptor(s: torch.Tensor, lp: int, blocks: tuple) -> tuple[TensorDescriptor, int, int]:
    """A 1-D TMA descriptor over the per-key scales ``s`` [B, Lp + Ln] (fp32, unit key stride: ``check_operands``), the
    batch pitch and where each entry's chunk scales start. Every tile's first scale must be 16-byte aligned:
    the tiles start at multiples of BLOCK_N in the prefix and of S_ALIGN in the chunk (``_split_start``), so
    the pitch and the chunk's offset must be multiples of S_ALIGN; where they are not (never at the 1.3B
    geometry: 1560 tokens a frame), the scales are copied into such a layout. Reads past the last entry are
    zeros."""
    lp_al = -(-lp // S_ALIGN) * S_ALIGN
    if lp_al != lp or s.stride(0) % S_ALIGN or s.data_ptr() % 16:
        b, lk = s.shape
        packed = s.new_zeros(b, lp_al + -(-(lk - lp) // S_ALIGN) * S_ALIGN)
        packed[:, :lp] = s[:, :lp]
        packed[:, lp_al:lp_al + lk - lp] = s[:, lp:]
        s = packed
    _, block, layout = blocks[3]
    return TensorDescriptor(s, [(s.shape[0] - 1) * s.stride(0) + s.shape[1]], [1], block, layout), s.stride(0), lp_al


def latent_attention_ws16(q_lat: torch.Tensor, q_r: torch.Tensor, c_past: torch.Tensor, c_new: torch.Tensor,
                          rho: torch.Tensor, s: torch.Tensor, scale: float,
                          config: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``latent_attention.latent_attention``'s contract on the warp-specialised Gluon kernel (Hopper, 16-bit
    operands of one dtype)."""
    if gluon is None:
        raise RuntimeError("the warp-specialised latent attention kernel needs Triton with Gluon (triton >= 3.5)")
    if not is_hopper(q_lat.device):
        raise RuntimeError("the warp-specialised latent attention kernel runs on Hopper GPUs (sm_90) only; "
                           "latent_attention.latent_attention serves other devices")
    check_operands(q_lat, q_r, c_past, c_new, rho, s)
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
    _check_config16(cfg, dc, dr)
    d0, d1, dr_p = pieces(dc, dr)
    q_lat, q_r = q_lat.contiguous(), q_r.contiguous()  # staged by row index (b * L + token) * H + head
    m_tiles = triton.cdiv(l * (h // g), BLOCK_M)
    plan = SplitPlan.make(cfg, m_tiles * b * g, lp + ln, b, l, h, dc, q_lat.device, q_lat.dtype, PROGRAMS_PER_SM16)
    blocks = _tile_blocks16(q_lat.dtype, d0, d1, dr_p, cfg.block_n)
    cp, rows_p = _latent_descriptors(c_past if lp else c_new, d0, d1, dr_p, cfg.block_n, "c_past")
    cn, rows_n = _latent_descriptors(c_new, d0, d1, dr_p, cfg.block_n, "c_new")
    rows_r = _pitch(rho, "rho")
    _, _, (_, blk_r, lay_r), _ = blocks
    rd = TensorDescriptor(rho, [(b - 1) * rows_r + lp + ln, g * dr], [rho.stride(1), 1], blk_r, lay_r)
    sd, pitch_s, s_n = _scale_descriptor(s, lp, blocks)
    _fwd16_ws[(m_tiles, b * g, plan.splits)](
        q_lat, q_r, *cp, *cn, rd, sd, plan.o_buf, plan.lse_buf,
        l, lp, ln, pitch_s, s_n, rows_p, rows_n, rows_r, plan.keys_per_split, b * l * h, scale * LOG2E,
        H=h, G=g, DC=dc, DRR=dr, D0=d0, D1=d1, DR=dr_p, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages,
        SPLITS=plan.splits, num_warps=4, maxnreg=MAX_REGS)
    return plan.finish()


def _check_config16(cfg: TileConfig, dc: int, dr: int) -> None:
    if (cfg.block_m != BLOCK_M or cfg.num_stages < MIN_STAGES16
            or smem_bytes16(dc, dr, cfg.block_n, cfg.num_stages) > SMEM_BYTES):
        raise ValueError(f"warp-specialised latent attention: block_m is {BLOCK_M}, num_stages >= {MIN_STAGES16} "
                         f"and the stages must fit {SMEM_BYTES} B of shared memory, got {cfg} "
                         f"({smem_bytes16(dc, dr, cfg.block_n, cfg.num_stages)} B)")


def compile_report16(dc: int = 160, dr: int = 64, groups: int = 1, heads: int = 12, splits: int = 2,
                     config: TileConfig | None = None) -> dict:
    """``latent_attention_ws.compile_report`` for this kernel (bf16 operands): sm_90a, no GPU needed."""
    if config is None:
        isolated = in_clean_process(__name__, "compile_report16", dc=dc, dr=dr, groups=groups, heads=heads,
                                       splits=splits)
        if isolated is not None:
            return isolated
    cfg = config or default_config_ws16(dc, dr)
    _check_config16(cfg, dc, dr)
    d0, d1, dr_p = pieces(dc, dr)
    blocks = _tile_blocks16(torch.bfloat16, d0, d1, dr_p, cfg.block_n)
    names = (("cp0", "cn0"), ("cp1", "cn1"), ("rd",), ("sd",))
    descs = {name: desc_type("fp32" if el == gl.float32 else "bf16", block, layout)
             for group, (el, block, layout) in zip(names, blocks) for name in group}
    ptrs = {"q_ptr": "*bf16", "qr_ptr": "*bf16", "lse_ptr": "*fp32", "o_ptr": "*fp32" if splits > 1 else "*bf16"}
    const = dict(H=heads, G=groups, DC=dc, DRR=dr, D0=d0, D1=d1, DR=dr_p, BLOCK_N=cfg.block_n,
                 STAGES=cfg.num_stages, SPLITS=splits)
    return compile_sm90(_fwd16_ws, ptrs, descs, const)
