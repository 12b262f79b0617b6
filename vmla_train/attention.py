"""Self-attention (Wan MHA, VideoMLA latent attention) and Wan's text cross-attention.

Notation: B batch, L query tokens, Lk key tokens (cached prefix + current), D model width, H heads,
Dh head width, G RoPE-key groups, dc latent width, dn per-head content q/k width, dr per-group RoPE
width (``d_r / G``), and the per-head score width ``dn + dr``.

MLA (one layer)::

    c      = W_dkv x + b_dkv                    (B, Lk, dc)      cached
    kr     = W_kr  x + b_kr                     (B, Lk, G*dr)    cached raw (no norm, no RoPE)
    kn_h   = W_uk,h c                           (B, Lk, H, dn)
    s      = rsqrt(mean([kn; kr]^2) + eps)      (B, Lk)          Wan's full-width key RMSNorm as a scalar
    k_h    = s * [g_n,h * kn_h ; RoPE(g_r * kr_group(h))]
    v_h    = W_uv,h c + b_uv,h
    q_h    = RMSNorm(W_q x + b_q)_h = [q_c,h ; RoPE(q_r,h)]
    score  = (q_c,h . k_n,h + q_r,h . k_r) / sqrt(dn + dr)

The key norm (docs/design.md, option C): Wan normalises the whole key with one RMS over all heads, i.e. a
per-token scalar times a fixed diagonal ``g``. The diagonal folds into the up-projections (absorbed
path: into ``q~``), and the scalar ``s`` is computed from the cached ``c`` and ``kr`` via
``|W_uk c|^2 = c^T (W_uk^T W_uk) c``: exact, absorbable, and no extra cached value.

Reference path: decompress per-head K/V, then SDPA. Absorbed path: ``q~_h = (g_n,h W_uk,h)^T q_c,h``,
MQA over ``K = s * [c ; RoPE(g_r kr)]`` with ``V = c``, then ``W_uv,h`` after. Fused paths (cached forwards
without gradients): the absorbed function in one kernel, chosen and fed by ``kernels.dispatch``. Same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .config import AttentionImpl, AttentionKind, Config, KNorm, MaskBackend
from .kernels import dispatch
from .kv_cache import CacheStep, KVCache, Latent8Layout
from .rope import RopeSpec, Rotary, apply_rope


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 with a learned weight (Wan's q/k norm over the full width)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


@dataclass
class FrameMask:
    """Which key frames each query frame sees, for full (uncached) forwards.

    ``chunk_frames=None`` is bidirectional. Otherwise block-causal over chunks, optionally limited to
    ``sink_frames`` + the last ``window_frames - chunk_frames`` frames before the chunk + the chunk:
    exactly what a cached rollout with the same cache settings sees.

    ``teacher_forcing``: the sequence is two copies of F frames, clean (0 .. F-1) then noisy (F .. 2F-1), at
    the same positions (``positions``). Clean frames see clean frames block-causally (as above); a noisy
    frame of chunk c sees the clean frames the block-causal mask gives chunk c from *earlier* chunks, and
    the noisy frames of chunk c itself: what a cached rollout sees when its cache holds the clean frames.
    """

    chunk_frames: int | None = None
    window_frames: int | None = None
    sink_frames: int = 0
    teacher_forcing: bool = False

    def positions(self, num_frames: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Frame positions (RoPE) of the sequence's frames: 0 .. F-1, twice with ``teacher_forcing``."""
        if not self.teacher_forcing:
            return torch.arange(num_frames, device=device)
        return torch.arange(num_frames // 2, device=device).repeat(2)

    def frame_mask(self, num_frames: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        if self.teacher_forcing:
            if self.chunk_frames is None or num_frames % (2 * self.chunk_frames):
                raise ValueError(f"teacher-forcing mask: {num_frames} frames are not two copies of whole chunks of "
                                 f"{self.chunk_frames}")
            half = num_frames // 2
            base = FrameMask(self.chunk_frames, self.window_frames, self.sink_frames).frame_mask(half, device)  # (F, F)
            chunk = torch.arange(half, device=device) // self.chunk_frames
            earlier = chunk[None, :] < chunk[:, None]  # key chunk before the query's
            same = chunk[None, :] == chunk[:, None]
            top = torch.cat([base, torch.zeros_like(base)], 1)  # clean queries: clean keys, block-causal
            bottom = torch.cat([base & earlier, same], 1)  # noisy queries: earlier clean chunks + own noisy chunk
            return torch.cat([top, bottom], 0)  # (2F, 2F)
        if self.chunk_frames is None:
            return None
        f = torch.arange(num_frames, device=device)
        chunk = f // self.chunk_frames
        qi, kj = chunk[:, None], chunk[None, :]
        visible = kj <= qi  # block-causal (F, F)
        if self.window_frames is not None:
            ring = self.window_frames - self.chunk_frames
            start = (qi * self.chunk_frames)  # first frame of the query's chunk
            in_window = f[None, :] >= start - ring
            visible = visible & (in_window | (f[None, :] < self.sink_frames))
        return visible

    def token_mask(self, num_frames: int, tokens_per_frame: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        fm = self.frame_mask(num_frames, device)
        if fm is None:
            return None
        return fm.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)  # (L, L)

    def block_mask(self, num_frames: int, tokens_per_frame: int, device: torch.device | str = "cpu") -> BlockMask | None:
        """The same mask as a flex-attention BlockMask: O(L^2 / 128^2) memory instead of O(L^2)."""
        fm = self.frame_mask(num_frames, device)
        if fm is None:
            return None

        def mask_mod(b, h, q_idx, kv_idx):
            return fm[q_idx // tokens_per_frame, kv_idx // tokens_per_frame]

        n = num_frames * tokens_per_frame
        return create_block_mask(mask_mod, None, None, n, n, device=device)

    def build(self, num_frames: int, tokens_per_frame: int, device: torch.device, backend: MaskBackend):
        """A dense boolean mask or a BlockMask, by ``attention.mask_backend``.

        ``auto`` is the dense mask: on an H100 at 18 720 tokens (bf16, one 1.3B block) SDPA with the
        dense mask ran the forward in 17.8 ms (MHA) / 21.5 ms (MLA absorbed) against 24.6 / 192.6 ms for
        compiled flex (benchmarks/results/masked_forward-*.json). Flex saves the L^2 mask bytes.
        """
        if backend == MaskBackend.flex:
            return self.block_mask(num_frames, tokens_per_frame, device)
        return self.token_mask(num_frames, tokens_per_frame, device)


@dataclass
class AttnInputs:
    """Per-forward inputs shared by every self-attention layer."""

    q_rot: Rotary  # rotary for the current tokens (queries)
    k_rot: Rotary  # rotary for all keys: cached prefix then current tokens
    mask: torch.Tensor | BlockMask | None  # (L, Lk) bool (True = attend) or a flex BlockMask; None = all visible
    cache: KVCache | None = None
    step: CacheStep | None = None
    rot_abs: Rotary | None = None  # the current tokens at their absolute positions (8-bit caches only)


_compiled_flex = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float) -> torch.Tensor:
    """Flex attention, compiled on CUDA with flex's autotuned tiles (smaller ones were slower or no better on an
    H100: benchmarks/masked_forward.py)."""
    global _compiled_flex  # a cache of the compiled kernel, not a behaviour switch
    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=mask, scale=scale)  # eager: reference speed, same result
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=mask, scale=scale)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """q (B, L, H, d), k (B, Lk, H, d), v (B, Lk, H, dv) -> (B, L, H, dv); mask bool, BlockMask or None."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if isinstance(mask, BlockMask):
        o = _flex(q, k.contiguous(), v.contiguous(), mask, scale)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)


class _WanQKVO(nn.Module):
    """Wan's attention projections: q, k, v, out with biases; RMSNorm over the full width on q and k."""

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.num_heads, self.head_dim = m.num_heads, m.head_dim
        self.to_q = nn.Linear(m.dim, m.dim)
        self.to_k = nn.Linear(m.dim, m.dim)
        self.to_v = nn.Linear(m.dim, m.dim)
        self.to_out = nn.ModuleList([nn.Linear(m.dim, m.dim)])
        self.norm_q = RMSNorm(m.dim, m.eps)
        self.norm_k = RMSNorm(m.dim, m.eps)


