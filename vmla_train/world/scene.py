"""The world's vocabulary, scene description and exact physics.

A scene is 1-3 flat objects (circle, square or triangle; small or large; one of six palette colours,
distinct within a scene: colour is identity) moving at constant velocity over a background, bouncing
elastically off the frame edges. Positions are closed-form: the centre at frame ``n`` is a triangle wave
of ``p0 + v * n`` between the edges, so any frame range of a scene is a slice of any longer one.

Units: positions in pixels (x right, y down; pixel ``(i, j)`` has its centre at ``(j + 0.5, i + 0.5)``),
velocities in pixels per frame. Speeds are named in frame heights per second (``SPEEDS``), sizes are
object diameters (square side, triangle base and height) as a fraction of the frame height (``SIZES``);
both axes use the height as their unit, so diagonal motion is at 45 degrees on any aspect ratio.

Background colours are greys and dark desaturated tones, far from every palette colour
(``palette_distance`` >= ``MIN_BACKGROUND_DISTANCE``), so a pixel's nearest palette colour within a
tolerance segments the objects exactly. The default distribution has no camera pan: a ``texture``
background drifts by whole pixels (``floor(n * v)``) and wraps; objects move in frame coordinates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {  # exact RGB inside objects
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 215, 30),
    "magenta": (215, 40, 215),
    "cyan": (30, 205, 220),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.22, "large": 0.36}  # diameter / frame height
SPEEDS: dict[str, float] = {"slowly": 0.15, "quickly": 0.4}  # frame heights per second
DIRECTIONS: dict[str, tuple[float, float]] = {  # unit (dx, dy), y down
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
    "up-left": (-math.sqrt(0.5), -math.sqrt(0.5)), "up-right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "down-left": (-math.sqrt(0.5), math.sqrt(0.5)), "down-right": (math.sqrt(0.5), math.sqrt(0.5)),
}
BACKGROUNDS = ("plain", "gradient", "texture")
MIN_BACKGROUND_DISTANCE = 120.0  # RGB distance every background pixel keeps from every palette colour
TEXTURE_SPEED = (0.03, 0.08)  # texture drift, frame heights per second (uniform)
TEXTURE_AMPLITUDE = 10  # texture contrast: +- this many levels around the base tone


def palette_distance(rgb) -> float:
    """Smallest Euclidean RGB distance from ``rgb`` to a palette colour."""
    p = np.array(list(PALETTE.values()), np.float64)
    return float(np.sqrt(((p - np.asarray(rgb, np.float64)) ** 2).sum(-1)).min())


@dataclass(frozen=True)
class Background:
    """What lies behind the objects: a plain tone, a two-tone gradient, or a drifting texture."""

    kind: str = "plain"  # plain | gradient | texture
    colour: tuple[int, int, int] = (90, 90, 90)  # the tone (gradient: top or left end)
    colour2: tuple[int, int, int] = (90, 90, 90)  # gradient: bottom or right end
    axis: str = "vertical"  # gradient direction: vertical (top -> bottom) | horizontal (left -> right)
    velocity: tuple[float, float] = (0.0, 0.0)  # texture drift (px / frame)
    seed: int = 0  # texture pattern

    def __post_init__(self) -> None:
        if self.kind not in BACKGROUNDS:
            raise ValueError(f"background kind {self.kind!r}: expected one of {list(BACKGROUNDS)}")
        if self.axis not in ("vertical", "horizontal"):
            raise ValueError(f"background axis {self.axis!r}: expected vertical or horizontal")


@dataclass(frozen=True)
class WorldObject:
    """One object: its attributes (vocabulary names) and its state at frame 0."""

    shape: str  # SHAPES
    colour: str  # PALETTE key; unique within a scene
    size: str  # SIZES key
    direction: str  # DIRECTIONS key: the direction of motion at frame 0
    speed: str  # SPEEDS key
    x: float  # centre at frame 0 (px)
    y: float
    vx: float  # velocity at frame 0 (px / frame)
    vy: float
    depth: int  # drawing order: smaller = nearer (drawn last)

    def __post_init__(self) -> None:
        for value, names, what in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                                   (self.size, SIZES, "size"), (self.direction, DIRECTIONS, "direction"),
                                   (self.speed, SPEEDS, "speed")):
            if value not in names:
                raise ValueError(f"object {what} {value!r}: expected one of {list(names)}")


@dataclass(frozen=True)
class Scene:
    """Everything needed to render any frame of a clip."""

    height: int  # px
    width: int  # px
    fps: int  # frames per second
    background: Background
    objects: tuple[WorldObject, ...]
    seed: int = 0  # the seed it was sampled from (record only)

    def __post_init__(self) -> None:
        colours = [o.colour for o in self.objects]
        if len(set(colours)) != len(colours):
            raise ValueError(f"scene colours must be distinct (identity = colour); found {colours}")

    def diameter(self, obj: WorldObject) -> float:
        """Object diameter in px."""
        return SIZES[obj.size] * self.height

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        bg = d["background"]
        bg = Background(**{**bg, "colour": tuple(bg["colour"]), "colour2": tuple(bg["colour2"]),
                           "velocity": tuple(bg["velocity"])})
        return Scene(height=d["height"], width=d["width"], fps=d["fps"], background=bg,
                     objects=tuple(WorldObject(**o) for o in d["objects"]), seed=d.get("seed", 0))


@dataclass(frozen=True)
class ObjectSpec:
    """One object as a prompt names it; ``None`` = not said (any value satisfies it)."""

    colour: str
    shape: str
    direction: str
    size: str | None = None
    speed: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: its objects (distinct colours) and optionally a background kind."""

    objects: tuple[ObjectSpec, ...]
    background: str | None = None

    @property
    def colours(self) -> tuple[str, ...]:
        return tuple(o.colour for o in self.objects)


