"""Rasterising a scene: hard-edged shapes in exact palette colours over the background, uint8 RGB.

Frame ``n`` is a function of ``n`` alone (closed-form positions, whole-pixel texture shifts), so
``render(scene, k, start_frame=a)`` equals ``render(scene, a + k)[a:]`` bit for bit. A pixel belongs to
a shape when its centre ``(j + 0.5, i + 0.5)`` lies inside (no anti-aliasing). Shapes of centre
``(cx, cy)`` and diameter ``d = 2 r``: circle ``|p - c| <= r``; square ``|px - cx|, |py - cy| <= r``;
triangle (apex up, base ``d``, height ``d``) ``cy - r <= py <= cy + r`` and ``|px - cx| <= (py - cy + r) / 2``.
Objects are drawn far to near (larger ``depth`` first).
"""

from __future__ import annotations

import math

import numpy as np

from .scene import PALETTE, TEXTURE_AMPLITUDE, Background, Scene, WorldObject, trajectory


def texture_tile(bg: Background, height: int, width: int) -> np.ndarray:
    """The texture's offsets from its base tone: int16 [H, W], blocks of ~1/16 frame height, periodic."""
    rng = np.random.default_rng(bg.seed)
    cell = max(2, height // 16)
    coarse = rng.integers(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE + 1, size=(math.ceil(height / cell), math.ceil(width / cell)))
    return np.repeat(np.repeat(coarse, cell, 0), cell, 1)[:height, :width].astype(np.int16)


def texture_shift(bg: Background, frames: np.ndarray) -> np.ndarray:
    """Whole-pixel texture offset (dx, dy) at each frame: floor(n * v). int [N, 2]."""
    n = np.asarray(frames, np.float64)[:, None]
    return np.floor(n * np.asarray(bg.velocity, np.float64)[None]).astype(np.int64)


def background(scene: Scene, frames) -> np.ndarray:
    """Background of the given frame indices: uint8 [N, H, W, 3]."""
    bg, h, w = scene.background, scene.height, scene.width
    frames = np.asarray(frames)
    c1 = np.asarray(bg.colour, np.float64)
    if bg.kind == "gradient":
        c2 = np.asarray(bg.colour2, np.float64)
        t = (np.arange(h if bg.axis == "vertical" else w) + 0.5) / (h if bg.axis == "vertical" else w)
        ramp = np.rint(c1 + (c2 - c1) * t[:, None]).astype(np.uint8)  # [L, 3]
        img = np.broadcast_to(ramp[:, None] if bg.axis == "vertical" else ramp[None], (h, w, 3))
        return np.broadcast_to(img, (len(frames), h, w, 3)).copy()
    if bg.kind == "texture":
        tile = texture_tile(bg, h, w)
        out = np.empty((len(frames), h, w, 3), np.uint8)
        for k, (dx, dy) in enumerate(texture_shift(bg, frames)):
            out[k] = np.clip(c1 + np.roll(tile, (int(dy), int(dx)), axis=(0, 1))[..., None], 0, 255).astype(np.uint8)
        return out
    return np.broadcast_to(np.asarray(bg.colour, np.uint8), (len(frames), h, w, 3)).copy()


def object_mask(scene: Scene, obj: WorldObject, frames) -> np.ndarray:
    """Pixels covered by ``obj`` (ignoring other objects): bool [N, H, W]."""
    centre, _ = trajectory(scene, obj, frames)
    cx, cy = centre[:, 0, None, None], centre[:, 1, None, None]  # [N, 1, 1]
    r = scene.diameter(obj) / 2
    dx = (np.arange(scene.width) + 0.5)[None, None, :] - cx  # [N, 1, W]
    dy = (np.arange(scene.height) + 0.5)[None, :, None] - cy  # [N, H, 1]
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def render_labels(scene: Scene, num_frames: int, start_frame: int = 0) -> np.ndarray:
    """Which object each pixel shows (index into ``scene.objects``, -1 = background): int8 [T, H, W]."""
    frames = np.arange(start_frame, start_frame + num_frames)
    labels = np.full((num_frames, scene.height, scene.width), -1, np.int8)
    for i in sorted(range(len(scene.objects)), key=lambda i: -scene.objects[i].depth):  # far to near
        labels[object_mask(scene, scene.objects[i], frames)] = i
    return labels


def render(scene: Scene, num_frames: int, start_frame: int = 0) -> np.ndarray:
    """Frames ``start_frame .. start_frame + num_frames - 1``: uint8 [T, H, W, 3]."""
    if num_frames < 1 or start_frame < 0:
        raise ValueError(f"render: num_frames={num_frames} must be >= 1 and start_frame={start_frame} >= 0")
    out = background(scene, np.arange(start_frame, start_frame + num_frames))
    labels = render_labels(scene, num_frames, start_frame)
    for i, obj in enumerate(scene.objects):
        out[labels == i] = PALETTE[obj.colour]
    return out
