"""World clips as an OpenVid-1M folder: ``vmla-data raw`` reads it unchanged, so the world's data goes
through the same raw -> encode -> ode-pairs path as real video.

Clip ``i`` is the scene ``sample_scene(clip_seed(seed, split, i), height, width, fps)`` (the seeding the
world codec trains on), rendered for ``num_frames`` frames, captioned by ``caption(scene, scene_seed)``
and written as an H.264 mp4 (``Mp4Writer``, yuv420p). Everything is a pure function of
``(seed, split, i)`` and the geometry, so any clip can be regenerated bit for bit. Held-out prompts come
from the same sampler on another stream, ``heldout_split`` (default ``split + HELDOUT_SPLIT_OFFSET``),
with no mp4s: their scenes are the ground truth for judging generated videos.

Folder layout (``OUT``)::

    OUT/world.json            manifest: the settings, clip counts, complete flag (marks the folder as ours)
    OUT/world.csv             one row per clip, OpenVid's columns (below) + height, width
    OUT/videos/<name>.mp4     world_<split>_<index:07d>.mp4, num_frames frames at fps, height x width
    OUT/scenes.jsonl          per clip {"video", "index", "caption", "scene": Scene.to_dict()}
    OUT/prompts.txt           the clips' captions, one per line, in index order
    OUT/prompts-heldout.txt   captions of the held-out scenes, one per line
    OUT/scenes-heldout.jsonl  per held-out scene {"index", "caption", "scene"}

CSV columns: ``video`` (file name), ``caption`` (the world caption), ``frame`` (= num_frames), ``fps``,
``seconds`` (= num_frames / fps, what the container reports), ``camera motion`` = ``static`` (the world's
camera never moves; a texture background drifts, objects move in frame coordinates) and ``height``,
``width`` in pixels. ``aesthetic score``, ``motion score`` and ``temporal consistency score`` are left
empty: they are OpenVid's model-predicted ratings of real footage and are not measured here; an empty
value passes every ``prep.raw.min_*`` score filter. OpenVid's own filters in data_prep/openvid.yaml
(``min_seconds: 5.1``, ``min_caption_chars: 20``) would drop 81-frame 16 fps clips and short captions,
so world data goes through ``vmla-data raw`` with the default (zero) filters.

Writes are atomic (mp4s under a temporary name, renamed when complete; text files via a temporary
file). A folder is written only if it is new or empty, or holds a ``world.json`` with the same
settings; a re-run resumes there, rendering only the clips whose mp4 is missing.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import atomic_write_text
from .scene import Scene

MANIFEST = "world.json"
CSV_NAME = "world.csv"
VIDEOS = "videos"
SCENES = "scenes.jsonl"
PROMPTS = "prompts.txt"
HELDOUT_PROMPTS = "prompts-heldout.txt"
HELDOUT_SCENES = "scenes-heldout.jsonl"
CSV_COLUMNS = ("video", "caption", "aesthetic score", "motion score", "temporal consistency score", "camera motion",
               "frame", "fps", "seconds", "height", "width")  # OpenVid-1M's nine, then the resolution
HELDOUT_SPLIT_OFFSET = 1000  # default held-out stream: split + this (streams >= 1000 are kept for held-out prompts)
DEFAULT_HELDOUT = 256  # held-out prompts when not given (at most num_clips)
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclass
class WorldDataConfig:
    """``vmla-data world OUT key=value ...``: which clips, at which geometry, encoded how."""

    num_clips: int = 1000  # clips (mp4 + CSV row + scene), indices 0 .. num_clips - 1
    seed: int = 0  # world seed; with split and index it fixes every clip
    split: int = 0  # stream of the clips (a different split gives different scenes)
    height: int = 64  # px (even: yuv420p)
    width: int = 64  # px (even: yuv420p)
    num_frames: int = 81  # frames per clip
    fps: int = 16  # frames per second
    num_heldout: int = -1  # held-out prompts (-1: min(num_clips, DEFAULT_HELDOUT); 0: none)
    heldout_split: int = -1  # stream of the held-out prompts (-1: split + HELDOUT_SPLIT_OFFSET); != split
    crf: int = 10  # libx264 quality (0 = lossless luma; 10 keeps luma within ~2 levels; chroma is 4:2:0)
    preset: str = "veryfast"  # libx264 speed preset: "medium"'s PSNR and metrics at 0.66x its encode time (benchmarks/world_data.py)
    workers: int = 4  # render processes (0 = in this process)

    def __post_init__(self) -> None:
        if self.num_heldout < 0:
            self.num_heldout = min(self.num_clips, DEFAULT_HELDOUT)
        if self.heldout_split < 0:
            self.heldout_split = self.split + HELDOUT_SPLIT_OFFSET
        checks = ((self.num_clips >= 1, "num_clips", ">= 1", self.num_clips),
                  (self.seed >= 0 and self.split >= 0, "seed/split", ">= 0", (self.seed, self.split)),
                  (self.height >= 16 and self.height % 2 == 0, "height", "even and >= 16", self.height),
                  (self.width >= 16 and self.width % 2 == 0, "width", "even and >= 16", self.width),
                  (self.num_frames >= 1, "num_frames", ">= 1", self.num_frames),
                  (self.fps >= 1, "fps", ">= 1", self.fps),
                  (self.heldout_split != self.split, "heldout_split", f"!= split={self.split}", self.heldout_split),
                  (0 <= self.crf <= 51, "crf", "in 0..51", self.crf),
                  (self.preset in X264_PRESETS, "preset", " | ".join(X264_PRESETS), self.preset),
                  (self.workers >= 0, "workers", ">= 0", self.workers))
        for ok, key, want, found in checks:
            if not ok:
                raise ValueError(f"world data '{key}': expected {want}, found {found}")

    def settings(self) -> dict:
        """What decides the folder's contents (a resumed run must match); ``workers`` only changes speed."""
        d = asdict(self)
        d.pop("workers")
        return d


