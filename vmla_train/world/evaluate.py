"""``vmla-world``: score world videos after generation, sample the bidirectional world teacher, and
assemble the world's frozen models.

    vmla-world models OUT --vae CODEC_VAE [--text-encoder TEXT]   (the codec + the world text encoder in one folder)
    vmla-world text-encoder OUT [--steps N]   (the world text encoder pretrained on the world's captions)
    vmla-world eval VIDEO_DIR_OR_FILES... (--prompts FILE | --scenes scenes.jsonl) [--world FOLDER] [--out report.json]
                    [--chunk-frames K]   (K latent frames per generated chunk: the chunk-seam jump)
    vmla-world eval VIDEO_DIR_OR_FILES... --scripts [--out report.json]   (prompt-switch videos, per segment)
    vmla-world sample-teacher --teacher T --vae V --text-encoder E --prompts FILE --out DIR [--world FOLDER] ...

**Evaluating** (``evaluate_videos``). Every mp4 is decoded whole at its own frame rate and size with the
project's reader (``dataprep.video.decode_pyav``: uint8 [T, H, W, 3]) and scored by
``metrics.evaluate_many`` against its target: a ``PromptSpec`` parsed from a prompt (``--prompts``, one
per line) or the exact ``Scene`` of a ``scenes.jsonl`` record (``--scenes``). Videos pair with targets
by name when they can: a scene record's ``video`` field, the full prompt that ``vmla-generate``'s
``manifest.json`` beside the videos gives each file, or its ``<prompt>-<index>.mp4`` naming
(``generate.video_name``). Otherwise they pair in order (a folder's mp4s sorted by name, files in
the order given) with the first targets.

**Prompt switches** (``evaluate_switches``, ``--scripts``). A video generated from a prompt script is
cut at the frames where each new prompt takes over (the ``frame`` of its segments in ``manifest.json``);
each piece is scored against its own prompt, and the visual jump into each switch frame is the mean
frame-to-frame change there over that into every other frame (``metrics.switch_jump``: 1 = no jump).

**Reference and floor** (``reference_from_world``). The held-out scenes of a world folder
(``scenes-heldout.jsonl``) are rendered directly at the evaluated videos' length and measured the same
way: their mean metrics are the ground truth's (what a perfect model scores on those scenes, the numbers
to compare with) and their features are the reference for the Fréchet distance. The reference is split
in two halves A (first) and B: the videos' distance is to A, and the *floor* is the distance of B to A,
real data against real data at the same reference. The Fréchet distance of a finite sample is biased
upwards, more so for fewer videos, so compare a model with the floor at about as many videos as B has.

**Teacher sampling** (``sample_teacher``): noise [F, C, h, w] seeded ``seed + i`` for prompt ``i`` (as
``vmla-data ode-pairs`` seeds it), ``wan.euler_sample`` (the teacher's flow-matching Euler sampler with
classifier-free guidance against ``negative_prompt``, shared with ``ode-pairs``), then ``wan.vae_decode``
-> uint8 [T, H, W, 3] with T = 1 + t_stride (F - 1), H = s_stride h, W = s_stride w.

Exit status: 0 done, 2 bad input (one line naming the file, key or word). Outputs are never overwritten:
an existing report or mp4 is refused before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import metrics
from .captions import PromptError, parse_prompt
from .openvid import HELDOUT_SCENES, MANIFEST, WorldDataConfig, read_scenes
from .scene import PromptSpec, Scene

TABLE = (  # report key, label, better
    ("adherence", "adherence", "1"),
    ("motion_error", "motion error", "0"),
    ("physics_error", "physics error", "0"),
    ("identity", "identity", "1"),
    ("background", "background change", "0"),
    ("drift_score", "drift", "0"),
    ("chunk_jump", "chunk seam jump", "1"),  # only with --chunk-frames
)
DEFAULT_CRF = 10  # libx264 quality of sampled videos: the world data's own (metrics are unchanged by it)


class InputError(ValueError):
    """Bad user input: the message is one line naming the file, key or word."""


# ----------------------------------------------------------------------------------------------
# Reading videos and targets
# ----------------------------------------------------------------------------------------------
def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Every frame of an mp4 at its own rate and size: (uint8 [T, H, W, 3], fps)."""
    from ..dataprep.video import ClipSpec, Reject, decode_pyav, probe

    p = Path(path)
    try:
        data = p.read_bytes()
        pr = probe(data, decode_first=False)
        frames = decode_pyav(data, ClipSpec(pr.frames, pr.fps, pr.height, pr.width), pr)
    except (OSError, Reject) as e:
        raise InputError(f"video '{p}': {e}") from None
    return frames, pr.fps


