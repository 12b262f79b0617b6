"""The seam between ``attention.MLASelfAttention`` and the fused latent-attention kernels.

Notation as in ``latent_attention``: B batch, L query tokens (the chunk), H heads, G RoPE-key groups, dn per-head
content width, dc latent width, dr RoPE width per group, Lp cached keys (a prefix of the cache), Lk = Lp + L.

The layer hands over tensors (``Queries``, ``Keys``: its projections, RoPE rotations and key-norm maths) and
gets the latent output o_lat [B, L, H, dc] back (``latent_attention``); it applies W_uv itself. Here:

- ``resolve_impl``: the path ``attention.impl`` means for an input (the kernels are forward-only and serve
  cached forwards);
- ``kernel16`` / ``kernel8``: the kernel ``attention.kernel`` means for the operands (Triton anywhere Triton
  runs, Gluon on Hopper), checked to run there;
- 8-bit operands: queries, the chunk's keys, the cached prefix's keys (``quant8``, ``quantize_queries``);
- per cache state (``KVCache.memo``): the cached prefix's key-norm scale, its quantised rows;
- the 8-bit cache (``cache.dtype=8bit``): read, attend, write (``KVCache.read8`` / ``write8``);
- ``override``: tests force a path or kernel family.

The kernel modules are imported on first use: Triton decides at import whether it runs its CPU interpreter
(``TRITON_INTERPRET``). Nothing here imports the run config: ``impl`` and ``kernel`` are the config's values
(``AttentionImpl`` / ``FusedKernel`` are str enums), as strings.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from ..rope import Rotary
from . import quant8 as Q8

FUSED = ("fused", "fused_8bit")  # the impls that run a kernel
_OVERRIDE: dict[str, str] = {}  # set by ``override`` only


@contextmanager
def override(impl: str | None = None, kernel: str | None = None):
    """Run every MLA layer with ``attention.impl=impl`` and/or ``attention.kernel=kernel`` inside the block,
    whatever their config says (tests: ``with dispatch.override(kernel="triton"): ...``)."""
    saved = dict(_OVERRIDE)
    _OVERRIDE.update({k: v for k, v in (("impl", impl), ("kernel", kernel)) if v is not None})
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(saved)


def _value(name: str, given) -> str:
    """The config value ``given`` (an enum or a string) as a string, unless ``override`` sets ``name``."""
    return _OVERRIDE[name] if name in _OVERRIDE else str(getattr(given, "value", given))


# ----------------------------------------------------------------------------------------------
# Which path, which kernel
# ----------------------------------------------------------------------------------------------
def resolve_impl(impl, x: torch.Tensor, cached: bool = True, needs_grad: bool = False, backward="absorbed",
                 eight_bit_cache: bool = False) -> str:
    """The MLA path (an ``attention.impl`` value) to run for ``impl`` on this input.

    The fused kernels are forward-only and serve the cached path (no mask): a forward that needs gradients runs
    ``backward`` (``attention.backward``), a masked full forward runs ``absorbed``. ``auto`` (measured on an H100,
    benchmarks/README.md): ``fused`` for forwards on CUDA with Triton and 16-bit activations (faster
    than absorbed SDPA from one latent frame of queries to a 3-frame chunk, key pre-pass included); ``absorbed``
    on CPU, without Triton, or for float32 activations (the kernels' tiles are sized for 16-bit operands).
    ``fused_8bit`` is only run when named (faster on Hopper, but its error is 8-bit: benchmarks/NOTES-kernel.md)
    and always on an 8-bit cache (which only the 8-bit kernels read). ``x`` is the query-side activation
    [B, L, ...] in the dtype attention runs in.
    """
    impl = _value("impl", impl)
    if eight_bit_cache:
        if needs_grad:
            raise RuntimeError("cache.dtype=8bit is for inference (generation): a forward that needs gradients "
                               "runs the torch paths on a 16-bit cache")
        return "fused_8bit"
    if impl == "auto":
        impl = "absorbed"
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):  # the kernel module loads on GPUs only
            from . import latent_attention as LA

            impl = "fused" if LA.available() else "absorbed"
    if impl in FUSED:
        if needs_grad:
            return str(getattr(backward, "value", backward))
        if not cached:
            return "absorbed"
    return impl


def kernel16(kernel, q_lat: torch.Tensor, q_r: torch.Tensor, c_past: torch.Tensor) -> Callable:
    """The 16-bit kernel ``attention.kernel`` names for these operands (``latent_attention``'s signature).
    ``auto``: the warp-specialised Gluon kernel where it runs (Hopper, queries and cache of one 16-bit dtype,
    TMA-aligned widths), measured 1.3x the Triton one on an H200 (benchmarks/latent_attention_ws.py); the Triton
    kernel elsewhere. ``gluon`` names the Gluon kernel, which refuses to run off Hopper."""
    from . import latent_attention as LA
    from . import latent_attention_ws16 as W16

    kernel = _value("kernel", kernel)
    if kernel == "gluon" or (kernel == "auto" and c_past.dtype == q_lat.dtype
                             and W16.supports16(q_lat.device, q_lat.dtype, q_lat.shape[-1], q_r.shape[-1])):
        return W16.latent_attention_ws16
    return LA.latent_attention


def kernel8(kernel, q8: torch.Tensor, qr8: torch.Tensor) -> Callable:
    """The 8-bit kernel ``attention.kernel`` names for these operands (``attention8``'s signature). ``auto``: the
    warp-specialised Gluon kernel where it runs (Hopper, TMA-aligned widths), measured 1.28x faster than the
    Triton one on an H100 (benchmarks/latent_attention_ws.py); the Triton kernel elsewhere."""
    from . import latent_attention_fp8 as LA8
    from . import latent_attention_ws as WS

    kernel = _value("kernel", kernel)
    if kernel == "gluon" or (kernel == "auto" and WS.supports(q8.device, q8.shape[-1], qr8.shape[-1])):
        return WS.attention8_ws
    return LA8.attention8


# ----------------------------------------------------------------------------------------------
# The fused call
# ----------------------------------------------------------------------------------------------
@dataclass
class Queries:
    """The query side of a fused call."""

    q_c: torch.Tensor  # (B, L, H, dn) content queries
    q_r: torch.Tensor  # (B, L, H, dr) RoPE queries, rotated at the cache scheme's positions
    w_uk: torch.Tensor  # (H, dn, dc) W_uk with the key norm's content gain folded in: q_lat = q_c W_uk
    scale: float  # softmax scale, 1 / sqrt(dn + dr)
    groups: int  # RoPE-key groups G
    q_r_abs: torch.Tensor | None = None  # (B, L, H, dr) rotated at absolute positions: the 8-bit cache only


@dataclass
class Keys:
    """The key side of a fused call: the chunk's entries and the layer's key maths, which this module runs on the
    chunk and on the cached prefix (the prefix's key scale once per cache state)."""

    c: torch.Tensor  # (B, L, dc) the chunk's latents
    kr: torch.Tensor  # (B, L, G*dr) its raw RoPE keys (no norm, no RoPE)
    rot: Rotary  # every key at the cache scheme's positions: the cached prefix (Lp), then the chunk (L)
    key_scale: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (c, kr) -> key-norm scale s (B, n, 1) fp32
    rope_key: Callable[[torch.Tensor, Rotary], torch.Tensor]  # (kr, rot) -> RoPE(g_r kr) (B, n, G, dr)
    rot_abs: Rotary | None = None  # the chunk at absolute positions: an 8-bit cache stores its keys rotated so


def key_rows(c: torch.Tensor, rho: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The absorbed MQA key of every token, [s c ; s rho] (B, n, dc + G*dr) in c's dtype, from c (B, n, dc),
    rho = RoPE(g_r kr) (B, n, G, dr) and the key-norm scale s (B, n, 1): what the 8-bit path quantises."""
    return torch.cat([c.float() * s, rho.flatten(2).float() * s], -1).to(c.dtype)


def latent_attention(impl, kernel, q: Queries, k: Keys, cache=None, layer: int = 0, step=None) -> torch.Tensor:
    """o_lat (B, L, H, dc) of a fused path (``impl`` from ``resolve_impl``: fused | fused_8bit) over the cached
    prefix of ``layer`` (``KVCache``, None: the chunk alone) and the chunk. An 8-bit cache is read and written here;
    a 16-bit one only read (the layer writes its c and kr)."""
    if cache is not None and cache.eight_bit is not None:
        return _cached_8bit(kernel, q, k, cache, layer, step)
    past = cache.read(layer, step) if cache is not None else None  # views: the layer writes after this call
    c_past = past["c"] if past is not None else k.c[:, :0]  # (B, Lp, dc)
    kr_past = past["kr"] if past is not None else k.kr[:, :0]  # (B, Lp, G*dr)
    lp = c_past.shape[1]
    rot_past, rot_new = Rotary(k.rot.cos[:lp], k.rot.sin[:lp]), Rotary(k.rot.cos[lp:], k.rot.sin[lp:])
    memo = cache.memo if cache is not None else (lambda _layer, _name, fn: fn())
    s_past = memo(layer, "mla_key_scale", lambda: k.key_scale(c_past, kr_past))  # (B, Lp, 1): 4 B a key
    s_new = k.key_scale(k.c, k.kr)  # (B, L, 1)
    rho_new = k.rope_key(k.kr, rot_new).to(q.q_c.dtype)  # (B, L, G, dr)
    if impl == "fused_8bit":  # 8-bit: key rows [s c ; s rho] and values quantised

        def prefix8():  # the prefix's 8-bit rows and values, once per cache state (as an 8-bit cache write would
            # store them; the cache holds 16 bits, so this copy costs 384 B a token at 160/64 while it lives)
            rho_p = k.rope_key(kr_past, rot_past).to(q.q_c.dtype)
            return Q8.quantize_keys(key_rows(c_past.to(k.c.dtype), rho_p, s_past), c_past) if lp else None

        past8 = memo(layer, "mla_prefix8", prefix8)
        new8 = Q8.quantize_keys(key_rows(k.c, rho_new, s_new), k.c)
        return _attend8(kernel, q, past8, new8, q.q_r, q.q_r)
    s = torch.cat([s_past, s_new], 1)  # (B, Lk, 1)
    # RoPE per call: keeping the rotated prefix costs d_r values a key (measured +9 % peak memory for +0.5 % speed)
    rho = torch.cat([k.rope_key(kr_past, rot_past).to(q.q_c.dtype), rho_new], 1)  # (B, Lk, G, dr)
    q_lat = torch.einsum("blhn,hnc->blhc", q.q_c, q.w_uk.to(q.q_c.dtype))  # (B, L, H, dc)
    o_lat, _ = kernel16(kernel, q_lat, q.q_r, c_past)(q_lat, q.q_r, c_past, k.c, rho, s.squeeze(-1).contiguous(),
                                                       q.scale)
    return o_lat


def _attend8(kernel, q: Queries, past8: Q8.Latent8 | None, new8: Q8.Latent8, q_r: torch.Tensor,
             q_r_sink: torch.Tensor, sink_tokens: int = 0) -> torch.Tensor:
    """The 8-bit kernel on quantised queries (``q_r`` scores the window and the chunk, ``q_r_sink`` the first
    ``sink_tokens`` cached keys) and quantised key sets."""
    from . import latent_attention_fp8 as LA8

    q8, qr8, qs8, sq = LA8.quantize_queries(q.q_c, q.w_uk, q_r, q_r_sink)  # (B, L, H, dc / dr) int8, (B, L, H)
    o_lat, _ = kernel8(kernel, q8, qr8)(q8, qr8, qs8, sq, past8, new8, q.scale, q.groups, sink_tokens,
                                        out_dtype=q.q_c.dtype)
    return o_lat


def _cached_8bit(kernel, q: Queries, k: Keys, cache, layer: int, step) -> torch.Tensor:
    """Attention over an 8-bit cache (``cache.dtype=8bit``). Cached key rows were rotated at their frames'
    absolute positions when written; the chunk's are too, and its queries are rotated twice: at absolute positions
    for the window and the chunk (``q_r_abs``), and at the cache's scheme positions for the sinks (``q_r``; RoPE
    sees only differences: under ``position_scheme=relative`` the window and the queries share one shift that the
    sinks do not, see ``latent_attention_fp8``). Then the chunk is written with the layer's scales."""
    n = step.read_tokens
    past8 = cache.read8(layer, step)  # views of the buffers and scales: attended before the write below
    rho = k.rope_key(k.kr, k.rot_abs).to(k.c.dtype)  # (B, L, G, dr)
    krow = key_rows(k.c, rho, k.key_scale(k.c, k.kr))  # (B, L, dc + G*dr)
    new8 = Q8.quantize_keys(krow, k.c)
    sinks = min(cache.sink_frames, n // cache.tokens_per_frame) * cache.tokens_per_frame
    o_lat = _attend8(kernel, q, past8, new8, q.q_r_abs.to(q.q_c.dtype), q.q_r.to(q.q_c.dtype), sinks)
    cache.write8(layer, step, krow, k.c)
    return o_lat
