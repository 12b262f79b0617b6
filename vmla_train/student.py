"""The block-causal Wan2.1 DiT student with pluggable self-attention (``mha`` | ``mla``).

Architecture only: no training infrastructure. Parameter names follow diffusers'
``WanTransformer3DModel`` (``blocks.N.attn1.to_q``, ``condition_embedder.time_proj``, ...), so a Wan
checkpoint in diffusers layout loads into the ``mha`` student as is, and the parity test proves the
two compute the same function.

Shapes: latents ``x`` are [B, F, C, H, W] (frame-major: chunks are slices on dim 1); timesteps ``t``
are per frame [B, F] (or [B], broadcast); text embeddings [B, Lt, text_dim] with Lt <= text_len are
zero-padded to text_len as Wan does. Tokens are frame-major: L = F' * N with F' = F / p_t frames of
N = (H / p_h) * (W / p_w) tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttnInputs, CrossAttention, FrameMask, self_attention_class
from .config import Config, torch_dtype
from .kv_cache import KVCache
from .rope import Rotary, rope_angles


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Wan's sinusoidal timestep features [..., dim] as (cos, sin) halves, float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[..., None] * torch.exp(exponent)  # (..., half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _Linear2(nn.Module):
    """Two linears with an activation between (names linear_1 / linear_2 as in diffusers)."""

    def __init__(self, d_in: int, d_out: int, act: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out)
        self.act = act
        self.linear_2 = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Timestep MLP (+ projection to the 6 modulation vectors) and text projection."""

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.freq_dim = m.freq_dim
        self.time_embedder = _Linear2(m.freq_dim, m.dim, nn.SiLU())
        self.time_proj = nn.Linear(m.dim, 6 * m.dim)
        self.text_embedder = _Linear2(m.text_dim, m.dim, nn.GELU(approximate="tanh"))


