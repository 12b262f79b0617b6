"""Warp-specialised 8-bit latent attention for Hopper, written in Gluon (Triton's explicit dialect).

The same function and the same operands as ``latent_attention_fp8.attention8`` (int8 Q.K^T on the key rows
``[s c ; s rho]``, e4m3 P.V on the transposed latent, one key and one value scale per sequence, sinks scored
with their own query RoPE part; see that module's doc), with FlashAttention-3's schedule instead of Triton's
lock-step loop:

- **a producer warp** issues every TMA load (key-row pieces and value tiles of a stage) and signals a
  ``ready`` mbarrier per stage; consumers give a stage back through an ``empty`` mbarrier. No CTA-wide
  barrier in the loop: Triton 3.6's loop had five per key tile, and the lazy-rescale probe
  (benchmarks/NOTES-kernel.md) measured how much they cost;
- **two consumer warpgroups**, 64 query rows each (the wgmma M), run Q.K^T -> softmax -> P.V on the same
  key tiles independently, so the warp schedulers overlap one's softmax with the other's tensor-core work;
- the three Q.K^T pieces (content D0 and D1, RoPE) are issued back to back and waited for once (Triton waited
  after each);
- the queries stay in shared memory (the wgmma A operand), so a consumer thread holds only the two
  accumulators, one score tile and P.

Measured on an H100 (benchmarks/latent_attention_ws.py, benchmarks/README.md): 1.28x the Triton
8-bit kernel and 1.25x cuDNN MHA at the 1.3B chunk geometry, with bit-identical outputs; ``attention.impl=
fused_8bit`` runs it on Hopper (``attention.kernel``: ``kernels.dispatch``). ``compile_report`` checks on CPU
machines what ptxas makes of it (registers, spills, shared memory, the waits). ``latent_attention_ws16`` is the
bf16 kernel on the same schedule; ``gluon_common`` holds what the two share.
"""

from __future__ import annotations

import functools

import torch

from .gluon_common import (BLOCK_M, MAX_REGS, SMEM_BYTES, available, compile_sm90, desc_type, gluon,  # noqa: F401
                           in_clean_process, is_hopper)
from .latent_attention import LOG2E, SplitPlan, TileConfig, triton
from .latent_attention_fp8 import MAX_DC8, P_RANGE, PROGRAMS_PER_SM8, check_operands8, check_width8, pieces8
from .quant8 import ALIGN, Latent8

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .gluon_common import (GL_CONSUMER_REGS, GL_CONSUMERS, GL_PRODUCER_REGS, GL_WG_ROWS, epilogue,
                               query_rows, stage_queries)


def supports(device: torch.device, dc: int, dr: int) -> bool:
    """Whether ``attention8_ws`` runs latents of width ``dc`` with ``dr``-wide RoPE keys per group on ``device``:
    Gluon present, a Hopper GPU, TMA-aligned widths, a stage plan that fits shared memory."""
    return (is_hopper(device) and dc % ALIGN == 0 and dr % ALIGN == 0 and dc <= MAX_DC8
            and smem_bytes(dc, dr, 128, default_config_ws(dc, dr).num_stages) <= SMEM_BYTES)


