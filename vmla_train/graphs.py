"""Launch-light chunks: a rollout's student forwards replayed from CUDA graphs (``generate.graphs``).

A chunk of a rollout is five student forwards over the latent cache (four denoising steps, then the cache pass at
t = 0 that writes the chunk), each thousands of small kernels launched from Python: at batch 1 the host's launches
set the pace, not the GPU. ``ChunkGraphs`` wraps the student forward (a ``WanStudent`` or a
``generate.GuidedStudent``); ``rollout.sample_video`` drives it like the student, and its forwards replay captured
CUDA graphs: one launch a forward, no host synchronisation between a chunk's forwards.

What is captured, and when. A graph replays fixed kernels on fixed addresses and shapes. A cached forward's shapes
are fixed once the cache is full (``num_valid == num_slots``: every forward reads all of its slots), so

- until the window is full (a video's first ``num_slots / chunk`` chunks: 7 of the 80 of a minute of Wan at
  21 + 3 sinks) and during the re-caching forwards of a prompt switch, the forwards run eagerly, unchanged;
- from the first full-window forward on, over one set of static buffers, three kinds of graph:

  ``first``  a denoising forward (``write_cache=False``) that also computes the values the cache keeps per state
             (``KVCache.memo``: the cached prefix's key-norm scale on the fused path) into static tensors, as the
             eager first forward of a chunk does;
  ``rest``   a denoising forward that reads them (the chunk's other steps); ``first`` itself where the attention
             path keeps nothing per state (MHA, the 8-bit cache, the torch paths);
  ``pass``   the cache pass (``write_cache=True``), one graph per write pattern: a chunk's frames go to ring slots
             that move on by a chunk each time, ``ring / gcd(ring, chunk)`` patterns in a video (6 for Wan: a ring
             of 18 frames, chunks of 3; ``cache_pass_patterns``), and as many again may follow a re-cache, which
             restarts the frame count.

  Each is captured the first time it is needed; the first full-window denoising forward and cache pass run
  eagerly on the capture stream before their capture (lazy initialisation: Triton compiles, cuBLAS workspaces)
  and give that forward's result. One graph per fill state was the alternative: three more graphs per state
  for chunks that come once a video, so those run eagerly.

Static buffers: the inputs ``x``, ``t`` and ``text`` (copied in before a replay; the text is not read while the
cache holds the prompt's cross-attention K/V, but a guided student's graph concatenates it); the cache's own
buffers and 8-bit scales, used in place; the prompt's cross-attention K/V (the cache points at them; a prompt
switch leaves new ones in the cache, computed by the eager forward that follows it, and they are copied in); the
RoPE tables of the cache state (queries, all keys, the chunk at absolute positions for the 8-bit cache), made
once per cache state by the student's own eager code (``WanStudent._attn_inputs``, at the first forward of a
chunk: its positions and frequencies reach the GPU with the eager path's small host-to-device copies) and handed
to the captured forward through ``CacheStep.rotary``; each graph's output (cloned after the replay). The
cache's book-keeping stays on the host: the runner commits a replayed cache pass.

Memory. Static buffers for the 1.3B geometry (window 21 + 3 sinks, chunks of 3 frames of 1560 tokens, RoPE
keys of 32 pairs), about 23 MB: RoPE tables 24 x 1560 x 32 x 2 x 4 B = 9.6 MB for the keys, 1.2 MB for the
queries (and 1.2 MB at absolute positions, 8-bit cache), per-state key scales 21 x 1560 x 4 B x 30 layers = 3.9 MB,
the inputs (text embeddings 512 x 4096 fp32 = 8 MB); the cross-attention K/V (30 x 2 x 512 x 1536 x 2 B = 94 MB)
replace the eager ones. All graphs share one private memory pool holding their temporaries: one forward's working
set, as in eager mode, but kept for the graphs. Each graph's output is consumed (cloned) right after its replay,
so graphs may replay in any order. ``nbytes`` counts the static buffers; ``benchmarks/generate.py --graphs``
measures the peak against the eager forwards.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from .kv_cache import CacheStep, KVCache
from .rope import Rotary


def cache_pass_patterns(cache: KVCache) -> int:
    """Write patterns of the cache pass a full window goes through in a video: ring / gcd(ring, chunk) (1
    without a ring, where frames past the sinks are not kept). A ``fill_random`` state takes the next chunks
    through all of them."""
    ring = cache.ring_frames
    return ring // math.gcd(ring, cache.chunk_frames) if ring else 1


class _GraphView:
    """The cache as a captured forward sees it: ``begin`` gives the graph's static step, the cross-attention K/V
    are the static ones, ``commit`` waits for the runner (a replay runs no Python); buffers, scales, reads, writes
    and the memo are the cache's own."""

    def __init__(self, cache: KVCache, step: CacheStep, cross: list[tuple[torch.Tensor, torch.Tensor]]):
        self._cache, self._step, self._cross = cache, step, cross

    def begin(self, num_frames: int, write: bool) -> CacheStep:
        if (num_frames, write) != (self._step.num_frames, self._step.write):
            raise RuntimeError(f"a captured forward over {num_frames} frames (write={write}) planned as "
                               f"{self._step.num_frames} frames (write={self._step.write})")
        return self._step

    def commit(self, step: CacheStep) -> None:
        """Nothing here: the runner commits the cache after the replay."""

    def cross_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cross[layer]

    def set_cross_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        raise RuntimeError("a captured forward reads the static cross-attention K/V; it computes none")

    def __getattr__(self, name: str):
        return getattr(self._cache, name)


