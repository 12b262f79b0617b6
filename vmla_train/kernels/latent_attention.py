"""Fused absorbed latent attention over the cache (Triton, forward), with its torch reference.

Notation: B batch, L query tokens, H heads, G RoPE-key groups (REP = H / G heads share one), dc latent
width, dr RoPE width per group, Lp cached keys (sinks + window, a prefix of the cache), Ln current keys
(the chunk itself), Lk = Lp + Ln.

What it computes (docs/design.md "Latent attention", the absorbed path of ``attention.MLASelfAttention``)::

    score[l, h, j] = s_j * (q_lat[l, h] . c_j + q_r[l, h] . rho[j, g(h)]) * scale
    o_lat[l, h]    = softmax_j(score[l, h]) @ c           (V = c: the latent tile is loaded once)
    lse[l, h]      = logsumexp_j score[l, h]               (natural log)

with ``rho = RoPE(g_r * kr)`` (the rotated, gained raw RoPE key, un-normalised) and ``s`` the per-key
key-norm scalar, applied to the score column (so the kernel never rescales the latent that is V too).

Kernel layout: the REP heads of one group are folded into the M dimension (rows = L * REP), so a key
tile is read once for all of them; the content dot is split into two power-of-two pieces (dc = D0 + D1,
e.g. 160 = 128 + 32, padded and masked where the rest is not a power of two); online softmax in exp2
with fp32 accumulators; the cached prefix and the current chunk are two inputs walked one after the
other (no concatenation of the window); optionally the key range is split over SPLITS programs whose
partial results a small combine kernel merges (fills the GPU when L * H / BLOCK_M is a few waves).

The pre-pass (``_key_scale``, ``_rope_key`` in attention.py, torch) touches d_c + d_r values per key once
per call: ~19 MB at the 21-frame geometry, ~0.3 ms measured in torch launches against ~3 ms of attention
(a fused Triton pre-pass measured slower, 6 ms, and was dropped: benchmarks/NOTES-kernel.md).

Forward only: when gradients are needed, ``attention.MLASelfAttention`` runs the torch path named by
``attention.backward`` instead (see there).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

try:  # Triton is optional on CPU machines; TRITON_INTERPRET=1 runs the kernels on CPU.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None
    tl = None

LOG2E = 1.4426950408889634


def available() -> bool:
    return triton is not None


# ----------------------------------------------------------------------------------------------
# Torch reference (float64 by default): the same function on concatenated keys
# ----------------------------------------------------------------------------------------------
def reference(q_lat: torch.Tensor, q_r: torch.Tensor, c: torch.Tensor, rho: torch.Tensor, s: torch.Tensor,
              scale: float, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """q_lat [B, L, H, dc], q_r [B, L, H, dr], c [B, Lk, dc], rho [B, Lk, G, dr], s [B, Lk]
    -> (o_lat [B, L, H, dc], lse [B, L, H]) in ``dtype``."""
    b, l, h, dc = q_lat.shape
    g = rho.shape[2]
    rho_h = rho.to(dtype).repeat_interleave(h // g, dim=2)  # (B, Lk, H, dr)
    sc = torch.einsum("blhc,bkc->bhlk", q_lat.to(dtype), c.to(dtype))
    sc = sc + torch.einsum("blhr,bkhr->bhlk", q_r.to(dtype), rho_h)  # (B, H, L, Lk)
    sc = sc * (s.to(dtype)[:, None, None, :] * scale)
    lse = torch.logsumexp(sc, -1)  # (B, H, L)
    o = torch.einsum("bhlk,bkc->blhc", torch.softmax(sc, -1), c.to(dtype))
    return o, lse.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Tile configurations
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    block_m: int = 128  # query rows (tokens x heads of a group) per program
    block_n: int = 64  # keys per inner step
    num_warps: int = 8
    num_stages: int = 2
    splits: int = 0  # key-range splits; 0 = pick from the grid size (see choose_splits)


# Candidates the benchmark sweeps (pruned by hand: 128-row tiles take 8 warps, 64-row tiles 4).
CANDIDATES = [
    TileConfig(128, 64, 8, 2), TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 2),
    TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 3), TileConfig(64, 128, 4, 2),
]


def default_config(dc: int, dr: int, on_gpu: bool) -> TileConfig:
    """The tile shape used unless one is passed (chosen from benchmarks/results/latent_attention-*.json)."""
    if not on_gpu:
        return TileConfig(16, 16, 1, 1)  # interpreter: small tiles keep CPU tests fast and hit the tails
    if dc > 256:  # 64 x dc fp32 accumulators are already 128 registers/thread at 8 warps
        return TileConfig(64, 32, 8, 2)
    return TileConfig(64, 64, 4, 3)  # measured best on H100 with 3 key splits (benchmarks/NOTES-kernel.md)


def choose_splits(programs: int, num_keys: int, block_n: int, device: torch.device, per_sm: int = 16) -> int:
    """Key splits so that the grid has ~``per_sm`` programs per SM (measured for the bf16 kernel: 3 splits of
    878 64-row tiles beat 1 and 2 at the 21-frame geometry; the 8-bit kernel passes its own)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = math.ceil(per_sm * sms / max(programs, 1))
    return max(1, min(want, 8, triton.cdiv(num_keys, 4 * block_n)))


