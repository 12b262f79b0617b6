"""The 8-bit formats of latent attention, in plain torch: what the 8-bit kernels read and the 8-bit cache stores.

Notation as in ``latent_attention``: B batch, n tokens, dc latent width, G dr all RoPE-key groups together.

- key rows ``[s c ; s RoPE(g_r kr)]`` [B, n, dc + G dr]: int8, rows padded with zeros to 16 bytes (TMA row
  strides), one scale per sequence ``ks = amax / 127``;
- latents ``c`` [B, n, dc]: e4m3 stored token-last [B, dc, n] (rows padded to 16 bytes: the kernels read value
  columns in whole 16-byte groups), one scale per sequence ``vs = amax / 448``.

Why these formats: ``latent_attention_fp8``'s module doc. No Triton here: ``kv_cache`` uses it on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
ALIGN = 16  # bytes: TMA row strides and the padded widths of 8-bit rows


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def key_width(dc: int, dr_all: int) -> int:
    """Stored int8 key-row width: dc + G dr rounded up to 16 bytes (TMA row strides)."""
    return round_up(dc + dr_all, ALIGN)


def sequence_scale(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """One scale per sequence of x [B, n, d]: amax / qmax, [B] float32 (1 where x is empty or zero)."""
    amax = x.abs().amax((1, 2)).float() if x.shape[1] else torch.ones(x.shape[0], device=x.device)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def to8(x: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [B, ...] times a per-sequence ``factor`` [B] (1 / scale), in int8 (rounded) or e4m3. The factor
    keeps |x| within the format's range: no clamp."""
    y = x.float() * factor.view(-1, *[1] * (x.dim() - 1))
    return (torch.round(y) if dtype == torch.int8 else y).to(dtype)


@dataclass
class Latent8:
    """8-bit keys and values of n tokens (see the module doc): ``k`` [B, n, >= dc + G dr] int8 and ``v`` [B, dc, n]
    e4m3 (row stride a multiple of 16 bytes and >= n, finite padding: the kernel reads value columns in whole
    16-byte groups), with one scale per sequence each, ``ks`` and ``vs`` [B] fp32."""

    k: torch.Tensor
    ks: torch.Tensor
    v: torch.Tensor
    vs: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    def dequantize(self, key_width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key rows [B, n, key_width], c [B, n, dc]) in float32."""
        krow = self.k[..., :key_width].float() * self.ks[:, None, None]
        c = self.v.float().transpose(1, 2) * self.vs[:, None, None]
        return krow, c


def quantize_keys(krow: torch.Tensor, c: torch.Tensor) -> Latent8:
    """Key rows [B, n, dc + G dr] and latents [B, n, dc] -> ``Latent8`` with their own scales."""
    b, n, dc = c.shape
    ks, vs = sequence_scale(krow, INT8_MAX), sequence_scale(c, FP8_MAX)
    k8 = torch.zeros(b, n, key_width(dc, krow.shape[2] - dc), device=c.device, dtype=torch.int8)
    k8[..., :krow.shape[2]] = to8(krow, 1 / ks, torch.int8)
    # rows padded to 16 bytes with zeros: the kernel reads value columns in whole 16-byte groups
    vt = torch.zeros(b, dc, round_up(max(n, 1), ALIGN), device=c.device, dtype=FP8)[:, :, :n]
    vt.copy_(to8(c, 1 / vs, FP8).transpose(1, 2))
    return Latent8(k8, ks, vt, vs)