class _Graph:
    """One captured forward: a ``torch.cuda.CUDAGraph`` and its static output. ``simulate``: the forward itself,
    re-run at each replay on the static buffers, so the runner's book-keeping runs on any device (tests)."""

    def __init__(self, fn: Callable[[], torch.Tensor], simulate: bool, pool=None, stream=None):
        self.fn, self.simulate = fn, simulate
        self.out: torch.Tensor | None = None
        self.graph = None
        if not simulate:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, stream=stream):
                self.out = fn()

    def replay(self) -> torch.Tensor:
        if self.simulate:
            self.out = self.fn()
        else:
            self.graph.replay()
        return self.out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _static(rot: Rotary | None) -> Rotary | None:
    return None if rot is None else Rotary(rot.cos.clone(), rot.sin.clone())


class _Bound:
    """The graphs of one cache and the static buffers they read (module doc)."""

    def __init__(self, cache: KVCache, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor):
        self.cache = cache
        self.x, self.t, self.text = x.clone(), t.clone(), text.clone()  # (B, f, C, H, W), (B, f), (B, Lt, text_dim)
        self.text_src: torch.Tensor | None = text
        self.cross = [(k.clone(), v.clone()) for k, v in cache.cross]  # per layer (B, Lt, H, Dh) each
        self.rotary: tuple[Rotary, Rotary, Rotary | None] | None = None  # (q_rot, k_rot, rot_abs)
        self.step: CacheStep | None = None  # the cache pass's step in the current state (positions, write slots)
        self.tables_for: tuple[int, ...] | None = None  # the cache version the tables and step are for
        self.memo: dict[tuple[int, str], object] = {}  # what ``first`` computes per cache state (kept in place)
        self.memo_for: tuple[int, ...] | None = None  # the cache version of its last replay
        self.graphs: dict[tuple, _Graph] = {}
        self.warm: set[bool] = set()  # write_cache values whose eager warm-up ran

    def fits(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, cache: KVCache) -> bool:
        return (_same(x, self.x) and _same(t, self.t) and _same(text, self.text)
                and all(kv is mine or (_same(kv[0], mine[0]) and _same(kv[1], mine[1]))
                        for kv, mine in zip(cache.cross, self.cross)))