@dataclass
class SplitPlan:
    """How a call spreads its Lk keys over ``splits`` programs of ``keys_per_split`` keys, and where their
    partial results go (fp32 buffers when split, else ``o`` / ``lse`` directly). Shared by the bf16 and the
    8-bit kernels."""

    splits: int
    keys_per_split: int
    o: torch.Tensor  # [B, L, H, dc]
    lse: torch.Tensor  # [B, L, H] float32
    o_buf: torch.Tensor
    lse_buf: torch.Tensor

    @classmethod
    def make(cls, cfg: "TileConfig", programs: int, num_keys: int, b: int, l: int, h: int, dc: int,
             device: torch.device, out_dtype: torch.dtype, per_sm: int = 16) -> "SplitPlan":
        splits = cfg.splits or choose_splits(programs, num_keys, cfg.block_n, device, per_sm)
        per = triton.cdiv(triton.cdiv(num_keys, splits), cfg.block_n) * cfg.block_n
        splits = triton.cdiv(num_keys, per)
        o = torch.empty(b, l, h, dc, device=device, dtype=out_dtype)
        lse = torch.empty(b, l, h, device=device, dtype=torch.float32)
        if splits == 1:
            return cls(splits, per, o, lse, o, lse)
        return cls(splits, per, o, lse, torch.empty(splits, b * l * h, dc, device=device, dtype=torch.float32),
                   torch.empty(splits, b * l * h, device=device, dtype=torch.float32))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge the splits' partial results (one small kernel) and return (o, lse)."""
        if self.splits > 1:
            n_rows, dc = self.o_buf.shape[1], self.o_buf.shape[2]
            block_r = 32 if self.o.is_cuda else 16
            _combine_splits[(triton.cdiv(n_rows, block_r),)](
                self.o_buf, self.lse_buf, self.o, self.lse, n_rows, DC=dc, DCP=1 << (dc - 1).bit_length(),
                SPLITS=self.splits, BLOCK_R=block_r, num_warps=4)
        return self.o, self.lse