class _GeluProj(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


class WanBlock(nn.Module):
    """Self-attention -> text cross-attention -> FFN, with per-frame adaLN modulation.

    ``mod`` [B, F', 6, D] (float32): shift/scale/gate for attention, then for the FFN.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.eps = m.eps
        self.attn1 = self_attention_class(cfg)(cfg)
        self.attn2 = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(m.dim, eps=m.eps) if m.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(m.dim, m.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, m.dim) / m.dim**0.5)

    def _cross_norm(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm2, nn.Identity):
            return x
        w, b = self.norm2.weight.float(), self.norm2.bias.float()
        return F.layer_norm(x.float(), x.shape[-1:], w, b, self.eps).to(x.dtype)

    def forward(
        self, x: torch.Tensor, mod: torch.Tensor, text: torch.Tensor | None, inp: AttnInputs, layer: int, frames: int
    ) -> torch.Tensor:
        b, l, d = x.shape  # (B, L, D), L = frames * N
        e = (self.scale_shift_table[:, None].float() + mod).unbind(2)  # 6 x (B, F', D)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (t[:, :, None] for t in e)  # (B, F', 1, D)

        def per_frame(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(1, (frames, l // frames))  # (B, F', N, D)

        h = (per_frame(_layer_norm(x, self.eps)) * (1 + scale_a) + shift_a).flatten(1, 2).to(x.dtype)
        a = self.attn1(h, inp, layer)
        x = (per_frame(x.float()) + per_frame(a.float()) * gate_a).flatten(1, 2).to(x.dtype)
        h = self._cross_norm(x)
        x = x + self.attn2(h, text, inp.cache, layer)
        h = (per_frame(_layer_norm(x, self.eps)) * (1 + scale_f) + shift_f).flatten(1, 2).to(x.dtype)
        f = self.ffn(h)
        return (per_frame(x.float()) + per_frame(f.float()) * gate_f).flatten(1, 2).to(x.dtype)


class WanStudent(nn.Module):
    """Wan2.1 text-to-video DiT; block-causal through masks (training) or a KV cache (rollouts)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.patch_size = tuple(m.patch_size)
        self.patch_embedding = nn.Conv3d(m.in_channels, m.dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(m.num_layers)])
        self.proj_out = nn.Linear(m.dim, m.out_channels * math.prod(self.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, m.dim) / m.dim**0.5)
        self._attn_cls = self_attention_class(cfg)
        self.rope_spec = self._attn_cls.rope_spec(cfg)

    # Cache ------------------------------------------------------------------------------------
    def new_cache(self, batch: int, device: torch.device | str | None = None) -> KVCache:
        """An empty cache for ``batch`` videos with this config's window, sinks and position scheme."""
        c, v = self.cfg.cache, self.cfg.video
        return KVCache(
            num_layers=self.cfg.model.num_layers,
            batch=batch,
            tokens_per_frame=self.cfg.tokens_per_frame,
            sink_frames=c.sink_frames,
            window_frames=c.window_frames,
            chunk_frames=v.chunk_frames // self.patch_size[0],
            widths=self._attn_cls.cache_widths(self.cfg),
            position_scheme=c.position_scheme,
            dtype=torch_dtype(c.dtype) if c.dtype != "8bit" else torch.bfloat16,  # 8bit: the layout's dtypes
            device=device if device is not None else self.proj_out.weight.device,
            **self._attn_cls.cache_layouts(self.cfg),
        )

    # Forward ----------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        *,
        mask: FrameMask | None = None,
        cache: KVCache | None = None,
        write_cache: bool = False,
    ) -> torch.Tensor:
        """Predict the flow (Wan's output) for latents ``x`` [B, F, C, H, W] at timesteps ``t``.

        Without ``cache``: a full forward; ``mask`` chooses bidirectional (None) or block-causal.
        With ``cache``: ``x`` is the next chunk; it attends to the cached frames and itself, and if
        ``write_cache`` its entries are stored (the clean re-run at t = 0 in self-forcing).
        """
        b, nf, ch, hh, ww = x.shape  # (B, F, C, H, W)
        pt, ph, pw = self.patch_size
        if nf % pt or hh % ph or ww % pw:
            raise ValueError(f"latents [B, F, C, H, W]={tuple(x.shape)} not divisible by patch {self.patch_size}")
        fp, hp, wp = nf // pt, hh // ph, ww // pw
        tokens = self.patch_embedding(x.transpose(1, 2))  # (B, D, F', H', W')
        tokens = tokens.flatten(2).transpose(1, 2).contiguous()  # (B, L, D)

        # Per-frame conditioning: t [B, F] -> mod [B, F', 6, D]; temb [B, F', D].
        if t.ndim == 1:
            t = t[:, None].expand(b, nf)
        if t.shape != (b, nf):
            raise ValueError(f"timesteps: expected [B, F]=({b}, {nf}) or [B], got {tuple(t.shape)}")
        t = t[:, ::pt]  # (B, F')
        ce = self.condition_embedder
        temb = ce.time_embedder(timestep_sinusoid(t, ce.freq_dim).to(ce.time_embedder.linear_1.weight.dtype))
        temb = temb.to(tokens.dtype)  # (B, F', D)
        mod = ce.time_proj(F.silu(temb)).unflatten(-1, (6, -1)).float()  # (B, F', 6, D)

        need_text = cache is None or cache.cross_kv(0) is None
        text_emb = ce.text_embedder(self._pad_text(text).to(tokens.dtype)) if need_text else None

        inp = self._attn_inputs(fp, hp, wp, tokens.device, mask, cache, write_cache)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, mod, text_emb, inp, i, fp)
        if cache is not None:
            cache.commit(inp.step)

        shift, scale = (self.scale_shift_table[:, None].float() + temb.float()[:, :, None]).unbind(2)  # (B, F', D)
        h = _layer_norm(tokens, self.cfg.model.eps).unflatten(1, (fp, hp * wp))  # (B, F', N, D)
        h = (h * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2).to(tokens.dtype)
        out = self.proj_out(h)  # (B, L, pt*ph*pw*C)
        out = out.reshape(b, fp, hp, wp, pt, ph, pw, -1)  # (B, F', H', W', pt, ph, pw, C)
        out = out.permute(0, 1, 4, 7, 2, 5, 3, 6)  # (B, F', pt, C, H', ph, W', pw)
        return out.reshape(b, nf, -1, hh, ww)  # (B, F, C, H, W)

    def _pad_text(self, text: torch.Tensor) -> torch.Tensor:
        n = self.cfg.model.text_len
        if text.ndim != 3 or text.shape[-1] != self.cfg.model.text_dim:
            raise ValueError(f"text embeddings: expected [B, Lt, {self.cfg.model.text_dim}], got {tuple(text.shape)}")
        if text.shape[1] > n:
            raise ValueError(f"text embeddings: {text.shape[1]} tokens > model.text_len={n}")
        return F.pad(text, (0, 0, 0, n - text.shape[1]))  # Wan pads with zeros to text_len

    def _attn_inputs(
        self, fp: int, hp: int, wp: int, device: torch.device, mask: FrameMask | None, cache: KVCache | None, write: bool
    ) -> AttnInputs:
        n = hp * wp
        if cache is None:
            pos = mask.positions(fp, device) if mask is not None else torch.arange(fp, device=device)
            rot = Rotary.from_angles(rope_angles(self.rope_spec, pos, hp, wp))
            token_mask = mask.build(fp, n, device, self.cfg.attention.mask_backend) if mask is not None else None
            return AttnInputs(q_rot=rot, k_rot=rot, mask=token_mask)
        if n != cache.tokens_per_frame:
            raise ValueError(f"chunk has {n} tokens per frame, the cache was built for {cache.tokens_per_frame}")
        step = cache.begin(fp, write)
        if step.rotary is not None:  # tables made before the forward (a CUDA-graph replay's static buffers)
            q_rot, k_rot, rot_abs = step.rotary
            return AttnInputs(q_rot=q_rot, k_rot=k_rot, mask=None, cache=cache, step=step, rot_abs=rot_abs)
        k_rot = Rotary.from_angles(rope_angles(self.rope_spec, step.key_frame_pos, hp, wp))
        q_rot = Rotary.from_angles(rope_angles(self.rope_spec, step.query_frame_pos, hp, wp))
        rot_abs = None
        if cache.eight_bit is not None:  # an 8-bit cache stores keys rotated at absolute positions (kv_cache doc)
            abs_pos = torch.arange(step.first_frame, step.first_frame + fp, device=device)
            rot_abs = Rotary.from_angles(rope_angles(self.rope_spec, abs_pos, hp, wp))
        return AttnInputs(q_rot=q_rot, k_rot=k_rot, mask=None, cache=cache, step=step, rot_abs=rot_abs)


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameters in total and in self-attention (the part MLA changes)."""
    total = sum(p.numel() for p in model.parameters())
    attn = sum(p.numel() for n, p in model.named_parameters() if ".attn1." in n)
    return {"total": total, "self_attention": attn}
