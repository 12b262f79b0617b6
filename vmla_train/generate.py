"""vmla-generate: minute-scale text-to-video from a student folder, streamed to mp4.

    vmla-generate CKPT prompts.txt [key=value ...]      (e.g. generate.seconds=60 generate.guidance_scale=3)
    vmla-generate CKPT --prompt-script walk.txt [key=value ...]      (a video whose prompt changes over time)

Per prompt and sample: text embeddings (umT5 via ``wan.load_text_encoder`` or a precomputed
safetensors file) -> ``rollout.sample_video`` over the latent cache (sliding window + sinks, so any
length runs in constant memory) with ``keep=False`` -> each finished chunk goes through a streaming VAE
decoder (diffusers' own causal feature cache, carried across chunks: frames equal a whole-video decode
and memory stays flat) -> frames are encoded into ``<out_dir>/<prompt>-<index>.mp4`` (VBench naming),
written to a temporary file and renamed when complete.

Outputs (``video_names``, ``manifest.json``). Every file of a run has its own name: ``<prompt>-<index>.mp4``
where the prompt fits a file name as it is; a prompt cut at 200 bytes, or one whose cleaned name
(separators and control characters -> spaces) another prompt of the run shares, gets ``~<8 hex digits of
the SHA-256 of the full prompt>`` after its text; a prompt listed again continues its indices (the second
of two identical lines with 2 samples each writes ``-2`` and ``-3``). ``<out_dir>/manifest.json`` maps
every file to its full prompt, index and noise seed; it is rewritten atomically after every batch and
keeps the entries of earlier runs into the same folder. An mp4 that exists already is refused before
anything loads (no resuming: remove it or choose another ``out_dir``); partial files that killed runs
left behind (``Mp4Writer.remove_stale``) are removed at the start.

Latent frames = seconds * video.fps / vae_stride[0], rounded up to whole chunks (60 s at 16 fps with
Wan's 4x temporal stride = 240); the video has 1 + vae_stride[0] (latent frames - 1) frames, which the
command prints before it starts. Classifier-free guidance (guidance_scale > 1) runs the negative prompt
as a second batch half with its own cache; the flows are mixed before the x0 step.

Streaming (``generate.stream``): ``mp4`` writes a growing, playable fragmented copy of each video beside it
(``partial_path``, removed once the mp4 is in place); ``pipe`` writes raw rgb24 frames to stdout (every
printed line goes to stderr). Prompt scripts (``read_prompt_script``): one video per script, its prompt
switching at the chunk boundary at or after each segment's start, the cache re-cached under the new prompt
(``generate.recache``, ``rollout.recache_window``). docs/generation.md has both. ``generate.graphs``: on a GPU the
full-window forwards replay CUDA graphs (``graphs.ChunkGraphs``; a CPU runs them eagerly and says so).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import config as C
from . import schedule, wan
from .config import atomic_write_text
from .dataprep.video import Mp4Writer
from .graphs import ChunkGraphs
from .rollout import PromptSwitch, sample_video


def latent_frames_for(cfg: C.Config) -> int:
    """Latent frames for ``generate.seconds``: seconds * fps / vae_stride[0], rounded up to whole chunks."""
    v = cfg.video
    frames = math.ceil(round(cfg.generate.seconds * v.fps / v.vae_stride[0], 6))  # round: 2.25*16/4 is 9, not 9.0000001
    return v.chunk_frames * max(1, math.ceil(frames / v.chunk_frames))


def video_frames_for(cfg: C.Config, latent_frames: int) -> int:
    """Frames of the decoded video: the Wan VAE turns F latent frames into 1 + vae_stride[0] (F - 1)."""
    return 1 + cfg.video.vae_stride[0] * (latent_frames - 1)


MANIFEST_NAME = "manifest.json"  # in out_dir: file name -> prompt, index, seed
NAME_MAX_BYTES = 200  # prompt bytes in a file name (the name stays under the usual 255-byte limit)
HASH_CHARS = 8  # hex digits of the SHA-256 of the full prompt that tell cut or clashing prompts apart


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:HASH_CHARS]


def _clean(prompt: str) -> str:
    """Path separators and control characters -> spaces, ends stripped."""
    return re.sub(r"[/\\\x00-\x1f]", " ", prompt).strip()


def video_stem(prompt: str, max_bytes: int = NAME_MAX_BYTES, tag: bool = False) -> str:
    """The ``<prompt>`` part of a file name: the cleaned prompt, cut to ``max_bytes`` UTF-8 bytes; a cut
    prompt (or any with ``tag``) ends in ``~<prompt_hash of the full prompt>``."""
    raw = _clean(prompt).encode()
    stem = raw[:max_bytes].decode(errors="ignore").rstrip() or "prompt"
    return f"{stem}~{prompt_hash(prompt)}" if tag or len(raw) > max_bytes else stem


def video_name(prompt: str, index: int, max_bytes: int = NAME_MAX_BYTES, tag: bool = False) -> str:
    """VBench-style file name ``<prompt>-<index>.mp4`` (``video_stem``)."""
    return f"{video_stem(prompt, max_bytes, tag)}-{index}.mp4"


def video_names(prompts: Sequence[str], samples_per_prompt: int) -> list[list[str]]:
    """File names [len(prompts)][samples_per_prompt], all different. A prompt keeps its plain VBench name
    unless it is cut (``video_stem`` tags it) or its cleaned name equals another prompt's, when those of
    the clashing prompts that were changed by cleaning (or are empty) are tagged; the k-th repeat of a
    prompt takes indices k * samples_per_prompt + 0 .. samples_per_prompt - 1."""
    distinct = list(dict.fromkeys(prompts))
    by_stem: dict[str, list[str]] = {}
    for p in distinct:
        by_stem.setdefault(video_stem(p), []).append(p)
    tagged = {p for group in by_stem.values() if len(group) > 1 for p in group if _clean(p) != p or not _clean(p)}
    stems = {p: video_stem(p, tag=p in tagged) for p in distinct}
    owner: dict[str, str] = {}
    for p, st in stems.items():  # still equal: two prompts with one hash, or a prompt spelling a tagged name
        if st in owner:
            raise ValueError(f"prompts {owner[st]!r} and {p!r} get the same file name '{st}-0.mp4': reword one of them")
        owner[st] = p
    repeats: dict[str, int] = {}
    names = []
    for p in prompts:
        first = repeats.get(p, 0) * samples_per_prompt
        repeats[p] = repeats.get(p, 0) + 1
        names.append([f"{stems[p]}-{first + k}.mp4" for k in range(samples_per_prompt)])
    return names


def refuse_existing(out_dir: Path, names: Sequence[Sequence[str]], partial: bool = False) -> None:
    """``FileExistsError`` naming the first planned mp4 (with ``partial``, or its ``partial_path``) that exists:
    outputs are never replaced."""
    for row in names:
        for n in row:
            for path in (out_dir / n, partial_path(out_dir / n)) if partial else (out_dir / n,):
                if path.exists():
                    raise FileExistsError(f"'{path}' exists: refusing to overwrite it "
                                          "(remove it or choose another generate.out_dir)")


def read_manifest(path: Path) -> dict[str, dict]:
    """The ``videos`` table of a ``manifest.json`` (empty when the file does not exist); ``ValueError``
    naming the file when it is not one."""
    if not path.exists():
        return {}
    try:
        videos = json.loads(path.read_text(encoding="utf-8"))["videos"]
        if not isinstance(videos, dict) or not all(isinstance(e, dict) and isinstance(e.get("prompt"), str)
                                                   for e in videos.values()):
            raise ValueError("entries without a 'prompt'")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"'{path}' is not a vmla-generate manifest ({type(e).__name__}: {e}): "
                         "remove it or choose another folder") from None
    return videos


def write_manifest(path: Path, videos: dict[str, dict]) -> None:
    """Atomic write: ``{"videos": {file name: {"prompt", "index", "seed", "batch_row", "batch_size"}}}``."""
    text = json.dumps({"videos": dict(sorted(videos.items()))}, indent=1, ensure_ascii=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


def manifest_entries(videos: Sequence[Path]) -> dict[Path, dict]:
    """The ``manifest.json`` entry of every video that the manifest beside it lists (others are left out):
    prompt, index, seed, ..., and for a prompt script ``script`` (its segments in order, each ``{start, prompt,
    chunk, frame}``, ``frame`` the first video frame under that prompt) and ``recache``."""
    out: dict[Path, dict] = {}
    tables: dict[Path, dict[str, dict]] = {}
    for v in map(Path, videos):
        if v.parent not in tables:
            tables[v.parent] = read_manifest(v.parent / MANIFEST_NAME)
        entry = tables[v.parent].get(v.name)
        if entry is not None:
            out[v] = entry
    return out


def manifest_prompts(videos: Sequence[Path]) -> dict[Path, str]:
    """Full prompt of every video that the ``manifest.json`` beside it lists (others are left out)."""
    return {v: entry["prompt"] for v, entry in manifest_entries(videos).items()}


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, stripped; ``ValueError`` / ``FileNotFoundError`` naming the file."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"prompt file '{p}' is a folder; expected a text file, one prompt per line")
    if not p.is_file():
        raise FileNotFoundError(f"prompt file '{p}' does not exist")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file '{p}' has no prompts (one per line)")
    return prompts


# ----------------------------------------------------------------------------------------------
# Prompt scripts: timed prompts, one video per script
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    start: float  # seconds into the video
    prompt: str
    line: int  # in the script file


@dataclass(frozen=True)
class PromptScript:
    """A timed prompt script: ``segments`` in time order, the first from 0 s."""

    path: Path
    segments: tuple[Segment, ...]

    @property
    def name(self) -> str:
        """The text the video is named after (``video_names``): the file's name without its suffix."""
        return self.path.stem

    def text(self) -> str:
        """The script as one string, a line per segment (the ``prompt`` of its manifest entries)."""
        return "\n".join(f"{seg.start:g}\t{seg.prompt}" for seg in self.segments)