def spec_of(scene: Scene) -> PromptSpec:
    """The full prompt spec a scene satisfies (every attribute named)."""
    return PromptSpec(tuple(ObjectSpec(o.colour, o.shape, o.direction, o.size, o.speed) for o in scene.objects),
                      scene.background.kind)


# ----------------------------------------------------------------------------------------------
# Physics (closed form)
# ----------------------------------------------------------------------------------------------
def reflect(p: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Unbounded positions ``p`` folded into ``[lo, hi]`` (elastic walls): (position, velocity sign)."""
    span = hi - lo
    u = np.mod(np.asarray(p, np.float64) - lo, 2 * span)
    back = u > span
    return lo + np.where(back, 2 * span - u, u), np.where(back, -1.0, 1.0)


def extent(scene: Scene, obj: WorldObject) -> tuple[float, float, float, float]:
    """(x_lo, x_hi, y_lo, y_hi): the range of the object's centre (its bounding box stays in frame)."""
    r = scene.diameter(obj) / 2
    return r, scene.width - r, r, scene.height - r


def trajectory(scene: Scene, obj: WorldObject, frames) -> tuple[np.ndarray, np.ndarray]:
    """Centre [N, 2] and velocity [N, 2] (px, px / frame) of ``obj`` at the frame indices ``frames``."""
    n = np.asarray(frames, np.float64)
    x_lo, x_hi, y_lo, y_hi = extent(scene, obj)
    x, sx = reflect(obj.x + obj.vx * n, x_lo, x_hi)
    y, sy = reflect(obj.y + obj.vy * n, y_lo, y_hi)
    return np.stack([x, y], -1), np.stack([sx * obj.vx, sy * obj.vy], -1)


def velocity_px(direction: str, speed: str, height: int, fps: int) -> tuple[float, float]:
    """(vx, vy) in px / frame of a named direction and speed."""
    dx, dy = DIRECTIONS[direction]
    s = SPEEDS[speed] * height / fps
    return dx * s, dy * s


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def _tone(rng: np.random.Generator, lo: int = 35, hi: int = 175, tint: int = 12) -> tuple[int, int, int]:
    g = rng.integers(lo, hi + 1)
    return tuple(int(np.clip(g + rng.integers(-tint, tint + 1), 0, 255)) for _ in range(3))


def sample_background(rng: np.random.Generator, height: int, fps: int, kind: str | None = None,
                      kinds: tuple[str, ...] = BACKGROUNDS) -> Background:
    kind = kind or str(rng.choice(list(kinds)))
    colour = _tone(rng)
    if kind == "plain":
        return Background("plain", colour, colour)
    if kind == "gradient":
        c2 = _tone(rng)
        while abs(sum(c2) - sum(colour)) < 90:  # a visible gradient
            c2 = _tone(rng)
        return Background("gradient", colour, c2, axis=str(rng.choice(["vertical", "horizontal"])))
    speed = rng.uniform(*TEXTURE_SPEED) * height / fps
    angle = rng.uniform(0, 2 * math.pi)
    colour = _tone(rng, 50, 160)
    return Background("texture", colour, colour, velocity=(speed * math.cos(angle), speed * math.sin(angle)),
                      seed=int(rng.integers(2**31)))


def _pair_margin(pi: np.ndarray, pj: np.ndarray, di: float, dj: float, clear_frames: int, start_frames: int) -> np.ndarray:
    """Separation margin of two objects' centres pi, pj [K, N, 2] (K candidates, N frames); >= 0 passes:
    bounding boxes 3 px apart for the first ``start_frames`` frames and, for objects of one size, a
    Chebyshev centre distance >= half a diameter for ``clear_frames`` frames (the one behind stays >= ~25 %
    visible; a smaller object is always in front of a larger one). [K]"""
    cheb = np.abs(pi - pj).max(-1)  # [K, N]
    margin = (cheb[:, :start_frames] - (di + dj) / 2 - 3).min(1)
    if di == dj and clear_frames:
        margin = np.minimum(margin, (cheb[:, :clear_frames] - 0.5 * di).min(1))
    return margin


def _place(rng: np.random.Generator, height: int, width: int, fps: int, attrs: list[tuple[str, str, str, str, str]],
           background: Background, seed: int, clear_frames: int, candidates: int = 128,
           restarts: int = 16) -> tuple[Scene, float]:
    """Positions for fixed attributes (colour, shape, size, direction, speed), one object after another:
    the first of ``candidates`` random positions keeping ``_pair_margin`` >= 0 with every object placed
    before; the whole placement is redrawn up to ``restarts`` times (else the best is kept, with its
    margin). Each moving
    axis starts clear of a bounce for ``start_frames``; smaller objects are nearer."""
    start_frames = max(4, math.ceil(fps / 4)) + 1
    order = sorted(range(len(attrs)), key=lambda i: (SIZES[attrs[i][2]], rng.random()))
    depth = {i: d for d, i in enumerate(order)}
    frames = np.arange(max(clear_frames, start_frames))
    probe = Scene(height, width, fps, background, (), seed)
    best, best_margin = None, -math.inf
    for _ in range(restarts):
        objs: list[WorldObject] = []
        paths: list[np.ndarray] = []  # [N, 2] per placed object
        worst = math.inf
        for i, (colour, shape, size, direction, speed) in enumerate(attrs):
            vx, vy = velocity_px(direction, speed, height, fps)
            r = SIZES[size] * height / 2
            xy = []
            for v, length in ((vx, width), (vy, height)):
                lo, hi = r + 2, length - r - 2  # off the border (a still axis stays there)
                ahead = abs(v) * start_frames + 1  # no bounce during the first frames
                lo, hi = (lo, hi - ahead) if v > 0 else (lo + ahead, hi) if v < 0 else (lo, hi)
                xy.append(rng.uniform(lo, max(lo, hi), size=candidates))
            cand = [WorldObject(shape, colour, size, direction, speed, float(x), float(y), vx, vy, depth[i])
                    for x, y in zip(*xy)]
            path = np.stack([trajectory(probe, o, frames)[0] for o in cand])  # [K, N, 2]
            margin = np.full(candidates, np.inf)
            for o, p in zip(objs, paths):
                margin = np.minimum(margin, _pair_margin(path, p[None], 2 * r, probe.diameter(o), clear_frames,
                                                         start_frames))
            k = int(np.argmax(margin >= 0)) if (margin >= 0).any() else int(np.argmax(margin))
            worst = min(worst, float(margin[k]))
            objs.append(cand[k])
            paths.append(path[k])
        if worst > best_margin:
            best, best_margin = Scene(height, width, fps, background, tuple(objs), seed), worst
        if worst >= 0:
            break
    return best, best_margin


def _sample(rng: np.random.Generator, height: int, width: int, fps: int, wanted: list[tuple], background: Background,
            seed: int, clear_frames: int, redraws: int = 8) -> Scene:
    """Fill the ``None`` attributes of ``wanted`` (colour, shape, size, direction, speed) at random and place
    the objects; attributes are redrawn (up to ``redraws`` times) while no placement passes the overlap
    check, so crowded draws (e.g. three large objects) are a little rarer than uniform."""
    names = (None, SHAPES, list(SIZES), list(DIRECTIONS), list(SPEEDS))
    best, best_margin = None, -math.inf
    for _ in range(redraws):
        attrs = [tuple(v if v is not None else str(rng.choice(n)) for v, n in zip(w, names)) for w in wanted]
        scene, margin = _place(rng, height, width, fps, attrs, background, seed, clear_frames)
        if margin > best_margin:
            best, best_margin = scene, margin
        if margin >= 0:
            break
    return best


def sample_scene(seed: int, height: int, width: int, fps: int, num_objects: int | None = None,
                 backgrounds: tuple[str, ...] = BACKGROUNDS, clear_frames: int = 0) -> Scene:
    """A random scene of the default distribution: 1-3 objects (uniform), distinct colours, every other
    choice uniform (see ``_sample`` for the one exception).

    ``clear_frames``: for that many frames from frame 0, objects of one size never hide more than about
    three quarters of each other (a smaller object is always drawn in front of a larger one)."""
    rng = np.random.default_rng([seed, height, width, fps])
    n = num_objects if num_objects is not None else int(rng.integers(1, 4))
    if not 1 <= n <= len(COLOURS):
        raise ValueError(f"num_objects={n}: expected 1..{len(COLOURS)}")
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    bg = sample_background(rng, height, fps, kinds=backgrounds)
    return _sample(rng, height, width, fps, [(str(c), None, None, None, None) for c in colours], bg, seed, clear_frames)


def scene_from_prompt(spec: PromptSpec, seed: int, height: int, width: int, fps: int, clear_frames: int = 0) -> Scene:
    """A scene that satisfies ``spec``: unnamed sizes, speeds and background drawn from ``seed``."""
    rng = np.random.default_rng([seed, height, width, fps, 1])
    bg = sample_background(rng, height, fps, spec.background)
    wanted = [(o.colour, o.shape, o.size, o.direction, o.speed) for o in spec.objects]
    return _sample(rng, height, width, fps, wanted, bg, seed, clear_frames)