class ChunkGraphs(nn.Module):
    """``model`` (``WanStudent`` or ``GuidedStudent``) with its full-window cached forwards replayed from CUDA graphs
    (module doc); every other forward, and every forward off CUDA, runs ``model`` itself. Called and used like
    ``model`` (``cfg``, ``parameters``, ``new_cache``). ``counts``: forwards run eagerly, replayed, and graphs
    captured. ``simulate`` (tests): replays re-run the recorded forward on the static buffers instead of a graph,
    on any device."""

    def __init__(self, model: nn.Module, simulate: bool = False):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.simulate = simulate
        self.counts = {"eager": 0, "replay": 0, "capture": 0}
        self._bound: dict[int, _Bound] = {}  # id(cache) -> its graphs: new_cache's caches and the last other one
        self._caches: dict[tuple[int, str], KVCache] = {}  # new_cache's, by (batch, device)
        self._stream = None  # the warm-up and capture stream (CUDA)
        self._pool = None  # the graphs' shared memory pool (CUDA)

    @property
    def student(self) -> nn.Module:
        """The ``WanStudent``: its RoPE planning makes the static tables."""
        return getattr(self.model, "student", self.model)

    def new_cache(self, batch: int, device: torch.device | str | None = None) -> KVCache:
        """An empty cache: for the same batch and device the same one again, ``reset`` (graphs capture a cache's
        buffers, so they serve every video generated into it)."""
        key = (batch, str(device))
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = self.model.new_cache(batch, device)
        else:
            cache.reset()
        return cache

    # Forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, *, cache: KVCache | None = None,
                write_cache: bool = False) -> torch.Tensor:
        """``model(x, t, text, cache=cache, write_cache=write_cache)``, from a graph where one serves (module doc)."""
        bound = self._bound_for(x, t, text, cache)
        if bound is None:
            self.counts["eager"] += 1
            return self.model(x, t, text, cache=cache, write_cache=write_cache)
        with torch.no_grad():
            self._feed(bound, x, t, text, cache)
            current = bound.memo_for == cache.version  # the per-state values of ``first`` are this state's
            if write_cache and bound.memo and not current:  # (no denoising forward in this state: rare)
                self.counts["eager"] += 1
                return self.model(x, t, text, cache=cache, write_cache=write_cache)
            if write_cache:
                key = ("pass", bound.step.write_src, bound.step.write_slots)
            else:
                key = ("rest",) if current else ("first",)
            if key not in bound.graphs:
                if write_cache not in bound.warm:  # this forward runs eagerly; the graph serves the next ones
                    bound.warm.add(write_cache)
                    step = bound.step
                    out = self._warm_up(x, t, text, cache, write_cache)
                    self._capture(bound, cache, key, step)
                    self.counts["eager"] += 1
                    return out
                self._capture(bound, cache, key, bound.step)
            out = bound.graphs[key].replay().clone()
            self.counts["replay"] += 1
            if key[0] == "first":
                bound.memo_for = cache.version
            if write_cache:
                cache.commit(bound.step)
            return out

    def _bound_for(self, x, t, text, cache) -> _Bound | None:
        """The graphs for this forward's cache, bound on its first full-window forward; None: run eagerly (no
        cache, gradients, not on CUDA, the window not full, the prompt's cross-attention K/V not yet computed, or
        other shapes than those captured)."""
        if cache is None or torch.is_grad_enabled() or not (self.simulate or x.is_cuda):
            return None
        if cache.num_valid != cache.num_slots or any(kv is None for kv in cache.cross):
            return None
        bound = self._bound.get(id(cache))
        if bound is not None:
            return bound if bound.fits(x, t, text, cache) else None
        mine = {id(c) for c in self._caches.values()}
        self._bound = {k: b for k, b in self._bound.items() if k in mine}  # another cache's graphs go
        if not self.simulate and self._stream is None:
            self._stream = torch.cuda.Stream(x.device)
            self._pool = torch.cuda.graph_pool_handle()
        bound = self._bound[id(cache)] = _Bound(cache, x, t, text)
        return bound

    def _feed(self, bound: _Bound, x, t, text, cache: KVCache) -> None:
        """Copy this forward's data into the static buffers: the inputs, the prompt's cross-attention K/V when the
        cache holds new ones, the RoPE tables and step at the first forward of a cache state."""
        if bound.tables_for != cache.version:
            pt, ph, pw = self.student.patch_size
            inp = self.student._attn_inputs(x.shape[1] // pt, x.shape[3] // ph, x.shape[4] // pw, x.device, None,
                                            cache, True)
            tables = (inp.q_rot, inp.k_rot, inp.rot_abs)
            if bound.rotary is None:
                bound.rotary = tuple(_static(r) for r in tables)
            for dst, src in zip(bound.rotary, tables):
                if dst is not None:
                    dst.cos.copy_(src.cos)
                    dst.sin.copy_(src.sin)
            bound.step, bound.tables_for = inp.step, cache.version
        for layer, mine in enumerate(bound.cross):
            kv = cache.cross[layer]
            if kv is not mine:  # a new prompt's K/V (or the bind): into the static buffers the graphs read
                mine[0].copy_(kv[0])
                mine[1].copy_(kv[1])
                cache.cross[layer] = mine
        if text is not bound.text_src:
            bound.text.copy_(text)
            bound.text_src = text
        bound.x.copy_(x)
        bound.t.copy_(t)

    # Capture -----------------------------------------------------------------------------------
    def _warm_up(self, x, t, text, cache: KVCache, write_cache: bool) -> torch.Tensor:
        """The forward run eagerly on the capture stream (its lazy initialisations happen there, not in the
        capture): this forward's result."""
        if self.simulate:
            return self.model(x, t, text, cache=cache, write_cache=write_cache)
        main = torch.cuda.current_stream()
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            out = self.model(x, t, text, cache=cache, write_cache=write_cache)
        main.wait_stream(self._stream)
        out.record_stream(main)
        return out

    def _capture(self, bound: _Bound, cache: KVCache, key: tuple, step: CacheStep) -> None:
        """Capture the forward ``key`` names over the static buffers, with the static ``step`` of its cache state.
        ``first`` computes the per-state values into tensors of its own and keeps them (``bound.memo``); the others
        read those. ``rest`` is ``first`` where there are none."""
        kind = key[0]
        write = kind == "pass"
        static = replace(step, rotary=bound.rotary) if write else replace(step, write=False, write_src=(),
                                                                            write_slots=(), rotary=bound.rotary)
        view, model, memo = _GraphView(cache, static, bound.cross), self.model, bound.memo
        x, t, text = bound.x, bound.t, bound.text

        def forward() -> torch.Tensor:  # (no reference to the runner or the bound state: no cycles to collect)
            cache.set_memo({} if kind == "first" else memo)
            try:
                out = model(x, t, text, cache=view, write_cache=write)
                if kind == "first":
                    memo.clear()
                    memo.update(cache.memo_values())
            finally:
                cache.set_memo({})  # the capture's tensors are not this state's values until a replay
            return out

        self.counts["capture"] += 1
        bound.graphs[key] = _Graph(forward, self.simulate, self._pool, self._stream)
        if kind == "first" and ("rest",) not in bound.graphs:
            if bound.memo or self.simulate:  # (simulated: the values exist after a replay; keep the two kinds)
                self._capture(bound, cache, ("rest",), step)
            else:
                bound.graphs[("rest",)] = bound.graphs[key]

    def nbytes(self) -> int:
        """Bytes of the static buffers of every bound cache: inputs, cross-attention K/V, RoPE tables, per-state
        values (the graphs' memory pool aside)."""
        total = 0
        for b in self._bound.values():
            tables = [t for r in (b.rotary or ()) if r is not None for t in (r.cos, r.sin)]
            memo = [t for v in b.memo.values() for t in _tensors(v)]
            total += sum(t.numel() * t.element_size()
                         for t in (b.x, b.t, b.text, *[t for kv in b.cross for t in kv], *tables, *memo))
        return total


def _tensors(value) -> list[torch.Tensor]:
    """The tensors of a memoised value: a tensor, or the tensor fields of one (an 8-bit key set), or none."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [v for v in getattr(value, "__dict__", {}).values() if isinstance(v, torch.Tensor)]
