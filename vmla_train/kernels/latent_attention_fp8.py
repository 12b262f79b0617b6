"""8-bit latent attention (Hopper): int8 Q.K^T and fp8 (e4m3) P.V, fp32 accumulation.

The same function as ``latent_attention.reference`` (notation there), on 8-bit operands:

- **Key rows** ``krow_j = [s_j c_j ; s_j RoPE(g_r kr_j)]`` (the absorbed path's MQA key, all RoPE groups side
  by side, width ``dc + G dr``): int8 with one fp32 scale per sequence, ``ks = amax / 127`` (per tensor, as
  serving stacks scale fp8 KV caches). The key-norm scalar ``s`` is folded in, so a score needs no per-key
  factor at all: the int32 dot times a per-row scale, one FMA with the int->float conversion's offset. A
  per-token scale measured 12 % slower (a per-column vector of 32 registers a thread at 128-key tiles and a
  multiply per score) for the same error on layer activations (6.1e-3 vs 6.3e-3) and less error with a x4
  sharpened softmax (4.0e-2 vs 5.2e-2; benchmarks/NOTES-kernel.md). int8 beats e4m3 here:
  Gaussian-like rows keep 0.7 % rms error per element in int8 against 2.6 % in e4m3, and logit errors are
  what a sharp softmax amplifies.
- **Values** ``c_j``: e4m3 with one scale per sequence ``vs = amax / 448`` (e4m3 is a float: its 3 mantissa
  bits hold each token's relative precision at any magnitude, so a per-token scale buys nothing and cost a
  per-column vector and a multiply per score), stored transposed [B, dc, n] (fp8 wgmma wants both operands
  K-major). P is scaled into e4m3's normal range: ``P8_ij = e4m3(p_ij * 256 vs / vmax)`` with the key set's
  ``vs`` and the larger of the two sets' ``vmax``, folded into the exponent (``exp2(y - m + log2 f)``), so it
  costs no multiply; ``o = acc vmax / (256 l)``.
- **Queries** ``[q_lat ; q_r]`` (``q_lat = (g_n W_uk)^T q_c``): int8 with one scale per (token, head) row,
  made in one kernel with the absorption GEMM (``quantize_queries``).

Operand formats and quantisers in plain torch: ``quant8`` (``quantize_keys``, ``Latent8``). The 8-bit cache
(``cache.dtype=8bit``, ``kv_cache.Latent8Layout``) stores exactly these per token, written once: ``dc + G dr``
int8 (padded to 16 bytes) + ``dc`` e4m3 = 384 bytes at 160/64 against 448 for the bf16 latent cache (-14 %: the
latent is stored twice, once inside the key rows) and 6144 for Wan MHA in bf16 (-93.75 %), plus one key and one
value scale per layer and batch row, raised (and the layer requantised) when a chunk outgrows them. With a
16-bit cache (``attention.impl=fused_8bit``) ``kernels.dispatch`` quantises each layer's prefix once per cache
state and keeps that copy until the layer's next write (``KVCache.memo``); the benchmark's ``fused_8bit``
variant quantises it once, as a cache write would. The 8-bit cache rotates the key rows once, at the frame's
**absolute** position. With ``position_scheme=relative`` the window's keys sit at ``absolute - shift`` while the
sinks sit at their absolute positions, so the kernel takes two rotated query RoPE parts: ``qr_sink`` (scheme
positions) for the first ``sink_tokens`` keys of the prefix and ``qr`` (absolute positions) for all others; RoPE
sees only position differences, so both give the scheme's scores exactly (``dispatch``, the 8-bit cache path).

Kernel layout as the bf16 kernel: the REP heads of a RoPE group folded into M, key tiles fetched by TMA
(host-made Hopper tensor descriptors; pointer loads in the CPU interpreter), value tiles through pointers
(see ``_pv8``), the content dot split in power-of-two pieces >= 32 (the 8-bit wgmma K step), key-range
splits planned and merged by ``latent_attention.SplitPlan``. Key tiles start at multiples of BLOCK_N (segment
edges masked in a head and a tail tile), so value tiles load as aligned 16-byte asynchronous copies.
"""

from __future__ import annotations

import torch

from .latent_attention import LOG2E, SplitPlan, TileConfig, interpreting, triton
from .quant8 import ALIGN, FP8, Latent8, quantize_keys, round_up

if triton is not None:
    import triton.language as tl

P_RANGE = 256.0  # P's largest entry (p = 1 of the set with the larger value scale) in e4m3 (max 448)
QUANT_BLOCK_K = 64  # dn piece of the query absorption GEMM: fp32 operands of dn = 256 asked 256 KB of shared memory


def _pow2(n: int, lo: int = 32) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def pieces8(dc: int, dr: int) -> tuple[int, int, int]:
    """(D0, D1, DR): dc = D0 + (<= D1), powers of two >= 32 (the 8-bit MMA K step); DR = dr padded."""
    d0 = max(32, 1 << (max(dc - 1, 1).bit_length() - 1))
    return d0, _pow2(max(dc - d0, 1)), _pow2(dr)


