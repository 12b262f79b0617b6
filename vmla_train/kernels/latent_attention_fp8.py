"""8-bit latent attention (Hopper fp8 e4m3): both matmuls in 8 bits, fp32 accumulation.

Scheme (the same function as ``latent_attention.reference``; notation there):

- Latent ``c``: e4m3 with one fp32 scale per token (``sc_j = amax_j / 448``), stored twice: row-major
  [B, n, dc] for Q.K^T and transposed [B, dc, n] for P.V (fp8 wgmma wants both operands K-major). An
  8-bit cache writes both once per token (``quantize_latent``); per call only the current chunk is.
- Queries: ``q_lat = (g_n W_uk)^T q_c`` is computed and quantised in one kernel (``absorb_quantize_q``),
  one scale per (token, head) row; ``q_r`` gets its own row scale in the same kernel.
- RoPE key: ``rho = RoPE(g_r kr)`` is rotated at read time (positions change), then quantised per
  (key, group) with its own scale, so the small-magnitude rotary part keeps its relative accuracy
  instead of sharing the content scale. Two fp32 score accumulators (content, rope) take the two
  scale pairs: ``score = (S_c * sq_i * sc_j + S_r * sqr_i * srho_j) * s_j * scale``.
- P.V: ``p_ij * sc_j`` is scaled into e4m3's range with one per-call power ``vs = 256 / max_j sc_j``
  (a device scalar: no host sync), so the per-token V scale folds into P exactly; ``o = acc / (l vs)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .latent_attention import LOG2E, TileConfig, _interpreting, choose_splits, triton

if triton is not None:
    import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@dataclass
class QuantLatent:
    """An e4m3 latent with per-token scales: ``c8`` [B, n, dc], ``c8t`` [B, dc, n], ``scale`` [B, n]."""

    c8: torch.Tensor
    c8t: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.c8.float() * self.scale[..., None]


def _pow2(n: int, lo: int = 32) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def _pieces8(dc: int, dr: int) -> tuple[int, int, int]:
    d0 = max(32, 1 << (max(dc - 1, 1).bit_length() - 1))
    return d0, _pow2(max(dc - d0, 1)), _pow2(dr)


if triton is not None:

    @triton.jit
    def _quant_rows(x_ptr, y_ptr, yt_ptr, sc_ptr, N, sx_b, sx_n, sy_b, syt_b, syt_d,
                    D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, TRANSPOSE: tl.constexpr):
        """Per-row e4m3 quantisation of x [B, N, D] -> y [B, N, D] (+ y^T [B, D, N]), scale [B, N]."""
        b = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, DP)
        mask = (rows[:, None] < N) & (cols[None, :] < D)
        x = tl.load(x_ptr + b * sx_b + rows[:, None] * sx_n + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), 1)
        scale = tl.where(amax > 0, amax / 448.0, 1.0)
        y = (x / scale[:, None]).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + b * sy_b + rows[:, None] * D + cols[None, :], y, mask=mask)
        if TRANSPOSE:
            tl.store(yt_ptr + b * syt_b + cols[None, :] * syt_d + rows[:, None], y, mask=mask)
        tl.store(sc_ptr + b * N + rows, scale, mask=rows < N)

    @triton.jit
    def _absorb_quant_q(qc_ptr, w_ptr, qr_ptr, q8_ptr, sq_ptr, qr8_ptr, sqr_ptr, L,
                        sqc_b, sqc_l, sqc_h, sw_h, sw_n, sqr_b, sqr_l, sqr_h,
                        H: tl.constexpr, DN: tl.constexpr, DNP: tl.constexpr, DC: tl.constexpr, D0: tl.constexpr,
                        D1: tl.constexpr, DRR: tl.constexpr, DR: tl.constexpr, BLOCK_M: tl.constexpr):
        """q_lat = q_c,h @ W_h (W = g_n W_uk as [H, dn, dc]) quantised per row in the GEMM's epilogue;
        q_r quantised per row alongside. Outputs [B, L, H, *] contiguous; scales [B, L, H]."""
        pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tok = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        tmask = tok < L
        offs_n = tl.arange(0, DNP)
        qc = tl.load(qc_ptr + b * sqc_b + tok[:, None] * sqc_l + h * sqc_h + offs_n[None, :],
                     mask=tmask[:, None] & (offs_n[None, :] < DN), other=0.0)
        offs_0 = tl.arange(0, D0)
        offs_1 = D0 + tl.arange(0, D1)
        w_row = w_ptr + h * sw_h + offs_n[:, None] * sw_n
        nmask = offs_n[:, None] < DN
        w0 = tl.load(w_row + offs_0[None, :], mask=nmask, other=0.0)
        w1 = tl.load(w_row + offs_1[None, :], mask=nmask & (offs_1[None, :] < DC), other=0.0)
        a0 = tl.dot(qc, w0.to(qc.dtype))
        a1 = tl.dot(qc, w1.to(qc.dtype))
        amax = tl.maximum(tl.max(tl.abs(a0), 1), tl.max(tl.abs(a1), 1))
        sq = tl.where(amax > 0, amax / 448.0, 1.0)
        row = (b * L + tok) * H + h
        q8_row = q8_ptr + row * DC
        tl.store(q8_row[:, None] + offs_0[None, :], (a0 / sq[:, None]).to(q8_ptr.dtype.element_ty), mask=tmask[:, None])
        tl.store(q8_row[:, None] + offs_1[None, :], (a1 / sq[:, None]).to(q8_ptr.dtype.element_ty),
                 mask=tmask[:, None] & (offs_1[None, :] < DC))
        tl.store(sq_ptr + row, sq, mask=tmask)
        offs_r = tl.arange(0, DR)
        rmask = tmask[:, None] & (offs_r[None, :] < DRR)
        qr = tl.load(qr_ptr + b * sqr_b + tok[:, None] * sqr_l + h * sqr_h + offs_r[None, :], mask=rmask,
                     other=0.0).to(tl.float32)
        ramax = tl.max(tl.abs(qr), 1)
        sr = tl.where(ramax > 0, ramax / 448.0, 1.0)
        tl.store(qr8_ptr + row[:, None] * DRR + offs_r[None, :], (qr / sr[:, None]).to(qr8_ptr.dtype.element_ty),
                 mask=rmask)
        tl.store(sqr_ptr + row, sr, mask=tmask)

    @triton.jit
    def _attend_tile8(acc0, acc1, m_i, l_i, q0, q1, qr, sq, sqr, c_ptr, s_cn, ct_ptr, s_ctd, sc_ptr, kr_ptr, s_krn,
                      skr_ptr, s_skrn, s_ptr, vs, start, hi, qk_scale, DC: tl.constexpr, DRR: tl.constexpr,
                      D0: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_d0 = tl.arange(0, D0)
        offs_d1 = D0 + tl.arange(0, D1)
        offs_r = tl.arange(0, DR)
        offs_n = start + tl.arange(0, BLOCK_N)
        kmask = offs_n < hi
        c0 = tl.load(c_ptr + offs_n[:, None] * s_cn + offs_d0[None, :], mask=kmask[:, None], other=0.0)
        c1 = tl.load(c_ptr + offs_n[:, None] * s_cn + offs_d1[None, :],
                     mask=kmask[:, None] & (offs_d1[None, :] < DC), other=0.0)
        kr = tl.load(kr_ptr + offs_n[:, None] * s_krn + offs_r[None, :],
                     mask=kmask[:, None] & (offs_r[None, :] < DRR), other=0.0)
        sc_c = tl.dot(q0, tl.trans(c0))
        sc_c = tl.dot(q1, tl.trans(c1), sc_c)
        sc_r = tl.dot(qr, tl.trans(kr))
        csc = tl.load(sc_ptr + offs_n, mask=kmask, other=0.0)
        s = tl.load(s_ptr + offs_n, mask=kmask, other=0.0) * qk_scale
        rsc = tl.load(skr_ptr + offs_n * s_skrn, mask=kmask, other=0.0)
        qk = sc_c * sq[:, None] * (csc * s)[None, :] + sc_r * sqr[:, None] * (rsc * s)[None, :]
        qk = tl.where(kmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p8 = (p * (csc * vs)[None, :]).to(c0.dtype)  # V's per-token scale folded into P
        ct0 = tl.load(ct_ptr + offs_d0[:, None] * s_ctd + offs_n[None, :], mask=kmask[None, :], other=0.0)
        ct1 = tl.load(ct_ptr + offs_d1[:, None] * s_ctd + offs_n[None, :],
                      mask=kmask[None, :] & (offs_d1[:, None] < DC), other=0.0)
        acc0 = tl.dot(p8, tl.trans(ct0), acc0 * alpha[:, None])
        acc1 = tl.dot(p8, tl.trans(ct1), acc1 * alpha[:, None])
        return acc0, acc1, m_new, l_i

    @triton.jit
    def _fwd8(q_ptr, sq_ptr, qr_ptr, sqr_ptr,
              cp_ptr, cpt_ptr, scp_ptr, cn_ptr, cnt_ptr, scn_ptr, kr_ptr, skr_ptr, s_ptr, vs_ptr, o_ptr, lse_ptr,
              scp_b, scp_n, scpt_b, scpt_d, sscp_b, scn_b, scn_n, scnt_b, scnt_d, sscn_b,
              skr_b, skr_n, skr_g, sskr_b, sskr_n, ss_b,
              L, Lp, Ln, keys_per_split, qk_scale,
              H: tl.constexpr, G: tl.constexpr, DC: tl.constexpr, DRR: tl.constexpr,
              D0: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr):
        REP: tl.constexpr = H // G
        pid_m, pid_bg, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b = pid_bg // G
        g = pid_bg % G
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < L * REP
        tok = rows // REP
        head = g * REP + rows % REP
        row = (b * L + tok) * H + head  # q8/o [B, L, H, DC], scales [B, L, H] contiguous
        offs_d0 = tl.arange(0, D0)
        offs_d1 = D0 + tl.arange(0, D1)
        offs_r = tl.arange(0, DR)
        q0 = tl.load(q_ptr + row[:, None] * DC + offs_d0[None, :], mask=rmask[:, None], other=0.0)
        q1 = tl.load(q_ptr + row[:, None] * DC + offs_d1[None, :], mask=rmask[:, None] & (offs_d1[None, :] < DC),
                     other=0.0)
        qr = tl.load(qr_ptr + row[:, None] * DRR + offs_r[None, :], mask=rmask[:, None] & (offs_r[None, :] < DRR),
                     other=0.0)
        sq = tl.load(sq_ptr + row, mask=rmask, other=0.0)
        sqr = tl.load(sqr_ptr + row, mask=rmask, other=0.0)
        vs = tl.load(vs_ptr)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
        lo = split * keys_per_split
        hi = lo + keys_per_split
        if hi > Lp + Ln:
            hi = Lp + Ln
        lo_p = lo
        if lo_p > Lp:
            lo_p = Lp
        hi_p = hi
        if hi_p > Lp:
            hi_p = Lp
        lo_n = lo - Lp
        if lo_n < 0:
            lo_n = 0
        hi_n = hi - Lp
        if hi_n < 0:
            hi_n = 0
        kr_b = kr_ptr + b * skr_b + g * skr_g
        skr_b_ = skr_ptr + b * sskr_b + g
        s_b = s_ptr + b * ss_b
        for start in range(lo_p, hi_p, BLOCK_N):
            acc0, acc1, m_i, l_i = _attend_tile8(
                acc0, acc1, m_i, l_i, q0, q1, qr, sq, sqr, cp_ptr + b * scp_b, scp_n, cpt_ptr + b * scpt_b, scpt_d,
                scp_ptr + b * sscp_b, kr_b, skr_n, skr_b_, sskr_n, s_b, vs, start, hi_p, qk_scale,
                DC, DRR, D0, D1, DR, BLOCK_N)
        for start in range(lo_n, hi_n, BLOCK_N):
            acc0, acc1, m_i, l_i = _attend_tile8(
                acc0, acc1, m_i, l_i, q0, q1, qr, sq, sqr, cn_ptr + b * scn_b, scn_n, cnt_ptr + b * scnt_b, scnt_d,
                scn_ptr + b * sscn_b, kr_b + Lp * skr_n, skr_n, skr_b_ + Lp * sskr_n, sskr_n, s_b + Lp, vs, start,
                hi_n, qk_scale, DC, DRR, D0, D1, DR, BLOCK_N)
        has = l_i > 0
        l_safe = tl.where(has, l_i, 1.0)
        lse = tl.where(has, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, float("-inf"))
        o0 = acc0 / (l_safe * vs)[:, None]
        o1 = acc1 / (l_safe * vs)[:, None]
        if SPLITS == 1:
            tl.store(o_ptr + row[:, None] * DC + offs_d0[None, :], o0.to(o_ptr.dtype.element_ty), mask=rmask[:, None])
            tl.store(o_ptr + row[:, None] * DC + offs_d1[None, :], o1.to(o_ptr.dtype.element_ty),
                     mask=rmask[:, None] & (offs_d1[None, :] < DC))
            tl.store(lse_ptr + row, lse, mask=rmask)
        else:
            n_rows = tl.num_programs(1) // G * L * H
            o_row = o_ptr + (split * n_rows + row) * DC
            tl.store(o_row[:, None] + offs_d0[None, :], o0, mask=rmask[:, None])
            tl.store(o_row[:, None] + offs_d1[None, :], o1, mask=rmask[:, None] & (offs_d1[None, :] < DC))
            tl.store(lse_ptr + split * n_rows + row, lse, mask=rmask)


def quantize_rows(x: torch.Tensor, transpose: bool = False):
    """x [B, N, D] -> (x8 [B, N, D], scale [B, N] fp32, x8^T [B, D, N] or None), one fused pass."""
    b, n, d = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    y = torch.empty(b, n, d, device=x.device, dtype=FP8)
    yt = torch.empty(b, d, n, device=x.device, dtype=FP8) if transpose else y
    sc = torch.empty(b, n, device=x.device, dtype=torch.float32)
    if n:
        block = 64
        _quant_rows[(triton.cdiv(n, block), b)](x, y, yt, sc, n, x.stride(0), x.stride(1), n * d, d * n, n,
                                                D=d, DP=_pow2(d, 16), BLOCK=block, TRANSPOSE=transpose, num_warps=4)
    return y, sc, (yt if transpose else None)


def quantize_latent(c: torch.Tensor) -> QuantLatent:
    """What an 8-bit cache stores per token (written once): e4m3 rows, the transposed copy, scales.
    The transposed copy is a torch copy: the fused transposed byte store of ``_quant_rows`` measured
    wrong on the H100 (check_stages 'quant_transpose' 1.4, Triton 3.6), kept out of the path."""
    c8, sc, _ = quantize_rows(c)
    return QuantLatent(c8, c8.transpose(1, 2).contiguous(), sc)


def absorb_quantize_q(q_c: torch.Tensor, w_uk: torch.Tensor, q_r: torch.Tensor):
    """(q8 [B, L, H, dc], sq [B, L, H], qr8 [B, L, H, dr], sqr [B, L, H]) from q_c [B, L, H, dn],
    w_uk [H, dn, dc] (gain folded) and q_r [B, L, H, dr] in one kernel."""
    b, l, h, dn = q_c.shape
    dc, dr = w_uk.shape[2], q_r.shape[3]
    q_c = q_c if q_c.stride(3) == 1 else q_c.contiguous()
    q_r = q_r if q_r.stride(3) == 1 else q_r.contiguous()
    w = w_uk.to(q_c.dtype).contiguous()
    d0, d1, dr_p = _pieces8(dc, dr)
    q8 = torch.empty(b, l, h, dc, device=q_c.device, dtype=FP8)
    qr8 = torch.empty(b, l, h, dr, device=q_c.device, dtype=FP8)
    sq = torch.empty(b, l, h, device=q_c.device, dtype=torch.float32)
    sqr = torch.empty_like(sq)
    bm = 64
    _absorb_quant_q[(triton.cdiv(l, bm), h, b)](
        q_c, w, q_r, q8, sq, qr8, sqr, l, q_c.stride(0), q_c.stride(1), q_c.stride(2), w.stride(0), w.stride(1),
        q_r.stride(0), q_r.stride(1), q_r.stride(2),
        H=h, DN=dn, DNP=_pow2(dn, 16), DC=dc, D0=d0, D1=d1, DRR=dr, DR=dr_p, BLOCK_M=bm, num_warps=4)
    return q8, sq, qr8, sqr


def attention_fp8(q8, sq, qr8, sqr, past: QuantLatent, new: QuantLatent, rho8, srho, s, scale: float,
                  out_dtype=torch.bfloat16, config: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit kernel on already quantised operands. rho8 [B, Lk, G, dr] with srho [B, Lk, G]; s [B, Lk]."""
    b, l, h, dc = q8.shape
    g, dr = rho8.shape[2], rho8.shape[3]
    lp, ln = past.c8.shape[1], new.c8.shape[1]
    lk = lp + ln
    if s.shape != (b, lk) or srho.shape != (b, lk, g):
        raise ValueError(f"fp8 latent attention: s [B, Lk] / srho [B, Lk, G] expected for Lk={lk}, "
                         f"got {tuple(s.shape)} / {tuple(srho.shape)}")
    cfg = config or TileConfig(64, 64, 4, 3)
    d0, d1, dr_p = _pieces8(dc, dr)
    vs = 256.0 / torch.maximum(past.scale.amax() if lp else new.scale.amax(), new.scale.amax()).reshape(1)
    m_tiles = triton.cdiv(l * (h // g), cfg.block_m)
    splits = cfg.splits or choose_splits(m_tiles * b * g, lk, cfg.block_n, q8.device)
    per = triton.cdiv(triton.cdiv(lk, splits), cfg.block_n) * cfg.block_n
    splits = triton.cdiv(lk, per)
    o = torch.empty(b, l, h, dc, device=q8.device, dtype=out_dtype)
    lse = torch.empty(b, l, h, device=q8.device, dtype=torch.float32)
    if splits > 1:
        o_buf = torch.empty(splits, b * l * h, dc, device=q8.device, dtype=torch.float32)
        lse_buf = torch.empty(splits, b * l * h, device=q8.device, dtype=torch.float32)
    else:
        o_buf, lse_buf = o, lse
    _fwd8[(m_tiles, b * g, splits)](
        q8, sq, qr8, sqr, past.c8, past.c8t, past.scale, new.c8, new.c8t, new.scale, rho8, srho, s, vs, o_buf, lse_buf,
        past.c8.stride(0), past.c8.stride(1), past.c8t.stride(0), past.c8t.stride(1), past.scale.stride(0),
        new.c8.stride(0), new.c8.stride(1), new.c8t.stride(0), new.c8t.stride(1), new.scale.stride(0),
        rho8.stride(0), rho8.stride(1), rho8.stride(2), srho.stride(0), srho.stride(1), s.stride(0),
        l, lp, ln, per, scale * LOG2E,
        H=h, G=g, DC=dc, DRR=dr, D0=d0, D1=d1, DR=dr_p, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLITS=splits,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits > 1:
        from .latent_attention import _combine_splits

        n_rows = b * l * h
        _combine_splits[(triton.cdiv(n_rows, 32),)](o_buf, lse_buf, o, lse, n_rows, DC=dc,
                                                    DCP=1 << (dc - 1).bit_length(), SPLITS=splits, BLOCK_R=32,
                                                    num_warps=4)
    return o, lse


def latent_attention_fp8(q_c: torch.Tensor, w_uk: torch.Tensor, q_r: torch.Tensor, c_past, c_new: torch.Tensor,
                         rho: torch.Tensor, s: torch.Tensor, scale: float) -> torch.Tensor:
    """The model path: every per-call quantisation (queries, current chunk, RoPE key; the cached prefix
    too when ``c_past`` is a plain tensor, i.e. the cache is not stored in 8 bits) then the 8-bit kernel.
    Returns o_lat [B, L, H, dc] in q_c's dtype."""
    if triton is None or not q_c.is_cuda or _interpreting():
        raise RuntimeError("attention.impl=triton_fp8 needs Triton on a CUDA GPU with fp8 (Hopper)")
    q8, sq, qr8, sqr = absorb_quantize_q(q_c, w_uk, q_r)
    past = c_past if isinstance(c_past, QuantLatent) else quantize_latent(c_past)
    new = quantize_latent(c_new)
    b, lk, g, dr = rho.shape
    rho8, srho, _ = quantize_rows(rho.reshape(b, lk * g, dr))
    o, _ = attention_fp8(q8, sq, qr8, sqr, past, new, rho8.view(b, lk, g, dr), srho.view(b, lk, g),
                         s.float().contiguous(), scale, out_dtype=q_c.dtype)
    return o


# ----------------------------------------------------------------------------------------------
# Test hook: stage-by-stage errors (quantisers, absorbed-query kernel, attention on exact 8-bit values)
# ----------------------------------------------------------------------------------------------
def check_stages(b=1, l=300, h=12, dn=128, dc=160, dr=64, lp=700, seed=0) -> dict[str, float]:
    """Relative errors of each stage against torch on the same (already quantised) values, so a wrong
    stage shows as O(1) and an accurate one at its 8-bit rounding level (CUDA only)."""
    from .latent_attention import random_inputs, reference

    g = torch.Generator().manual_seed(seed)
    err = lambda a, r: float((a.double() - r.double()).norm() / r.double().norm())  # noqa: E731
    dev = "cuda"
    x = torch.randn(b, lp, dc, generator=g).to(dev, torch.bfloat16)
    y8, sc, yt = quantize_rows(x, transpose=True)
    out = {"quant_rows": err(y8.float() * sc[..., None], x.float()),
           "quant_transpose": err(yt.float(), y8.float().transpose(1, 2))}
    q_c = torch.randn(b, l, h, dn, generator=g).to(dev, torch.bfloat16)
    w = (torch.randn(h, dn, dc, generator=g) / dn**0.5).to(dev, torch.bfloat16)
    q_r = torch.randn(b, l, h, dr, generator=g).to(dev, torch.bfloat16)
    q8, sq, qr8, sqr = absorb_quantize_q(q_c, w, q_r)
    q_lat = torch.einsum("blhn,hnc->blhc", q_c.float(), w.float())
    out["absorb_q"] = err(q8.float() * sq[..., None], q_lat)
    out["quant_qr"] = err(qr8.float() * sqr[..., None], q_r.float())
    xi = random_inputs(b, l, h, dc, dr, lp, device=dev, dtype=torch.bfloat16, seed=seed)
    past, new = quantize_latent(xi["c_past"]), quantize_latent(xi["c_new"])
    lk = lp + l
    rho8, srho, _ = quantize_rows(xi["rho"].reshape(b, lk, dr))
    q8, sq, _ = quantize_rows(xi["q_lat"].reshape(b, l * h, dc))
    qr8, sqr, _ = quantize_rows(xi["q_r"].reshape(b, l * h, dr))
    o, lse = attention_fp8(q8.view(b, l, h, dc), sq.view(b, l, h), qr8.view(b, l, h, dr), sqr.view(b, l, h),
                           past, new, rho8.view(b, lk, 1, dr), srho.view(b, lk, 1), xi["s"], xi["scale"],
                           config=TileConfig(64, 64, 4, 2, 1))
    deq = lambda t8, sc_: t8.float() * sc_[..., None]  # noqa: E731
    c_deq = torch.cat([past.dequantize(), new.dequantize()], 1)
    o_ref, lse_ref = reference(deq(q8, sq).view(b, l, h, dc), deq(qr8, sqr).view(b, l, h, dr), c_deq,
                               deq(rho8, srho).view(b, lk, 1, dr), xi["s"], xi["scale"])
    out["attention_lse_vs_dequantised"] = err(lse, lse_ref)
    out["attention_o_vs_dequantised"] = err(o, o_ref)
    c = torch.cat([xi["c_past"], xi["c_new"]], 1)
    o_true, _ = reference(xi["q_lat"], xi["q_r"], c, xi["rho"], xi["s"], xi["scale"])
    out["attention_o_vs_bf16_inputs"] = err(o, o_true)
    return out
