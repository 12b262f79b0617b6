"""vmla-generate: minute-scale text-to-video from a student folder, streamed to mp4.

    vmla-generate CKPT prompts.txt [key=value ...]      (e.g. generate.seconds=60 generate.guidance_scale=3)

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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from . import config as C
from . import schedule, wan
from .config import atomic_write_text
from .dataprep.video import Mp4Writer
from .rollout import sample_video


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


def refuse_existing(out_dir: Path, names: Sequence[Sequence[str]]) -> None:
    """``FileExistsError`` naming the first planned mp4 that exists: outputs are never replaced."""
    for row in names:
        for n in row:
            if (out_dir / n).exists():
                raise FileExistsError(f"'{out_dir / n}' exists: refusing to overwrite it "
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


def manifest_prompts(videos: Sequence[Path]) -> dict[Path, str]:
    """Full prompt of every video that the ``manifest.json`` beside it lists (others are left out)."""
    out: dict[Path, str] = {}
    tables: dict[Path, dict[str, dict]] = {}
    for v in map(Path, videos):
        if v.parent not in tables:
            tables[v.parent] = read_manifest(v.parent / MANIFEST_NAME)
        entry = tables[v.parent].get(v.name)
        if entry is not None:
            out[v] = entry["prompt"]
    return out


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
def generate(student: nn.Module, cfg: C.Config, prompts: Sequence[str], text: TextSource, vae,
             out_dir: Path, progress: bool = True) -> list[Path]:
    """Every prompt x sample -> one mp4 in ``out_dir`` named by ``video_names`` and listed in its
    ``manifest.json``. Refuses (``FileExistsError``) when one of the files exists; first removes partial
    files of killed runs. Returns the written paths."""
    from tqdm import tqdm

    g = cfg.generate
    dev = next(student.parameters()).device
    frames = latent_frames_for(cfg)
    chunks = frames // cfg.video.chunk_frames
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    names = video_names(prompts, g.samples_per_prompt)
    refuse_existing(out_dir, names)
    manifest_path = out_dir / MANIFEST_NAME
    manifest = read_manifest(manifest_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in Mp4Writer.remove_stale(out_dir):
        print(f"vmla-generate: removed '{stale}', a partial file of a killed run", file=sys.stderr)
    model: nn.Module = student
    if g.guidance_scale != 1.0:
        model = GuidedStudent(student, text.negative(), g.guidance_scale)
    written = []
    for p_idx, prompt in enumerate(prompts):
        emb = text.prompt(p_idx)
        for first in range(0, g.samples_per_prompt, g.batch_size):
            idx = list(range(first, min(first + g.batch_size, g.samples_per_prompt)))
            b = len(idx)
            seed = cfg.runtime.seed + 1_000_003 * p_idx + first
            gen = torch.Generator(device=dev).manual_seed(seed)
            paths = [out_dir / names[p_idx][k] for k in idx]
            writers = [Mp4Writer(p, cfg.video.fps, g.crf) for p in paths]
            bar = tqdm(total=chunks, unit="chunk", disable=not progress, desc=f"{prompt[:40]!r} x{b}")
            t0 = time.perf_counter()
            decoder = StreamingDecoder(vae)  # one decoder, batch rows decoded together

            def on_chunk(i: int, x0: torch.Tensor) -> None:
                pix = decoder(x0)  # (B, 3, T, H, W)
                for r, w in enumerate(writers):
                    w.write(rgb_frames(pix[r]))
                dt = time.perf_counter() - t0
                done = (i + 1) * cfg.video.chunk_frames
                bar.update(1)
                bar.set_postfix(latent_fps=f"{done * b / dt:.2f}", video_fps=f"{writers[0].frames * b / dt:.1f}")

            try:
                sample_video(model, emb.expand(b, -1, -1), frames, steps, generator=gen, on_chunk=on_chunk, keep=False)
            except BaseException:
                for w in writers:
                    w.abort()
                raise
            finally:
                bar.close()
                decoder.close()
            for w in writers:
                w.close()
            offset = prompts[:p_idx].count(prompt) * g.samples_per_prompt  # a repeated prompt continues its indices
            for r, (path, k) in enumerate(zip(paths, idx)):
                manifest[path.name] = {"prompt": prompt, "index": offset + k, "seed": seed, "batch_row": r,
                                       "batch_size": b}
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
    p = argparse.ArgumentParser(prog="vmla-generate", description="minute-scale text-to-video from a student folder")
    p.add_argument("checkpoint", help="student folder (config.yaml + model.safetensors)")
    p.add_argument("prompts", help="text file, one prompt per line")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. generate.seconds=30 generate.vae=/wan/vae")
    return p


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
    args = _parser().parse_args(argv)
    from .student_io import CheckpointError, load_config, load_student

    try:
        refuse_run_folder(Path(args.checkpoint))
        cfg = load_config(args.checkpoint, args.overrides)
        prompts = read_prompts(args.prompts)
        out_dir = Path(cfg.generate.out_dir)
        refuse_existing(out_dir, video_names(prompts, cfg.generate.samples_per_prompt))
        read_manifest(out_dir / MANIFEST_NAME)
        dev = check_inputs(cfg)
    except (C.ConfigError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = C.torch_dtype(cfg.runtime.dtype)
    torch.manual_seed(cfg.runtime.seed)
    try:
        student, cfg = load_student(args.checkpoint, args.overrides, device=dev, dtype=dtype)
    except CheckpointError as e:  # a missing, truncated or altered weight file: named in the message
        print(f"error: {e}", file=sys.stderr)
        return 2
    student.eval()
    try:
        vae = wan.load_vae(cfg.generate.vae, device=dev, dtype=torch.float32 if dev.type == "cpu" else torch.bfloat16)
        text = TextSource(cfg, prompts, dev)  # an embeddings file with the wrong tensors or count is named here
    except (CheckpointError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    print(f"vmla-generate: {len(prompts)} prompt(s) x {cfg.generate.samples_per_prompt} -> {out_dir}, "
          f"{length_line(cfg)}, window {cfg.cache.window_frames} + {cfg.cache.sink_frames} sinks, "
          f"attention {cfg.attention.kind.value}/{cfg.attention.impl.value}, on {dev}")
    paths = generate(student, cfg, prompts, text, vae, out_dir, progress=cfg.runtime.progress)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