def read_prompt_script(path: str | Path) -> PromptScript:
    """A text file of ``START_SECONDS<tab or spaces>prompt`` lines (blank lines and ``#`` lines skipped); the
    first start is 0 and starts increase. ``ValueError`` / ``FileNotFoundError`` naming the file and line."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"prompt script '{p}' is a folder; expected a text file of 'START_SECONDS prompt' lines")
    if not p.is_file():
        raise FileNotFoundError(f"prompt script '{p}' does not exist")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt script '{p}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    segments: list[Segment] = []
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"prompt script '{p}' line {n}"
        m = re.fullmatch(r"(\S+)\s+(.+)", line)
        if m is None:
            raise ValueError(f"{where}: expected 'START_SECONDS<tab or space>prompt', found {line!r}")
        try:
            start = float(m[1])
        except ValueError:
            raise ValueError(f"{where}: start {m[1]!r} is not a number of seconds") from None
        if not math.isfinite(start) or start < 0:
            raise ValueError(f"{where}: start {m[1]!r} is not a time >= 0 s")
        if not segments and start != 0:
            raise ValueError(f"{where}: the first segment must start at 0, found {start:g} s")
        if segments and start <= segments[-1].start:
            raise ValueError(f"{where}: start {start:g} s is not after the previous segment's "
                             f"{segments[-1].start:g} s (line {segments[-1].line})")
        segments.append(Segment(start, m[2].strip(), n))
    if not segments:
        raise ValueError(f"prompt script '{p}' has no segments (lines 'START_SECONDS prompt', the first at 0)")
    return PromptScript(p, tuple(segments))


def chunk_first_frame(cfg: C.Config, chunk: int) -> int:
    """Index of the first video frame of latent chunk ``chunk``: the frames the chunks before it decode to."""
    return video_frames_for(cfg, chunk * cfg.video.chunk_frames) if chunk else 0


def first_frame_at(cfg: C.Config, seconds: float) -> int:
    """Index of the first video frame shown at or after ``seconds``."""
    return math.ceil(round(seconds * cfg.video.fps, 6))  # round: 0.5625*16 is 9, not 9.0000001


def switch_chunk(cfg: C.Config, seconds: float) -> int:
    """The first chunk whose first video frame is at or after ``seconds`` (a switch takes effect there)."""
    frame = first_frame_at(cfg, seconds)
    return bisect.bisect_left(range(frame + 1), frame, key=lambda i: chunk_first_frame(cfg, i))  # chunk i starts at >= i


def switch_plan(cfg: C.Config, script: PromptScript) -> tuple[list[tuple[int, int]], list[str]]:
    """([(chunk, segment index)] from chunk 0, warnings): each segment from the chunk boundary at or after its
    start. A segment starting after the video's last chunk boundary, or sharing its boundary with a later one,
    is not shown; each such segment gets a warning line."""
    chunks = latent_frames_for(cfg) // cfg.video.chunk_frames
    last = chunk_first_frame(cfg, chunks - 1)
    plan: list[tuple[int, int]] = []
    warnings = []
    for k, seg in enumerate(script.segments):
        if first_frame_at(cfg, seg.start) > last:
            warnings.append(f"prompt script '{script.path}' line {seg.line}: starts at {seg.start:g} s, after the "
                            f"video's last chunk boundary ({last / cfg.video.fps:.2f} s): not shown")
            continue
        c = switch_chunk(cfg, seg.start)
        if plan and plan[-1][0] == c:
            prev = script.segments[plan[-1][1]]
            warnings.append(f"prompt script '{script.path}' line {prev.line}: switches at the same chunk boundary "
                            f"({chunk_first_frame(cfg, c) / cfg.video.fps:.2f} s) as line {seg.line}: not shown")
            plan.pop()
        plan.append((c, k))
    return plan, warnings


# ----------------------------------------------------------------------------------------------
# Streaming outputs: a growing mp4 beside each video, raw frames on stdout
# ----------------------------------------------------------------------------------------------
PARTIAL_SUFFIX = ".partial.mp4"


def partial_path(path: Path) -> Path:
    """The growing copy of ``path`` (``generate.stream=mp4``): ``<name>.partial.mp4``, a name no final video has
    (those end in ``-<index>.mp4``)."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