class MHASelfAttention(_WanQKVO):
    """Wan2.1 self-attention: biases, full-width RMSNorm on q and k before RoPE, 3D RoPE per head."""

    @staticmethod
    def rope_spec(cfg: Config) -> RopeSpec:
        return RopeSpec.for_head(cfg.model.head_dim, cfg.model.rope_theta)

    @staticmethod
    def cache_widths(cfg: Config) -> dict[str, tuple[int, ...]]:
        return {"k": (cfg.model.num_heads, cfg.model.head_dim), "v": (cfg.model.num_heads, cfg.model.head_dim)}

    @staticmethod
    def cache_layouts(cfg: Config) -> dict:
        return {}

    def forward(self, x: torch.Tensor, inp: AttnInputs, layer: int) -> torch.Tensor:
        b, l, _ = x.shape  # (B, L, D)
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.num_heads, self.head_dim))  # (B, L, H, Dh)
        k = self.norm_k(self.to_k(x)).unflatten(-1, (self.num_heads, self.head_dim))  # (B, L, H, Dh)
        v = self.to_v(x).unflatten(-1, (self.num_heads, self.head_dim))  # (B, L, H, Dh)
        if inp.cache is not None:
            past = inp.cache.read(layer, inp.step)
            k_all = torch.cat([past["k"].to(k.dtype), k], 1)  # (B, Lk, H, Dh)
            v_all = torch.cat([past["v"].to(v.dtype), v], 1)
            inp.cache.write(layer, inp.step, k=k, v=v)
        else:
            k_all, v_all = k, v
        q = apply_rope(q, inp.q_rot)
        k_all = apply_rope(k_all, inp.k_rot)
        o = _sdpa(q, k_all, v_all, inp.mask, self.head_dim**-0.5)  # (B, L, H, Dh)
        return self.to_out[0](o.flatten(2))


