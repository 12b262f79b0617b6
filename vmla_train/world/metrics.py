"""Exact metrics of world videos, computed from decoded frames alone (uint8 [T, H, W, 3]).

Detection: every pixel takes the nearest palette colour if it lies within ``tolerance`` (RGB distance),
else it is background; isolated pixels (fewer than 2 of 8 neighbours alike) are dropped. Per frame and
palette colour: present (>= ``min_pixels``), area, centroid, bounding box, and - only when the object is
*clean* (no other colour within ``touch_px`` pixels, bounding box off the frame border) - a shape class
from the fill ratio area / bbox area (square > 0.9 > circle > 0.64 > triangle; exact values pi/4 and 1/2)
and a size class from max(bbox w, bbox h) / H (threshold halfway between ``SIZES``).

Occlusion: an absent colour counts as *hidden* (present for identity and adherence) while it is gone
between two frames where it touches another colour with at most ``HIDDEN_AREA`` = 0.6 of its median
area showing (a gap at the clip's start or end needs only its other side): it slid behind something and
came out again. Going fully behind takes the sliver that one frame of relative motion uncovers (at most
0.42 of the area in 340 sampled ground-truth scenes), while a vanishing object shows all of it.

Tracks: an object's *runs* are maximal spans of consecutive frames where it is clean and its bounding
box keeps ``|v_x| + 1`` px from the left and right borders and ``|v_y| + 1`` px from the top and bottom
(no bounce inside). A lossy codec erodes a bounding box (libx264 crf 10, yuv420p: up to 3 px at a border
in 72 ground-truth clips), so that test can miss a bounce; a run whose centroids stray more than the
raster bound ``sqrt(2) RASTER_PX`` from a straight line is therefore split at its best two-line break
(recursively, pieces under 3 frames dropped) when every piece then lies within that bound and each axis
whose velocity flips there was heading for a border its box reaches within the margin + ``CODEC_PX`` = 4
px: a reflection. Rendered runs are never split (they meet the bound); an object turning back in mid-frame
is not a reflection, keeps its one run and scores a physics error. Per run of >= 3 frames: the least-squares velocity ``m`` (px / frame) and its
direction (nearest of the 8 names, "still" when ``|m| < 0.25 |v|``). ``v`` is the expected velocity:
the scene's, or the prompt's direction x speed (an unnamed speed takes the class nearest to the
measured one).

Rasterisation allowance. A pixel belongs to a shape when its centre lies inside, so a detected centroid
is the true centre plus a fixed per-shape offset (a triangle's lies below its centre) plus a
quantisation error ``q`` that depends on the sub-pixel phase. On an axis where every pixel line of the
shape is an interval symmetric about the centre (circle and square: both axes; triangle: x) each line's
midpoint is off by less than half a pixel, so ``|q| < RASTER_PX = 0.5`` px; the triangle's y axis has
no such argument, and half the range of its ``q`` measures 0.46-0.50 px at H = 60-128 (0.54 at H = 32;
41 x 41 sub-pixel phases, isolated-pixel filter included). Hence on ground truth, per run of L frames
with centred frame indices t:

- the least-squares slope is off by at most ``s_L = RASTER_PX sum|t| / sum t^2`` per axis (constant
  offsets cancel as sum t = 0): 0.5 px / frame at L = 3, 0.09 at L = 16;
- the RMS distance of the centroids from their least-squares line is at most the RMS of ``q`` (a
  projection never lengthens a vector), so at most ``sqrt(2) RASTER_PX`` px over both axes.

The metrics:

- adherence: an object adheres when present (or hidden) in >= half the frames, its majority shape and
  majority size match the prompt, and the prompted initial direction (a scene target: the scene's
  direction at the first run's start) is one of the names of the velocities within ``s_L`` per axis of
  the first run's ``m`` (a short run cannot tell neighbouring directions apart); unnamed attributes
  always match. Later segments accept any reflection of the initial direction. A video adheres when all
  its objects do. Reported per video (0/1) and as the fraction of objects.
- motion_error: run-length-weighted mean of
  (max(0, ||m_x| - |v_x|| - s_L) + max(0, ||m_y| - |v_y|| - s_L)) / (|v_x| + |v_y|).
- physics_error: run-length-weighted mean of max(0, rms - sqrt(2) RASTER_PX) / d, with rms the RMS
  distance (px) of a run's centroids from its least-squares constant-velocity line and d the object's
  diameter: exact constant-velocity motion scores 0; acceleration, jitter or a jump inside a run scores
  its deviation beyond the rasterisation bound in diameters. Both errors are clipped to [0, 1]; an
  object with no run scores 1.
- identity: fraction of frames whose set of present or hidden colours equals the prompted set.
- background: motion-compensated change of background pixels, min over whole-pixel shifts s of
  mean |B_t(p) - B_{t-1}(p - s)| / 255 (0 for any rigidly drifting background, plain or textured).
- chunk_jump: mean frame-to-frame change across chunk boundaries over that within chunks.
- switch_jump: the same at the frames where a prompt script's new prompt takes over (``switch_jump``).

Every metric is also computed per time segment (a segment without evidence takes the video value),
giving quality-over-time curves and a drift score per metric: the weighted mean over segments k >= 1
(weights k) of the drop m_0 - m_k (scores) or the rise (m_k - m_0) / max(m_0, floor) (errors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .scene import (COLOURS, DIRECTIONS, PALETTE, SHAPES, SIZES, SPEEDS, TEXTURE_SPEED, PromptSpec, Scene,
                    trajectory)

DEFAULT_TOLERANCE = 60.0  # RGB distance: palette colours are >= 180 apart, backgrounds >= 120 away
SQUARE_FILL, CIRCLE_FILL = 0.9, 0.64  # fill-ratio thresholds (square 1, circle pi/4, triangle 1/2)
SIZE_SPLIT = sum(SIZES.values()) / len(SIZES)  # extent / H threshold between small and large
MIN_RUN = 3  # frames in a run with a measurable velocity
RASTER_PX = 0.5  # px per axis: how far a rasterised centroid strays from a straight path (module doc)
STILL = 0.25  # |m| below this fraction of |v|: "still"
CODEC_PX = 4  # px a lossy codec may pull a bounding box in from the frame border (module doc)
HIDDEN_AREA = 0.6  # area fraction an object can show the frame before it is fully behind another (module doc)
SCORES = ("adherence", "object_adherence", "identity")  # higher is better, in [0, 1]
OBJECT_CHECKS = ("present_ok", "shape_ok", "size_ok", "direction_ok", "adheres")  # per prompted object, 0 or 1
ERRORS = ("motion_error", "physics_error", "background")  # lower is better
DRIFT_FLOOR = {"motion_error": 0.25, "physics_error": 0.25, "background": 0.02}  # error scale below which changes are noise
_INTERNAL = ("class_direction", "class_consistent", "consistent", "run_start")  # per-object keys left out of results
_RGB = np.array([PALETTE[c] for c in COLOURS], np.float32)  # [C, 3]


# ----------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------
@dataclass
class Detections:
    """Per frame t and palette colour c (order ``COLOURS``); absent entries hold -1 / nan."""

    labels: np.ndarray  # int8 [T, H, W]: palette index or -1 (after cleaning)
    present: np.ndarray  # bool [T, C]
    area: np.ndarray  # int [T, C] pixels
    centroid: np.ndarray  # float [T, C, 2] (x, y) px
    bbox: np.ndarray  # int [T, C, 4] (x0, y0, x1, y1), ends exclusive
    touching: np.ndarray  # bool [T, C] another colour within ``touch_px`` pixels
    clean: np.ndarray  # bool [T, C] present, untouched by other colours, off the border
    shape: np.ndarray  # int [T, C] index into SHAPES, -1 unless clean
    size: np.ndarray  # int [T, C] index into SIZES, -1 unless clean


def _shifted_max(mask: np.ndarray, k: int) -> np.ndarray:
    """Chebyshev dilation by k px of bool [..., H, W] (separable; no wrap)."""
    out = mask.copy()
    for axis in (-1, -2):
        base = out.copy()
        n = mask.shape[axis]
        for s in range(1, k + 1):
            lo = [slice(None)] * mask.ndim
            hi = [slice(None)] * mask.ndim
            lo[axis], hi[axis] = slice(0, n - s), slice(s, n)
            out[tuple(lo)] |= base[tuple(hi)]
            out[tuple(hi)] |= base[tuple(lo)]
    return out


def segment(frames: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """Nearest palette colour within ``tolerance`` per pixel, isolated pixels dropped: int8 [T, H, W]."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected uint8 [T, H, W, 3], found shape {tuple(frames.shape)}")
    labels = np.empty(frames.shape[:3], np.int8)
    step = max(1, (1 << 22) // (frames.shape[1] * frames.shape[2]))  # frames per block (~4 M pixels)
    for a in range(0, len(frames), step):
        x = frames[a:a + step].astype(np.float32)
        d2 = ((x[..., None, :] - _RGB) ** 2).sum(-1)  # [t, H, W, C]
        idx = d2.argmin(-1)
        labels[a:a + step] = np.where(np.take_along_axis(d2, idx[..., None], -1)[..., 0] <= tolerance**2, idx, -1)
    same = np.zeros(labels.shape, np.int8)  # neighbours of the same label
    p = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    h, w = labels.shape[1:]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                same += p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == labels
    labels[same < 2] = -1
    return labels


def detect(frames: np.ndarray, tolerance: float = DEFAULT_TOLERANCE, min_pixels: int | None = None,
           touch_px: int = 2) -> Detections:
    """Per-frame, per-colour object states of a video (see the module docstring)."""
    labels = segment(frames, tolerance)
    t_n, h, w = labels.shape
    c_n = len(COLOURS)
    min_pixels = min_pixels if min_pixels is not None else max(4, round(0.002 * h * w))
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    area = np.zeros((t_n, c_n), np.int64)
    centroid = np.full((t_n, c_n, 2), np.nan)
    bbox = np.full((t_n, c_n, 4), -1, np.int64)
    masks = [labels == c for c in range(c_n)]
    seen = [bool(m.any()) for m in masks]
    dilated = [_shifted_max(m, touch_px) if s else m for m, s in zip(masks, seen)]
    touching = np.zeros((t_n, c_n), bool)
    for c, m in enumerate(masks):
        if not seen[c]:
            continue
        area[:, c] = m.sum((1, 2))
        others = np.zeros_like(m)
        for c2 in range(c_n):
            if c2 != c and seen[c2]:
                others |= dilated[c2]
        touching[:, c] = (m & others).any((1, 2))
        rows, cols = m.any(2), m.any(1)  # [T, H], [T, W]
        has = area[:, c] > 0
        safe = np.maximum(area[:, c], 1)
        centroid[has, c, 0] = ((m.sum(1) * xs).sum(1) / safe)[has]
        centroid[has, c, 1] = ((m.sum(2) * ys).sum(1) / safe)[has]
        bbox[has, c, 0] = cols.argmax(1)[has]
        bbox[has, c, 1] = rows.argmax(1)[has]
        bbox[has, c, 2] = (w - cols[:, ::-1].argmax(1))[has]
        bbox[has, c, 3] = (h - rows[:, ::-1].argmax(1))[has]
    present = area >= min_pixels
    border = (bbox[..., 0] <= 0) | (bbox[..., 1] <= 0) | (bbox[..., 2] >= w) | (bbox[..., 3] >= h)
    clean = present & ~touching & ~border
    bw, bh = bbox[..., 2] - bbox[..., 0], bbox[..., 3] - bbox[..., 1]
    fill = area / np.maximum(bw * bh, 1)
    shape = np.where(fill > SQUARE_FILL, SHAPES.index("square"),
                     np.where(fill > CIRCLE_FILL, SHAPES.index("circle"), SHAPES.index("triangle")))
    sizes = sorted(SIZES, key=SIZES.get)
    size = np.where(np.maximum(bw, bh) / h > SIZE_SPLIT, list(SIZES).index(sizes[-1]), list(SIZES).index(sizes[0]))
    return Detections(labels, present, area, centroid, bbox, touching & present, clean, np.where(clean, shape, -1),
                      np.where(clean, size, -1))


def hidden(det: Detections) -> np.ndarray:
    """Occluded, not missing: colour c is absent at frame t, and at the nearest frame before t where it is
    present and at the nearest one after (a gap reaching the clip's first or last frame needs only its
    other side) it touches another colour with at most ``HIDDEN_AREA`` of its median area showing: it
    slid behind something. bool [T, C]."""
    t_n, c_n = det.present.shape
    out = np.zeros((t_n, c_n), bool)
    for c in range(c_n):
        p = det.present[:, c]
        if not p.any():
            continue
        partly = det.touching[:, c] & (det.area[:, c] <= HIDDEN_AREA * np.median(det.area[p, c]))  # [T]
        for a, b in _runs(~p):
            sides = [partly[t] for t in (a - 1, b) if 0 <= t < t_n]
            out[a:b, c] = bool(sides) and all(sides)
    return out


# ----------------------------------------------------------------------------------------------
# Targets: what each object should be
# ----------------------------------------------------------------------------------------------
@dataclass
class _Expect:
    colour: int  # palette index
    shape: str | None
    size: str | None
    direction: str  # at the first evaluated frame
    speed: str | None  # None: the class nearest the measurement
    velocity: tuple[float, float] | None  # exact |vx|, |vy| (px / frame) when known
    diameter: float | None  # px when known
    directions: tuple[str, ...] | None = None  # Scene targets: the exact direction at every video frame


def _direction_name(v) -> str:
    best = max(DIRECTIONS, key=lambda k: DIRECTIONS[k][0] * v[0] + DIRECTIONS[k][1] * v[1])
    return best


def _consistent_directions(m: np.ndarray, slack: float, still: float) -> tuple[str, ...]:
    """Every name (8 directions and "still") of some velocity within ``slack`` px / frame per axis of the
    measured ``m`` [2]: the directions a run of that slope allowance cannot tell apart. A velocity below
    ``still`` px / frame is "still"."""
    lo_norm = math.hypot(max(0.0, abs(m[0]) - slack), max(0.0, abs(m[1]) - slack))
    hi_norm = math.hypot(abs(m[0]) + slack, abs(m[1]) + slack)
    out = ("still",) if lo_norm < still else ()
    if hi_norm < still:
        return out
    if abs(m[0]) <= slack and abs(m[1]) <= slack:  # the box holds the origin: any direction
        return out + tuple(DIRECTIONS)
    wrap = lambda a: (a + math.pi) % (2 * math.pi) - math.pi  # noqa: E731
    base = math.atan2(m[1], m[0])
    phi = [wrap(math.atan2(m[1] + sy * slack, m[0] + sx * slack) - base) for sx in (-1, 1) for sy in (-1, 1)]
    half = math.pi / 8  # each name covers +-22.5 degrees
    return out + tuple(d for d, (dx, dy) in DIRECTIONS.items()
                       if min(phi) - half <= wrap(math.atan2(dy, dx) - base) <= max(phi) + half)


def _reflections(direction: str) -> set[str]:
    dx, dy = DIRECTIONS[direction]
    return {_direction_name((sx * dx, sy * dy)) for sx in (-1, 1) for sy in (-1, 1)}


def _margin(ex: _Expect, h: int, fps: float) -> tuple[float, float]:
    """(x, y) px a run keeps from the borders: one frame's expected motion along that axis + 1."""
    if ex.velocity is not None:
        vx, vy = ex.velocity
    else:
        u, s = DIRECTIONS[ex.direction], SPEEDS[ex.speed or max(SPEEDS, key=SPEEDS.get)] * h / fps
        vx, vy = abs(u[0]) * s, abs(u[1]) * s
    return vx + 1, vy + 1


def _expectations(target: Scene | PromptSpec, height: int, start_frame: int, num_frames: int) -> list[_Expect]:
    if isinstance(target, Scene):
        out = []
        for o in target.objects:
            _, vel = trajectory(target, o, np.arange(start_frame, start_frame + num_frames))
            names = tuple(_direction_name(v) for v in vel)
            out.append(_Expect(COLOURS.index(o.colour), o.shape, o.size, names[0], o.speed,
                               (abs(o.vx), abs(o.vy)), target.diameter(o), names))
        return out
    return [_Expect(COLOURS.index(o.colour), o.shape, o.size, o.direction, o.speed, None,
                    SIZES[o.size] * height if o.size else None) for o in target.objects]


# ----------------------------------------------------------------------------------------------
# Per-object measurements
# ----------------------------------------------------------------------------------------------
def _runs(ok: np.ndarray) -> list[tuple[int, int]]:
    """Maximal [a, b) spans of True in a bool [T] array."""
    edges = np.flatnonzero(np.diff(np.r_[0, ok.astype(np.int8), 0]))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _slope(c: np.ndarray) -> np.ndarray:
    """Least-squares velocity of centroids c [L, 2] (px / frame)."""
    t = np.arange(len(c)) - (len(c) - 1) / 2
    return (t[:, None] * (c - c.mean(0))).sum(0) / (t * t).sum()


def _slope_allowance(length: int) -> float:
    """Largest error of ``_slope`` on one axis (px / frame) when every centroid is off a straight line by
    at most ``RASTER_PX``: RASTER_PX sum |t| / sum t^2 over centred frame indices t (3 frames: RASTER_PX)."""
    t = np.arange(length) - (length - 1) / 2
    return RASTER_PX * float(np.abs(t).sum() / (t * t).sum())


def _fit_residual(c: np.ndarray) -> float:
    """RMS distance (px) of centroids c [L, 2] from their least-squares constant-velocity line."""
    t = np.arange(len(c)) - (len(c) - 1) / 2
    line = c.mean(0) + t[:, None] * _slope(c)
    return float(np.sqrt(((c - line) ** 2).sum(-1).mean()))


def _bounce_splits(cen: np.ndarray, bbox: np.ndarray, a: int, e: int, margin: tuple[float, float],
                   size: tuple[int, int]) -> list[tuple[int, int]] | None:
    """Pieces of run [a, e) (centroids ``cen`` [T, 2], boxes ``bbox`` [T, 4]) each within the raster
    bound of a straight line, the run split only at reflections off a border (module doc); None when
    the run cannot be so split. Pieces of fewer than ``MIN_RUN`` frames are dropped."""
    bound = math.sqrt(2) * RASTER_PX
    if e - a < MIN_RUN or _fit_residual(cen[a:e]) <= bound:
        return [(a, e)] if e - a >= MIN_RUN else []
    t = np.arange(a, e, dtype=np.float64)
    c = cen[a:e]
    z = lambda x: np.r_[np.zeros((1, *x.shape[1:])), np.cumsum(x, 0)]  # noqa: E731  prefix sums
    n, st, stt = z(np.ones_like(t)), z(t), z(t * t)
    sy, syy, sty = z(c), z(c * c), z(t[:, None] * c)  # [L + 1, 2]

    def sse(i: int, j: int) -> float:  # least-squares line residual over local frames [i, j), both axes
        k = n[j] - n[i]
        tt = stt[j] - stt[i] - (st[j] - st[i]) ** 2 / k
        yy = syy[j] - syy[i] - (sy[j] - sy[i]) ** 2 / k
        ty = sty[j] - sty[i] - (st[j] - st[i]) * (sy[j] - sy[i]) / k
        return float((yy - (ty * ty / tt if tt > 0 else 0.0)).sum())

    k = min(range(2, e - a - 1), key=lambda i: sse(0, i) + sse(i, e - a), default=None)
    if k is None:
        return None
    k += a
    before, after = _slope(cen[a:k]), _slope(cen[k:e])
    flipped = [j for j in (0, 1) if before[j] * after[j] < 0]
    for j in flipped:  # a reflection happens at the border the object was heading for
        lo = bbox[k - 1:k + 1, j].min() <= margin[j] + CODEC_PX
        hi = size[j] - bbox[k - 1:k + 1, j + 2].max() <= margin[j] + CODEC_PX
        if not (lo if before[j] < 0 else hi):
            return None
    if not flipped:
        return None
    left = _bounce_splits(cen, bbox, a, k, margin, size)
    right = _bounce_splits(cen, bbox, k, e, margin, size)
    return None if left is None or right is None else left + right


def _majority(values: np.ndarray, names) -> str | None:
    v = values[values >= 0]
    return names[int(np.bincount(v, minlength=len(names)).argmax())] if len(v) else None


@dataclass
class _Track:
    """One object's measurable pieces over a frame range."""

    present: np.ndarray  # bool [T] present or hidden (see ``hidden``)
    shape: np.ndarray  # int [T]
    size: np.ndarray  # int [T]
    runs: list[tuple[int, int, np.ndarray]]  # (a, b, velocity) per run of >= MIN_RUN frames


def _track(det: Detections, c: int, margin: tuple[float, float], occluded: np.ndarray | None = None) -> _Track:
    """Runs keep the bounding box ``margin`` (x, y) px off the borders the object can bounce on;
    ``occluded`` (bool [T], see ``hidden``) counts as present."""
    h, w = det.labels.shape[1:]
    b = det.bbox[:, c]
    mx, my = margin
    off_edge = (b[:, 0] >= mx) & (b[:, 1] >= my) & (w - b[:, 2] >= mx) & (h - b[:, 3] >= my)
    cen = det.centroid[:, c]
    runs = []
    for a, e in _runs(det.clean[:, c] & off_edge):
        pieces = _bounce_splits(cen, b, a, e, margin, (w, h)) if e - a >= MIN_RUN else []
        runs += [(i, j, _slope(cen[i:j])) for i, j in (pieces if pieces is not None else [(a, e)])]
    present = det.present[:, c] if occluded is None else det.present[:, c] | occluded
    return _Track(present, det.shape[:, c], det.size[:, c], runs)


def _clip_runs(runs, lo: int, hi: int):
    """Runs restricted to frames [lo, hi) (re-fitted velocity kept from the pieces' own frames)."""
    return [(max(a, lo), min(b, hi), v) for a, b, v in runs if min(b, hi) - max(a, lo) >= MIN_RUN]


def _object_metrics(tr: _Track, cen: np.ndarray, ex: _Expect, lo: int, hi: int, h: int, fps: float,
                    first: bool) -> dict:
    """Adherence pieces and errors of one object over frames [lo, hi)."""
    runs = [(a, b, _slope(cen[a:b])) for a, b, _ in _clip_runs(tr.runs, lo, hi)]
    present = float(tr.present[lo:hi].mean())
    shape = _majority(tr.shape[lo:hi], SHAPES)
    size = _majority(tr.size[lo:hi], list(SIZES))
    lengths = np.array([b - a for a, b, _ in runs], np.float64)
    speed = float(np.average([np.linalg.norm(v) for *_, v in runs], weights=lengths)) if runs else None
    if ex.velocity is not None:
        vx, vy = ex.velocity
    else:  # the prompt's speed, or the class nearest the measured speed
        name = ex.speed
        if name is None and speed is not None:
            name = min(SPEEDS, key=lambda k: abs(SPEEDS[k] * h / fps - speed))
        u, s = DIRECTIONS[ex.direction], (SPEEDS[name] * h / fps if name else 0.0)
        vx, vy = abs(u[0]) * s, abs(u[1]) * s
    vnorm = math.hypot(vx, vy)
    direction, consistent, run_start = None, None, None
    if runs:
        run_start, run_end, v = runs[0] if first else max(runs, key=lambda r: r[1] - r[0])
        direction = "still" if np.linalg.norm(v) < STILL * vnorm else _direction_name(v)
        consistent = _consistent_directions(v, _slope_allowance(run_end - run_start), STILL * vnorm)
    motion = None
    if runs and vx + vy > 0:
        errs = []
        for a, b, v in runs:
            slack = _slope_allowance(b - a)
            errs.append((max(0.0, abs(abs(v[0]) - vx) - slack) + max(0.0, abs(abs(v[1]) - vy) - slack)) / (vx + vy))
        motion = min(1.0, float(np.average(errs, weights=lengths)))
    diameter = ex.diameter
    if diameter is None and size is not None:
        diameter = SIZES[size] * h
    physics = None
    if runs and diameter:
        excess = [max(0.0, _fit_residual(cen[a:b]) - math.sqrt(2) * RASTER_PX) for a, b, _ in runs]
        physics = min(1.0, float(np.average(excess, weights=lengths)) / diameter)
    return dict(present=present, shape=shape, size=size, direction=direction, speed=speed, motion_error=motion,
                physics_error=physics, consistent=consistent, run_start=run_start)


def _judge(m: dict, ex: _Expect, first: bool) -> dict:
    if first:  # a scene knows the direction at the run's start (a continuation may begin just before a bounce)
        known = ex.directions is not None and m["run_start"] is not None
        allowed = {ex.directions[m["run_start"]] if known else ex.direction}
    else:
        allowed = _reflections(ex.direction)
    ok = dict(present_ok=m["present"] >= 0.5, shape_ok=ex.shape is None or m["shape"] == ex.shape,
              size_ok=ex.size is None or m["size"] == ex.size,
              direction_ok=bool(allowed & set(m["consistent"] or ())))
    ok["adheres"] = all(ok.values())
    return ok


# ----------------------------------------------------------------------------------------------
# Background and chunk seams
# ----------------------------------------------------------------------------------------------
def background_change(frames: np.ndarray, labels: np.ndarray, max_shift: int, touch_px: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per frame pair (t-1, t), t >= 1: raw and motion-compensated mean |change| of background pixels
    (/255). Object pixels (dilated by ``touch_px``) and a ``max_shift`` border are left out. [T-1] each."""
    t_n, h, w = labels.shape
    bg = ~_shifted_max(labels >= 0, touch_px)  # [T, H, W]
    x = frames.astype(np.int16)
    m = max_shift
    inner = (slice(None), slice(m, h - m), slice(m, w - m))
    raw, comp = np.zeros(t_n - 1), np.zeros(t_n - 1)
    for t in range(1, t_n):
        cur, ok = x[t][inner[1:]], bg[t][inner[1:]]
        best = math.inf
        for dy in range(-m, m + 1):
            for dx in range(-m, m + 1):
                prev = x[t - 1, m - dy:h - m - dy, m - dx:w - m - dx]
                valid = ok & bg[t - 1, m - dy:h - m - dy, m - dx:w - m - dx]
                if not valid.any():
                    continue
                d = float(np.abs(cur - prev)[valid].mean()) / 255
                if dx == 0 and dy == 0:
                    raw[t - 1] = d
                best = min(best, d)
        comp[t - 1] = 0.0 if best == math.inf else best
    return raw, comp


def chunk_boundaries(num_frames: int, frames_per_chunk: int, first_chunk_frames: int | None = None) -> list[int]:
    """First frame index of every chunk after the first (Wan: first = 1 + stride_t (K - 1), per = stride_t K)."""
    first = first_chunk_frames or frames_per_chunk
    return list(range(first, num_frames, frames_per_chunk))


def frame_jump(frames: np.ndarray, starts) -> tuple[float, float, float, int]:
    """(jump, change at starts, change elsewhere, number of starts): mean |x_t - x_{t-1}| / 255 into the frames
    ``starts`` over the same into every other frame (1 = no jump there; undefined stretches give 1)."""
    d = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean((1, 2, 3)) / 255  # [T-1]: change into frame t = i+1
    starts = set(starts)
    at = np.array([t in starts for t in range(1, len(frames))], dtype=bool)
    b = float(d[at].mean()) if at.any() else 0.0
    within = float(d[~at].mean()) if (~at).any() else 0.0
    eps = 1e-6
    return (b + eps) / (within + eps), b, within, int(at.sum())


def chunk_jump(frames: np.ndarray, frames_per_chunk: int, first_chunk_frames: int | None = None) -> dict:
    """Seam score of any video: ``frame_jump`` at the chunk starts (1 = no seam)."""
    jump, b, within, n = frame_jump(frames, chunk_boundaries(len(frames), frames_per_chunk, first_chunk_frames))
    return {"chunk_jump": jump, "boundary_change": b, "within_change": within, "num_boundaries": n}


def switch_jump(frames: np.ndarray, switch_frames) -> dict:
    """Visual jump of a prompt switch: ``frame_jump`` into the first frame of each new prompt (1 = none)."""
    jump, b, within, n = frame_jump(frames, switch_frames)
    return {"switch_jump": jump, "switch_change": b, "other_change": within, "num_switches": n}


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def _segments(num_frames: int, seg: int) -> list[tuple[int, int]]:
    n = max(1, num_frames // seg)
    return [(k * seg, (k + 1) * seg if k < n - 1 else num_frames) for k in range(n)]


def _drift(curve: list[float], higher_better: bool, floor: float = 1.0) -> float:
    if len(curve) < 2:
        return 0.0
    w = np.arange(1, len(curve), dtype=np.float64)
    m0, mk = curve[0], np.asarray(curve[1:])
    change = (m0 - mk) if higher_better else (mk - m0) / max(abs(m0), floor)
    return float((w * change).sum() / w.sum())


def features(result: dict) -> list[float]:
    """The per-video feature vector of ``evaluate`` (also in ``result['features']``); see ``FEATURES``."""
    return list(result["features"])


FEATURES = (*(f"present_{c}" for c in COLOURS), *(f"num_{s}" for s in SHAPES), *(f"num_{s}" for s in SIZES),
            "num_objects", "mean_speed", "max_speed", "num_horizontal", "num_vertical", "num_diagonal",
            "mean_area", "mean_x", "mean_y", "background_level", "background_change")


def _features(det: Detections, frames: np.ndarray, fps: float, raw_bg: np.ndarray) -> list[float]:
    """Measured object-state features (no target): order ``FEATURES``; speeds in frame heights / s."""
    t_n, h, w = det.labels.shape
    pres = det.present.mean(0)  # [C]
    shapes, sizes, speeds, classes, areas, xs, ys = np.zeros(len(SHAPES)), np.zeros(len(SIZES)), [], np.zeros(3), [], [], []
    margin = max(SPEEDS.values()) * h / fps + 1  # any direction, any speed
    for c in np.flatnonzero(pres >= 0.5):
        tr = _track(det, int(c), (margin, margin))
        s, z = _majority(tr.shape, SHAPES), _majority(tr.size, list(SIZES))
        if s:
            shapes[SHAPES.index(s)] += 1
        if z:
            sizes[list(SIZES).index(z)] += 1
        if tr.runs:
            lengths = [b - a for a, b, _ in tr.runs]
            speeds.append(float(np.average([np.linalg.norm(v) for *_, v in tr.runs], weights=lengths)) * fps / h)
            v = max(tr.runs, key=lambda r: r[1] - r[0])[2]
            ax, ay = abs(v[0]), abs(v[1])
            classes[0 if ax > 2 * ay else 1 if ay > 2 * ax else 2] += 1
        p = det.present[:, c]
        areas.append(det.area[p, c].mean() / (h * w))
        xs.append(np.nanmean(det.centroid[p, c, 0]) / w)
        ys.append(np.nanmean(det.centroid[p, c, 1]) / h)
    bgmask = det.labels < 0
    level = float(frames.mean(-1)[bgmask].mean()) / 255 if bgmask.any() else 0.0
    mean = lambda v: float(np.mean(v)) if len(v) else 0.0  # noqa: E731
    return [*map(float, pres), *map(float, shapes), *map(float, sizes), float((pres >= 0.5).sum()), mean(speeds),
            float(max(speeds)) if speeds else 0.0, *map(float, classes), mean(areas), mean(xs), mean(ys), level,
            float(raw_bg.mean()) if len(raw_bg) else 0.0]


def evaluate(frames: np.ndarray, target: Scene | PromptSpec, fps: float | None = None, segment_seconds: float = 1.0,
             frames_per_chunk: int | None = None, first_chunk_frames: int | None = None,
             tolerance: float = DEFAULT_TOLERANCE, start_frame: int = 0) -> dict:
    """All metrics of one video against its scene (exact velocities) or prompt spec: a JSON-ready dict.

    ``start_frame``: the scene frame the video starts at (a continuation); ``frames_per_chunk`` adds the
    chunk-seam score. Keys: adherence, object_adherence, motion_error, physics_error, identity, background,
    background_raw, objects (per object), segments (per metric, one value per segment), drift (per metric),
    drift_score, features (``FEATURES``), and chunk_jump when asked."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 [T, H, W, 3], found dtype {frames.dtype}")
    if isinstance(target, Scene):
        fps = fps or target.fps
        if frames.shape[1:3] != (target.height, target.width):
            raise ValueError(f"frames are {frames.shape[1]}x{frames.shape[2]}, scene is {target.height}x{target.width}")
    if not fps:
        raise ValueError("evaluate: fps is required with a prompt spec target")
    t_n, h, w = frames.shape[:3]
    det = detect(frames, tolerance)
    exps = _expectations(target, h, start_frame, t_n)
    occluded = hidden(det)  # [T, C]
    tracks = [_track(det, ex.colour, _margin(ex, h, fps), occluded[:, ex.colour]) for ex in exps]
    max_shift = max(1, math.ceil(TEXTURE_SPEED[1] * h / fps))
    raw_bg, comp_bg = background_change(frames, det.labels, max_shift) if t_n > 1 else (np.zeros(0), np.zeros(0))
    expected_set = np.zeros(len(COLOURS), bool)
    expected_set[[ex.colour for ex in exps]] = True
    identity_t = ((det.present | (occluded & expected_set)) == expected_set).all(1)  # [T]

    def scores(lo: int, hi: int, first: bool, fallback: dict | None) -> dict:
        objs = []
        for i, (ex, tr) in enumerate(zip(exps, tracks)):
            m = _object_metrics(tr, det.centroid[:, ex.colour], ex, lo, hi, h, fps, first)
            if fallback is not None:  # a segment without evidence takes the video's value
                v = fallback["objects"][i]
                for k in ("shape", "size", "motion_error", "physics_error"):
                    m[k] = v[k] if m[k] is None else m[k]
                if m["direction"] is None:
                    m["direction"] = v["direction"] if first else v["class_direction"]
                    m["consistent"] = v["consistent"] if first else v["class_consistent"]
                    m["run_start"] = v["run_start"]
            m.update(_judge(m, ex, first))
            objs.append(m)
        err = lambda k: float(np.mean([1.0 if o[k] is None else o[k] for o in objs]))  # noqa: E731
        bg = comp_bg[max(lo, 1) - 1:hi - 1]
        return dict(adherence=float(all(o["adheres"] for o in objs)),
                    object_adherence=float(np.mean([o["adheres"] for o in objs])),
                    motion_error=err("motion_error"), physics_error=err("physics_error"),
                    identity=float(identity_t[lo:hi].mean()), background=float(bg.mean()) if len(bg) else 0.0,
                    objects=objs)

    video = scores(0, t_n, True, None)
    for i, (ex, tr) in enumerate(zip(exps, tracks)):  # the direction class seen over the whole video
        m = _object_metrics(tr, det.centroid[:, ex.colour], ex, 0, t_n, h, fps, False)
        video["objects"][i].update(class_direction=m["direction"], class_consistent=m["consistent"])
    seg = max(1, int(round(segment_seconds * fps)))
    per = [scores(lo, hi, k == 0, video) for k, (lo, hi) in enumerate(_segments(t_n, seg))]
    segments = {k: [p[k] for p in per] for k in (*SCORES, *ERRORS)}
    drift = {k: _drift(segments[k], True) for k in SCORES}
    drift.update({k: _drift(segments[k], False, DRIFT_FLOOR[k]) for k in ERRORS})
    objects = [{"colour": COLOURS[ex.colour], **{k: v for k, v in o.items() if k not in _INTERNAL},
                "speed": None if o["speed"] is None else o["speed"] * fps / h} for ex, o in zip(exps, video["objects"])]
    out = {k: video[k] for k in (*SCORES, *ERRORS)}
    out.update(background_raw=float(raw_bg.mean()) if len(raw_bg) else 0.0, num_frames=t_n, fps=float(fps),
               segment_frames=seg, segments=segments, drift=drift,
               drift_score=float(np.mean([min(1.0, max(0.0, d)) for d in drift.values()])),
               objects=objects, features=_features(det, frames, fps, raw_bg))
    if frames_per_chunk:
        out.update(chunk_jump(frames, frames_per_chunk, first_chunk_frames))
    return out


def frechet_distance(a: np.ndarray, b: np.ndarray, ridge: float = 1e-3) -> float:
    """Fréchet distance between Gaussian fits of two feature sets [N, D], [M, D] after standardising
    every feature by the pooled mean and std (constant features drop out); covariances get ``ridge`` I.
    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance: expected [N, D] and [M, D] with N, M >= 2; found {a.shape} and {b.shape}")
    both = np.concatenate([a, b])
    mu, sd = both.mean(0), both.std(0)
    sd[sd < 1e-9] = 1.0
    a, b = (a - mu) / sd, (b - mu) / sd
    eye = ridge * np.eye(a.shape[1])
    sa, sb = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye

    def sqrtm(m: np.ndarray) -> np.ndarray:
        vals, vecs = np.linalg.eigh((m + m.T) / 2)
        return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T

    ra = sqrtm(sa)
    cross = np.trace(sqrtm(ra @ sb @ ra))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross)


def evaluate_many(items: Iterable[tuple[np.ndarray, Scene | PromptSpec]], fps: float | None = None,
                  segment_seconds: float = 1.0, reference: np.ndarray | None = None, **kwargs) -> dict:
    """``evaluate`` over (frames, target) pairs: means of every metric, mean curves per segment, mean
    drift, the rate of each per-object check over all prompted objects (``per_object``), and - given
    ``reference`` features [M, D] (e.g. of held-out real clips) - the Fréchet distance of these videos'
    features to them. ``kwargs`` go to ``evaluate``."""
    results = [evaluate(f, t, fps, segment_seconds, **kwargs) for f, t in items]
    if not results:
        raise ValueError("evaluate_many: no videos")
    keys = (*SCORES, *ERRORS, "background_raw", "drift_score") + (("chunk_jump",) if "chunk_jump" in results[0] else ())
    out = {k: float(np.mean([r[k] for r in results])) for k in keys}
    n_seg = max(len(r["segments"]["adherence"]) for r in results)
    out["curves"] = {k: [float(np.mean([r["segments"][k][i] for r in results if len(r["segments"][k]) > i]))
                         for i in range(n_seg)] for k in (*SCORES, *ERRORS)}
    out["drift"] = {k: float(np.mean([r["drift"][k] for r in results])) for k in results[0]["drift"]}
    objects = [o for r in results for o in r["objects"]]  # per prompted object, over all videos
    out["per_object"] = {k: float(np.mean([o[k] for o in objects])) if objects else None for k in OBJECT_CHECKS}
    out["per_object"]["objects"] = len(objects)
    out["num_videos"] = len(results)
    feats = np.array([r["features"] for r in results])
    out["features"] = feats.tolist()
    if reference is not None and len(results) >= 2:
        out["frechet_distance"] = frechet_distance(feats, np.asarray(reference))
    return out
