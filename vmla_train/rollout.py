"""Chunk-by-chunk rollouts of the causal student over the latent KV cache: one loop, two uses.

``self_forcing_rollout`` is the loop of Self-Forcing (Huang et al. 2025, Alg. 1): per chunk, start from
noise, run the denoising step list (predict x0, re-noise with fresh noise to the next step) up to the
chunk's *exit step* (one index per chunk, drawn once per iteration on rank 0 and broadcast,
``draw_exit_steps``), then re-run the clean x0 at t = 0 with ``write_cache=True`` so the cache holds
clean context. In training only the exit forward runs with grad. The cache is always detached: its
buffers are written under no_grad in the clean re-run and attention reads them through ``torch.cat``,
so autograd never sees an in-place write and gradients never cross chunks.

``sample_video`` is the few-step inference rollout (demo, generation, validation): the same loop with
every step of every chunk, without grad, geometry and dtype taken from the student.

Prompt switches (``PromptSwitch``): from a given chunk on, the rollout runs with other text embeddings. With
``recache`` the cache is rebuilt under the new text first (``recache_window``): emptied, then the cache pass
(t = 0, ``write_cache=True``) re-runs over the clean frames it held, kept for that in ``CleanFrames`` (slot for
slot: sinks + window - chunk frames whatever the length), in time order and in the pieces of their original
chunks. The re-cached frames take the cache's next frame numbers (sinks, then the window right after
them): the temporal positions a ``relative`` cache gives them are those they had; an ``absolute`` cache with
sinks sees the window moved next to the sinks. Without ``recache`` only the text changes (and the per-prompt
cross-attention K/V with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Sequence

import torch
import torch.distributed as dist

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
    switches: Sequence[PromptSwitch] = (),
    recache: bool = True,
    clean: CleanFrames | None = None,
) -> torch.Tensor | None:
    """Generate ``num_frames`` latent frames [B, F, C, h, w] for text embeddings [B, Lt, text_dim].

    ``student`` is a ``WanStudent`` (or a wrapper with its ``cfg`` and ``new_cache``); ``timesteps`` the
    already warped step list (e.g. [1000, 937.5, 833.3, 625]); ``cache`` defaults to a new one. See
    ``self_forcing_rollout`` for ``on_chunk``, ``keep``, ``switches``, ``recache`` and ``clean``.
    """
    cfg = student.cfg
    v = cfg.video
    param = next(student.parameters())
    if cache is None:
        cache = student.new_cache(text.shape[0], param.device)
    return self_forcing_rollout(student, cache, text, num_frames, v.chunk_frames,
                                (cfg.model.in_channels, v.latent_height, v.latent_width), timesteps, None, generator,
                                dtype=param.dtype, on_chunk=on_chunk, keep=keep, switches=switches, recache=recache,
                                clean=clean)


def draw_exit_steps(num_chunks: int, num_steps: int, generator: torch.Generator) -> list[int]:
    """One exit-step index per chunk, drawn on rank 0 and broadcast so every rank exits alike.

    Ranks that disagree would run different numbers of forwards and different grad paths (a known
    bug of some Self-Forcing forks); the broadcast makes the draw rank 0's whatever the other ranks'
    generators hold.
    """
    idx = torch.randint(0, num_steps, (num_chunks,), generator=generator, device=generator.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend = dist.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        idx = idx.to(dev)
        dist.broadcast(idx, src=0)
    return [int(i) for i in idx.tolist()]


def _drop_cross_kv(cache: KVCache) -> None:
    """Forget the per-prompt cross-attention K/V (they are stored detached): the grad forward
    recomputes them so the text path (text embedder, cross-attention K/V) receives gradients; after a
    prompt switch the next forward computes them from the new text."""
    cache.cross = [None] * cache.num_layers


# ----------------------------------------------------------------------------------------------
# Prompt switches
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSwitch:
    """From chunk ``chunk`` (> 0) on, the rollout runs with the text embeddings ``text`` [B, Lt, text_dim]."""

    chunk: int
    text: torch.Tensor


class CleanFrames:
    """The clean latent frames of the frames a cache holds, slot for slot: what ``recache_window`` re-runs.

    ``latents`` [B, num_slots * p_t, C, H, W] (p_t latent frames per cache frame: the temporal patch) is
    allocated by the first ``record`` (a whole chunk); ``slot_frame`` mirrors the cache's book-keeping (-1 =
    empty). Memory is the cache's sinks + window less a chunk, whatever the video's length.
    """

    def __init__(self) -> None:
        self.latents: torch.Tensor | None = None
        self.slot_frame: list[int] = []
        self.frames_per_slot = 0  # p_t

    @torch.no_grad()
    def record(self, cache: KVCache, x0: torch.Tensor) -> None:
        """After the cache pass over the clean frames ``x0`` [B, f, C, H, W] (the cache's newest): keep those
        the cache holds, in their slots."""
        if self.latents is None:
            self.frames_per_slot = x0.shape[1] // cache.chunk_frames
            self.latents = x0.new_zeros(x0.shape[0], cache.num_slots * self.frames_per_slot, *x0.shape[2:])
            self.slot_frame = [-1] * cache.num_slots
        pt = self.frames_per_slot
        first = cache.next_frame - x0.shape[1] // pt  # cache frame of x0's first frame
        for slot, frame in enumerate(cache.slot_frame):
            if first <= frame < cache.next_frame and self.slot_frame[slot] != frame:
                i = (frame - first) * pt
                self.latents[:, slot * pt : (slot + 1) * pt] = x0[:, i : i + pt]
                self.slot_frame[slot] = frame

    def held(self) -> list[tuple[int, torch.Tensor]]:
        """(cache frame, its clean latents [B, p_t, C, H, W]) of every kept frame, in time order."""
        pt = self.frames_per_slot
        order = sorted((f, s) for s, f in enumerate(self.slot_frame) if f >= 0)
        return [(f, self.latents[:, s * pt : (s + 1) * pt]) for f, s in order]

    def nbytes(self) -> int:
        return 0 if self.latents is None else self.latents.numel() * self.latents.element_size()


@torch.no_grad()
def recache_window(student: Callable[..., torch.Tensor], cache: KVCache, clean: CleanFrames,
                   text: torch.Tensor) -> None:
    """Rebuild the cache under ``text``: empty it (cross-attention K/V included), then re-run the cache pass
    (t = 0, ``write_cache=True``) over the clean frames it held, in time order, one piece per original chunk
    (each piece attends to the pieces before it, as when it was first cached). The frames take the cache's
    next frame numbers: sinks first, the window right after them. ``clean`` is updated to the new slots."""
    held = [(f, lat.clone()) for f, lat in clean.held()]  # copies: the replay re-records into the slots
    cache.reset()
    clean.slot_frame = [-1] * len(clean.slot_frame)
    for _, piece in groupby(held, key=lambda fx: fx[0] // cache.chunk_frames):  # frames of one original chunk
        x = torch.cat([lat for _, lat in piece], 1)  # (B, f, C, H, W)
        b, f = x.shape[:2]
        student(x, torch.zeros(b, f, device=x.device), text, cache=cache, write_cache=True)
        clean.record(cache, x)


def _check_switches(switches: Sequence[PromptSwitch], num_chunks: int) -> dict[int, torch.Tensor]:
    chunks = [s.chunk for s in switches]
    if chunks != sorted(set(chunks)) or not all(0 < c < num_chunks for c in chunks):
        raise ValueError(f"prompt switches at chunks {chunks}: expected increasing chunks in [1, {num_chunks})")
    return {s.chunk: s.text for s in switches}


def self_forcing_rollout(
    student: Callable[..., torch.Tensor],
    cache: KVCache,
    text: torch.Tensor,
    num_frames: int,
    chunk_frames: int,
    latent_shape: tuple[int, int, int],
    timesteps: Sequence[float],
    exit_steps: Sequence[int] | None,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
    snapshot_cache: bool = False,
    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
    keep: bool = True,
    switches: Sequence[PromptSwitch] = (),
    recache: bool = True,
    clean: CleanFrames | None = None,
) -> torch.Tensor | None:
    """Generate ``num_frames`` latent frames [B, F, C, H, W] chunk by chunk, Self-Forcing style.

    ``student(x, t, text, cache=, write_cache=)`` is the (possibly engine-wrapped) student forward;
    ``cache`` an empty cache from ``student.new_cache``; ``latent_shape`` = (C, H, W); ``timesteps``
    the warped step list. Per chunk i: the steps before ``exit_steps[i]`` run without grad (predict x0,
    re-noise with fresh noise to the next step), the exit step runs with grad if grad is enabled by the
    caller, then the clean x0 is re-run at t = 0 without grad to write the cache. ``exit_steps=None``
    runs every step (the critic's no-grad rollout uses the drawn exits too, for the same distribution).
    Noise comes from ``generator`` (on its device; None = the global generator on ``text``'s device).
    ``on_chunk(i, x0)`` receives each finished chunk (streaming decoders, progress); with
    ``keep=False`` chunks are not kept (minute-scale rollouts) and None is returned.

    ``switches``: before each switch's chunk the text becomes its embeddings; with ``recache`` the cache is
    rebuilt under them (``recache_window``) from the clean frames kept in ``clean`` (a new ``CleanFrames`` unless
    given; kept only when a switch re-caches), else only the cross-attention K/V are dropped.
    """
    c, h, w = latent_shape
    b = text.shape[0]
    dev = generator.device if generator is not None else text.device
    num_chunks = len(chunk_starts(num_frames, chunk_frames))
    exits = list(exit_steps) if exit_steps is not None else [len(timesteps) - 1] * num_chunks
    if len(exits) != num_chunks or not all(0 <= e < len(timesteps) for e in exits):
        raise ValueError(f"exit_steps {exits}: expected {num_chunks} indices in [0, {len(timesteps)})")
    new_text = _check_switches(switches, num_chunks)
    if clean is None and recache and switches:
        clean = CleanFrames()
    grad = torch.is_grad_enabled()

    def randn(*shape: int) -> torch.Tensor:  # drawn in float32 whatever the rollout dtype
        return torch.randn(*shape, generator=generator, device=dev, dtype=torch.float32).to(dtype)

    outs = []
    for i in range(num_chunks):
        if i in new_text:  # 0. a prompt switch at this chunk boundary
            text = new_text[i]
            if recache:
                recache_window(student, cache, clean, text)
            else:
                _drop_cross_kv(cache)
        x = randn(b, chunk_frames, c, h, w)  # (B, f, C, H, W)
        for j in range(exits[i] + 1):
            tt = torch.full((b, chunk_frames), float(timesteps[j]), device=dev)
            if j < exits[i]:  # 1. denoise without grad, re-noise to the next step with fresh noise
                with torch.no_grad():
                    x0 = schedule.x0_from_flow(x, student(x, tt, text, cache=cache), tt)
                    noise = randn(*x0.shape)
                    x = schedule.add_noise(x0, noise, torch.full_like(tt, float(timesteps[j + 1])))
            else:  # 2. the exit step: the only forward of this chunk that may carry grad
                view = cache.snapshot() if (grad and snapshot_cache) else cache
                if grad and not snapshot_cache:
                    _drop_cross_kv(view)
                x0 = schedule.x0_from_flow(x, student(x, tt, text, cache=view), tt)
        with torch.no_grad():  # 3. clean re-run at t = 0 writes the (detached) cache
            student(x0.detach(), torch.zeros(b, chunk_frames, device=dev), text, cache=cache, write_cache=True)
        if clean is not None:
            clean.record(cache, x0.detach())
        if on_chunk is not None:
            on_chunk(i, x0)
        if keep:
            outs.append(x0)
    return torch.cat(outs, 1) if keep else None  # (B, F, C, H, W)