def video_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """A folder -> its ``*.mp4`` sorted by name; files stay in the order given."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(item.glob("*.mp4"))
            if not found:
                raise InputError(f"video folder '{item}' holds no .mp4 files")
            out += found
        elif item.is_file():
            out.append(item)
        else:
            raise InputError(f"video '{item}' does not exist")
    return out


def read_prompt_targets(path: str | Path) -> list[tuple[str, PromptSpec]]:
    """(prompt, spec) per non-blank line; a prompt the world cannot stage is ``InputError`` 'FILE:LINE: why'."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"prompt file '{p}' does not exist")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append((line.strip(), parse_prompt(line)))
            except PromptError as e:
                raise InputError(f"{p}:{n}: {e}") from None
    if not out:
        raise InputError(f"prompt file '{p}' has no prompts (one per line)")
    return out


def read_scene_targets(path: str | Path) -> list[tuple[str | None, Scene]]:
    """(video file name or None, scene) per record of a ``scenes.jsonl`` / ``scenes-heldout.jsonl``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"scene file '{p}' does not exist")
    try:
        scenes = [s for _, s in read_scenes(p)]
    except ValueError as e:
        raise InputError(str(e)) from None
    names = [json.loads(line).get("video") for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not scenes:
        raise InputError(f"scene file '{p}' has no records")
    return list(zip(names, scenes))


def _stem(name: str) -> str:
    """``<prompt>-<index>.mp4`` -> ``<prompt>`` (the name ``generate.video_name`` gives)."""
    base = name[:-4] if name.endswith(".mp4") else name
    head, _, tail = base.rpartition("-")
    return head if head and tail.isdigit() else base


def pair(videos: list[Path], names: list[str | None], targets: list, what: str) -> list:
    """The target of every video: by file name where every video has one (``names[i]`` is the file name
    target ``i`` is known by), else in order with the first ``len(videos)`` targets."""
    index: dict[str, int] = {}
    for i, n in enumerate(names):
        if n is not None:
            index.setdefault(n, i)
    keys = [v.name if v.name in index else _stem(v.name) for v in videos]
    if index and all(k in index for k in keys):
        return [targets[index[k]] for k in keys]
    if len(videos) > len(targets):
        raise InputError(f"{len(videos)} videos but {len(targets)} targets in {what}, and the file names do not "
                         "name them: give as many targets as videos")
    return targets[: len(videos)]


def pair_prompts(videos: list[Path], rows: list[tuple[str, PromptSpec]], what: str) -> list[PromptSpec]:
    """The prompt target of every video: by the full prompt ``vmla-generate``'s ``manifest.json`` beside
    the videos gives each file when it lists them all, else by ``pair`` on the ``<prompt>-<index>.mp4`` names."""
    from ..generate import manifest_prompts, video_names

    try:
        prompt_of = manifest_prompts(videos)  # file -> full prompt
        names = [_stem(row[0]) for row in video_names([text for text, _ in rows], 1)]  # the names generate gives
    except ValueError as e:
        raise InputError(str(e)) from None
    row_of: dict[str, int] = {}
    for i, (text, _) in enumerate(rows):
        row_of.setdefault(text, i)
    if all(prompt_of.get(v) in row_of for v in videos):
        return [rows[row_of[prompt_of[v]]][1] for v in videos]
    return pair(videos, names, [spec for _, spec in rows], what)


# ----------------------------------------------------------------------------------------------
# Reference: rendered held-out ground truth
# ----------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """Ground truth of a world folder's held-out scenes, rendered and measured."""

    folder: str
    num_frames: int  # rendered frames per clip
    features: np.ndarray  # float [M, D], one row per clip (``metrics.FEATURES``)
    metrics: dict  # ``metrics.evaluate_many`` of the clips against their own scenes (means, curves, drift)

    def halves(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, B): the first and second half of the features, [M // 2, D] and [M - M // 2, D]."""
        m = len(self.features) // 2
        return self.features[:m], self.features[m:]

    def floor(self) -> float:
        """Fréchet distance of half B to half A: held-out real data against itself."""
        a, b = self.halves()
        return metrics.frechet_distance(b, a)


def reference_from_world(folder: str | Path, n: int | None = None, num_frames: int | None = None) -> Reference:
    """Render the first ``n`` (default all) held-out scenes of world folder ``folder`` for ``num_frames``
    frames (default the folder's clip length) and measure them against their scenes. Needs n >= 4 (two
    halves of at least two clips each for the floor)."""
    from .render import render

    f = Path(folder)
    path = f / HELDOUT_SCENES
    if not path.is_file():
        raise InputError(f"world folder '{f}' has no {HELDOUT_SCENES} (written by `vmla-data world`)")
    if num_frames is None:
        try:
            num_frames = int(json.loads((f / MANIFEST).read_text())["settings"]["num_frames"])
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"world folder '{f}': {MANIFEST} unreadable ({type(e).__name__}); pass num_frames") from None
    try:
        scenes = [s for _, s in read_scenes(path)][:n]
    except ValueError as e:
        raise InputError(str(e)) from None
    if len(scenes) < 4:
        raise InputError(f"'{path}' gives {len(scenes)} held-out scenes; the reference needs at least 4 "
                         "(write the world folder with num_heldout >= 4)")
    result = metrics.evaluate_many((render(s, num_frames), s) for s in scenes)
    return Reference(str(f), num_frames, np.asarray(result.pop("features")), result)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def evaluate_videos(videos: Sequence[str | Path], targets: Sequence[PromptSpec | Scene], fps: float | None = None,
                    reference_features: np.ndarray | None = None, **kwargs) -> dict:
    """Score mp4s against their targets (``targets[i]`` for ``videos[i]``): ``metrics.evaluate_many``'s
    dict (means, curves, drift, per-video ``features``), plus ``videos`` (the paths) and, given
    ``reference_features`` [M, D] and at least two videos, ``frechet_distance`` to them.

    ``fps``: the frame rate the metrics assume (px / frame <-> frame heights / s); default each video's
    own. A scene target must have the video's height and width. ``kwargs`` go to ``metrics.evaluate``."""
    if len(videos) != len(targets):
        raise InputError(f"evaluate_videos: {len(videos)} videos but {len(targets)} targets")
    if not videos:
        raise InputError("evaluate_videos: no videos")
    items = []
    for path, target in zip(videos, targets):
        frames, rate = read_video(path)
        if isinstance(target, Scene) and frames.shape[1:3] != (target.height, target.width):
            raise InputError(f"video '{path}' is {frames.shape[1]}x{frames.shape[2]} (HxW), its scene is "
                             f"{target.height}x{target.width}: evaluate videos of the world's geometry")
        items.append((frames, target, fps or rate))
    rates = {r for *_, r in items}
    if len(rates) > 1:
        raise InputError(f"videos have different frame rates {sorted(rates)}: pass fps to evaluate them together")
    out = metrics.evaluate_many(((f, t) for f, t, _ in items), fps=rates.pop(), reference=reference_features,
                                **kwargs)
    out["videos"] = [str(p) for p in videos]
    out["num_frames"] = int(items[0][0].shape[0])
    return out


