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
- ``mla`` with ``cache.dtype=8bit`` (inference, the 8-bit kernels; ``Latent8Layout``): ``k8`` [.., key width]
  int8 key rows ``[s c ; s RoPE(g_r kr)]`` rotated once, at the frame's absolute position, and ``v8`` e4m3
  latents stored token-last ([.., d_c, tokens], rows zero-padded to 16 bytes: the kernel's value operand), each
  with one scale per layer and batch row (``scales``; raised, and the layer's entries requantised, when a write
  outgrows it: ``write8``). 384 bytes a token at 160/64 against 448 for the bf16 latent cache and 6144 for Wan
  MHA (``config.kv_values_per_token`` counts them).

Position schemes for the temporal RoPE axis of the keys *and* the current chunk's queries:

- ``absolute``: a frame's position is its index in the video (float64 angles, any length).
- ``relative``: positions are the slot order: sinks 0..S-1, then the window's frames in time order,
  then the current chunk. Without sinks this equals ``absolute`` up to a shift (RoPE only sees
  differences); with sinks it keeps every distance within what the model saw in training.

Cross-attention K/V depend only on the prompt: they are computed once and kept per layer.

Book-keeping (which frame is in which slot) is host-side Python ints: no ``.item()`` and no device
sync in the attention path. Only this module writes the buffers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import PositionScheme
from .kernels import quant8 as Q8
from .rope import Rotary


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
    # (q_rot, k_rot, rot_abs) made before the forward, which then computes none from the positions: the static RoPE
    # tables of a forward replayed from a CUDA graph (graphs.py). None: the student computes them
    rotary: tuple[Rotary, Rotary, Rotary | None] | None = None


@dataclass(frozen=True)
class Latent8Layout:
    """The 8-bit MLA cache format (``cache.dtype=8bit``): what the 8-bit kernels read, as ``kernels.quant8``
    makes it. Per token: ``k8`` the int8 key row ``[s c ; s RoPE(g_r kr)]`` (d_c + d_r padded to 16 bytes) and
    ``v8`` the e4m3 latent (d_c), stored token-last; one scale per layer and batch row each."""

    d_c: int  # latent width
    d_r: int  # RoPE key width, all groups together

    @property
    def widths(self) -> dict[str, tuple[int, ...]]:
        return {"k8": (Q8.key_width(self.d_c, self.d_r),), "v8": (self.d_c,)}

    @staticmethod
    def layout(name: str) -> tuple[torch.dtype, bool]:
        """(dtype, token-last) of a stored tensor: int8 key rows, e4m3 latents token-last (the value operand)."""
        return {"k8": (torch.int8, False), "v8": (Q8.FP8, True)}[name]


@dataclass
class KVCache:
    """Preallocated self-attention cache for all layers plus the per-prompt cross-attention K/V."""

    num_layers: int
    batch: int
    tokens_per_frame: int
    sink_frames: int
    window_frames: int  # recent frames attended, the current chunk included
    chunk_frames: int
    widths: dict[str, tuple[int, ...]]  # per-token trailing shape of each stored tensor (8-bit: eight_bit.widths)
    position_scheme: PositionScheme = PositionScheme.relative
    dtype: torch.dtype = torch.bfloat16  # storage dtype (16-bit caches)
    device: torch.device | str = "cpu"
    eight_bit: Latent8Layout | None = None  # the 8-bit MLA format instead of ``dtype`` (cache.dtype=8bit)
    buffers: dict[str, torch.Tensor] = field(init=False)
    scales: dict[str, torch.Tensor] = field(init=False)  # 8-bit: name -> [layers, batch] float32, 0 = nothing written
    slot_frame: list[int] = field(init=False)
    next_frame: int = field(init=False, default=0)
    cross: list[tuple[torch.Tensor, torch.Tensor] | None] = field(init=False)
    _memo: dict = field(init=False, default_factory=dict)  # (layer, name) -> (version, tensor), see ``memo``
    _version: list[int] = field(init=False, default_factory=list)  # per layer: bumped by its writes, commits, resets
    _read_only: bool = field(init=False, default=False)  # a ``snapshot``

    def __post_init__(self) -> None:
        if self.window_frames < self.chunk_frames:
            raise ValueError(f"cache window_frames={self.window_frames} < chunk_frames={self.chunk_frames}")
        if self.eight_bit is not None and self.widths != self.eight_bit.widths:
            raise ValueError(f"8-bit cache: widths {self.widths} are not the layout's {self.eight_bit.widths}")
        n_tok = self.num_slots * self.tokens_per_frame
        self.buffers = {}
        for name, w in self.widths.items():
            dtype, token_last = self._layout(name)
            shape = (*w, Q8.round_up(n_tok, Q8.ALIGN)) if token_last else (n_tok, *w)  # token-last rows: 16-byte multiples
            self.buffers[name] = torch.zeros(self.num_layers, self.batch, *shape, dtype=dtype, device=self.device)
        scaled = self.widths if self.eight_bit is not None else {}
        self.scales = {name: torch.zeros(self.num_layers, self.batch, device=self.device) for name in scaled}
        self.reset()

    # Geometry --------------------------------------------------------------------------------
    @property
    def ring_frames(self) -> int:
        return self.window_frames - self.chunk_frames

    @property
    def num_slots(self) -> int:
        return self.sink_frames + self.ring_frames

    def nbytes(self) -> int:
        """Bytes allocated: buffers (all slots, padding included) and scales."""
        return sum(b.numel() * b.element_size() for b in (*self.buffers.values(), *self.scales.values()))

    def _layout(self, name: str) -> tuple[torch.dtype, bool]:
        return self.eight_bit.layout(name) if self.eight_bit is not None else (self.dtype, False)

    def _token_last(self, name: str) -> bool:
        return self._layout(name)[1]

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
        if write and self._read_only:
            raise RuntimeError("a cache snapshot is read-only: run the cache-writing forward on the cache itself")
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

    def read8(self, layer: int, step: CacheStep) -> Q8.Latent8 | None:
        """The 8-bit cache's valid prefix for ``layer`` as the 8-bit kernels' key set (views of the buffers and the
        layer's scales [B]), None when nothing is cached."""
        if not step.read_tokens:
            return None
        past = self.read(layer, step)
        return Q8.Latent8(past["k8"], self.scales["k8"][layer], past["v8"], self.scales["v8"][layer])

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

    @torch.no_grad()
    def write8(self, layer: int, step: CacheStep, krow: torch.Tensor, c: torch.Tensor) -> None:
        """Store a chunk's key rows [B, L, d_c + d_r] and latents [B, L, d_c] in the 8-bit cache with the layer's
        scales. A chunk that outgrows a scale raises it, and the layer's stored entries are requantised to the new
        scale first (branch-free, so no device sync: with an unchanged scale the pass multiplies by 1, which is
        exact in both formats)."""
        if not step.write:
            return
        for name, x, qmax in (("k8", krow, Q8.INT8_MAX), ("v8", c, Q8.FP8_MAX)):
            scale = self.scales[name][layer]  # [B]; 0 before the layer's first write
            new = torch.maximum(scale, Q8.sequence_scale(x, qmax))
            buf = self.buffers[name][layer]
            buf.copy_(Q8.to8(buf, scale / new, buf.dtype))
            q = Q8.to8(x, 1 / new, buf.dtype)
            if name == "k8":  # key rows padded to the stored width
                q = F.pad(q, (0, buf.shape[-1] - x.shape[-1]))
            scale.copy_(new)
            self.write(layer, step, **{name: q})

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
        if not self._read_only:  # a snapshot keeps none: every forward (and its recomputation) computes them
            self.cross[layer] = (k.detach(), v.detach())

    # Forwards replayed from CUDA graphs (graphs.py) --------------------------------------------
    @property
    def version(self) -> tuple[int, ...]:
        """Per layer, a counter that its writes, every commit and every reset advance: a forward that sees the
        version of an earlier one sees the same cached entries and book-keeping."""
        return tuple(self._version)

    def memo_values(self) -> dict[tuple[int, str], object]:
        """The values ``memo`` holds for the current cache state, by (layer, name)."""
        return {key: value for key, (version, value) in self._memo.items() if version == self._version[key[0]]}

    def set_memo(self, values: dict[tuple[int, str], object]) -> None:
        """Make ``values`` (by (layer, name)) what ``memo`` returns in the current cache state, and forget every
        other value: a captured forward reads the tensors another capture computes them into."""
        self._memo = {key: (self._version[key[0]], value) for key, value in values.items()}

    # Copies and benchmark states ----------------------------------------------------------------
    def snapshot(self) -> KVCache:
        """A read-only copy of the cache state, for a forward that must see it unchanged later: the grad forward
        of a self-forcing chunk under activation checkpointing (the recomputation in backward must read the same
        cached values, while later chunks overwrite ring slots in place). Buffers, scales and book-keeping are
        copies, derived values (``memo``) its own; it keeps no cross-attention K/V (every forward and its
        recomputation computes them, with grad) and plans no writing forward."""
        snap = copy.copy(self)
        snap.buffers = {k: v.clone() for k, v in self.buffers.items()}
        snap.scales = {k: v.clone() for k, v in self.scales.items()}
        snap.slot_frame = list(self.slot_frame)
        snap._memo, snap._version = {}, list(self._version)
        snap.cross = [None] * self.num_layers
        snap._read_only = True
        return snap

    @torch.no_grad()
    def fill_random(self, num_frames: int) -> None:
        """Random entries in every slot and the book-keeping of a cache that has seen ``num_frames`` frames: the
        steady state of a long rollout, for benchmarks (N(0, 1) values; 8-bit: random int8 key rows and e4m3
        latents of N(0, 1) entries with matching scales)."""
        for buf in self.buffers.values():
            for layer in buf:  # one layer at a time: the 8-bit fill goes through a float temporary
                if layer.dtype == torch.int8:
                    layer.random_(-127, 128)
                elif layer.dtype == Q8.FP8:
                    layer.copy_(torch.randn(layer.shape, device=layer.device).to(layer.dtype))
                else:
                    layer.normal_()
        for name, sc in self.scales.items():  # scales of N(0, 1) entries: int8 key rows, e4m3 values
            sc.fill_(4.0 / Q8.INT8_MAX if name == "k8" else 1.0)
        for f in range(num_frames):
            slot = self._slot_of(f)
            if slot is not None:
                self.slot_frame[slot] = f
        self.next_frame = num_frames
        self._version = [v + 1 for v in self._version]
