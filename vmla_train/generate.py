"""vmla-generate: minute-scale text-to-video from a student folder, streamed to mp4.

    vmla-generate CKPT prompts.txt [key=value ...]      (e.g. generate.seconds=60 generate.guidance_scale=3)

Per prompt and sample: text embeddings (umT5 via ``wan.load_text_encoder`` or a precomputed
safetensors file) -> ``rollout.sample_video`` over the latent cache (sliding window + sinks, so any
length runs in constant memory) with ``keep=False`` -> each finished chunk goes through a streaming VAE
decoder (diffusers' own causal feature cache, carried across chunks: frames equal a whole-video decode
and memory stays flat) -> frames are encoded into ``<out_dir>/<prompt>-<index>.mp4`` (VBench naming),
written to a temporary file and renamed when complete.

Latent frames = seconds * video.fps / vae_stride[0], rounded down to whole chunks (60 s at 16 fps with
Wan's 4x temporal stride = 240). Classifier-free guidance (guidance_scale > 1) runs the negative prompt
as a second batch half with its own cache; the flows are mixed before the x0 step.
"""

from __future__ import annotations

import argparse
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
from .dataprep.video import Mp4Writer
from .rollout import sample_video


def latent_frames_for(cfg: C.Config) -> int:
    """Latent frames for ``generate.seconds``: whole chunks, at least one."""
    v = cfg.video
    frames = int(cfg.generate.seconds * v.fps / v.vae_stride[0])
    return max(v.chunk_frames, frames - frames % v.chunk_frames)


def video_name(prompt: str, index: int, max_bytes: int = 200) -> str:
    """VBench-style file name ``<prompt>-<index>.mp4`` (path separators and control characters removed)."""
    clean = re.sub(r"[/\\\x00-\x1f]", " ", prompt).strip()
    clean = clean.encode()[:max_bytes].decode(errors="ignore").rstrip() or "prompt"
    return f"{clean}-{index}.mp4"


def read_prompts(path: str | Path) -> list[str]:
    p = Path(path)
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
    """Every prompt x sample -> one mp4 in ``out_dir``. Returns the written paths."""
    from tqdm import tqdm

    g = cfg.generate
    dev = next(student.parameters()).device
    frames = latent_frames_for(cfg)
    chunks = frames // cfg.video.chunk_frames
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    out_dir.mkdir(parents=True, exist_ok=True)
    model: nn.Module = student
    if g.guidance_scale != 1.0:
        model = GuidedStudent(student, text.negative(), g.guidance_scale)
    written = []
    for p_idx, prompt in enumerate(prompts):
        emb = text.prompt(p_idx)
        for first in range(0, g.samples_per_prompt, g.batch_size):
            idx = list(range(first, min(first + g.batch_size, g.samples_per_prompt)))
            b = len(idx)
            gen = torch.Generator(device=dev).manual_seed(cfg.runtime.seed + 1_000_003 * p_idx + first)
            paths = [out_dir / video_name(prompt, k) for k in idx]
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
            written += paths
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmla-generate", description="minute-scale text-to-video from a student folder")
    p.add_argument("checkpoint", help="student folder (config.yaml + model.safetensors)")
    p.add_argument("prompts", help="text file, one prompt per line")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. generate.seconds=30 generate.vae=/wan/vae")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .student_io import CheckpointError, load_config, load_student

    try:
        cfg = load_config(args.checkpoint, args.overrides)
        prompts = read_prompts(args.prompts)
    except (C.ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cfg.generate.vae:
        print("error: config key 'generate.vae': expected a local AutoencoderKLWan folder, found ''", file=sys.stderr)
        return 2
    dev = C.resolve_device(cfg.runtime.device)
    dtype = C.torch_dtype(cfg.runtime.dtype)
    torch.manual_seed(cfg.runtime.seed)
    student, cfg = load_student(args.checkpoint, args.overrides, device=dev, dtype=dtype)
    student.eval()
    vae = wan.load_vae(cfg.generate.vae, device=dev, dtype=torch.float32 if dev.type == "cpu" else torch.bfloat16)
    text = TextSource(cfg, prompts, dev)
    frames = latent_frames_for(cfg)
    print(f"vmla-generate: {len(prompts)} prompt(s) x {cfg.generate.samples_per_prompt}, {frames} latent frames "
          f"({cfg.generate.seconds:g} s at {cfg.video.fps} fps), window {cfg.cache.window_frames} + "
          f"{cfg.cache.sink_frames} sinks, attention {cfg.attention.kind.value}/{cfg.attention.impl.value}, on {dev}")
    paths = generate(student, cfg, prompts, text, vae, Path(cfg.generate.out_dir), progress=cfg.runtime.progress)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