if triton is not None:

    @triton.jit
    def _quant_queries(qc_ptr, w_ptr, qr_ptr, qs_ptr, q8_ptr, qr8_ptr, qs8_ptr, sq_ptr, L,
                       sqc_b, sqc_l, sqc_h, sw_h, sw_n, sqr_b, sqr_l, sqr_h, sqs_b, sqs_l, sqs_h,
                       H: tl.constexpr, DN: tl.constexpr, DNP: tl.constexpr, DC: tl.constexpr, D0: tl.constexpr,
                       D1: tl.constexpr, DRR: tl.constexpr, DR: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        """q_lat = q_c,h @ W_h (W = g_n W_uk as [H, dn, dc]) and the two rotated RoPE parts, int8 with one
        scale per (token, head) row over all three, in the GEMM's epilogue. Outputs [B, L, H, *]."""
        pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tok = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        tmask = tok < L
        offs_0 = tl.arange(0, D0)
        offs_1 = D0 + tl.arange(0, D1)
        a0 = tl.zeros([BLOCK_M, D0], tl.float32)
        a1 = tl.zeros([BLOCK_M, D1], tl.float32)
        for k in tl.static_range(0, DNP, BLOCK_K):  # dn in pieces: fp32 operands of a wide dn fit shared memory
            offs_n = k + tl.arange(0, BLOCK_K)
            qc = tl.load(qc_ptr + b * sqc_b + tok[:, None] * sqc_l + h * sqc_h + offs_n[None, :],
                         mask=tmask[:, None] & (offs_n[None, :] < DN), other=0.0)
            w_row = w_ptr + h * sw_h + offs_n[:, None] * sw_n
            nmask = offs_n[:, None] < DN
            w0 = tl.load(w_row + offs_0[None, :], mask=nmask & (offs_0[None, :] < DC), other=0.0)
            w1 = tl.load(w_row + offs_1[None, :], mask=nmask & (offs_1[None, :] < DC), other=0.0)
            a0 = tl.dot(qc, w0.to(qc.dtype), a0)
            a1 = tl.dot(qc, w1.to(qc.dtype), a1)
        offs_r = tl.arange(0, DR)
        rmask = tmask[:, None] & (offs_r[None, :] < DRR)
        qr = tl.load(qr_ptr + b * sqr_b + tok[:, None] * sqr_l + h * sqr_h + offs_r[None, :], mask=rmask,
                     other=0.0).to(tl.float32)
        qs = tl.load(qs_ptr + b * sqs_b + tok[:, None] * sqs_l + h * sqs_h + offs_r[None, :], mask=rmask,
                     other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(a0), 1), tl.max(tl.abs(a1), 1))
        amax = tl.maximum(amax, tl.maximum(tl.max(tl.abs(qr), 1), tl.max(tl.abs(qs), 1)))
        sq = tl.where(amax > 0, amax / 127.0, 1.0)
        inv = 1.0 / sq[:, None]
        row = (b * L + tok) * H + h
        q8_row = q8_ptr + row * DC
        tl.store(q8_row[:, None] + offs_0[None, :], tl.floor(a0 * inv + 0.5).to(tl.int8),
                 mask=tmask[:, None] & (offs_0[None, :] < DC))
        tl.store(q8_row[:, None] + offs_1[None, :], tl.floor(a1 * inv + 0.5).to(tl.int8),
                 mask=tmask[:, None] & (offs_1[None, :] < DC))
        tl.store(qr8_ptr + row[:, None] * DRR + offs_r[None, :], tl.floor(qr * inv + 0.5).to(tl.int8), mask=rmask)
        tl.store(qs8_ptr + row[:, None] * DRR + offs_r[None, :], tl.floor(qs * inv + 0.5).to(tl.int8), mask=rmask)
        tl.store(sq_ptr + row, sq, mask=tmask)

    @triton.jit
    def _e4m3_round(x):
        """Round x >= 0 to the nearest e4m3 value (3 mantissa bits, subnormals below 2^-6), in fp32 arithmetic."""
        e = tl.maximum(tl.floor(tl.math.log2(tl.maximum(x, 1e-30))), -6.0)
        ulp = tl.math.exp2(e - 3.0)
        return tl.floor(x / ulp + 0.5) * ulp

    ALIGN8 = tl.constexpr(ALIGN)
    P_RANGE8 = tl.constexpr(P_RANGE)

    @triton.jit
    def _qk8(q0, q1, qr, b, g, k_ptr, s_kn, k0_d, k1_d, kr_d, start, lo, hi, DC: tl.constexpr, DRR: tl.constexpr,
             KR_OFF, D0: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, BLOCK_N: tl.constexpr, DESC: tl.constexpr):
        """int32 scores of the key tile [start, start + BLOCK_N) (``start`` a multiple of BLOCK_N)."""
        start = tl.multiple_of(start, BLOCK_N)
        if DESC:  # host-made TMA descriptors over [B, n, *] (batch index b)
            k0 = k0_d.load([b, start, 0]).reshape(BLOCK_N, D0)  # int8
            k1 = k1_d.load([b, start, 0]).reshape(BLOCK_N, D1)
            kr = kr_d.load([b, start, g, 0]).reshape(BLOCK_N, DR)
        else:  # pointer loads (the CPU interpreter)
            offs_n = start + tl.arange(0, BLOCK_N)
            offs_0 = tl.arange(0, D0)
            offs_1 = D0 + tl.arange(0, D1)
            offs_r = tl.arange(0, DR)
            km = ((offs_n >= lo) & (offs_n < hi))[:, None]
            k_row = k_ptr + offs_n[:, None] * s_kn
            k0 = tl.load(k_row + offs_0[None, :], mask=km & (offs_0[None, :] < DC), other=0)
            k1 = tl.load(k_row + offs_1[None, :], mask=km & (offs_1[None, :] < DC), other=0)
            kr = tl.load(k_row + KR_OFF + offs_r[None, :], mask=km & (offs_r[None, :] < DRR), other=0)
        qk = tl.dot(q0, tl.trans(k0), out_dtype=tl.int32)
        qk = tl.dot(q1, tl.trans(k1), qk, out_dtype=tl.int32)
        return tl.dot(qr, tl.trans(kr), qk, out_dtype=tl.int32)

    @triton.jit
    def _pv8(acc0, acc1, m_i, l_i, qk, rs, v_ptr, s_vd, ks, lfac, ifac, start, lo, hi, DC: tl.constexpr,
             D0: tl.constexpr, D1: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, COMPILED: tl.constexpr,
             MAGIC: tl.constexpr):
        """The online-softmax step of the key tile at ``start`` (a multiple of BLOCK_N: the value tiles' pointer
        loads then vectorise into 16-byte asynchronous copies; an unaligned start made them byte loads through
        registers) given its int32 scores; keys outside [lo, hi) masked if MASK. P leaves the exponent scaled by
        f = 2^lfac (the key set's value scale, see the module doc); l sums unscaled p (ifac = 1 / f)."""
        start = tl.multiple_of(start, BLOCK_N)
        offs_n = start + tl.arange(0, BLOCK_N)
        kmask = (offs_n >= lo) & (offs_n < hi)
        offs_0 = tl.arange(0, D0)
        offs_1 = D0 + tl.arange(0, D1)
        # The e4m3 value tiles through pointers: TMA-loaded ones (device- or host-made descriptors) feeding the
        # fp8 wgmma raised illegal-instruction faults on the H100 under Triton 3.6 (benchmarks/NOTES-kernel.md).
        v0_ptr = v_ptr + offs_0[:, None] * s_vd + offs_n[None, :]
        v1_ptr = v_ptr + offs_1[:, None] * s_vd + offs_n[None, :]
        if MASK or D0 + D1 > DC:  # whole 16-byte columns (finite zero padding past n, see quantize_keys): P is 0 there
            vm = (offs_n < (hi + ALIGN8 - 1) // ALIGN8 * ALIGN8)[None, :]
            v0 = tl.load(v0_ptr, mask=vm & (offs_0[:, None] < DC), other=0.0)
            v1 = tl.load(v1_ptr, mask=vm & (offs_1[:, None] < DC), other=0.0)
        else:
            v0 = tl.load(v0_ptr)
            v1 = tl.load(v1_ptr)
        rs = rs * ks  # the key set's scale
        if MAGIC:  # int32 -> fp32 bits + 2^23 + 2^22 by an integer add; the offset folds into the row term
            y = (qk + 0x4B400000).to(tl.float32, bitcast=True)
            off = 12582912.0
        else:
            y = qk.to(tl.float32)
            off = 0.0
        if MASK:
            y = tl.where(kmask[None, :], y, float("-inf"))
        m_new = tl.maximum(m_i, (tl.max(y, 1) - off) * rs)  # rs > 0: q scale * k scale * softmax scale (log2)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(y * rs[:, None] - (m_new - lfac + off * rs)[:, None])  # p f
        l_i = l_i * alpha + tl.sum(p, 1) * ifac
        p8 = p.to(tl.float8e4nv)
        if COMPILED:
            acc0 = tl.dot(p8, tl.trans(v0), acc0 * alpha[:, None])
            acc1 = tl.dot(p8, tl.trans(v1), acc1 * alpha[:, None])
        else:  # the interpreter's fp8 dot and fp32->e4m3 cast are not exact: e4m3 rounding emulated, fp32 dots
            p32 = _e4m3_round(p)
            acc0 = tl.dot(p32, tl.trans(v0.to(tl.float32)), acc0 * alpha[:, None])
            acc1 = tl.dot(p32, tl.trans(v1.to(tl.float32)), acc1 * alpha[:, None])
        return acc0, acc1, m_new, l_i

    @triton.jit
    def _range8(acc0, acc1, m_i, l_i, q0, q1, qr, rs, b, g, k_ptr, s_kn, v_ptr, s_vd, k0_d, k1_d, kr_d,
                ks, lfac, ifac, lo, hi,
                DC: tl.constexpr, DRR: tl.constexpr, KR_OFF, D0: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr,
                BLOCK_N: tl.constexpr, DESC: tl.constexpr, COMPILED: tl.constexpr, MAGIC: tl.constexpr):
        """Online softmax over keys [lo, hi) of one key tensor in BLOCK_N-aligned tiles: whole tiles unmasked,
        then a masked head tile when ``lo`` is not aligned (segments start at frame boundaries: sinks,
        1560-token frames) and a masked tail."""
        first = (lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        full = first + tl.maximum(hi - first, 0) // BLOCK_N * BLOCK_N
        if COMPILED:  # a for loop: Triton pipelines the loads of scf.for loops only
            for start in range(first, full, BLOCK_N):
                qk = _qk8(q0, q1, qr, b, g, k_ptr, s_kn, k0_d, k1_d, kr_d, start, lo, hi, DC, DRR, KR_OFF, D0, D1,
                          DR, BLOCK_N, DESC)
                acc0, acc1, m_i, l_i = _pv8(acc0, acc1, m_i, l_i, qk, rs, v_ptr, s_vd, ks, lfac, ifac,
                                            start, lo, hi, DC, D0, D1, BLOCK_N, False, COMPILED, MAGIC)
        else:  # the CPU interpreter cannot take a program-id-derived range() bound
            start = first
            while start < full:
                qk = _qk8(q0, q1, qr, b, g, k_ptr, s_kn, k0_d, k1_d, kr_d, start, lo, hi, DC, DRR, KR_OFF, D0, D1,
                          DR, BLOCK_N, DESC)
                acc0, acc1, m_i, l_i = _pv8(acc0, acc1, m_i, l_i, qk, rs, v_ptr, s_vd, ks, lfac, ifac,
                                            start, lo, hi, DC, D0, D1, BLOCK_N, False, COMPILED, MAGIC)
                start += BLOCK_N
        # The masked tiles after the loop (the softmax is order-free): a head tile before the loop serialised the
        # wgmma pipeline (ptxas C7515)
        if first > lo:
            qk = _qk8(q0, q1, qr, b, g, k_ptr, s_kn, k0_d, k1_d, kr_d, first - BLOCK_N, lo, hi, DC, DRR, KR_OFF, D0,
                      D1, DR, BLOCK_N, DESC)
            acc0, acc1, m_i, l_i = _pv8(acc0, acc1, m_i, l_i, qk, rs, v_ptr, s_vd, ks, lfac, ifac,
                                        first - BLOCK_N, lo, hi, DC, D0, D1, BLOCK_N, True, COMPILED, MAGIC)
        if full < hi:
            qk = _qk8(q0, q1, qr, b, g, k_ptr, s_kn, k0_d, k1_d, kr_d, full, lo, hi, DC, DRR, KR_OFF, D0, D1, DR,
                      BLOCK_N, DESC)
            acc0, acc1, m_i, l_i = _pv8(acc0, acc1, m_i, l_i, qk, rs, v_ptr, s_vd, ks, lfac, ifac,
                                        full, lo, hi, DC, D0, D1, BLOCK_N, True, COMPILED, MAGIC)
        return acc0, acc1, m_i, l_i

    @triton.jit
    def _fwd8(q_ptr, qr_ptr, qs_ptr, sq_ptr,
              kp_ptr, ksp_ptr, vp_ptr, vsp_ptr, kn_ptr, ksn_ptr, vn_ptr, vsn_ptr, vmax_ptr, o_ptr, lse_ptr,
              kp0_d, kp1_d, kpr_d, kn0_d, kn1_d, knr_d,
              skp_b, skp_n, sksp_b, svp_b, svp_d, svsp_b, skn_b, skn_n, sksn_b, svn_b, svn_d, svsn_b,
              L, Lp, Ln, Ls, keys_per_split, qk_scale,
              H: tl.constexpr, G: tl.constexpr, DC: tl.constexpr, DRR: tl.constexpr,
              D0: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, DESC: tl.constexpr,
              COMPILED: tl.constexpr):
        REP: tl.constexpr = H // G
        MAGIC: tl.constexpr = (DC + DRR) * 127 * 127 < 4194304  # |int32 dot| < 2^22: exact in the magic add
        pid_m, pid_bg, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b = pid_bg // G
        g = pid_bg % G
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < L * REP
        tok = rows // REP
        head = g * REP + rows % REP
        row = (b * L + tok) * H + head  # q8/o [B, L, H, DC], scales [B, L, H] contiguous
        offs_0 = tl.arange(0, D0)
        offs_1 = D0 + tl.arange(0, D1)
        offs_r = tl.arange(0, DR)
        q0 = tl.load(q_ptr + row[:, None] * DC + offs_0[None, :], mask=rmask[:, None] & (offs_0[None, :] < DC), other=0)
        q1 = tl.load(q_ptr + row[:, None] * DC + offs_1[None, :], mask=rmask[:, None] & (offs_1[None, :] < DC),
                     other=0)
        rm = rmask[:, None] & (offs_r[None, :] < DRR)
        qr = tl.load(qr_ptr + row[:, None] * DRR + offs_r[None, :], mask=rm, other=0)
        rs = tl.load(sq_ptr + row, mask=rmask, other=1.0) * qk_scale
        vmax = tl.load(vmax_ptr + b)
        vnorm = P_RANGE8 / vmax
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
        lo = split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, Lp + Ln)
        kr_off = DC + g * DRR
        kp = kp_ptr + b * skp_b
        vp = vp_ptr + b * svp_b
        ksp = tl.load(ksp_ptr + b * sksp_b)  # the key sets' scales
        fac_p = tl.load(vsp_ptr + b * svsp_b) * vnorm  # P's factor for the prefix's values (<= 256)
        fac_n = tl.load(vsn_ptr + b * svsn_b) * vnorm  # and for the chunk's
        lf_p, if_p = tl.math.log2(fac_p), 1.0 / fac_p
        lf_n, if_n = tl.math.log2(fac_n), 1.0 / fac_n
        if tl.minimum(hi, Ls) > lo:  # the sinks' keys: rotated at the scheme's positions, like qr_sink
            qs = tl.load(qs_ptr + row[:, None] * DRR + offs_r[None, :], mask=rm, other=0)
            acc0, acc1, m_i, l_i = _range8(acc0, acc1, m_i, l_i, q0, q1, qs, rs, b, g, kp, skp_n, vp, svp_d,
                                           kp0_d, kp1_d, kpr_d, ksp, lf_p, if_p, lo, tl.minimum(hi, Ls),
                                           DC, DRR, kr_off, D0, D1, DR, BLOCK_N, DESC, COMPILED, MAGIC)
        lo_p = tl.maximum(lo, Ls)
        hi_p = tl.minimum(hi, Lp)
        if hi_p > lo_p:  # the rest of the cached prefix
            acc0, acc1, m_i, l_i = _range8(acc0, acc1, m_i, l_i, q0, q1, qr, rs, b, g, kp, skp_n, vp, svp_d,
                                           kp0_d, kp1_d, kpr_d, ksp, lf_p, if_p, lo_p, hi_p,
                                           DC, DRR, kr_off, D0, D1, DR, BLOCK_N, DESC, COMPILED, MAGIC)
        lo_n = tl.maximum(lo - Lp, 0)
        hi_n = tl.maximum(hi - Lp, 0)
        if hi_n > lo_n:  # the current chunk
            acc0, acc1, m_i, l_i = _range8(acc0, acc1, m_i, l_i, q0, q1, qr, rs, b, g, kn_ptr + b * skn_b, skn_n,
                                           vn_ptr + b * svn_b, svn_d, kn0_d, kn1_d, knr_d,
                                           tl.load(ksn_ptr + b * sksn_b), lf_n, if_n, lo_n, hi_n,
                                           DC, DRR, kr_off, D0, D1, DR, BLOCK_N, DESC, COMPILED, MAGIC)
        has = l_i > 0
        l_safe = tl.where(has, l_i, 1.0)
        lse = tl.where(has, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, float("-inf"))
        inv = 1.0 / (l_safe * vnorm)
        o0 = acc0 * inv[:, None]
        o1 = acc1 * inv[:, None]
        if SPLITS == 1:
            tl.store(o_ptr + row[:, None] * DC + offs_0[None, :], o0.to(o_ptr.dtype.element_ty),
                     mask=rmask[:, None] & (offs_0[None, :] < DC))
            tl.store(o_ptr + row[:, None] * DC + offs_1[None, :], o1.to(o_ptr.dtype.element_ty),
                     mask=rmask[:, None] & (offs_1[None, :] < DC))
            tl.store(lse_ptr + row, lse, mask=rmask)
        else:  # fp32 partials [SPLITS, B*L*H, DC] and [SPLITS, B*L*H]
            n_rows = tl.num_programs(1) // G * L * H
            o_row = o_ptr + (split * n_rows + row) * DC
            tl.store(o_row[:, None] + offs_0[None, :], o0, mask=rmask[:, None] & (offs_0[None, :] < DC))
            tl.store(o_row[:, None] + offs_1[None, :], o1, mask=rmask[:, None] & (offs_1[None, :] < DC))
            tl.store(lse_ptr + split * n_rows + row, lse, mask=rmask)


# ----------------------------------------------------------------------------------------------
# Quantisers
# ----------------------------------------------------------------------------------------------
def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("8-bit latent attention needs Triton (attention.impl=absorbed works without it)")


MAX_DC8 = 256  # widest latent the GPU kernels take: measured, dc = 512 asks 590 KB of shared memory


def check_width8(dc: int, device: torch.device) -> None:
    if device.type == "cuda" and dc > MAX_DC8:  # measured: dc = 512 asks 590 KB of shared memory (H100: 227 KB)
        raise ValueError(f"8-bit latent attention on the GPU takes dc <= {MAX_DC8}, got dc={dc} "
                         "(attention.impl=fused or absorbed serve wider latents)")


def quantize_queries(q_c: torch.Tensor, w_uk: torch.Tensor, q_r: torch.Tensor, q_r_sink: torch.Tensor | None = None):
    """(q8 [B, L, H, dc] int8, qr8, qr_sink8 [B, L, H, dr] int8, scale [B, L, H] fp32) from q_c [B, L, H, dn],
    w_uk [H, dn, dc] (gain folded) and the rotated RoPE parts [B, L, H, dr], in one kernel."""
    _need_triton()
    b, l, h, dn = q_c.shape
    dc, dr = w_uk.shape[2], q_r.shape[3]
    check_width8(dc, q_c.device)
    q_r_sink = q_r if q_r_sink is None else q_r_sink
    q_c, q_r, q_r_sink = (t if t.stride(3) == 1 else t.contiguous() for t in (q_c, q_r, q_r_sink))
    w = w_uk.to(q_c.dtype).contiguous()
    d0, d1, dr_p = pieces8(dc, dr)
    q8 = torch.empty(b, l, h, dc, device=q_c.device, dtype=torch.int8)
    qr8 = torch.empty(b, l, h, dr, device=q_c.device, dtype=torch.int8)
    qs8 = torch.empty_like(qr8)
    sq = torch.empty(b, l, h, device=q_c.device, dtype=torch.float32)
    bm = 16 if interpreting() else 64
    dnp = _pow2(dn, 16)
    _quant_queries[(triton.cdiv(l, bm), h, b)](
        q_c, w, q_r, q_r_sink, q8, qr8, qs8, sq, l, q_c.stride(0), q_c.stride(1), q_c.stride(2), w.stride(0), w.stride(1),
        q_r.stride(0), q_r.stride(1), q_r.stride(2), q_r_sink.stride(0), q_r_sink.stride(1), q_r_sink.stride(2),
        H=h, DN=dn, DNP=dnp, DC=dc, D0=d0, D1=d1, DRR=dr, DR=dr_p, BLOCK_M=bm, BLOCK_K=min(dnp, QUANT_BLOCK_K),
        num_warps=4)
    return q8, qr8, qs8, sq


# ----------------------------------------------------------------------------------------------
# Kernel wrapper
# ----------------------------------------------------------------------------------------------
def default_config8(dc: int, on_gpu: bool) -> TileConfig:
    if not on_gpu:
        return TileConfig(16, 32, 1, 1)  # interpreter: small tiles, 32-key steps (the 8-bit K step)
    # H100 sweep at 4680 queries x 21 (+ 3) frames (benchmarks/NOTES-kernel.md): 128x128 / 8 warps / 3 stages
    # with 3 key splits 2.18 ms (2.02 without sinks) against 2.30-2.40 for 64x64 / 4 warps / 3 stages and
    # 2.5-2.7 for 128x64 and 64x128. dc <= 256 on the GPU.
    return TileConfig(128, 128, 8, 3)


# Programs per SM that the automatic key split aims at: the 128x128 / 8-warp tile holds one CTA per SM (255
# registers a thread); 3 splits of its 439 tiles at 4680 queries (~10 per SM) beat 2, 4 and 5 (H100).
PROGRAMS_PER_SM8 = 9


def _descriptors(lat: Latent8, dc: int, groups: int, dr: int, d0: int, d1: int, dr_p: int, block_n: int) -> list:
    """Host-made TMA descriptors of one key set's int8 rows: content pieces [B, n, D0] / [B, n, dc - D0] and the
    RoPE part [B, n, G, dr]; rows and columns past a tensor's end read as zeros."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if lat.num_tokens == 0:  # descriptors need a non-empty shape; the kernel reads no key of an empty set
        z8 = torch.zeros(lat.k.shape[0], 1, lat.k.shape[2], device=lat.k.device, dtype=torch.int8)
        lat = Latent8(z8, lat.ks, lat.v, lat.vs)
    if lat.k.data_ptr() % ALIGN or any(st % ALIGN for st in lat.k.stride()[:-1]):
        raise ValueError(f"8-bit latent attention: key rows need 16-byte aligned bases and row strides, got strides "
                         f"{lat.k.stride()}; build them with quantize_keys")
    if dc % ALIGN or dr % ALIGN or dc < d0:
        raise ValueError(f"8-bit latent attention on the GPU: dc={dc} (>= {d0}) and per-group dr={dr} must be "
                         f"multiples of {ALIGN}")
    k = lat.k
    rope = k[..., dc: dc + groups * dr].unflatten(-1, (groups, dr))
    # dc == D0 (dc = 32): no second content piece; its dot multiplies the queries' zero padding, so any int8
    # columns serve as its keys
    k1 = k[..., d0:dc] if dc > d0 else k[..., :d1]
    return [TensorDescriptor.from_tensor(k[..., :d0], [1, block_n, d0]),
            TensorDescriptor.from_tensor(k1, [1, block_n, d1]),
            TensorDescriptor.from_tensor(rope, [1, block_n, 1, dr_p])]


def check_operands8(q8: torch.Tensor, qr8: torch.Tensor, qs8: torch.Tensor, sq: torch.Tensor, past: Latent8 | None,
                    new: Latent8, groups: int, sink_tokens: int) -> Latent8:
    """Shape, dtype and layout checks of the 8-bit kernels' operands (``attention8``'s doc); returns ``past``
    (an empty key set when None)."""
    b, l, h, dc = q8.shape
    dr = qr8.shape[3]
    if past is None:
        past = Latent8(new.k[:, :0], new.ks, new.v[:, :, :0], new.vs)
    ln = new.num_tokens
    for name, lat in (("past", past), ("new", new)):
        n = lat.num_tokens
        if (lat.k.shape[0] != b or lat.k.shape[2] < dc + groups * dr or lat.ks.shape != (b,)
                or lat.v.shape != (b, dc, n) or lat.vs.shape != (b,) or lat.k.dtype != torch.int8 or lat.v.dtype != FP8):
            raise ValueError(f"8-bit latent attention: {name} keys must be int8 [B={b}, n, >= {dc + groups * dr}] with "
                             f"e4m3 values [B, dc={dc}, n], got k {tuple(lat.k.shape)} {lat.k.dtype}, "
                             f"v {tuple(lat.v.shape)} {lat.v.dtype}")
        if n and (lat.v.stride(1) % ALIGN or lat.v.stride(1) < round_up(n, ALIGN)):
            raise ValueError(f"8-bit latent attention: {name} values need a row stride that is a multiple of {ALIGN} "
                             f"and >= {round_up(n, ALIGN)} (zero padding), got {lat.v.stride(1)}; build them with "
                             "quantize_keys")
    if h % groups or qr8.shape != (b, l, h, dr) or qs8.shape != qr8.shape or sq.shape != (b, l, h):
        raise ValueError(f"8-bit latent attention: queries [B, L, H, dc] / [B, L, H, dr] / scales [B, L, H] with H a "
                         f"multiple of {groups} groups expected, got {tuple(q8.shape)} / {tuple(qr8.shape)} / "
                         f"{tuple(sq.shape)}")
    if ln < 1:
        raise ValueError("8-bit latent attention: the current chunk has no keys")
    if not 0 <= sink_tokens <= past.num_tokens:
        raise ValueError(f"8-bit latent attention: sink_tokens={sink_tokens} outside the {past.num_tokens} cached keys")
    return past


def attention8(q8: torch.Tensor, qr8: torch.Tensor, qs8: torch.Tensor, sq: torch.Tensor, past: Latent8 | None,
               new: Latent8, scale: float, groups: int = 1, sink_tokens: int = 0, out_dtype=torch.bfloat16,
               config: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit kernel on quantised operands: queries from ``quantize_queries``, keys ``past`` (e.g. an 8-bit
    cache prefix) then ``new``; ``qs8`` serves the first ``sink_tokens`` keys of ``past``, ``qr8`` the rest.
    Returns (o_lat [B, L, H, dc] in ``out_dtype``, lse [B, L, H] float32)."""
    _need_triton()
    b, l, h, dc = q8.shape
    dr = qr8.shape[3]
    past = check_operands8(q8, qr8, qs8, sq, past, new, groups, sink_tokens)
    lp, ln = past.num_tokens, new.num_tokens
    lk = lp + ln
    on_gpu = q8.is_cuda
    check_width8(dc, q8.device)
    cfg = config or default_config8(dc, on_gpu)
    d0, d1, dr_p = pieces8(dc, dr)
    vmax = (torch.maximum(past.vs, new.vs) if lp else new.vs).float().contiguous()  # [B]
    m_tiles = triton.cdiv(l * (h // groups), cfg.block_m)
    plan = SplitPlan.make(cfg, m_tiles * b * groups, lk, b, l, h, dc, q8.device, out_dtype, PROGRAMS_PER_SM8)
    compiled = on_gpu and not interpreting()
    if compiled:
        descs = _descriptors(past, dc, groups, dr, d0, d1, dr_p, cfg.block_n) + \
            _descriptors(new, dc, groups, dr, d0, d1, dr_p, cfg.block_n)
    else:  # the interpreter loads through pointers
        descs = [past.k] * 3 + [new.k] * 3
    _fwd8[(m_tiles, b * groups, plan.splits)](
        q8, qr8, qs8, sq, past.k, past.ks, past.v, past.vs, new.k, new.ks, new.v, new.vs, vmax, plan.o_buf,
        plan.lse_buf, *descs,
        past.k.stride(0), past.k.stride(1), past.ks.stride(0), past.v.stride(0), past.v.stride(1), past.vs.stride(0),
        new.k.stride(0), new.k.stride(1), new.ks.stride(0), new.v.stride(0), new.v.stride(1), new.vs.stride(0),
        l, lp, ln, sink_tokens, plan.keys_per_split, scale * LOG2E,
        H=h, G=groups, DC=dc, DRR=dr, D0=d0, D1=d1, DR=dr_p, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        SPLITS=plan.splits, DESC=compiled, COMPILED=compiled, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return plan.finish()


# ----------------------------------------------------------------------------------------------
# References, test and benchmark hooks (STYLE 7)
# ----------------------------------------------------------------------------------------------
def reference8(q_lat: torch.Tensor, q_r: torch.Tensor, q_r_sink: torch.Tensor, krow: torch.Tensor, c: torch.Tensor,
               scale: float, groups: int, sink_tokens: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit kernel's function in ``dtype`` on given operands: keys ``krow`` [B, Lk, dc + G dr] (sinks
    first), values ``c`` [B, Lk, dc]; ``q_r_sink`` scores keys [0, sink_tokens), ``q_r`` the rest.
    Returns (o_lat [B, L, H, dc], lse [B, L, H])."""
    dc, dr, h = c.shape[2], q_r.shape[3], q_lat.shape[2]
    rep = h // groups
    kc = krow[..., :dc].to(dtype)
    rho = krow[..., dc: dc + groups * dr].to(dtype).unflatten(-1, (groups, dr)).repeat_interleave(rep, dim=2)
    scores = []
    for lo, hi, qr in ((0, sink_tokens, q_r_sink), (sink_tokens, krow.shape[1], q_r)):
        if hi > lo:
            sc = torch.einsum("blhc,bkc->bhlk", q_lat.to(dtype), kc[:, lo:hi])
            scores.append((sc + torch.einsum("blhr,bkhr->bhlk", qr.to(dtype), rho[:, lo:hi])) * scale)
    sc = torch.cat(scores, -1)  # (B, H, L, Lk)
    o = torch.einsum("bhlk,bkc->blhc", torch.softmax(sc, -1), c.to(dtype))
    return o, torch.logsumexp(sc, -1).transpose(1, 2)


def random_inputs8(b: int, l: int, h: int, dc: int, dr: int, lp: int, groups: int = 1, sink_tokens: int = 0,
                   device="cpu", seed: int = 0, q_gain: float = 1.0, d_n: int = 128) -> dict:
    """Fresh random float inputs of the 8-bit path: q_lat, q_r, q_r_sink [B, L, H, *], key rows and latents of
    the prefix and the chunk (krow = [s c ; s rho] as the model builds them), scale."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=gen) * std).to(device)  # noqa: E731
    ln = l
    c = rnd(b, lp + ln, dc)
    s = (0.5 + torch.rand(b, lp + ln, 1, generator=gen)).to(device)
    krow = torch.cat([c * s, rnd(b, lp + ln, groups * dr) * s], -1)
    return dict(q_lat=rnd(b, l, h, dc, std=q_gain), q_r=rnd(b, l, h, dr, std=q_gain),
                q_r_sink=rnd(b, l, h, dr, std=q_gain), krow=krow, c=c, lp=lp, groups=groups,
                sink_tokens=sink_tokens, scale=(d_n + dr) ** -0.5)


def run8(x: dict, config: TileConfig | None = None, dtype=torch.bfloat16,
         kernel=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``random_inputs8``'s operands (identity absorption) and run ``kernel`` (default ``attention8``;
    ``latent_attention_ws.attention8_ws`` takes the same operands)."""
    lp = x["lp"]
    q_lat = x["q_lat"].to(dtype)
    h, dc = q_lat.shape[2], q_lat.shape[3]
    eye = torch.eye(dc, device=q_lat.device, dtype=dtype).expand(h, dc, dc)
    q8, qr8, qs8, sq = quantize_queries(q_lat, eye, x["q_r"].to(dtype), x["q_r_sink"].to(dtype))
    krow, c = x["krow"].to(dtype), x["c"].to(dtype)
    past = quantize_keys(krow[:, :lp], c[:, :lp]) if lp else None
    new = quantize_keys(krow[:, lp:], c[:, lp:])
    return (kernel or attention8)(q8, qr8, qs8, sq, past, new, x["scale"], x["groups"], x["sink_tokens"],
                                  out_dtype=torch.float32, config=config)


def check8(x: dict, config: TileConfig | None = None, dtype=torch.bfloat16,
           rows: torch.Tensor | None = None) -> tuple[float, float]:
    """Relative errors (o, lse) of the 8-bit path against the float64 reference on the unquantised inputs
    (over query tokens ``rows`` only, if given: the reference is dense)."""
    o, lse = run8(x, config, dtype)
    sel = (lambda t: t[:, rows]) if rows is not None else (lambda t: t)  # noqa: E731
    o_ref, lse_ref = reference8(sel(x["q_lat"]), sel(x["q_r"]), sel(x["q_r_sink"]), x["krow"], x["c"], x["scale"],
                                x["groups"], x["sink_tokens"])
    err = lambda a, r: float((a.double() - r).norm() / r.norm())  # noqa: E731
    return err(sel(o), o_ref), err(sel(lse), lse_ref)