if gluon is not None:

    _P_RANGE = gl.constexpr(P_RANGE)  # as Gluon reads module globals

    @gluon.jit
    def _tiles(lo, hi, BLOCK_N: gl.constexpr):
        """(first, full, count) of the key tiles covering [lo, hi), in the Triton kernel's order (so both round P to
        e4m3 against the same running maxima): the whole tiles [first, full), then a masked head tile
        first - BLOCK_N when lo is not aligned, then a masked tail tile full when hi is not; none when empty."""
        first = (lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        full = first + gl.maximum(hi - first, 0) // BLOCK_N * BLOCK_N
        count = (full - first) // BLOCK_N + (first > lo).to(gl.int32) + (full < hi).to(gl.int32)
        return first, full, gl.where(hi > lo, count, 0)

    @gluon.jit
    def _tile_start(i, lo, first, full, BLOCK_N: gl.constexpr):
        """The first key of the i-th tile in ``_tiles``' order."""
        whole = first + i * BLOCK_N
        head = (whole == full) & (first > lo)
        return gl.where(whole < full, whole, gl.where(head, first - BLOCK_N, full))

    @gluon.jit
    def _produce_range(it, k0d, k1d, krd, v0d, v1d, smem, krow0, vrow0, kr_col, lo, hi, D0: gl.constexpr,
                       BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS1: gl.constexpr):
        """TMA loads of the key tiles over [lo, hi) of one key set into the stage ring (``it`` counts stages
        across ranges, as the consumers count them)."""
        _, _, _, _, k0_b, k1_b, kr_b, v0_b, v1_b, ready, empty = smem
        nbytes: gl.constexpr = (k0d.block_type.nbytes + k1d.block_type.nbytes * HAS1 + krd.block_type.nbytes
                                + v0d.block_type.nbytes + v1d.block_type.nbytes)
        first, full, count = _tiles(lo, hi, BLOCK_N)
        for i in range(0, count):
            start = _tile_start(i, lo, first, full, BLOCK_N)
            st = it % STAGES
            mbarrier.wait(empty.index(st), ((it // STAGES) & 1) ^ 1)  # both consumers gave the stage back
            bar = ready.index(st)
            mbarrier.expect(bar, nbytes)
            tma.async_copy_global_to_shared(k0d, [krow0 + start, 0], bar, k0_b.index(st))
            if HAS1:
                tma.async_copy_global_to_shared(k1d, [krow0 + start, 0], bar, k1_b.index(st))
            tma.async_copy_global_to_shared(krd, [krow0 + start, kr_col], bar, kr_b.index(st))
            tma.async_copy_global_to_shared(v0d, [vrow0, start], bar, v0_b.index(st))
            tma.async_copy_global_to_shared(v1d, [vrow0 + D0, start], bar, v1_b.index(st))
            it += 1
        return it

    @gluon.jit
    def _consume_range(acc0, acc1, m_i, l_i, it, q0, q1, qr, rs, smem, lo, hi, lfac, ifac, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr, HAS1: gl.constexpr, MAGIC: gl.constexpr, s_layout: gl.constexpr,
                       p0_layout: gl.constexpr, p1_layout: gl.constexpr):
        """Online softmax over the key tiles covering [lo, hi) of one key set, in exp2 (``rs``: per-row score
        factor in log2 units with the key set's scale folded in). Tiles that cross lo or hi mask their outside
        keys. P leaves the exponent scaled by 2^lfac, l sums p / 2^lfac (``ifac``): latent_attention_fp8's doc."""
        _, _, _, _, k0_b, k1_b, kr_b, v0_b, v1_b, ready, empty = smem
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        ROWS: gl.constexpr = q0.shape[0]
        zero = gl.zeros([ROWS, BLOCK_N], gl.int32, s_layout)
        first, full, count = _tiles(lo, hi, BLOCK_N)
        for i in range(0, count):
            start = _tile_start(i, lo, first, full, BLOCK_N)
            st = it % STAGES
            mbarrier.wait(ready.index(st), (it // STAGES) & 1)
            # the three Q.K^T pieces issued back to back, one wait
            sc = warpgroup_mma(q0, k0_b.index(st).permute((1, 0)), zero, use_acc=False, is_async=True)
            if HAS1:
                sc = warpgroup_mma(q1, k1_b.index(st).permute((1, 0)), sc, is_async=True)
            sc = warpgroup_mma(qr, kr_b.index(st).permute((1, 0)), sc, is_async=True)
            qk = warpgroup_mma_wait(0, deps=(sc, ))
            if MAGIC:  # int32 -> fp32 by an integer add (the bits of 2^23 + 2^22 + qk); the offset folds into rs
                y = (qk + 0x4B400000).to(gl.float32, bitcast=True)
                off = 12582912.0
            else:
                y = qk.to(gl.float32)
                off = 0.0
            if (start < lo) | (start + BLOCK_N > hi):
                keys = start + cols
                y = gl.where(((keys >= lo) & (keys < hi))[None, :], y, float("-inf"))
            m_new = gl.maximum(m_i, (gl.max(y, 1) - off) * rs)
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(y * rs[:, None] - (m_new - lfac + off * rs)[:, None])
            l_i = l_i * alpha + gl.sum(p, 1) * ifac
            m_i = m_new
            p8 = gl.convert_layout(p.to(gl.float8e4nv), p0_layout)
            a0 = gl.convert_layout(alpha, gl.SliceLayout(1, acc0.type.layout))
            a1 = gl.convert_layout(alpha, gl.SliceLayout(1, acc1.type.layout))
            acc0 = warpgroup_mma(p8, v0_b.index(st).permute((1, 0)), acc0 * a0[:, None], is_async=True)
            acc1 = warpgroup_mma(gl.convert_layout(p8, p1_layout), v1_b.index(st).permute((1, 0)),
                                 acc1 * a1[:, None], is_async=True)
            acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
            mbarrier.arrive(empty.index(st), count=1)
            it += 1
        return acc0, acc1, m_i, l_i, it

    @gluon.jit
    def _consume(wg: gl.constexpr, smem, descs, scal, H: gl.constexpr, G: gl.constexpr, DC: gl.constexpr,
                 DRR: gl.constexpr, D0: gl.constexpr, D1: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 SPLITS: gl.constexpr, HAS1: gl.constexpr, MAGIC: gl.constexpr):
        """Consumer warpgroup ``wg``: its 64 query rows against every key tile of the program's key range (the
        sinks with the sink-position query RoPE part, the rest of the prefix, the chunk), then the normalised
        output, or the split's fp32 partial, and the LSE."""
        q0_s, q1_s, qr_s, qs_s, _, _, _, _, _, _, _ = smem
        (sq_ptr, ksp_ptr, vsp_ptr, ksn_ptr, vsn_ptr, vmax_ptr, o_ptr, lse_ptr, L, Lp, Ln, Ls, keys_per_split,
         n_rows, qk_scale, _, _) = scal
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        o0_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, D0, 32])
        o1_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, D1, 32])
        p0_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o0_layout, k_width=4)
        p1_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o1_layout, k_width=4)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        pid_m, pid_bg, split = gl.program_id(0), gl.program_id(1), gl.program_id(2)
        b = pid_bg // G
        g = pid_bg % G
        first = pid_m * (GL_WG_ROWS * GL_CONSUMERS) + wg * GL_WG_ROWS
        row, rmask = query_rows(first, L, b, g, H, G, GL_WG_ROWS, row_layout)
        rs = gl.load(sq_ptr + row, mask=rmask, other=1.0) * qk_scale
        vnorm = _P_RANGE / gl.load(vmax_ptr + b)
        fac_p = gl.load(vsp_ptr + b) * vnorm  # P's factor for each key set's values (<= 256)
        fac_n = gl.load(vsn_ptr + b) * vnorm
        rs_p = rs * gl.load(ksp_ptr + b)
        rs_n = rs * gl.load(ksn_ptr + b)
        lf_p = gl.log2(fac_p)
        lf_n = gl.log2(fac_n)
        q0 = q0_s.slice(wg * GL_WG_ROWS, GL_WG_ROWS)
        q1 = q1_s.slice(wg * GL_WG_ROWS, GL_WG_ROWS)
        qr = qr_s.slice(wg * GL_WG_ROWS, GL_WG_ROWS)
        qs = qs_s.slice(wg * GL_WG_ROWS, GL_WG_ROWS)
        m_i = gl.full([GL_WG_ROWS], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([GL_WG_ROWS], gl.float32, row_layout)
        acc0 = gl.zeros([GL_WG_ROWS, D0], gl.float32, o0_layout)
        acc1 = gl.zeros([GL_WG_ROWS, D1], gl.float32, o1_layout)
        lo = split * keys_per_split
        hi = gl.minimum(lo + keys_per_split, Lp + Ln)
        acc0, acc1, m_i, l_i, it = _consume_range(acc0, acc1, m_i, l_i, gl.to_tensor(0), q0, q1, qs, rs_p, smem,
                                                  lo, gl.minimum(hi, Ls), lf_p, 1.0 / fac_p, BLOCK_N, STAGES, HAS1,
                                                  MAGIC, s_layout, p0_layout, p1_layout)
        acc0, acc1, m_i, l_i, it = _consume_range(acc0, acc1, m_i, l_i, it, q0, q1, qr, rs_p, smem,
                                                  gl.maximum(lo, Ls), gl.minimum(hi, Lp), lf_p, 1.0 / fac_p,
                                                  BLOCK_N, STAGES, HAS1, MAGIC, s_layout, p0_layout, p1_layout)
        acc0, acc1, m_i, l_i, it = _consume_range(acc0, acc1, m_i, l_i, it, q0, q1, qr, rs_n, smem,
                                                  gl.maximum(lo - Lp, 0), gl.maximum(hi - Lp, 0), lf_n, 1.0 / fac_n,
                                                  BLOCK_N, STAGES, HAS1, MAGIC, s_layout, p0_layout, p1_layout)
        epilogue(acc0, acc1, m_i, l_i, vnorm, o_ptr, lse_ptr, row, rmask, first, L, b, g, split, n_rows, DC, D0, H,
                G, SPLITS)

    @gluon.jit
    def _consumer0(smem, descs, scal, H: gl.constexpr, G: gl.constexpr, DC: gl.constexpr, DRR: gl.constexpr,
                   D0: gl.constexpr, D1: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   SPLITS: gl.constexpr, HAS1: gl.constexpr, MAGIC: gl.constexpr):
        _consume(0, smem, descs, scal, H, G, DC, DRR, D0, D1, BLOCK_N, STAGES, SPLITS, HAS1, MAGIC)

    @gluon.jit
    def _consumer1(smem, descs, scal, H: gl.constexpr, G: gl.constexpr, DC: gl.constexpr, DRR: gl.constexpr,
                   D0: gl.constexpr, D1: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   SPLITS: gl.constexpr, HAS1: gl.constexpr, MAGIC: gl.constexpr):
        _consume(1, smem, descs, scal, H, G, DC, DRR, D0, D1, BLOCK_N, STAGES, SPLITS, HAS1, MAGIC)

    @gluon.jit
    def _producer(smem, descs, scal, H: gl.constexpr, G: gl.constexpr, DC: gl.constexpr, DRR: gl.constexpr,
                  D0: gl.constexpr, D1: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  SPLITS: gl.constexpr, HAS1: gl.constexpr, MAGIC: gl.constexpr):
        """The producer warp: the same three key ranges as the consumers, in the same order."""
        kp0, kp1, kpr, vp0, vp1, kn0, kn1, knr, vn0, vn1 = descs
        _, _, _, _, _, _, _, _, L, Lp, Ln, Ls, keys_per_split, _, _, rows_p, rows_n = scal
        pid_bg, split = gl.program_id(1), gl.program_id(2)
        b = pid_bg // G
        g = pid_bg % G
        lo = split * keys_per_split
        hi = gl.minimum(lo + keys_per_split, Lp + Ln)
        it = _produce_range(gl.to_tensor(0), kp0, kp1, kpr, vp0, vp1, smem, b * rows_p, b * DC, g * DRR, lo,
                            gl.minimum(hi, Ls), D0, BLOCK_N, STAGES, HAS1)
        it = _produce_range(it, kp0, kp1, kpr, vp0, vp1, smem, b * rows_p, b * DC, g * DRR, gl.maximum(lo, Ls),
                            gl.minimum(hi, Lp), D0, BLOCK_N, STAGES, HAS1)
        _produce_range(it, kn0, kn1, knr, vn0, vn1, smem, b * rows_n, b * DC, g * DRR, gl.maximum(lo - Lp, 0),
                       gl.maximum(hi - Lp, 0), D0, BLOCK_N, STAGES, HAS1)

    @gluon.jit
    def _fwd8_ws(q_ptr, qr_ptr, qs_ptr, sq_ptr, kp0, kp1, kpr, vp0, vp1, kn0, kn1, knr, vn0, vn1,
                 ksp_ptr, vsp_ptr, ksn_ptr, vsn_ptr, vmax_ptr, o_ptr, lse_ptr,
                 L, Lp, Ln, Ls, rows_p, rows_n, keys_per_split, n_rows, qk_scale,
                 H: gl.constexpr, G: gl.constexpr, DC: gl.constexpr, DRR: gl.constexpr, D0: gl.constexpr,
                 D1: gl.constexpr, DR: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 SPLITS: gl.constexpr, HAS1: gl.constexpr):
        MAGIC: gl.constexpr = (DC + DRR) * 127 * 127 < 4194304  # |int32 dot| < 2^22: exact in the magic add
        BM: gl.constexpr = GL_WG_ROWS * GL_CONSUMERS
        pid_m, pid_bg = gl.program_id(0), gl.program_id(1)
        b = pid_bg // G
        g = pid_bg % G
        # the program's query rows into shared memory, once (both consumers read their half as wgmma A)
        ld: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
        row, rmask = query_rows(pid_m * BM, L, b, g, H, G, BM, gl.SliceLayout(1, ld))
        q0_s = stage_queries(q_ptr, row, rmask, DC, 0, D0, ld)
        q1_s = stage_queries(q_ptr, row, rmask, DC, D0, D1, ld)
        qr_s = stage_queries(qr_ptr, row, rmask, DRR, 0, DR, ld)
        qs_s = stage_queries(qs_ptr, row, rmask, DRR, 0, DR, ld)
        # the stage ring and its barriers: ready (TMA bytes landed), empty (both consumers done with it)
        k0_b = gl.allocate_shared_memory(kp0.dtype, [STAGES] + kp0.block_type.shape, kp0.layout)
        k1_b = gl.allocate_shared_memory(kp1.dtype, [STAGES] + kp1.block_type.shape, kp1.layout)
        kr_b = gl.allocate_shared_memory(kpr.dtype, [STAGES] + kpr.block_type.shape, kpr.layout)
        v0_b = gl.allocate_shared_memory(vp0.dtype, [STAGES] + vp0.block_type.shape, vp0.layout)
        v1_b = gl.allocate_shared_memory(vp1.dtype, [STAGES] + vp1.block_type.shape, vp1.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=GL_CONSUMERS)
        fence_async_shared()  # the query stores and barrier inits before any async-proxy access
        smem = (q0_s, q1_s, qr_s, qs_s, k0_b, k1_b, kr_b, v0_b, v1_b, ready, empty)
        descs = (kp0, kp1, kpr, vp0, vp1, kn0, kn1, knr, vn0, vn1)
        scal = (sq_ptr, ksp_ptr, vsp_ptr, ksn_ptr, vsn_ptr, vmax_ptr, o_ptr, lse_ptr, L, Lp, Ln, Ls, keys_per_split,
                n_rows, qk_scale, rows_p, rows_n)
        # (the partitions' argument tuples written out: a tuple assigned to a variable turns its constexprs into
        # tensors)
        gl.warp_specialize([
            (_consumer0, (smem, descs, scal, H, G, DC, DRR, D0, D1, BLOCK_N, STAGES, SPLITS, HAS1, MAGIC)),
            (_consumer1, (smem, descs, scal, H, G, DC, DRR, D0, D1, BLOCK_N, STAGES, SPLITS, HAS1, MAGIC)),
            (_producer, (smem, descs, scal, H, G, DC, DRR, D0, D1, BLOCK_N, STAGES, SPLITS, HAS1, MAGIC)),
        ], [4, 1], [GL_CONSUMER_REGS, GL_PRODUCER_REGS])


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def smem_bytes(dc: int, dr: int, block_n: int, stages: int) -> int:
    """Shared memory of one program: the queries (both consumers' rows) and ``stages`` key/value stages."""
    d0, d1, dr_p = pieces8(dc, dr)
    queries = BLOCK_M * (d0 + d1 + 2 * dr_p)
    stage = block_n * (d0 + d1 + dr_p) + (d0 + d1) * block_n
    return queries + stages * stage + 1024  # + barriers and the compiler's scratch (184 768 B compiled at 160/64)


def default_config_ws(dc: int, dr: int) -> TileConfig:
    """128 query rows (two consumer warpgroups) x 128-key tiles, as many stages (<= 3) as shared memory holds:
    3 at 160/64 (181 KB), 2 at 256/64. ``num_warps`` is the default partition's: one consumer warpgroup."""
    stages = 3
    while stages > 1 and smem_bytes(dc, dr, 128, stages) > SMEM_BYTES:
        stages -= 1
    return TileConfig(BLOCK_M, 128, 4, stages)


@functools.lru_cache(maxsize=None)
def _tile_blocks(d0: int, d1: int, dr_p: int, block_n: int) -> tuple:
    """(element type, TMA block, shared layout) of the five tiles of a key set, in the kernel's order: key-row
    pieces k0, k1, rope (keys x columns) and value pieces v0, v1 (latent columns x keys, token-last). Cached:
    building the layouts was a third of the host time of a call (measured on the GPU machine)."""
    blocks = [(gl.int8, [block_n, d0]), (gl.int8, [block_n, d1]), (gl.int8, [block_n, dr_p]),
              (gl.float8e4nv, [d0, block_n]), (gl.float8e4nv, [d1, block_n])]
    return tuple((dtype, block, gl.NVMMASharedLayout.get_default_for(block, dtype)) for dtype, block in blocks)


def _key_descriptors(lat: Latent8, dc: int, groups: int, dr: int, d0: int, d1: int, dr_p: int,
                     block_n: int) -> tuple[list, int]:
    """2-D TMA descriptors of one key set (``_tile_blocks``' order) over its batch-flattened rows, and the row
    pitch of one batch entry in the key rows. Rows past a batch entry's n belong to the next entry (or read as
    zeros past the tensor): the consumers mask every key outside the range, and P is 0 there."""
    k, v = lat.k, lat.v
    b, n, _ = k.shape
    if k.stride(2) != 1 or k.stride(0) % k.stride(1) or v.stride(2) != 1 or v.stride(0) != dc * v.stride(1):
        raise ValueError(f"warp-specialised 8-bit attention: key rows need a row pitch dividing the batch pitch and "
                         f"values [B, dc, n] with rows of one entry adjacent, got strides {k.stride()} / {v.stride()}")
    if dc % ALIGN or dr % ALIGN:
        raise ValueError(f"warp-specialised 8-bit attention: dc={dc} and per-group dr={dr} must be multiples of "
                         f"{ALIGN} (TMA piece offsets)")
    pitch = k.stride(0) // k.stride(1)
    rows = (b - 1) * pitch + n
    # (base, global shape) per tile; dc == D0: the second content piece is skipped (HAS1 False) and the first
    # piece's columns serve its descriptor
    sources = [(k, [rows, d0]), (k[..., d0:], [rows, dc - d0]) if dc > d0 else (k, [rows, d0]),
               (k[..., dc:], [rows, groups * dr]), (v, [b * dc, n]), (v, [b * dc, n])]
    return [TensorDescriptor(base, shape, [base.stride(-2), 1], block, layout)
            for (base, shape), (_, block, layout) in zip(sources, _tile_blocks(d0, d1, dr_p, block_n))], pitch


def attention8_ws(q8: torch.Tensor, qr8: torch.Tensor, qs8: torch.Tensor, sq: torch.Tensor, past: Latent8 | None,
                  new: Latent8, scale: float, groups: int = 1, sink_tokens: int = 0, out_dtype=torch.bfloat16,
                  config: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention8``'s contract (same operands, same outputs) on the warp-specialised Gluon kernel; Hopper
    GPUs only."""
    if gluon is None:
        raise RuntimeError("the warp-specialised 8-bit kernel needs Triton with Gluon (triton >= 3.5)")
    if not is_hopper(q8.device):
        raise RuntimeError("the warp-specialised 8-bit kernel runs on Hopper GPUs (sm_90) only; "
                           "latent_attention_fp8.attention8 serves other devices")
    b, l, h, dc = q8.shape
    dr = qr8.shape[3]
    past = check_operands8(q8, qr8, qs8, sq, past, new, groups, sink_tokens)
    check_width8(dc, q8.device)
    lp, ln = past.num_tokens, new.num_tokens
    cfg = config or default_config_ws(dc, dr)
    if cfg.block_m != BLOCK_M or smem_bytes(dc, dr, cfg.block_n, cfg.num_stages) > SMEM_BYTES:
        raise ValueError(f"warp-specialised 8-bit attention: block_m is {BLOCK_M} (two 64-row consumer warpgroups) "
                         f"and the stages must fit {SMEM_BYTES} B of shared memory, got {cfg} "
                         f"({smem_bytes(dc, dr, cfg.block_n, cfg.num_stages)} B)")
    d0, d1, dr_p = pieces8(dc, dr)
    vmax = (torch.maximum(past.vs, new.vs) if lp else new.vs).float().contiguous()
    m_tiles = triton.cdiv(l * (h // groups), BLOCK_M)
    plan = SplitPlan.make(cfg, m_tiles * b * groups, lp + ln, b, l, h, dc, q8.device, out_dtype, PROGRAMS_PER_SM8)
    kp, rows_p = _key_descriptors(past if lp else new, dc, groups, dr, d0, d1, dr_p, cfg.block_n)
    kn, rows_n = _key_descriptors(new, dc, groups, dr, d0, d1, dr_p, cfg.block_n)
    _fwd8_ws[(m_tiles, b * groups, plan.splits)](
        q8, qr8, qs8, sq, *kp, *kn, past.ks, past.vs, new.ks, new.vs, vmax, plan.o_buf, plan.lse_buf,
        l, lp, ln, sink_tokens, rows_p, rows_n, plan.keys_per_split, b * l * h, scale * LOG2E,
        H=h, G=groups, DC=dc, DRR=dr, D0=d0, D1=d1, DR=dr_p, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages,
        SPLITS=plan.splits, HAS1=dc > d0, num_warps=4, maxnreg=MAX_REGS)
    return plan.finish()


# ----------------------------------------------------------------------------------------------
# Compile report (no GPU needed): what ptxas makes of the kernel for sm_90a
# ----------------------------------------------------------------------------------------------
def compile_report(dc: int = 160, dr: int = 64, groups: int = 1, heads: int = 12, splits: int = 2,
                   config: TileConfig | None = None) -> dict:
    """Compile the kernel for sm_90a on any machine (``compile_sm90``): registers, spills, shared memory,
    SASS opcode counts and text."""
    if config is None:
        isolated = in_clean_process(__name__, "compile_report", dc=dc, dr=dr, groups=groups, heads=heads,
                                    splits=splits)
        if isolated is not None:
            return isolated
    cfg = config or default_config_ws(dc, dr)
    d0, d1, dr_p = pieces8(dc, dr)
    names = {gl.int8: "i8", gl.float8e4nv: "fp8e4nv"}
    descs = {}
    for key in ("p", "n"):
        for piece, (dtype, block, layout) in zip(("k{}0", "k{}1", "k{}r", "v{}0", "v{}1"),
                                                 _tile_blocks(d0, d1, dr_p, cfg.block_n)):
            descs[piece.format(key)] = desc_type(names[dtype], block, layout)
    ptrs = {n: "*i8" for n in ("q_ptr", "qr_ptr", "qs_ptr")}
    ptrs.update({n: "*fp32" for n in ("sq_ptr", "ksp_ptr", "vsp_ptr", "ksn_ptr", "vsn_ptr", "vmax_ptr", "lse_ptr")})
    ptrs["o_ptr"] = "*fp32" if splits > 1 else "*bf16"
    const = dict(H=heads, G=groups, DC=dc, DRR=dr, D0=d0, D1=d1, DR=dr_p, BLOCK_N=cfg.block_n,
                 STAGES=cfg.num_stages, SPLITS=splits, HAS1=dc > d0)
    return compile_sm90(_fwd8_ws, ptrs, descs, const)
