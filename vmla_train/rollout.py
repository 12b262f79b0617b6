"""Chunk-by-chunk rollouts of the causal student over the latent KV cache.

``sample_video`` is the few-step inference rollout (demo, generation, validation): per chunk, start
from noise, run the denoising step list (predict x0, re-noise with fresh noise to the next step),
then re-run the clean x0 at t = 0 with ``write_cache=True`` so the cache holds clean context.
The self-forcing training rollout (grad through one exit step per chunk) builds on the same pieces.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import schedule
from .kv_cache import KVCache


def chunk_starts(num_frames: int, chunk_frames: int) -> list[int]:
    if num_frames % chunk_frames:
        raise ValueError(f"{num_frames} latent frames are not a whole number of chunks of {chunk_frames}")
    return list(range(0, num_frames, chunk_frames))


@torch.no_grad()
def sample_video(
    student: torch.nn.Module,
    text: torch.Tensor,
    num_frames: int,
    timesteps: Sequence[float],
    generator: torch.Generator | None = None,
    cache: KVCache | None = None,
    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
    keep: bool = True,
) -> torch.Tensor | None:
    """Generate ``num_frames`` latent frames [B, F, C, h, w] for text embeddings [B, Lt, text_dim].

    ``timesteps`` is the already warped step list (e.g. [1000, 937.5, 833.3, 625]). ``on_chunk(i, x0)``
    receives each finished chunk (for streaming decoders / progress); with ``keep=False`` chunks are
    not kept in memory (minute-scale rollouts) and None is returned.
    """
    cfg = student.cfg
    chunk = cfg.video.chunk_frames
    b = text.shape[0]
    c_in, h, w = cfg.model.in_channels, cfg.video.latent_height, cfg.video.latent_width
    dev = next(student.parameters()).device
    dtype = next(student.parameters()).dtype
    if cache is None:
        cache = student.new_cache(b, dev)
    outs = []
    for i, _ in enumerate(chunk_starts(num_frames, chunk)):
        x = torch.randn(b, chunk, c_in, h, w, generator=generator, device=dev, dtype=torch.float32).to(dtype)
        x0 = x
        for j, t in enumerate(timesteps):
            tt = torch.full((b, chunk), float(t), device=dev)
            flow = student(x, tt, text, cache=cache)
            x0 = schedule.x0_from_flow(x, flow, tt)
            if j + 1 < len(timesteps):
                noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=torch.float32).to(dtype)
                x = schedule.add_noise(x0, noise, torch.full((b, chunk), float(timesteps[j + 1]), device=dev))
        student(x0, torch.zeros(b, chunk, device=dev), text, cache=cache, write_cache=True)  # clean context
        if on_chunk is not None:
            on_chunk(i, x0)
        if keep:
            outs.append(x0)
    return torch.cat(outs, 1) if keep else None