def pieces(dc: int, dr: int) -> tuple[int, int, int]:
    """(D0, D1, DR): dc = D0 + (<= D1) with powers of two >= 16; DR = dr padded."""
    d0 = 1 << (max(dc - 1, 1).bit_length() - 1)  # largest power of two < dc
    d0 = max(d0, 16) if dc > 16 else 16
    rest = max(dc - d0, 1)
    d1 = max(16, 1 << (rest - 1).bit_length())
    dr_p = max(16, 1 << (dr - 1).bit_length())
    return d0, d1, dr_p


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _softmax_accumulate(acc0, acc1, m_i, l_i, qk, c0, c1, s_ptr, offs_n, kmask, qk_scale, MASK: tl.constexpr):
        """Online-softmax step shared by both tile loaders: the key-norm scalar on the score column (log2
        units), masking of keys past the segment (MASK: the last tile of a range only), exp2 rescaling, P.V
        with the latent tile reused as V."""
        if MASK:
            s = tl.load(s_ptr + offs_n, mask=kmask, other=0.0)
            qk = tl.where(kmask[None, :], qk * (s * qk_scale)[None, :], float("-inf"))
        else:
            qk = qk * (tl.load(s_ptr + offs_n) * qk_scale)[None, :]
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = p.to(c0.dtype)
        acc0 = tl.dot(pv, c0, acc0 * alpha[:, None])
        acc1 = tl.dot(pv, c1, acc1 * alpha[:, None])
        return acc0, acc1, m_new, l_i

    @triton.jit
    def _attend_tile(acc0, acc1, m_i, l_i, q0, q1, qr, c_ptr, stride_cn, kr_ptr, stride_krn, s_ptr, start, hi,
                     qk_scale, DC: tl.constexpr, DRR: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                     DR: tl.constexpr, BLOCK_N: tl.constexpr):
        """One online-softmax step over keys [start, min(start + BLOCK_N, hi)) of a segment."""
        offs_d0 = tl.arange(0, D0)
        offs_d1 = D0 + tl.arange(0, D1)
        offs_r = tl.arange(0, DR)
        offs_n = start + tl.arange(0, BLOCK_N)
        kmask = offs_n < hi
        c0 = tl.load(c_ptr + offs_n[:, None] * stride_cn + offs_d0[None, :], mask=kmask[:, None], other=0.0)
        c1 = tl.load(c_ptr + offs_n[:, None] * stride_cn + offs_d1[None, :],
                     mask=kmask[:, None] & (offs_d1[None, :] < DC), other=0.0)
        kr = tl.load(kr_ptr + offs_n[:, None] * stride_krn + offs_r[None, :],
                     mask=kmask[:, None] & (offs_r[None, :] < DRR), other=0.0)
        c0 = c0.to(q0.dtype)  # the latent tile: K (content part) and V
        c1 = c1.to(q0.dtype)
        qk = tl.dot(q0, tl.trans(c0))
        qk = tl.dot(q1, tl.trans(c1), qk)
        qk = tl.dot(qr, tl.trans(kr.to(q0.dtype)), qk)  # (BM, BN) fp32
        return _softmax_accumulate(acc0, acc1, m_i, l_i, qk, c0, c1, s_ptr, offs_n, kmask, qk_scale, True)

    @triton.jit
    def _attend_tile_desc(acc0, acc1, m_i, l_i, q0, q1, qr, c0_desc, c1_desc, kr_desc, s_ptr, start, hi, qk_scale,
                          BLOCK_N: tl.constexpr, MASK: tl.constexpr):
        """``_attend_tile`` with the key tiles fetched by the tensor-memory accelerator (Hopper): no
        per-element pointer tensors in registers, rows/columns past the tensor read as zero."""
        c0 = c0_desc.load([start, 0])  # (BN, D0): K (content part) and V
        c1 = c1_desc.load([start, 0])  # (BN, D1)
        kr = kr_desc.load([start, 0])  # (BN, DR)
        offs_n = start + tl.arange(0, BLOCK_N)
        kmask = offs_n < hi
        qk = tl.dot(q0, tl.trans(c0))
        qk = tl.dot(q1, tl.trans(c1), qk)
        qk = tl.dot(qr, tl.trans(kr), qk)
        return _softmax_accumulate(acc0, acc1, m_i, l_i, qk, c0, c1, s_ptr, offs_n, kmask, qk_scale, MASK)

    @triton.jit
    def _attend_segment_desc(acc0, acc1, m_i, l_i, q0, q1, qr, c_ptr, stride_cn, n_seg, kr_ptr, stride_krn, s_ptr,
                             lo, hi, qk_scale, DC: tl.constexpr, DRR: tl.constexpr, D0: tl.constexpr,
                             D1: tl.constexpr, DR: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.maximum(n_seg, 1)
        c0_desc = tl.make_tensor_descriptor(c_ptr, shape=[rows, DC], strides=[stride_cn, 1], block_shape=[BLOCK_N, D0])
        c1_desc = tl.make_tensor_descriptor(c_ptr + D0, shape=[rows, DC - D0], strides=[stride_cn, 1],
                                            block_shape=[BLOCK_N, D1])
        kr_desc = tl.make_tensor_descriptor(kr_ptr, shape=[rows, DRR], strides=[stride_krn, 1], block_shape=[BLOCK_N, DR])
        full = lo + (hi - lo) // BLOCK_N * BLOCK_N
        for start in range(lo, full, BLOCK_N):  # whole tiles: no masking
            acc0, acc1, m_i, l_i = _attend_tile_desc(acc0, acc1, m_i, l_i, q0, q1, qr, c0_desc, c1_desc, kr_desc,
                                                     s_ptr, start, hi, qk_scale, BLOCK_N, False)
        if full < hi:
            acc0, acc1, m_i, l_i = _attend_tile_desc(acc0, acc1, m_i, l_i, q0, q1, qr, c0_desc, c1_desc, kr_desc,
                                                     s_ptr, full, hi, qk_scale, BLOCK_N, True)
        return acc0, acc1, m_i, l_i

    @triton.jit
    def _attend_segment(acc0, acc1, m_i, l_i, q0, q1, qr,
                        c_ptr, stride_cn, kr_ptr, stride_krn, s_ptr, lo, hi, qk_scale,
                        DC: tl.constexpr, DRR: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                        DR: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):
        """Online softmax over keys [lo, hi) of one segment (pointers at the segment's key 0)."""
        if INTERPRET:  # the CPU interpreter cannot take a program-id-derived range() bound
            start = lo
            while start < hi:
                acc0, acc1, m_i, l_i = _attend_tile(acc0, acc1, m_i, l_i, q0, q1, qr, c_ptr, stride_cn, kr_ptr,
                                                    stride_krn, s_ptr, start, hi, qk_scale, DC, DRR, D0, D1, DR,
                                                    BLOCK_N)
                start += BLOCK_N
        else:
            for start in range(lo, hi, BLOCK_N):
                acc0, acc1, m_i, l_i = _attend_tile(acc0, acc1, m_i, l_i, q0, q1, qr, c_ptr, stride_cn, kr_ptr,
                                                    stride_krn, s_ptr, start, hi, qk_scale, DC, DRR, D0, D1, DR,
                                                    BLOCK_N)
        return acc0, acc1, m_i, l_i

    @triton.jit
    def _latent_attention_fwd(
        q_ptr, qr_ptr, cp_ptr, cn_ptr, kr_ptr, s_ptr, o_ptr, lse_ptr,
        sq_b, sq_l, sq_h, sqr_b, sqr_l, sqr_h,
        scp_b, scp_n, scn_b, scn_n, skr_b, skr_n, skr_g, ss_b,
        L, Lp, Ln, keys_per_split, qk_scale,
        H: tl.constexpr, G: tl.constexpr, DC: tl.constexpr, DRR: tl.constexpr,
        D0: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, INTERPRET: tl.constexpr,
        USE_DESC: tl.constexpr,
    ):
        REP: tl.constexpr = H // G
        pid_m = tl.program_id(0)
        pid_bg = tl.program_id(1)
        split = tl.program_id(2)
        b = pid_bg // G
        g = pid_bg % G
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # folded (token, head-in-group) rows
        rmask = rows < L * REP
        tok = rows // REP
        head = g * REP + rows % REP
        offs_d0 = tl.arange(0, D0)
        offs_d1 = D0 + tl.arange(0, D1)
        offs_r = tl.arange(0, DR)

        q_row = q_ptr + b * sq_b + tok * sq_l + head * sq_h
        q0 = tl.load(q_row[:, None] + offs_d0[None, :], mask=rmask[:, None], other=0.0)
        q1 = tl.load(q_row[:, None] + offs_d1[None, :], mask=rmask[:, None] & (offs_d1[None, :] < DC), other=0.0)
        qr_row = qr_ptr + b * sqr_b + tok * sqr_l + head * sqr_h
        qr = tl.load(qr_row[:, None] + offs_r[None, :], mask=rmask[:, None] & (offs_r[None, :] < DRR), other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], tl.float32)

        lo = split * keys_per_split
        hi = lo + keys_per_split
        if hi > Lp + Ln:
            hi = Lp + Ln
        lo_p = lo  # this split's part of the cached prefix: [lo_p, hi_p)
        if lo_p > Lp:
            lo_p = Lp
        hi_p = hi
        if hi_p > Lp:
            hi_p = Lp
        lo_n = lo - Lp  # ... and of the current chunk: [lo_n, hi_n)
        if lo_n < 0:
            lo_n = 0
        hi_n = hi - Lp
        if hi_n < 0:
            hi_n = 0
        kr_b = kr_ptr + b * skr_b + g * skr_g
        s_b = s_ptr + b * ss_b
        if USE_DESC:
            acc0, acc1, m_i, l_i = _attend_segment_desc(  # cached prefix: combined keys [0, Lp)
                acc0, acc1, m_i, l_i, q0, q1, qr, cp_ptr + b * scp_b, scp_n, Lp, kr_b, skr_n, s_b,
                lo_p, hi_p, qk_scale, DC, DRR, D0, D1, DR, BLOCK_N)
            acc0, acc1, m_i, l_i = _attend_segment_desc(  # current chunk: combined keys [Lp, Lp + Ln)
                acc0, acc1, m_i, l_i, q0, q1, qr, cn_ptr + b * scn_b, scn_n, Ln, kr_b + Lp * skr_n, skr_n, s_b + Lp,
                lo_n, hi_n, qk_scale, DC, DRR, D0, D1, DR, BLOCK_N)
        else:
            acc0, acc1, m_i, l_i = _attend_segment(  # cached prefix: combined keys [0, Lp)
                acc0, acc1, m_i, l_i, q0, q1, qr, cp_ptr + b * scp_b, scp_n, kr_b, skr_n, s_b,
                lo_p, hi_p, qk_scale, DC, DRR, D0, D1, DR, BLOCK_N, INTERPRET)
            acc0, acc1, m_i, l_i = _attend_segment(  # current chunk: combined keys [Lp, Lp + Ln)
                acc0, acc1, m_i, l_i, q0, q1, qr, cn_ptr + b * scn_b, scn_n, kr_b + Lp * skr_n, skr_n, s_b + Lp,
                lo_n, hi_n, qk_scale, DC, DRR, D0, D1, DR, BLOCK_N, INTERPRET)

        has = l_i > 0
        l_safe = tl.where(has, l_i, 1.0)
        lse = tl.where(has, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, float("-inf"))
        o0 = acc0 / l_safe[:, None]
        o1 = acc1 / l_safe[:, None]
        out_row = (b * L + tok) * H + head  # o is [B, L, H, DC] contiguous; lse [B, L, H]
        if SPLITS == 1:
            o_row = o_ptr + out_row * DC
            tl.store(o_row[:, None] + offs_d0[None, :], o0.to(o_ptr.dtype.element_ty), mask=rmask[:, None])
            tl.store(o_row[:, None] + offs_d1[None, :], o1.to(o_ptr.dtype.element_ty),
                     mask=rmask[:, None] & (offs_d1[None, :] < DC))
            tl.store(lse_ptr + out_row, lse, mask=rmask)
        else:  # fp32 partials [SPLITS, B*L*H, DC] and [SPLITS, B*L*H]
            n_rows = tl.num_programs(1) // G * L * H
            o_row = o_ptr + (split * n_rows + out_row) * DC
            tl.store(o_row[:, None] + offs_d0[None, :], o0, mask=rmask[:, None])
            tl.store(o_row[:, None] + offs_d1[None, :], o1, mask=rmask[:, None] & (offs_d1[None, :] < DC))
            tl.store(lse_ptr + split * n_rows + out_row, lse, mask=rmask)

    @triton.jit
    def _combine_splits(po_ptr, plse_ptr, o_ptr, lse_ptr, n_rows,
                        DC: tl.constexpr, DCP: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr):
        """o = sum_s exp(lse_s - lse) o_s, lse = logsumexp_s lse_s (rows of all splits)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        offs_d = tl.arange(0, DCP)
        dmask = rmask[:, None] & (offs_d[None, :] < DC)
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for s in tl.static_range(SPLITS):
            m = tl.maximum(m, tl.load(plse_ptr + s * n_rows + rows, mask=rmask, other=float("-inf")))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        tot = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, DCP], tl.float32)
        for s in tl.static_range(SPLITS):
            w = tl.exp(tl.load(plse_ptr + s * n_rows + rows, mask=rmask, other=float("-inf")) - m_safe)
            tot += w
            part = tl.load(po_ptr + (s * n_rows + rows)[:, None] * DC + offs_d[None, :], mask=dmask, other=0.0)
            acc += w[:, None] * part
        tot_safe = tl.where(tot > 0, tot, 1.0)
        tl.store(o_ptr + rows[:, None] * DC + offs_d[None, :], (acc / tot_safe[:, None]).to(o_ptr.dtype.element_ty),
                 mask=dmask)
        tl.store(lse_ptr + rows, m_safe + tl.log(tot_safe), mask=rmask)


# ----------------------------------------------------------------------------------------------
# Wrapper
# ----------------------------------------------------------------------------------------------
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _tma_ok(q_lat: torch.Tensor, *keys: torch.Tensor) -> bool:
    """Tensor descriptors need one dtype, 16-byte aligned bases and row strides (and group offsets)."""
    if any(t.dtype != q_lat.dtype for t in keys):
        return False
    el = q_lat.element_size()
    ok = all(t.data_ptr() % 16 == 0 and all((st * el) % 16 == 0 for st in t.stride()[:-1]) for t in keys)
    if ok:  # first (device-side) descriptor: give Triton its scratch allocator
        global _ALLOCATOR_SET
        if not _ALLOCATOR_SET:
            triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
            _ALLOCATOR_SET = True
    return ok


_ALLOCATOR_SET = False


def check_operands(q_lat, q_r, c_past, c_new, rho, s) -> None:
    if q_lat.ndim != 4 or q_r.ndim != 4 or q_lat.shape[:3] != q_r.shape[:3]:
        raise ValueError(f"latent attention: q_lat [B, L, H, dc] and q_r [B, L, H, dr] expected, got "
                         f"{tuple(q_lat.shape)} and {tuple(q_r.shape)}")
    b, l, h, dc = q_lat.shape
    for name, t in (("c_past", c_past), ("c_new", c_new)):
        if t.ndim != 3 or t.shape[0] != b or t.shape[2] != dc or t.stride(2) != 1:
            raise ValueError(f"latent attention: {name} must be [B={b}, n, dc={dc}] with unit last stride, got "
                             f"{tuple(t.shape)} strides {t.stride()}")
    lk = c_past.shape[1] + c_new.shape[1]
    if rho.ndim != 4 or rho.shape[0] != b or rho.shape[1] != lk or rho.shape[3] != q_r.shape[3] or rho.stride(3) != 1:
        raise ValueError(f"latent attention: rho must be [B={b}, Lk={lk}, G, dr={q_r.shape[3]}], got {tuple(rho.shape)}")
    if h % rho.shape[2]:
        raise ValueError(f"latent attention: {h} heads are not a multiple of {rho.shape[2]} RoPE key groups")
    if s.shape != (b, lk) or s.stride(1) != 1 or s.dtype != torch.float32:
        raise ValueError(f"latent attention: s must be float32 [B={b}, Lk={lk}], got {tuple(s.shape)} {s.dtype}")
    if c_new.shape[1] < 1:
        raise ValueError("latent attention: the current chunk has no keys")


def latent_attention(q_lat: torch.Tensor, q_r: torch.Tensor, c_past: torch.Tensor, c_new: torch.Tensor,
                     rho: torch.Tensor, s: torch.Tensor, scale: float,
                     config: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward. Shapes as in ``reference`` with the keys given as ``c_past`` [B, Lp, dc] (e.g. a
    cache prefix view) and ``c_new`` [B, Ln, dc]; ``rho`` and ``s`` cover all Lp + Ln keys.
    Returns (o_lat [B, L, H, dc] in q_lat's dtype, lse [B, L, H] float32)."""
    if triton is None:
        raise RuntimeError("latent attention kernel: Triton is not installed (use attention.impl=absorbed)")
    check_operands(q_lat, q_r, c_past, c_new, rho, s)
    b, l, h, dc = q_lat.shape
    g, dr = rho.shape[2], rho.shape[3]
    lp, ln = c_past.shape[1], c_new.shape[1]
    lk = lp + ln
    d0, d1, dr_p = pieces(dc, dr)
    on_gpu = q_lat.is_cuda
    cfg = config or default_config(dc, dr, on_gpu)
    q_lat = q_lat if q_lat.stride(3) == 1 else q_lat.contiguous()
    q_r = q_r if q_r.stride(3) == 1 else q_r.contiguous()
    m_tiles = triton.cdiv(l * (h // g), cfg.block_m)
    plan = SplitPlan.make(cfg, m_tiles * b * g, lk, b, l, h, dc, q_lat.device, q_lat.dtype)
    use_desc = on_gpu and not interpreting() and _tma_ok(q_lat, c_past, c_new, rho)
    _latent_attention_fwd[(m_tiles, b * g, plan.splits)](
        q_lat, q_r, c_past, c_new, rho, s, plan.o_buf, plan.lse_buf,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_r.stride(0), q_r.stride(1), q_r.stride(2),
        c_past.stride(0), c_past.stride(1), c_new.stride(0), c_new.stride(1),
        rho.stride(0), rho.stride(1), rho.stride(2), s.stride(0),
        l, lp, ln, plan.keys_per_split, scale * LOG2E,
        H=h, G=g, DC=dc, DRR=dr, D0=d0, D1=d1, DR=dr_p,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLITS=plan.splits, INTERPRET=interpreting(), USE_DESC=use_desc,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return plan.finish()


# ----------------------------------------------------------------------------------------------
# Test and benchmark hooks (STYLE 7)
# ----------------------------------------------------------------------------------------------
def random_inputs(b: int, l: int, h: int, dc: int, dr: int, lp: int, groups: int = 1, device="cpu",
                  dtype=torch.bfloat16, seed: int | None = None, q_gain: float = 1.0, d_n: int = 128) -> dict:
    """Fresh random inputs of the kernel's signature (``q_gain`` > 1 sharpens the softmax)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else torch.seed() % (1 << 62))

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    ln = l
    return dict(
        q_lat=rnd(b, l, h, dc, std=q_gain), q_r=rnd(b, l, h, dr, std=q_gain),
        c_past=rnd(b, lp, dc), c_new=rnd(b, ln, dc), rho=rnd(b, lp + ln, groups, dr),
        s=(0.5 + torch.rand(b, lp + ln, generator=gen)).to(device),
        scale=(d_n + dr) ** -0.5,  # the per-head q.k width, as in the model
    )


def check(inputs: dict, config: TileConfig | None = None) -> tuple[float, float]:
    """Relative errors (o, lse) of the kernel against the float64 reference."""
    o, lse = latent_attention(**inputs, config=config)
    c = torch.cat([inputs["c_past"], inputs["c_new"]], 1)
    o_ref, lse_ref = reference(inputs["q_lat"], inputs["q_r"], c, inputs["rho"], inputs["s"], inputs["scale"])
    err = lambda a, r: float((a.double() - r).norm() / r.norm())  # noqa: E731
    return err(o, o_ref), err(lse, lse_ref)


def bench(num_queries: int, num_cached: int, heads: int, dc: int, dr: int, groups: int = 1, d_n: int = 128,
          batch: int = 1, config: TileConfig | None = None) -> float:
    """Median ms of the kernel alone on a CUDA device (do_bench): ``num_queries`` query tokens (e.g. a chunk)
    attending to ``num_cached`` cached keys and to themselves; ``dr`` per RoPE-key group."""
    x = random_inputs(batch, num_queries, heads, dc, dr, num_cached, groups=groups, device="cuda", seed=0, d_n=d_n)
    return triton.testing.do_bench(lambda: latent_attention(**x, config=config), warmup=50, rep=300,
                                   return_mode="median")