SWITCH_KEYS = (("adherence", "adherence", "1"), ("object_adherence", "object adherence", "1"),
               ("identity", "identity", "1"), ("motion_error", "motion error", "0"))


def evaluate_switches(videos: Sequence[str | Path], fps: float | None = None) -> dict:
    """Prompt-switch videos (``vmla-generate --prompt-script``), each with the script that the ``manifest.json``
    beside it records: every segment, from the first frame generated under its prompt to the next one's, scored
    against its own prompt (``metrics.evaluate``), and the visual jump into each switch frame
    (``metrics.switch_jump``). Keys: ``before`` / ``after``, the mean metrics of the first segments / of every
    later one (``SWITCH_KEYS``); ``switch_jump``, its mean over the videos that switch; ``videos``, per video its
    segments and jump; ``num_videos``, ``num_switches``, ``recache`` (the manifest's, per video)."""
    from ..generate import MANIFEST_NAME, manifest_entries

    videos = [Path(v) for v in videos]
    try:
        entries = manifest_entries(videos)
    except ValueError as e:
        raise InputError(str(e)) from None
    per_video = []
    for path in videos:
        script = entries.get(path, {}).get("script")
        if not script:
            raise InputError(f"video '{path}' has no prompt script in the {MANIFEST_NAME} beside it: --scripts scores "
                             "videos of `vmla-generate --prompt-script`")
        if any("frame" not in seg for seg in script):
            raise InputError(f"video '{path}': its {MANIFEST_NAME} entry has no switch frames (an older vmla-generate): "
                             "generate it again")
        frames, rate = read_video(path)
        bounds = [int(seg["frame"]) for seg in script] + [len(frames)]
        segments = []
        for seg, a, b in zip(script, bounds, bounds[1:]):
            try:
                spec = parse_prompt(seg["prompt"])
            except PromptError as e:
                raise InputError(f"video '{path}': segment prompt {seg['prompt']!r}: {e}") from None
            r = metrics.evaluate(frames[a:b], spec, fps=fps or rate)
            segments.append({"prompt": seg["prompt"], "first_frame": a, "end_frame": b,
                             **{key: r[key] for key, *_ in SWITCH_KEYS}})
        per_video.append({"video": str(path), "recache": entries[path].get("recache"), "segments": segments,
                          **metrics.switch_jump(frames, bounds[1:-1])})

    def mean(rows: list[dict], key: str) -> float | None:
        return float(np.mean([r[key] for r in rows])) if rows else None

    first = [v["segments"][0] for v in per_video]
    later = [seg for v in per_video for seg in v["segments"][1:]]
    switching = [v for v in per_video if v["num_switches"]]
    return {"before": {key: mean(first, key) for key, *_ in SWITCH_KEYS},
            "after": {key: mean(later, key) for key, *_ in SWITCH_KEYS},
            "switch_jump": mean(switching, "switch_jump"), "num_videos": len(per_video),
            "num_switches": sum(v["num_switches"] for v in per_video),
            "recache": sorted({v["recache"] for v in per_video}, key=str), "videos": per_video}