class PartialMp4(Mp4Writer):
    """A playable copy of a video while it is generated (``generate.stream=mp4``), at ``partial_path``: a
    fragmented mp4 (an empty moov first, then a moof + mdat fragment per frame, flushed to the file as it is
    written) from a low-latency encode (x264 ``zerolatency``: a packet per frame, no lookahead). The mp4 muxer
    writes a frame's fragment when the next frame comes, so the file holds every frame written but the newest
    one. ``close`` removes it (the final mp4 is complete by then); so does ``abort``. Frame handling is
    ``Mp4Writer``'s."""

    MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof+frag_every_frame"

    def __init__(self, path: Path, fps: int, crf: int | None = None):
        import av

        self.path = self.tmp = partial_path(path)  # ``abort`` removes ``tmp``
        self.container = av.open(str(self.path), mode="w", format="mp4",
                                 options={"movflags": self.MOVFLAGS, "flush_packets": "1"})
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=fps)
        self.stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self.stream.options = {"tune": "zerolatency", "preset": "veryfast",
                                   **({"crf": str(crf)} if crf is not None else {})}
        self.frames = 0

    def close(self) -> Path:
        self.abort()
        return self.path


class RawFrames:
    """uint8 RGB frames [T, H, W, 3] as raw rgb24 bytes on a binary stream (``generate.stream=pipe``), flushed
    per write. When the reader goes away the frames stop (one line on stderr) and generation goes on."""

    def __init__(self, out: BinaryIO):
        self.out, self.open = out, True

    def write(self, rgb: np.ndarray) -> None:
        if not self.open:
            return
        try:
            self.out.write(np.ascontiguousarray(rgb).tobytes())
            self.out.flush()
        except BrokenPipeError:
            self.open = False
            print("vmla-generate: stdout was closed: no more raw frames (the mp4 files are still written)",
                  file=sys.stderr)
            try:  # no second BrokenPipeError when Python flushes stdout at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())
            except (OSError, ValueError, AttributeError):
                pass


