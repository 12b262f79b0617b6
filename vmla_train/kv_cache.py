"""The latent KV cache: preallocated per-layer buffers with sink frames and a sliding window.

Layout (per layer, per batch row), in *slots* of one latent frame (``tokens_per_frame`` tokens each)::

    slot:   0 .. S-1            S .. S+R-1
            sink frames         ring of the R most recent past frames,  R = window_frames - chunk_frames

Frame ``f < S`` lives in slot ``f`` forever; frame ``f >= S`` lives in slot ``S + (f - S) % R``. Slots
fill in frame order, so the valid slots are always the prefix ``[0, n_valid)`` and a read is one slice.
Attention is order-free given per-key positions, so the ring is never rotated.

What is stored (the 16-bit keys are *not* rotated: positions are applied at read time, so they never cap a
rollout's length and may be re-assigned, see ``position_scheme``):

- ``mla``: ``c`` [.., d_c] the content latent and ``kr`` [.., d_r] the raw RoPE key (before the key
  norm and RoPE). The key-norm scale is a function of the two and is recomputed at read time, so a
  token costs exactly ``d_c + d_r`` values (224 for the default, against 3072 for Wan MHA).
- ``mha``: per-head ``k`` (RMS-normalised, not rotated) and ``v``, [.., H, head_dim] each.
- ``mla`` with ``cache.dtype=fp8`` (inference, the 8-bit kernel): ``k8`` [.., key width] int8 key rows
  ``[s c ; s RoPE(g_r kr)]`` rotated once, at the frame's absolute position, and ``v8`` e4m3 latents stored
  token-last ([.., d_c, tokens], rows zero-padded to 16 bytes: the kernel's value operand), each with one
  scale per layer and batch row (``scales``; raised, and the layer's entries requantised, when a write
  outgrows it). 384 bytes a token at 160/64 against 448 for the bf16 latent cache and 6144 for Wan MHA.

Position schemes for the temporal RoPE axis of the keys *and* the current chunk's queries:

- ``absolute``: a frame's position is its index in the video (float64 angles, any length).
- ``relative``: positions are the slot order: sinks 0..S-1, then the window's frames in time order,
  then the current chunk. Without sinks this equals ``absolute`` up to a shift (RoPE only sees
  differences); with sinks it keeps every distance within what the model saw in training.

Cross-attention K/V depend only on the prompt: they are computed once and kept per layer.

Book-keeping (which frame is in which slot) is host-side Python ints: no ``.item()`` and no device
sync in the attention path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import PositionScheme


@dataclass(frozen=True)
class CacheStep:
    """What one forward over ``num_frames`` new frames reads and (if ``write``) where it writes."""

    first_frame: int  # absolute index of the first new frame
    num_frames: int  # new frames in this forward
    read_tokens: int  # cached tokens visible to the new frames (a prefix of the buffers)
    key_frame_pos: torch.Tensor  # [n_read_frames + num_frames] temporal RoPE position per key frame
    query_frame_pos: torch.Tensor  # [num_frames] temporal RoPE position per query frame
    write: bool  # whether this forward writes the new frames' entries
    write_src: tuple[int, ...] = ()  # frames (relative to first_frame) that are written ...
    write_slots: tuple[int, ...] = ()  # ... into these slots (same length)


@dataclass
class KVCache:
    """Preallocated self-attention cache for all layers plus the per-prompt cross-attention K/V."""

    kind: str  # "mha" | "mla"
    num_layers: int
    batch: int
    tokens_per_frame: int
    sink_frames: int
    window_frames: int  # recent frames attended, the current chunk included
    chunk_frames: int
    widths: dict[str, tuple[int, ...]]  # per-token trailing shape of each stored tensor
    position_scheme: PositionScheme = PositionScheme.relative
    dtype: torch.dtype = torch.bfloat16
    device: torch.device | str = "cpu"
    layouts: dict[str, tuple[torch.dtype, bool]] = field(default_factory=dict)  # name -> (dtype, token-last)
    scaled: tuple[str, ...] = ()  # names quantised with one scale per (layer, batch row), see ``scales``
    buffers: dict[str, torch.Tensor] = field(init=False)
    scales: dict[str, torch.Tensor] = field(init=False)  # name -> [layers, batch] float32, 0 = nothing written
    slot_frame: list[int] = field(init=False)
    next_frame: int = field(init=False, default=0)
    cross: list[tuple[torch.Tensor, torch.Tensor] | None] = field(init=False)
    _memo: dict = field(init=False, default_factory=dict)  # (layer, name) -> (version, tensor), see ``memo``
    _version: list[int] = field(init=False, default_factory=list)  # per layer: bumped by its writes, commits, resets

    def __post_init__(self) -> None:
        if self.window_frames < self.chunk_frames:
            raise ValueError(f"cache window_frames={self.window_frames} < chunk_frames={self.chunk_frames}")
        n_tok = self.num_slots * self.tokens_per_frame
        self.buffers = {}
        for name, w in self.widths.items():
            dtype, token_last = self.layouts.get(name, (self.dtype, False))
            shape = (*w, -(-n_tok // 16) * 16) if token_last else (n_tok, *w)  # token-last rows: 16-byte multiples
            self.buffers[name] = torch.zeros(self.num_layers, self.batch, *shape, dtype=dtype, device=self.device)
        self.scales = {name: torch.zeros(self.num_layers, self.batch, device=self.device) for name in self.scaled}
        self.reset()

    # Geometry --------------------------------------------------------------------------------
    @property
    def ring_frames(self) -> int:
        return self.window_frames - self.chunk_frames

    @property
    def num_slots(self) -> int:
        return self.sink_frames + self.ring_frames

    def values_per_token(self) -> int:
        """Stored values per token per layer (the quantity VideoMLA reduces)."""
        total = 0
        for w in self.widths.values():
            n = 1
            for d in w:
                n *= d
            total += n
        return total

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (*self.buffers.values(), *self.scales.values()))

    def _token_last(self, name: str) -> bool:
        return self.layouts.get(name, (None, False))[1]

    # State -----------------------------------------------------------------------------------
    def reset(self, keep_cross: bool = False) -> None:
        """Forget all frames (new video). ``keep_cross`` keeps the prompt's cross-attention K/V."""
        self.slot_frame = [-1] * self.num_slots
        self.next_frame = 0
        self._version = [v + 1 for v in self._version] or [0] * self.num_layers
        self._memo = {}
        for sc in self.scales.values():
            sc.zero_()
        if not keep_cross:
            self.cross = [None] * self.num_layers

    @property
    def num_valid(self) -> int:
        return min(self.next_frame, self.num_slots)

    def _slot_of(self, frame: int) -> int | None:
        if frame < self.sink_frames:
            return frame
        if self.ring_frames == 0:
            return None
        return self.sink_frames + (frame - self.sink_frames) % self.ring_frames

    def begin(self, num_frames: int, write: bool) -> CacheStep:
        """Plan a forward over the next ``num_frames`` frames (read before write, per layer)."""
        if num_frames > self.chunk_frames:
            raise ValueError(f"a cached forward takes at most chunk_frames={self.chunk_frames} frames, got {num_frames}")
        n_valid = self.num_valid
        frames = self.slot_frame[:n_valid]
        if self.position_scheme == PositionScheme.absolute:
            key_pos = list(frames) + [self.next_frame + i for i in range(num_frames)]
            q_pos = key_pos[n_valid:]
        else:
            order = sorted(range(n_valid), key=lambda s: frames[s])
            rank = [0] * n_valid
            for r, s in enumerate(order):
                rank[s] = r
            q_pos = [n_valid + i for i in range(num_frames)]
            key_pos = rank + q_pos
        src: list[int] = []
        slots: list[int] = []
        if write:
            last: dict[int, int] = {}
            for i in range(num_frames):
                slot = self._slot_of(self.next_frame + i)
                if slot is not None:
                    last[slot] = i  # a later frame of the same chunk wins the slot
            for slot, i in sorted(last.items(), key=lambda kv: kv[1]):
                src.append(i)
                slots.append(slot)
        dev = self.device
        return CacheStep(
            first_frame=self.next_frame,
            num_frames=num_frames,
            read_tokens=n_valid * self.tokens_per_frame,
            key_frame_pos=torch.tensor(key_pos, dtype=torch.long, device=dev),
            query_frame_pos=torch.tensor(q_pos, dtype=torch.long, device=dev),
            write=write,
            write_src=tuple(src),
            write_slots=tuple(slots),
        )

    def read(self, layer: int, step: CacheStep) -> dict[str, torch.Tensor]:
        """Views [B, read_tokens, ...] of the valid prefix of each stored tensor for ``layer`` ([B, ...,
        read_tokens] for token-last ones: their rows keep the buffer's padded stride)."""
        return {name: buf[layer, ..., : step.read_tokens] if self._token_last(name) else buf[layer, :, : step.read_tokens]
                for name, buf in self.buffers.items()}

    def memo(self, layer: int, name: str, compute):
        """``compute()`` once per cache state: a value derived from this layer's cached prefix only (e.g. the
        key-norm scale of the cached keys) is reused by every forward until this layer's next write, or the
        next commit or reset (the denoising steps of one chunk and its cache pass, which reads each layer
        before writing it, see the same prefix). Not for values that carry gradients."""
        key = (layer, name)
        hit = self._memo.get(key)
        if hit is not None and hit[0] == self._version[layer]:
            return hit[1]
        value = compute()
        self._memo[key] = (self._version[layer], value)
        return value

    @torch.no_grad()
    def write(self, layer: int, step: CacheStep, **new: torch.Tensor) -> None:
        """Store the new frames' entries ``name=[B, num_frames * tokens_per_frame, ...]`` (detached)."""
        if not step.write or not step.write_src:
            return
        self._version[layer] += 1
        tpf = self.tokens_per_frame
        for name, value in new.items():
            buf = self.buffers[name][layer]
            expect = (self.batch, step.num_frames * tpf, *self.widths[name])
            if tuple(value.shape) != expect:
                raise ValueError(f"cache write '{name}': expected shape {expect}, got {tuple(value.shape)}")
            v = value.detach().to(buf.dtype).unflatten(1, (step.num_frames, tpf))  # (B, n, tpf, ...)
            if self._token_last(name):
                for i, slot in zip(step.write_src, step.write_slots):
                    buf[..., slot * tpf: (slot + 1) * tpf].copy_(v[:, i].movedim(1, -1))
                continue
            b = buf.unflatten(1, (self.num_slots, tpf))  # (B, slots, tpf, ...)
            for i, slot in zip(step.write_src, step.write_slots):
                b[:, slot].copy_(v[:, i])

    def commit(self, step: CacheStep) -> None:
        """Advance the frame counter after a forward; record the written frames' slots."""
        if step.first_frame != self.next_frame:
            raise RuntimeError(f"cache step planned at frame {step.first_frame}, cache is at {self.next_frame}")
        if step.write:
            for i, slot in zip(step.write_src, step.write_slots):
                self.slot_frame[slot] = step.first_frame + i
            self.next_frame += step.num_frames
            self._version = [v + 1 for v in self._version]

    # Cross-attention ---------------------------------------------------------------------------
    def cross_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.cross[layer]

    def set_cross_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cross[layer] = (k.detach(), v.detach())