def clip_name(split: int, index: int) -> str:
    """The mp4 file name of clip ``index`` of stream ``split``."""
    return f"world_{split}_{index:07d}.mp4"


def _describe(scene_seed: int, c: dict):
    """(scene, caption) of one scene seed at the geometry of settings ``c``."""
    from .captions import caption
    from .scene import sample_scene

    scene = sample_scene(scene_seed, c["height"], c["width"], c["fps"])
    return scene, caption(scene, scene_seed)


def _clip(task: tuple) -> dict:
    """One clip: sample and caption its scene; render and write its mp4 unless it exists (worker)."""
    from ..dataprep.video import Mp4Writer
    from .render import render

    index, scene_seed, path, c = task
    scene, text = _describe(scene_seed, c)
    rendered = False
    if path is not None and not os.path.isfile(path):
        frames = render(scene, c["num_frames"])  # uint8 [T, H, W, 3]
        with Mp4Writer(path, c["fps"], crf=c["crf"], preset=c["preset"]) as writer:
            writer.write(frames)
        rendered = True
    return {"index": index, "caption": text, "scene": scene.to_dict(), "rendered": rendered}


def _check_folder(out: Path, settings: dict) -> bool:
    """Raise ``FileExistsError`` (one line) unless ``out`` is new, empty, or ours with these settings;
    returns whether it is a resume of an earlier run."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"world data folder '{out}' is a file: give a new or empty folder")
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())["settings"]
        except (ValueError, KeyError) as e:
            raise FileExistsError(f"'{manifest}' is unreadable ({type(e).__name__}): delete the folder or give "
                                  "a new one") from None
        if old != settings:
            changed = sorted(k for k in settings if old.get(k) != settings[k])
            raise FileExistsError(f"world data folder '{out}' was written with other settings ({changed}): "
                                  "give a new folder or the same settings to resume")
        return True
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"folder '{out}' is not empty and holds no {MANIFEST} (not written by "
                              "`vmla-data world`): give a new or empty folder")
    return False


def _write_manifest(out: Path, cfg: WorldDataConfig, complete: bool, **extra) -> None:
    body = {"settings": cfg.settings(), "complete": complete, "csv": CSV_NAME, "videos": VIDEOS, **extra}
    atomic_write_text(out / MANIFEST, json.dumps(body, indent=1, allow_nan=False) + "\n")


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records)


def write_world_dataset(out_dir: str | Path, num_clips: int = WorldDataConfig.num_clips, seed: int = WorldDataConfig.seed,
                        split: int = WorldDataConfig.split, height: int = WorldDataConfig.height,
                        width: int = WorldDataConfig.width, num_frames: int = WorldDataConfig.num_frames,
                        fps: int = WorldDataConfig.fps, workers: int = WorldDataConfig.workers,
                        num_heldout: int = WorldDataConfig.num_heldout, heldout_split: int = WorldDataConfig.heldout_split,
                        crf: int = WorldDataConfig.crf, preset: str = WorldDataConfig.preset,
                        progress: bool = False) -> dict:
    """Write (or finish) the world folder ``out_dir`` (layout in the module docstring); returns the
    manifest dict. ``FileExistsError`` for a folder that is not new, empty or ours with these settings,
    ``ValueError`` for bad settings (both one line naming the thing)."""
    from tqdm import tqdm

    from .codec import clip_seed  # here, not at the top: worker processes then never import torch

    cfg = WorldDataConfig(num_clips=num_clips, seed=seed, split=split, height=height, width=width,
                          num_frames=num_frames, fps=fps, num_heldout=num_heldout, heldout_split=heldout_split,
                          crf=crf, preset=preset, workers=workers)
    out = Path(out_dir)
    resumed = _check_folder(out, cfg.settings())
    (out / VIDEOS).mkdir(parents=True, exist_ok=True)
    _write_manifest(out, cfg, complete=False)
    from ..dataprep.video import Mp4Writer

    Mp4Writer.remove_stale(out / VIDEOS)  # a killed run's half-written clips (live writers' files stay)

    c = cfg.settings()
    tasks = [(i, clip_seed(seed, split, i), str(out / VIDEOS / clip_name(split, i)), c) for i in range(num_clips)]
    tasks += [(i, clip_seed(seed, cfg.heldout_split, i), None, c) for i in range(cfg.num_heldout)]
    todo = sum(1 for t in tasks if t[2] is not None and not os.path.isfile(t[2]))
    print(f"world: {num_clips} clips ({num_clips - todo} already written, {todo} to render) + {cfg.num_heldout} "
          f"held-out prompts, {height}x{width} x {num_frames} frames @ {fps} fps -> {out}")
    start = time.time()
    bar = tqdm(total=len(tasks), unit="scene", disable=not progress)
    results: list[dict] = []
    if workers > 0 and len(tasks) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            for r in pool.imap(_clip, tasks, chunksize=max(1, min(64, len(tasks) // (4 * workers)))):
                results.append(r)
                bar.update()
    else:
        for t in tasks:
            results.append(_clip(t))
            bar.update()
    bar.close()

    clips, heldout = results[:num_clips], results[num_clips:]
    buf = io.StringIO()
    rows = csv.writer(buf, lineterminator="\n")
    rows.writerow(CSV_COLUMNS)
    for r in clips:  # unmeasured OpenVid scores stay empty (see the module docstring)
        rows.writerow([clip_name(split, r["index"]), r["caption"], "", "", "", "static", num_frames, float(fps),
                       num_frames / fps, height, width])
    atomic_write_text(out / CSV_NAME, buf.getvalue())
    atomic_write_text(out / SCENES, _jsonl([{"video": clip_name(split, r["index"]), "index": r["index"],
                                             "caption": r["caption"], "scene": r["scene"]} for r in clips]))
    atomic_write_text(out / PROMPTS, "".join(r["caption"] + "\n" for r in clips))
    atomic_write_text(out / HELDOUT_SCENES, _jsonl([{"index": r["index"], "caption": r["caption"],
                                                     "scene": r["scene"]} for r in heldout]))
    atomic_write_text(out / HELDOUT_PROMPTS, "".join(r["caption"] + "\n" for r in heldout))
    rendered = sum(r["rendered"] for r in clips)
    _write_manifest(out, cfg, complete=True, num_clips=num_clips, num_heldout=cfg.num_heldout,
                    rendered_this_run=rendered, resumed=resumed, seconds=round(time.time() - start, 2))
    return json.loads((out / MANIFEST).read_text())


def read_scenes(path: str | Path) -> list[tuple[str, Scene]]:
    """(caption, Scene) per line of a ``scenes.jsonl`` / ``scenes-heldout.jsonl``: the ground truth that
    ``metrics.evaluate`` takes as its target."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    r = json.loads(line)
                    out.append((r["caption"], Scene.from_dict(r["scene"])))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not a world scene record ({type(e).__name__}: {e})") from None
    return out