def switch_table(result: dict) -> str:
    """The first prompt's metrics beside those after a switch, and the switch jump."""
    def cell(x):
        return "-" if x is None else f"{x:.3f}"

    rows = [("metric", "first prompt", "after a switch", "better")]
    rows += [(label, cell(result["before"][key]), cell(result["after"][key]), better) for key, label, better in SWITCH_KEYS]
    rows.append(("switch jump", "-", cell(result["switch_jump"]), "1"))
    return _text_table(rows)


def _text_table(rows: list[tuple[str, ...]]) -> str:
    """Plain-text columns: the first left-aligned, the others right-aligned, a rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_table(result: dict, reference: Reference | None = None) -> str:
    """One plain-text table: each metric of the videos beside the held-out ground truth's, and the
    Fréchet distance beside its floor."""
    gt = reference.metrics if reference is not None else {}
    rows = [("metric", "videos", "held-out", "better")]
    for key, label, better in TABLE:
        if key not in result:
            continue
        rows.append((label, f"{result[key]:.3f}", f"{gt[key]:.3f}" if key in gt else "-", better))
    ours, theirs = result.get("per_object") or {}, gt.get("per_object") or {}
    for key in metrics.OBJECT_CHECKS[:-1]:  # present, shape, size, direction: the parts of object adherence
        if ours.get(key) is not None:
            rows.append((f"objects {key[:-3]}", f"{ours[key]:.3f}",
                         f"{theirs[key]:.3f}" if theirs.get(key) is not None else "-", "1"))
    if "frechet_distance" in result:
        rows.append(("Fréchet distance", f"{result['frechet_distance']:.2f}", f"{result['frechet_floor']:.2f} (floor)",
                     "floor"))
    return _text_table(rows)


def _refuse_existing(*paths: Path) -> None:
    for p in paths:
        if p.exists():
            raise InputError(f"'{p}' exists: refusing to overwrite it (give a new path or remove it)")


def _evaluate_and_report(videos: list[Path], targets: list, fps: float | None, world: str | None,
                         num_reference: int | None, out: Path | None, source: dict, chunk_frames: int | None = None,
                         temporal_stride: int = 4) -> dict:
    """Score ``videos`` (against the world's held-out reference when ``world`` is given), print the
    table, write ``out`` (JSON) when given. ``chunk_frames`` (latent frames per generated chunk) adds the
    chunk-seam score: pixel chunks of ``temporal_stride`` x K frames, the first 1 + stride (K - 1)."""
    first, _ = read_video(videos[0])
    reference = reference_from_world(world, num_reference, len(first)) if world else None
    ref_a = reference.halves()[0] if reference is not None else None
    seams = ({} if not chunk_frames else
             dict(frames_per_chunk=temporal_stride * chunk_frames, first_chunk_frames=1 + temporal_stride * (chunk_frames - 1)))
    result = evaluate_videos(videos, targets, fps, ref_a, **seams)
    if reference is not None and "frechet_distance" in result:
        result["frechet_floor"] = reference.floor()
    print(f"vmla-world eval: {len(videos)} videos of {result['num_frames']} frames"
          + (f"; reference: {len(reference.features)} held-out scenes of {reference.folder} "
             f"(distance to the first half; floor = second half to the first)" if reference else ""))
    print(report_table(result, reference))
    report = {**source, **result}
    if reference is not None:
        report["reference"] = {"folder": reference.folder, "num_clips": len(reference.features),
                               "num_frames": reference.num_frames, "metrics": reference.metrics,
                               "features": reference.features.tolist()}
    if out is not None:
        _write_report(out, report)
    return report


def _write_report(out: Path, report: dict) -> None:
    """The report as JSON at ``out``, atomically (non-finite numbers as null)."""
    from ..config import atomic_write_text, json_finite

    atomic_write_text(out, json.dumps(json_finite(report), indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    print(f"wrote {out}")


# ----------------------------------------------------------------------------------------------
# Teacher sampling
# ----------------------------------------------------------------------------------------------
def _world_text_len() -> int:
    from ..config import MODEL_SIZES

    return MODEL_SIZES["world"]["model"]["text_len"]


def sample_teacher(teacher_folder: str | Path, vae_folder: str | Path, text_encoder_folder: str | Path,
                   prompts: Sequence[str], num_frames: int = WorldDataConfig.num_frames, steps: int = 48,
                   guidance: float = 5.0, seed: int = 0, device: str = "auto", height: int = WorldDataConfig.height,
                   width: int = WorldDataConfig.width, shift: float = 5.0,
                   text_len: int | None = None, negative_prompt: str | None = None, batch_size: int = 4,
                   dtype=None) -> list[np.ndarray]:
    """Many-step sampling of the bidirectional teacher (a diffusers ``WanTransformer3DModel`` folder):
    one uint8 video [num_frames, height, width, 3] per prompt.

    ``num_frames`` = 1 + t_stride k and ``height``, ``width`` multiples of the codec's spatial stride times
    the teacher's patch size. ``guidance`` > 1 mixes ``schedule.guide(cond, uncond, guidance)`` against
    ``negative_prompt`` (default Wan's, as ``vmla-data ode-pairs``); 1 runs the prompt alone. ``text_len``:
    the teacher's text slots (default the world model size's). ``dtype``: the teacher's compute dtype
    (default float32 on CPU, bfloat16 on CUDA)."""
    import torch

    from .. import wan
    from ..config import resolve_device
    from ..generate import rgb_frames

    dev = resolve_device(device)
    dtype = dtype or (torch.float32 if dev.type == "cpu" else torch.bfloat16)
    text_len = text_len or _world_text_len()
    model = wan.load_wan_transformer(teacher_folder, dev, dtype).eval()
    vae = wan.load_vae(vae_folder, dev, torch.float32 if dev.type == "cpu" else torch.bfloat16)
    tok, enc = wan.load_text_encoder(text_encoder_folder, dev, torch.float32)
    s, ts = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
    p = model.config.patch_size  # (t, h, w)
    if (num_frames - 1) % ts or num_frames < 1:
        raise InputError(f"num_frames={num_frames}: expected 1 + {ts} k (the codec's causal first frame)")
    if height % (s * p[1]) or width % (s * p[2]):
        raise InputError(f"height x width = {height}x{width}: expected multiples of {s * p[1]}x{s * p[2]} "
                         "(codec stride x teacher patch)")
    shape = (1 + (num_frames - 1) // ts, model.config.in_channels, height // s, width // s)  # [F, C, h, w]
    negative = None
    if guidance != 1.0:
        negative, _ = wan.encode_prompts(tok, enc, [negative_prompt or wan.WAN_NEGATIVE_PROMPT], text_len)
    videos = []
    for lo in range(0, len(prompts), batch_size):
        batch = list(prompts[lo: lo + batch_size])
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + lo + i))
                             for i in range(len(batch))])  # [B, F, C, h, w]
        text, _ = wan.encode_prompts(tok, enc, batch, text_len)  # [B, text_len, D]
        x, _ = wan.euler_sample(model, noise.to(dev), text, steps, shift, text_len, negative, guidance)
        pixels = wan.vae_decode(vae, x)  # [B, 3, T, H, W] in [-1, 1]
        videos += [rgb_frames(v) for v in pixels]
    return videos


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmla-world", description="evaluate world videos; sample the world teacher; "
                                                                "assemble the world's frozen models")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("models", help="one folder with the world codec (vae/) and text encoder (tokenizer/, "
                                      "text_encoder/), as Wan's diffusers folders are laid out")
    m.add_argument("out", type=Path, help="new folder")
    m.add_argument("--vae", required=True, type=Path, help="the trained codec (train_codec's OUT/vae)")
    m.add_argument("--text-encoder", type=Path, default=None,
                   help="a folder with tokenizer/ and text_encoder/ to copy (`vmla-world text-encoder`'s OUT); "
                        "default: build the seeded random encoder")
    x = sub.add_parser("text-encoder", help="pretrain the world text encoder on the world's captions (token tagging)")
    x.add_argument("out", type=Path, help="new folder: tokenizer/, text_encoder/, training.json")
    x.add_argument("--steps", type=int, default=600, help="AdamW steps")
    x.add_argument("--batch-size", type=int, default=128, help="captions per step")
    x.add_argument("--lr", type=float, default=3e-3)
    x.add_argument("--seed", type=int, default=0, help="initial weights and the caption stream")
    x.add_argument("--heldout", type=int, default=1000, help="captions of another stream the accuracy is measured on")
    e = sub.add_parser("eval", help="score mp4s against prompts or scenes; Fréchet distance to a world's held-out clips")
    e.add_argument("videos", nargs="+", help="folder(s) of .mp4 files (sorted by name) and/or .mp4 files")
    t = e.add_mutually_exclusive_group(required=True)
    t.add_argument("--prompts", help="text file, one prompt per line (targets from the prompt's words)")
    t.add_argument("--scenes", help="scenes.jsonl / scenes-heldout.jsonl (exact targets)")
    t.add_argument("--scripts", action="store_true",
                   help="videos of `vmla-generate --prompt-script`: each segment against its own prompt (the scripts "
                        "in the manifest.json beside them), and the visual jump at each switch")
    e.add_argument("--out", type=Path, default=None, help="report JSON (must not exist)")
    e.add_argument("--chunk-frames", type=int, default=None,
                   help="latent frames per chunk of the generator: adds the chunk-seam jump (1 = no seam)")
    e.add_argument("--temporal-stride", type=int, default=4, help="the codec's pixel frames per latent frame (Wan: 4)")
    s = sub.add_parser("sample-teacher", help="many-step Euler samples of the teacher -> mp4s + eval")
    for q in (e, s):
        q.add_argument("--world", help="world folder: held-out scenes for the reference (sample-teacher: also "
                                       "the default geometry)")
        q.add_argument("--num-reference", type=int, default=None, help="held-out scenes to render (default all)")
        q.add_argument("--fps", type=float, default=None, help="frame rate (eval: default the videos' own)")
    s.add_argument("--teacher", required=True, help="diffusers WanTransformer3DModel folder")
    s.add_argument("--vae", required=True, help="AutoencoderKLWan folder (the world codec)")
    s.add_argument("--text-encoder", required=True, help="folder with tokenizer/ and text_encoder/")
    s.add_argument("--prompts", required=True, help="text file, one prompt per line")
    s.add_argument("--out", type=Path, required=True, help="folder for the mp4s and report.json (existing files are refused)")
    s.add_argument("--frames", type=int, default=None, help="pixel frames, 1 + 4k (default: the world's, else 81)")
    s.add_argument("--height", type=int, default=None, help="px (default: the world's, else 64)")
    s.add_argument("--width", type=int, default=None, help="px (default: the world's, else 64)")
    s.add_argument("--steps", type=int, default=48, help="Euler steps")
    s.add_argument("--guidance", type=float, default=5.0, help="CFG weight (1 = off)")
    s.add_argument("--shift", type=float, default=5.0, help="flow-matching shift of the Euler sigmas")
    s.add_argument("--seed", type=int, default=0, help="prompt i starts from noise seeded seed + i")
    s.add_argument("--text-len", type=int, default=None, help="teacher text slots (default: the world size's)")
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--device", default="auto")
    return p


def _world_settings(world: str | None) -> dict:
    if not world:
        return {}
    path = Path(world) / MANIFEST
    try:
        return json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"world folder '{world}': {MANIFEST} unreadable ({type(e).__name__}): give a folder "
                         "written by `vmla-data world`") from None


def _eval(args) -> int:
    if args.out is not None:
        _refuse_existing(args.out)
    videos = video_paths(args.videos)
    if args.scripts:
        unused = [flag for flag, value in (("--world", args.world), ("--num-reference", args.num_reference),
                                           ("--chunk-frames", args.chunk_frames)) if value is not None]
        if unused:
            raise InputError(f"{unused[0]} is not used with --scripts (each segment is scored against its own prompt)")
        result = evaluate_switches(videos, args.fps)
        print(f"vmla-world eval: {result['num_videos']} prompt-script videos, {result['num_switches']} switches "
              f"(generate.recache: {', '.join(map(str, result['recache']))})")
        print(switch_table(result))
        if args.out is not None:
            _write_report(args.out, {"scripts": True, **result})
        return 0
    if args.prompts:
        rows = read_prompt_targets(args.prompts)
        targets = pair_prompts(videos, rows, args.prompts)
        source = {"prompts": args.prompts}
    else:
        rows = read_scene_targets(args.scenes)
        targets = pair(videos, [n for n, _ in rows], [s for _, s in rows], args.scenes)
        source = {"scenes": args.scenes}
    if args.chunk_frames is not None and (args.chunk_frames < 1 or args.temporal_stride < 1):
        raise InputError(f"--chunk-frames {args.chunk_frames} and --temporal-stride {args.temporal_stride} must be >= 1")
    _evaluate_and_report(videos, targets, args.fps, args.world, args.num_reference, args.out, source,
                         args.chunk_frames, args.temporal_stride)
    return 0


def _sample(args) -> int:
    from ..dataprep.video import Mp4Writer
    from ..generate import video_names

    rows = read_prompt_targets(args.prompts)  # every prompt parses before any model loads
    w = _world_settings(args.world)
    d = WorldDataConfig()  # the world's defaults where neither the command nor the folder says
    frames, height, width = (args.frames or w.get("num_frames", d.num_frames), args.height or w.get("height", d.height),
                             args.width or w.get("width", d.width))
    fps = args.fps or w.get("fps", d.fps)
    try:
        paths = [args.out / row[0] for row in video_names([t for t, _ in rows], 1)]  # one distinct name per prompt
    except ValueError as e:
        raise InputError(str(e)) from None
    report = args.out / "report.json"
    _refuse_existing(report, *paths)
    for key, folder in (("--teacher", args.teacher), ("--vae", args.vae), ("--text-encoder", args.text_encoder)):
        if not Path(folder).is_dir():
            raise InputError(f"{key} '{folder}' is not a folder")
    print(f"vmla-world sample-teacher: {len(rows)} prompts, {frames} frames of {height}x{width} at {fps:g} fps, "
          f"{args.steps} Euler steps, guidance {args.guidance:g} -> {args.out}")
    videos = sample_teacher(args.teacher, args.vae, args.text_encoder, [t for t, _ in rows], frames, args.steps,
                            args.guidance, args.seed, args.device, height, width, args.shift, args.text_len,
                            batch_size=args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    for path, video in zip(paths, videos):
        with Mp4Writer(path, int(round(fps)), crf=DEFAULT_CRF) as writer:
            writer.write(video)
    settings = {"teacher": str(args.teacher), "steps": args.steps, "guidance": args.guidance, "shift": args.shift,
                "seed": args.seed, "num_frames": frames, "height": height, "width": width}
    _evaluate_and_report(paths, [spec for _, spec in rows], fps, args.world, args.num_reference, report,
                         {"prompts": args.prompts, "sampling": settings})
    return 0


def _models(args) -> int:
    """``args.out``/{vae, tokenizer, text_encoder}: the codec copied; the text encoder copied from
    ``--text-encoder`` or built (seeded, frozen, the world's vocabulary and ``text_dim``); written atomically
    (``student_io.AtomicDir``), never over an existing folder."""
    import shutil

    from ..config import MODEL_SIZES
    from ..student_io import AtomicDir, OutputError
    from .text import build_text_encoder, world_words

    if not (args.vae / "config.json").is_file():
        raise InputError(f"--vae '{args.vae}' has no config.json: give the codec folder (train_codec's OUT/vae)")
    text = args.text_encoder
    missing = [f"{text / part}" for part in ("tokenizer", "text_encoder", "text_encoder/config.json")
               if text and not (text / part).exists()]
    if missing:
        raise InputError(f"--text-encoder '{text}' has no {missing[0]}: give `vmla-world text-encoder`'s OUT")
    text_dim = MODEL_SIZES["world"]["model"]["text_dim"]
    if text and (d := json.loads((text / "text_encoder" / "config.json").read_text()).get("d_model")) != text_dim:
        raise InputError(f"--text-encoder '{text}': its text_encoder/config.json has d_model {d}, the world's DiT "
                         f"reads text_dim {text_dim}: give an encoder built for the world")
    try:
        with AtomicDir(args.out) as tmp:
            if text:
                for part in ("tokenizer", "text_encoder"):
                    shutil.copytree(text / part, tmp / part)
            else:
                build_text_encoder(tmp, world_words(), d_model=text_dim)
            shutil.copytree(args.vae, tmp / "vae")
    except OutputError as e:
        raise InputError(str(e)) from None
    print(f"vmla-world models: codec from {args.vae} + world text encoder {'from ' + str(text) if text else '(seeded)'}"
          f" -> {args.out}")
    return 0


def _text_encoder(args) -> int:
    """``args.out``/{tokenizer, text_encoder, training.json}: the seeded world encoder pretrained by
    ``text.train_encoder``; written atomically, never over an existing folder."""
    from ..config import MODEL_SIZES
    from ..student_io import AtomicDir, OutputError
    from .text import pretrain_text_encoder

    if args.steps < 1 or args.batch_size < 1 or args.heldout < 1 or args.lr <= 0:
        raise InputError(f"--steps {args.steps}, --batch-size {args.batch_size}, --heldout {args.heldout}, "
                         f"--lr {args.lr}: all must be > 0")
    try:
        with AtomicDir(args.out) as tmp:
            report = pretrain_text_encoder(tmp, d_model=MODEL_SIZES["world"]["model"]["text_dim"], steps=args.steps,
                                           batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                           heldout=args.heldout)  # max_len: the world DiT's text slots
    except OutputError as e:
        raise InputError(str(e)) from None
    acc = report["heldout_accuracy"]
    print(f"vmla-world text-encoder: {args.steps} steps, held-out token accuracy "
          + ", ".join(f"{k} {v:.3f}" for k, v in acc.items() if k not in ("step", "loss")) + f" -> {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"eval": _eval, "sample-teacher": _sample, "models": _models,
                "text-encoder": _text_encoder}[args.command](args)
    except (InputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