def pipe_line(cfg: C.Config) -> str:
    """How to watch ``generate.stream=pipe``."""
    v = cfg.video
    return (f"raw rgb24 {v.width}x{v.height} frames at {v.fps} fps on stdout; watch with "
            f"`| ffplay -f rawvideo -pixel_format rgb24 -video_size {v.width}x{v.height} -framerate {v.fps} -`")


# ----------------------------------------------------------------------------------------------
# Streaming VAE decoding
# ----------------------------------------------------------------------------------------------
class StreamingDecoder:
    """Decode normalised latents chunk by chunk with the Wan VAE's causal feature cache kept between
    calls (the per-frame loop of ``AutoencoderKLWan._decode``, spread over calls): the concatenated
    output equals ``wan.vae_decode`` of the whole video; memory is that of one chunk."""

    def __init__(self, vae):
        if getattr(vae, "use_tiling", False):
            raise ValueError("StreamingDecoder: disable the VAE's tiling (vae.use_tiling=False)")
        self.vae = vae
        self.vae.clear_cache()
        self.first = True

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, F, C, h, w] -> pixels [B, 3, T, H, W] in [-1, 1] (T = 1 + 4 (F - 1) for the first
        call, 4 F after)."""
        vae = self.vae
        mean, std = wan._latent_stats(vae, latents)
        z = (latents.float() * std + mean).transpose(1, 2)  # (B, C, F, h, w)
        x = vae.post_quant_conv(z.to(next(vae.parameters()).dtype))
        outs = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            kw = {"first_chunk": True} if self.first else {}
            outs.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, **kw))
            self.first = False
        out = torch.cat(outs, 2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.float().clamp(-1, 1)

    def close(self) -> None:
        self.vae.clear_cache()


class OverlappedOutput:
    """Chunk outputs off the denoiser's critical path (``generate.overlap``): ``submit(i, x0)`` snapshots the
    chunk's latents on the caller's stream and returns at once; one worker thread, in chunk order, runs
    ``consume(i, latents)`` (the streaming decode, the frames to the host and into the writers) on its own CUDA
    stream, which waits for the snapshot only. So chunk k decodes and writes while chunk k + 1 denoises. At
    most ``depth`` chunks wait (memory stays bounded); ``finish()`` waits for the last one. An exception of
    ``consume`` is raised again by the next ``submit`` or by ``finish``. What ``consume`` computes is what the
    sequential path computes, in the same order: frames are identical (tests/test_generate_streaming.py)."""

    def __init__(self, consume: Callable[[int, torch.Tensor], None], device: torch.device, depth: int = 2):
        import queue
        import threading

        self.consume = consume
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.todo: "queue.Queue" = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="vmla-generate-output", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            while (item := self.todo.get()) is not None:
                if self.error is None:  # after a failure: drain without work, the caller raises
                    i, latents, ready = item
                    try:
                        if ready is not None:
                            self.stream.wait_event(ready)
                        self.consume(i, latents)
                    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                        self.error = e
                del item  # the chunk's latents are freed before the worker waits for the next one

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, i: int, x0: torch.Tensor) -> None:
        self._raise()
        latents = x0.detach().clone()  # the rollout reuses its buffers (and graphs their static outputs)
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()  # the caller's stream: the snapshot is complete after this point
            latents.record_stream(self.stream)
        self.todo.put((i, latents, ready))

    def finish(self) -> None:
        """Wait for every submitted chunk; raise a failure of one. Safe to call twice."""
        if self.thread.is_alive():
            self.todo.put(None)
            self.thread.join()
        self._raise()


def rgb_frames(pixels: torch.Tensor) -> np.ndarray:
    """Pixels [3, T, H, W] in [-1, 1] -> uint8 RGB frames [T, H, W, 3] for ``Mp4Writer``."""
    return ((pixels.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance over the cache
# ----------------------------------------------------------------------------------------------
class GuidedStudent(nn.Module):
    """The student run on [negative; positive] halves with one cache of twice the batch; returns
    ``schedule.guide(cond, uncond, w)``. ``sample_video`` drives it like the plain student."""

    def __init__(self, student: nn.Module, negative: torch.Tensor, scale: float):
        super().__init__()
        self.student = student
        self.cfg = student.cfg
        self.negative = negative  # [B, Lt, text_dim]
        self.scale = scale

    def new_cache(self, batch: int, device=None):
        return self.student.new_cache(2 * batch, device)

    def forward(self, x, t, text, *, cache=None, write_cache: bool = False):
        neg = self.negative.to(text.dtype).expand(text.shape[0], -1, -1)
        if neg.shape[1] != text.shape[1]:
            width = max(neg.shape[1], text.shape[1])
            pad = lambda e: torch.nn.functional.pad(e, (0, 0, 0, width - e.shape[1]))  # noqa: E731
            neg, text = pad(neg), pad(text)
        out = self.student(torch.cat([x, x]), torch.cat([t, t]), torch.cat([neg, text]), cache=cache,
                           write_cache=write_cache)
        uncond, cond = out.chunk(2)
        return schedule.guide(cond, uncond, self.scale)


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------
class TextSource:
    """Prompt embeddings [1, text_len, text_dim] from umT5 or from a precomputed safetensors file."""

    def __init__(self, cfg: C.Config, prompts: Sequence[str], device: torch.device):
        g = cfg.generate
        self.cfg, self.prompts, self.device = cfg, list(prompts), device
        self.tok = self.enc = None
        self.table: dict[str, torch.Tensor] = {}
        if g.text_encoder:
            self.tok, self.enc = wan.load_text_encoder(g.text_encoder, device=device)
        elif g.embeddings:
            from safetensors.torch import load_file

            self.table = load_file(g.embeddings)
            if "prompt_embeds" not in self.table:
                raise KeyError(f"generate.embeddings '{g.embeddings}': no 'prompt_embeds' tensor")
            n = self.table["prompt_embeds"].shape[0]
            if n != len(self.prompts):
                raise ValueError(f"generate.embeddings '{g.embeddings}': {n} prompt embeddings for "
                                 f"{len(self.prompts)} prompts")
        else:
            raise ValueError("set generate.text_encoder (umT5 folder) or generate.embeddings (safetensors)")

    def _encode(self, text: str) -> torch.Tensor:
        emb, _ = wan.encode_prompts(self.tok, self.enc, [text], self.cfg.model.text_len)
        return emb

    def prompt(self, i: int) -> torch.Tensor:
        if self.enc is not None:
            return self._encode(self.prompts[i]).to(self.device)
        return self.table["prompt_embeds"][i : i + 1].float().to(self.device)

    def negative(self) -> torch.Tensor:
        neg = self.cfg.generate.negative_prompt or wan.WAN_NEGATIVE_PROMPT
        if self.enc is not None:
            return self._encode(neg).to(self.device)
        if "negative_embeds" not in self.table:
            raise KeyError(f"generate.embeddings '{self.cfg.generate.embeddings}': guidance needs 'negative_embeds'")
        return self.table["negative_embeds"][:1].float().to(self.device)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
def text_rows(videos: Sequence[str | PromptScript]) -> list[list[int]]:
    """Per video, the rows of its texts in ``text_prompts(videos)``: one for a prompt, one per segment for a script."""
    rows, n = [], 0
    for v in videos:
        k = 1 if isinstance(v, str) else len(v.segments)
        rows.append(list(range(n, n + k)))
        n += k
    return rows


def text_prompts(videos: Sequence[str | PromptScript]) -> list[str]:
    """Every text the videos need, in order (a prompt, or a script's segments): the prompts of ``TextSource``
    and the rows of a ``generate.embeddings`` file."""
    return [p for v in videos for p in ([v] if isinstance(v, str) else [seg.prompt for seg in v.segments])]


def generate(student: nn.Module, cfg: C.Config, videos: Sequence[str | PromptScript], text: TextSource, vae,
             out_dir: Path, progress: bool = True, after_chunk: Callable[[int, list[Path]], None] | None = None,
             pipe: BinaryIO | None = None) -> list[Path]:
    """Every video (a prompt, or a ``PromptScript`` switching prompts at chunk boundaries) x sample -> one mp4
    in ``out_dir`` named by ``video_names`` and listed in its ``manifest.json``. Refuses (``FileExistsError``)
    when one of the files exists; first removes partial files of killed runs. ``generate.stream`` adds a
    growing ``partial_path`` copy of each video (mp4) or raw frames on ``pipe`` (default: stdout).
    ``after_chunk(i, paths)`` runs once chunk i's frames are in every output. Returns the written paths."""
    from tqdm import tqdm

    g = cfg.generate
    dev = next(student.parameters()).device
    frames = latent_frames_for(cfg)
    chunks = frames // cfg.video.chunk_frames
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    titles = [v if isinstance(v, str) else v.name for v in videos]
    names = video_names(titles, g.samples_per_prompt)
    refuse_existing(out_dir, names, partial=g.stream == "mp4")
    manifest_path = out_dir / MANIFEST_NAME
    manifest = read_manifest(manifest_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in Mp4Writer.remove_stale(out_dir):
        print(f"vmla-generate: removed '{stale}', a partial file of a killed run", file=sys.stderr)
    raw = RawFrames(pipe if pipe is not None else sys.stdout.buffer) if g.stream == "pipe" else None
    model: nn.Module = student
    if g.guidance_scale != 1.0:
        model = GuidedStudent(student, text.negative(), g.guidance_scale)
    if g.graphs and dev.type == "cuda":  # full-window forwards replayed from CUDA graphs, its caches reused per video
        model = ChunkGraphs(model)
    elif g.graphs:
        print(f"vmla-generate: generate.graphs=true replays CUDA graphs, which need a CUDA device: on {dev} every "
              "forward runs eagerly", file=sys.stderr)
    rows = text_rows(videos)
    written = []
    for p_idx, video in enumerate(videos):
        plan = [(0, 0)]
        if isinstance(video, PromptScript):
            plan, warnings = switch_plan(cfg, video)
            for w in warnings:
                print(f"vmla-generate: {w}", file=sys.stderr)
            print(f"vmla-generate: '{video.path}': " + ", ".join(
                f"{video.segments[k].prompt[:40]!r} from {chunk_first_frame(cfg, c) / cfg.video.fps:.2f} s (chunk {c})"
                for c, k in plan))
        embs = [text.prompt(rows[p_idx][k]) for _, k in plan]
        for first in range(0, g.samples_per_prompt, g.batch_size):
            idx = list(range(first, min(first + g.batch_size, g.samples_per_prompt)))
            b = len(idx)
            seed = cfg.runtime.seed + 1_000_003 * p_idx + first
            gen = torch.Generator(device=dev).manual_seed(seed)
            paths = [out_dir / names[p_idx][k] for k in idx]
            writers: list[Mp4Writer] = [Mp4Writer(p, cfg.video.fps, g.crf) for p in paths]
            if g.stream == "mp4":
                writers += [PartialMp4(p, cfg.video.fps, g.crf) for p in paths]
            bar = tqdm(total=chunks, unit="chunk", disable=not progress, desc=f"{titles[p_idx][:40]!r} x{b}")
            t0 = time.perf_counter()
            decoder = StreamingDecoder(vae)  # one decoder, batch rows decoded together
            done_frames = 0

            def consume(i: int, x0: torch.Tensor) -> None:  # chunk i's frames into every output
                nonlocal done_frames
                pix = decoder(x0)  # (B, 3, T, H, W)
                for r in range(b):
                    rgb = rgb_frames(pix[r])
                    for w in writers[r::b]:  # the final mp4, then its growing copy
                        w.write(rgb)
                    if raw is not None:
                        raw.write(rgb)
                done_frames += pix.shape[2]
                dt = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(latent_fps=f"{(i + 1) * cfg.video.chunk_frames * b / dt:.2f}",
                                video_fps=f"{done_frames * b / dt:.1f}")
                if after_chunk is not None:
                    after_chunk(i, paths)

            # generate.overlap: chunk k is decoded and written by a worker (own CUDA stream) while k + 1 denoises
            overlap = OverlappedOutput(consume, dev) if g.overlap else None
            switches = [PromptSwitch(c, e.expand(b, -1, -1)) for (c, _), e in zip(plan[1:], embs[1:])]
            try:
                sample_video(model, embs[0].expand(b, -1, -1), frames, steps, generator=gen,
                             on_chunk=overlap.submit if overlap else consume, keep=False, switches=switches,
                             recache=g.recache)
                if overlap is not None:
                    overlap.finish()
            except BaseException:
                if overlap is not None:  # the worker stops before the files it writes are aborted
                    with contextlib.suppress(BaseException):
                        overlap.finish()
                for w in writers:
                    w.abort()
                raise
            finally:
                bar.close()
                decoder.close()
            for w in writers:  # the final mp4s are renamed into place before their growing copies go
                w.close()
            offset = titles[:p_idx].count(titles[p_idx]) * g.samples_per_prompt  # a repeat continues its indices
            for r, (path, k) in enumerate(zip(paths, idx)):
                entry = {"prompt": video if isinstance(video, str) else video.text(), "index": offset + k,
                         "seed": seed, "batch_row": r, "batch_size": b}
                if isinstance(video, PromptScript):
                    entry["script"] = [{"start": video.segments[j].start, "prompt": video.segments[j].prompt,
                                        "chunk": c, "frame": chunk_first_frame(cfg, c)} for c, j in plan]
                    entry["recache"] = g.recache
                manifest[path.name] = entry
            write_manifest(manifest_path, manifest)
            written += paths
    return written


def length_line(cfg: C.Config) -> str:
    """What will be written per video, e.g. '3 latent frames = 9 video frames = 0.56 s at 16 fps (asked for
    0.01 s; whole chunks of 3 latent frames)'."""
    latent = latent_frames_for(cfg)
    video = video_frames_for(cfg, latent)
    return (f"{latent} latent frames = {video} video frames = {video / cfg.video.fps:.2f} s at {cfg.video.fps} fps "
            f"(asked for {cfg.generate.seconds:g} s; whole chunks of {cfg.video.chunk_frames} latent frames)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmla-generate", description="minute-scale text-to-video from a student folder",
                                usage="vmla-generate CKPT (PROMPTS | --prompt-script FILE ...) [key=value ...]")
    p.add_argument("checkpoint", help="student folder (config.yaml + model.safetensors)")
    p.add_argument("prompts", nargs="?", help="text file, one prompt per line (a video per prompt)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. generate.seconds=30 generate.vae=/wan/vae")
    p.add_argument("--prompt-script", action="append", default=[], metavar="FILE",
                   help="instead of PROMPTS: a video per script of 'START_SECONDS prompt' lines, the prompt switching "
                        "at the chunk boundary at or after each start (repeat for more videos)")
    return p


def read_videos(args: argparse.Namespace) -> tuple[list[str | PromptScript], list[str]]:
    """(videos, overrides) from the command line: the prompt file's prompts, or one ``PromptScript`` per
    ``--prompt-script`` (then every positional after the checkpoint is an override)."""
    if not args.prompt_script:
        if args.prompts is None:
            raise ValueError("give a prompt file (one prompt per line) or --prompt-script FILE")
        return list(read_prompts(args.prompts)), list(args.overrides)
    overrides = ([args.prompts] if args.prompts is not None else []) + list(args.overrides)
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"'{o}' is not a key=value override: give a prompt file or --prompt-script, not both")
    return [read_prompt_script(f) for f in args.prompt_script], overrides


def refuse_run_folder(folder: Path) -> None:
    """``CheckpointError`` when ``folder`` is a training run folder (or one of its checkpoints) rather than
    an exported student folder, saying how to export it."""
    from .student_io import RUN_FOLDER_MARKS, CheckpointError

    run = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    if any((run / mark).exists() for mark in RUN_FOLDER_MARKS):
        raise CheckpointError(f"'{folder}' is a training run folder, not a student folder: export it first with "
                              f"`vmla-train export {run} OUT` (add --ema for the EMA weights), then generate from OUT")


def check_inputs(cfg: C.Config) -> torch.device:
    """The device and the files generation reads besides the student, checked before anything loads:
    ``generate.vae`` (an AutoencoderKLWan folder), ``generate.text_encoder`` (umT5) or ``generate.embeddings``
    (a safetensors file). Returns the device; raises naming the key."""
    from .student_io import CheckpointError

    g = cfg.generate
    dev = C.resolve_device(cfg.runtime.device, "runtime.device")
    if not g.vae:
        raise C.ConfigError("config key 'generate.vae': expected a local AutoencoderKLWan folder, found ''")
    wan.vae_folder(g.vae, key="generate.vae")
    if g.text_encoder:
        wan.text_encoder_folders(g.text_encoder, key="generate.text_encoder")
    elif g.embeddings:
        if not Path(g.embeddings).is_file():
            raise CheckpointError(f"generate.embeddings '{g.embeddings}': expected a safetensors file, found "
                                  f"{wan.describe_folder(g.embeddings)}")
    else:
        raise C.ConfigError("config keys 'generate.text_encoder' and 'generate.embeddings': set one (a umT5 "
                            "folder or a safetensors file of prompt embeddings), found both ''")
    return dev


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # overrides may follow --prompt-script
    from .student_io import CheckpointError, load_config

    try:
        refuse_run_folder(Path(args.checkpoint))
        videos, overrides = read_videos(args)
        cfg = load_config(args.checkpoint, overrides)
        out_dir = Path(cfg.generate.out_dir)
        names = video_names([v if isinstance(v, str) else v.name for v in videos], cfg.generate.samples_per_prompt)
        refuse_existing(out_dir, names, partial=cfg.generate.stream == "mp4")
        read_manifest(out_dir / MANIFEST_NAME)
        dev = check_inputs(cfg)
        if cfg.generate.stream == "pipe" and sys.stdout.isatty():
            raise ValueError("generate.stream=pipe writes raw frames to stdout, which is a terminal: pipe it into a "
                             f"player ({pipe_line(cfg).split('watch with ')[1]})")
    except (C.ConfigError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pipe = sys.stdout.buffer if cfg.generate.stream == "pipe" else None
    # stdout carries the frames with generate.stream=pipe: every line printed goes to stderr then
    with contextlib.redirect_stdout(sys.stderr) if pipe is not None else contextlib.nullcontext():
        return _run(args.checkpoint, overrides, cfg, videos, dev, out_dir, pipe)


def _run(checkpoint: str, overrides: list[str], cfg: C.Config, videos: list[str | PromptScript], dev: torch.device,
         out_dir: Path, pipe: BinaryIO | None) -> int:
    from .student_io import CheckpointError, load_student

    dtype = C.torch_dtype(cfg.runtime.dtype)
    torch.manual_seed(cfg.runtime.seed)
    try:
        student, cfg = load_student(checkpoint, overrides, device=dev, dtype=dtype)
    except CheckpointError as e:  # a missing, truncated or altered weight file: named in the message
        print(f"error: {e}", file=sys.stderr)
        return 2
    student.eval()
    try:
        vae = wan.load_vae(cfg.generate.vae, device=dev, dtype=torch.float32 if dev.type == "cpu" else torch.bfloat16)
        wan.check_vae(vae, cfg, cfg.generate.vae)
        text = TextSource(cfg, text_prompts(videos), dev)  # an embeddings file with the wrong tensors or count is named here
    except (CheckpointError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    kind = "prompt script(s)" if videos and isinstance(videos[0], PromptScript) else "prompt(s)"
    print(f"vmla-generate: {len(videos)} {kind} x {cfg.generate.samples_per_prompt} -> {out_dir}, "
          f"{length_line(cfg)}, window {cfg.cache.window_frames} + {cfg.cache.sink_frames} sinks, "
          f"attention {cfg.attention.kind.value}/{cfg.attention.impl.value}, on {dev}")
    if pipe is not None:
        print(f"vmla-generate: {pipe_line(cfg)}")
    paths = generate(student, cfg, videos, text, vae, out_dir, progress=cfg.runtime.progress, pipe=pipe)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