class MLASelfAttention(nn.Module):
    """VideoMLA latent attention with a shared content latent and a decoupled 3D-RoPE key."""

    def __init__(self, cfg: Config):
        super().__init__()
        m, a = cfg.model, cfg.attention
        self.num_heads, self.head_dim = m.num_heads, m.head_dim
        self.d_c, self.groups = a.d_c, a.rope_key_groups
        self.d_r = a.d_r // a.rope_key_groups  # per group
        self.d_n = m.head_dim if a.qk_nope_head_dim == -1 else a.qk_nope_head_dim
        self.impl, self.kernel, self.backward = a.impl, a.kernel, a.backward
        self.k_norm = a.k_norm
        self.eps = m.eps
        qk = self.d_n + self.d_r
        self.scale = qk**-0.5  # the per-head q.k width, never (d_c + d_r)
        self.to_q = nn.Linear(m.dim, self.num_heads * qk)
        self.norm_q = RMSNorm(self.num_heads * qk, m.eps)
        self.to_kv_a = nn.Linear(m.dim, self.d_c)  # W_dkv
        self.to_k_rope = nn.Linear(m.dim, self.groups * self.d_r)  # W_kr
        self.k_up = nn.Linear(self.d_c, self.num_heads * self.d_n, bias=False)  # W_uk
        self.v_up = nn.Linear(self.d_c, self.num_heads * self.head_dim)  # W_uv
        if self.k_norm == KNorm.rms_scalar:
            self.norm_k = RMSNorm(self.num_heads * self.d_n + self.groups * self.d_r, m.eps)  # g = [g_n; g_r]
        self.to_out = nn.ModuleList([nn.Linear(m.dim, m.dim)])

    @staticmethod
    def rope_spec(cfg: Config) -> RopeSpec:
        a = cfg.attention
        return RopeSpec.for_key(cfg.model.head_dim, a.d_r // a.rope_key_groups, cfg.model.rope_theta)

    @staticmethod
    def cache_widths(cfg: Config) -> dict[str, tuple[int, ...]]:
        a = cfg.attention
        if cfg.cache.dtype == "8bit":  # 8-bit key rows [s c ; s rho] and latents (kv_cache.Latent8Layout)
            return Latent8Layout(a.d_c, a.d_r).widths
        return {"c": (a.d_c,), "kr": (a.d_r,)}

    @staticmethod
    def cache_layouts(cfg: Config) -> dict:
        """KVCache keyword arguments beyond the widths: the 8-bit format (``cache.dtype=8bit``)."""
        if cfg.cache.dtype != "8bit":
            return {}
        return {"eight_bit": Latent8Layout(cfg.attention.d_c, cfg.attention.d_r)}

    # Pieces shared by both paths ---------------------------------------------------------------
    def _key_scale(self, c: torch.Tensor, kr: torch.Tensor, kn: torch.Tensor | None = None) -> torch.Tensor:
        """s = rsqrt(mean([W_uk c; kr]^2) + eps) per key token, float32 (B, Lk, 1)."""
        if self.k_norm == KNorm.none:
            return torch.ones(*c.shape[:-1], 1, dtype=torch.float32, device=c.device)
        cf = c.float()
        if kn is None:  # |W_uk c|^2 = c^T (W_uk^T W_uk) c: no per-head decompression
            w = self.k_up.weight.float()  # (H*dn, dc)
            gram = w.t() @ w  # (dc, dc)
            sq_n = ((cf @ gram) * cf).sum(-1, keepdim=True)
        else:
            sq_n = kn.float().pow(2).sum(-1, keepdim=True)
        sq_r = kr.float().pow(2).sum(-1, keepdim=True)
        width = self.num_heads * self.d_n + self.groups * self.d_r
        return torch.rsqrt((sq_n + sq_r) / width + self.eps)

    def _gains(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.k_norm == KNorm.none:
            return None, None
        g = self.norm_k.weight
        return g[: self.num_heads * self.d_n], g[self.num_heads * self.d_n :]

    def _rope_key(self, kr: torch.Tensor, s: torch.Tensor, g_r: torch.Tensor | None, rot: Rotary) -> torch.Tensor:
        """RoPE(s * g_r * kr) as (B, Lk, G, dr)."""
        k = kr.float() * s
        if g_r is not None:
            k = k * g_r.float()
        return apply_rope(k.unflatten(-1, (self.groups, self.d_r)), rot)

    def _w_uk(self, g_n: torch.Tensor | None) -> torch.Tensor:
        """W_uk per head with the key norm's content gain folded in, (H, dn, dc): q_lat = q_c W_uk."""
        w_uk = self.k_up.weight.unflatten(0, (self.num_heads, self.d_n))
        return w_uk if g_n is None else w_uk * g_n.unflatten(0, (self.num_heads, self.d_n))[..., None]

    def _up_v(self, o_lat: torch.Tensor) -> torch.Tensor:
        """The latent output (B, L, H, dc) through W_uv and its bias: (B, L, H, Dh) (softmax rows sum to 1)."""
        H = self.num_heads
        w_uv = self.v_up.weight.unflatten(0, (H, self.head_dim))  # (H, Dh, dc)
        o = torch.einsum("blhc,hdc->blhd", o_lat, w_uv.to(o_lat.dtype))
        return o + self.v_up.bias.unflatten(0, (H, self.head_dim)).to(o.dtype)

    def forward(self, x: torch.Tensor, inp: AttnInputs, layer: int) -> torch.Tensor:
        H, dn, dr = self.num_heads, self.d_n, self.d_r
        q = self.norm_q(self.to_q(x)).unflatten(-1, (H, dn + dr))  # (B, L, H, dn+dr)
        q_c, q_r = q[..., :dn], apply_rope(q[..., dn:], inp.q_rot)  # (B, L, H, dn), (B, L, H, dr)
        c = self.to_kv_a(x)  # (B, L, dc)
        kr = self.to_k_rope(x)  # (B, L, G*dr)
        g_n, g_r = self._gains()
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.to_q.weight.requires_grad)
        cache, eight_bit = inp.cache, inp.cache is not None and inp.cache.eight_bit is not None
        impl = dispatch.resolve_impl(self.impl, q_c, inp.mask is None, needs_grad, self.backward, eight_bit)
        if impl in dispatch.FUSED:  # a fused kernel (kernels.dispatch: which one, its operands, the 8-bit cache)
            queries = dispatch.Queries(q_c, q_r, self._w_uk(g_n), self.scale, self.groups,
                                       q_r_abs=apply_rope(q[..., dn:], inp.rot_abs) if eight_bit else None)
            keys = dispatch.Keys(c, kr, inp.k_rot, self._key_scale, lambda k, rot: self._rope_key(k, 1.0, g_r, rot),
                                 rot_abs=inp.rot_abs)
            o = self._up_v(dispatch.latent_attention(impl, self.kernel, queries, keys, cache, layer, inp.step))
        else:
            if cache is not None:
                past = cache.read(layer, inp.step)  # views: used before this layer's write below
                c_all = torch.cat([past["c"].to(c.dtype), c], 1)  # (B, Lk, dc)
                kr_all = torch.cat([past["kr"].to(kr.dtype), kr], 1)  # (B, Lk, G*dr)
            else:
                c_all, kr_all = c, kr
            if impl == AttentionImpl.reference:
                o = self._reference(q_c, q_r, c_all, kr_all, g_n, g_r, inp)
            else:
                o = self._absorbed(q_c, q_r, c_all, kr_all, g_n, g_r, inp)
        if cache is not None and not eight_bit:  # (the 8-bit cache is written by the fused call)
            cache.write(layer, inp.step, c=c, kr=kr)
        return self.to_out[0](o.flatten(2).to(x.dtype))

    def _reference(self, q_c, q_r, c_all, kr_all, g_n, g_r, inp: AttnInputs) -> torch.Tensor:
        H, dn, G = self.num_heads, self.d_n, self.groups
        kn = self.k_up(c_all)  # (B, Lk, H*dn)
        s = self._key_scale(c_all, kr_all, kn)  # (B, Lk, 1)
        kn = kn.float() * s
        if g_n is not None:
            kn = kn * g_n.float()
        kn = kn.to(q_c.dtype).unflatten(-1, (H, dn))  # (B, Lk, H, dn)
        k_r = self._rope_key(kr_all, s, g_r, inp.k_rot).to(q_c.dtype)  # (B, Lk, G, dr)
        k_r = k_r.repeat_interleave(H // G, dim=2)  # (B, Lk, H, dr)
        v = self.v_up(c_all).unflatten(-1, (H, self.head_dim))  # (B, Lk, H, Dh)
        q = torch.cat([q_c, q_r], -1)  # (B, L, H, dn+dr)
        k = torch.cat([kn, k_r], -1)  # (B, Lk, H, dn+dr)
        return _sdpa(q, k, v, inp.mask, self.scale)  # (B, L, H, Dh)

    def _absorbed(self, q_c, q_r, c_all, kr_all, g_n, g_r, inp: AttnInputs) -> torch.Tensor:
        H, G = self.num_heads, self.groups
        w_uk = self._w_uk(g_n)  # (H, dn, dc)
        q_lat = torch.einsum("blhn,hnc->blhc", q_c, w_uk.to(q_c.dtype))  # (B, L, H, dc)
        s = self._key_scale(c_all, kr_all)  # (B, Lk, 1)
        k_r = self._rope_key(kr_all, s, g_r, inp.k_rot).to(q_c.dtype)  # (B, Lk, G, dr)
        k_c = (c_all.float() * s).to(q_c.dtype)[:, :, None, :].expand(-1, -1, G, -1)  # (B, Lk, G, dc)
        k = torch.cat([k_c, k_r], -1)  # (B, Lk, G, dc+dr)
        q = torch.cat([q_lat, q_r], -1)  # (B, L, H, dc+dr)
        v = c_all.to(q_c.dtype)[:, :, None, :]  # (B, Lk, 1, dc)
        rep = H // G
        k = k.repeat_interleave(rep, dim=2) if G > 1 else k.expand(-1, -1, H, -1)  # (B, Lk, H, dc+dr)
        v = v.expand(-1, -1, H, -1)  # (B, Lk, H, dc)
        o_lat = _sdpa(q, k, v, inp.mask, self.scale)  # (B, L, H, dc)
        return self._up_v(o_lat)


class CrossAttention(_WanQKVO):
    """Wan text cross-attention (no RoPE, full-width RMSNorm on q and k). K/V cacheable per prompt."""

    def text_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.norm_k(self.to_k(text)).unflatten(-1, (self.num_heads, self.head_dim))  # (B, Lt, H, Dh)
        v = self.to_v(text).unflatten(-1, (self.num_heads, self.head_dim))
        return k, v

    def forward(self, x: torch.Tensor, text: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        kv = cache.cross_kv(layer) if cache is not None else None
        if kv is None:
            if text is None:
                raise ValueError("cross-attention needs the text embeddings (no cached K/V for this prompt)")
            kv = self.text_kv(text)
            if cache is not None:
                cache.set_cross_kv(layer, *kv)
        k, v = kv
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.num_heads, self.head_dim))  # (B, L, H, Dh)
        o = _sdpa(q, k.to(q.dtype), v.to(q.dtype), None, self.head_dim**-0.5)
        return self.to_out[0](o.flatten(2))


def self_attention_class(cfg: Config) -> type[MHASelfAttention] | type[MLASelfAttention]:
    return MHASelfAttention if cfg.attention.kind == AttentionKind.mha else MLASelfAttention
