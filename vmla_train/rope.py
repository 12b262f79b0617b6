"""Wan's 3D rotary position embedding: interleaved complex pairs split over the t / h / w axes.

A head of ``head_dim`` values is ``head_dim / 2`` adjacent pairs ``(x[2i], x[2i+1])``. Wan splits the
pairs over the axes as ``h = w = head_dim // 6`` pairs and ``t`` = the rest (22 / 21 / 21 for 128).
Pair ``j`` of an axis with ``D`` values rotates by ``pos * theta ** (-2j / D)``: the first pairs of an
axis turn fastest. Angles are computed in float64 from integer positions, so there is no table and no
length cap: a rollout of any length gets exact angles.

An MLA RoPE key of ``d`` values per group uses ``d // 6`` pairs for h and w and the rest for t, and
takes the *fastest* pairs of each axis of the head's table (the ones that rotate over a window; the
slow ones carry almost no position and live in the content latent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def axis_pairs(dim: int) -> tuple[int, int, int]:
    """RoPE pairs per axis (t, h, w) for ``dim`` values, as Wan splits them (dim=128 -> 22, 21, 21)."""
    hw = dim // 6
    return dim // 2 - 2 * hw, hw, hw


@dataclass(frozen=True)
class RopeSpec:
    """Which frequencies a rotated vector of ``2 * sum(pairs)`` values uses.

    ``head_dim`` fixes the per-axis frequency tables (Wan's), ``pairs`` how many of the fastest pairs of
    each axis are taken, in t, h, w order.
    """

    head_dim: int
    pairs: tuple[int, int, int]
    theta: float = 10000.0

    @classmethod
    def for_head(cls, head_dim: int, theta: float = 10000.0) -> "RopeSpec":
        return cls(head_dim, axis_pairs(head_dim), theta)

    @classmethod
    def for_key(cls, head_dim: int, key_dim: int, theta: float = 10000.0) -> "RopeSpec":
        pairs = axis_pairs(key_dim)
        full = axis_pairs(head_dim)
        if any(p > f for p, f in zip(pairs, full)):
            raise ValueError(f"RoPE key of {key_dim} values needs pairs {pairs}, a head of {head_dim} has only {full}")
        return cls(head_dim, pairs, theta)

    @property
    def dim(self) -> int:
        return 2 * sum(self.pairs)

    def frequencies(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Angular frequency per pair for each axis, float64."""
        out = []
        for n, axis_dim in zip(self.pairs, (2 * p for p in axis_pairs(self.head_dim))):
            j = torch.arange(n, dtype=torch.float64)
            out.append(self.theta ** (-2.0 * j / axis_dim))
        return tuple(out)  # type: ignore[return-value]


def rope_angles(spec: RopeSpec, frame_pos: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Angles [F * height * width, pairs] (float64) for tokens laid out frame-major, then h, then w.

    ``frame_pos`` [F] holds each token frame's temporal position (any integers, no cap).
    """
    ft, fh, fw = spec.frequencies()
    dev = frame_pos.device
    t = frame_pos.to(torch.float64)[:, None] * ft.to(dev)  # (F, pt)
    h = torch.arange(height, dtype=torch.float64, device=dev)[:, None] * fh.to(dev)  # (H, ph)
    w = torch.arange(width, dtype=torch.float64, device=dev)[:, None] * fw.to(dev)  # (W, pw)
    nf = frame_pos.shape[0]
    ang = torch.cat(
        [
            t[:, None, None, :].expand(nf, height, width, -1),
            h[None, :, None, :].expand(nf, height, width, -1),
            w[None, None, :, :].expand(nf, height, width, -1),
        ],
        dim=-1,
    )  # (F, H, W, pairs)
    return ang.reshape(nf * height * width, -1)


@dataclass
class Rotary:
    """cos / sin of the angles for one token sequence, in the dtype the rotation runs in."""

    cos: torch.Tensor  # (L, pairs)
    sin: torch.Tensor  # (L, pairs)

    @classmethod
    def from_angles(cls, angles: torch.Tensor, dtype: torch.dtype = torch.float32) -> "Rotary":
        return cls(torch.cos(angles).to(dtype), torch.sin(angles).to(dtype))

    def cat(self, other: "Rotary") -> "Rotary":
        return Rotary(torch.cat([self.cos, other.cos]), torch.cat([self.sin, other.sin]))


def apply_rope(x: torch.Tensor, rot: Rotary) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` [B, L, G, d] (d = 2 * pairs) by ``rot`` (L, pairs).

    Runs in float32 (or the rotation's dtype if wider) and returns ``x``'s dtype.
    """
    b, l, g, d = x.shape  # (B, L, G, d)
    if rot.cos.shape != (l, d // 2):
        raise ValueError(f"RoPE: tensor has {l} tokens x {d // 2} pairs, angles are {tuple(rot.cos.shape)}")
    work = torch.promote_types(x.dtype, rot.cos.dtype)
    if work not in (torch.float32, torch.float64):
        work = torch.float32
    xp = x.to(work).unflatten(-1, (d // 2, 2))  # (B, L, G, pairs, 2)
    x1, x2 = xp[..., 0], xp[..., 1]
    cos = rot.cos.to(work)[None, :, None, :]
    sin = rot.sin.to(work)[None, :, None, :]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, L, G, pairs, 2)
    return out.flatten(-2).to(x.dtype)
