"""Validation and sample videos, offline (torchmetrics; nothing downloads).

On fixed prompts and fixed noise, the student's few-step rollout (``rollout.sample_video``, the
inference path with the cache) is compared with the teacher's many-step Euler sample from the same
starting noise:

- ``val/psnr``, ``val/ssim``: per latent frame, latents min-max scaled to [0, 1] jointly.
- ``val/fid``, ``val/kid``: Fréchet / kernel distance between the student's and the teacher's frames
  with **latent features**: each latent frame [C, H, W] average-pooled to a 2x2 grid, C*4 values
  (``LatentPoolFeatures``). No Inception network (it would need a download); distances are therefore
  comparable between runs of this framework only, not with published FID numbers.
- ``val/temporal_student``, ``val/temporal_teacher``: mean |frame[f+1] - frame[f]| of the latents
  (temporal consistency; the ratio shows whether the student flickers more than the teacher).

Sample videos: latents -> VAE (``logging.vae_path`` or a tiny random VAE) -> mp4 with PyAV.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import config as C
from . import schedule, wan
from .dataprep.video import Mp4Writer
from .generate import rgb_frames
from .rollout import sample_video


class LatentPoolFeatures(nn.Module):
    """[N, C, H, W] latent frames -> [N, C * 4] (2x2 average pool); the FID/KID feature extractor.
    ``num_features`` tells torchmetrics the width (it would otherwise probe with a 3-channel image)."""

    def __init__(self, channels: int):
        super().__init__()
        self.num_features = channels * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)


@torch.no_grad()
def teacher_sample(teacher, noise: torch.Tensor, text: torch.Tensor, cfg: C.Config, num_steps: int) -> torch.Tensor:
    """Many-step Euler sample of the bidirectional teacher from ``noise`` [B, F, C, H, W]."""
    return wan.euler_sample(teacher, noise, text, num_steps, cfg.schedule.shift, cfg.model.text_len)[0]


def _frames(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(0, 1).float()  # (B*F, C, H, W)


@torch.no_grad()
def latent_metrics(student_x: torch.Tensor, teacher_x: torch.Tensor) -> dict[str, float]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    s, t = _frames(student_x).cpu(), _frames(teacher_x).cpu()
    lo, hi = torch.minimum(s.min(), t.min()), torch.maximum(s.max(), t.max())
    s01, t01 = (s - lo) / (hi - lo + 1e-8), (t - lo) / (hi - lo + 1e-8)
    out = {"val/psnr": float(peak_signal_noise_ratio(s01, t01, data_range=1.0)),
           "val/ssim": float(structural_similarity_index_measure(s01, t01, data_range=1.0, kernel_size=3))}
    n, channels = s.shape[:2]
    kid = KernelInceptionDistance(feature=LatentPoolFeatures(channels), subset_size=min(50, n), normalize=True)
    fid = FrechetInceptionDistance(feature=LatentPoolFeatures(channels), normalize=True)
    for m in (kid, fid):
        m.update(t, real=True)
        m.update(s, real=False)
    out["val/kid"] = float(kid.compute()[0])
    out["val/fid"] = float(fid.compute())
    out["val/temporal_student"] = float((student_x[:, 1:] - student_x[:, :-1]).abs().mean())
    out["val/temporal_teacher"] = float((teacher_x[:, 1:] - teacher_x[:, :-1]).abs().mean())
    return out


@torch.no_grad()
def validate(cfg: C.Config, student, new_cache, teacher, texts: torch.Tensor, run_dir: Path, step: int) -> dict[str, float]:
    """Student few-step vs teacher many-step on ``texts`` [N, Lt, D] with fixed noise; JSON in the run folder."""
    v, m = cfg.video, cfg.model
    frames = cfg.validation.num_frames or v.latent_frames
    dev = texts.device
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    gen = torch.Generator(device=dev).manual_seed(cfg.runtime.seed + 0x7A1)
    student_x = sample_video(student, texts, frames, steps, generator=gen, cache=new_cache(texts.shape[0])).float()
    noise = torch.randn(texts.shape[0], frames, m.in_channels, v.latent_height, v.latent_width,
                        generator=torch.Generator(device=dev).manual_seed(cfg.runtime.seed + 0x7A2), device=dev)
    teacher_x = teacher_sample(teacher, noise, texts, cfg, cfg.validation.teacher_steps)
    out = latent_metrics(student_x, teacher_x)
    path = Path(run_dir) / "validation.json"
    history = json.loads(path.read_text()) if path.is_file() else []
    history.append({"step": step, **out})
    C.atomic_write_text(path, json.dumps(C.json_finite(history), indent=1, allow_nan=False))  # a diverged run: null
    return out


def load_vae(cfg: C.Config):
    """The VAE at ``logging.vae_path`` (checked against the config's strides), else a random tiny one."""
    if not cfg.logging.vae_path:
        return wan.tiny_vae(cfg.runtime.seed)
    vae = wan.load_vae(cfg.logging.vae_path)
    wan.check_vae(vae, cfg, cfg.logging.vae_path)
    return vae


def write_mp4(pixels: torch.Tensor, path: str | Path, fps: int) -> Path:
    """Pixels [3, T, H, W] in [-1, 1] -> an H.264 (or MPEG-4) mp4 written atomically with PyAV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with Mp4Writer(path, fps) as writer:
        writer.write(rgb_frames(pixels))
    return path


@torch.no_grad()
def sample_mp4(cfg: C.Config, student, new_cache, text: torch.Tensor, vae, path: str | Path) -> Path:
    """Few-step rollout of ``text`` [1, Lt, D] (fixed noise) -> VAE decode -> mp4."""
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    gen = torch.Generator(device=text.device).manual_seed(cfg.runtime.seed + 0x5A3)
    latents = sample_video(student, text, cfg.video.latent_frames, steps, generator=gen, cache=new_cache(text.shape[0]))
    vae = vae.to(text.device)
    pixels = wan.vae_decode(vae, latents.float())[0]  # (3, T, H, W)
    return write_mp4(pixels, path, cfg.video.fps)
