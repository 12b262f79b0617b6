"""Typed configuration: OmegaConf structured dataclasses, YAML files and ``key=value`` overrides.

Resolution order (later wins)::

    schema defaults  <-  named model size (model.name)  <-  YAML file(s)  <-  key=value overrides

``load`` returns a plain ``Config`` dataclass instance; every section's ``__post_init__`` has run, so
contradictions are rejected before any model, worker or GPU is touched. Errors are ``ConfigError``
and name the key, what was expected, what was found and the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration problem, with the offending key named in the message."""


# ----------------------------------------------------------------------------------------------
# Named model sizes (one table; DESIGN.md section 3). Every geometry number in the code derives
# from these fields.
# ----------------------------------------------------------------------------------------------
# A size fills `model` and may bring the defaults of other sections that only make sense with it.
MODEL_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "wan-1.3b": {"model": dict(dim=1536, num_heads=12, num_layers=30, ffn_dim=8960)},
    "wan-14b": {"model": dict(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824)},
    # Seconds on a CPU with the real structure: heads of 12 dims (RoPE pairs 2/2/2 per axis),
    # 9 latent frames of 8x12 latents (24 tokens per frame), a latent of 24 + a RoPE key of 12.
    "tiny": {
        "model": dict(dim=48, num_heads=4, num_layers=2, ffn_dim=96, text_dim=32, text_len=16, freq_dim=32),
        "attention": dict(d_c=24, d_r=12),
        "video": dict(num_frames=33, height=64, width=96),
        "cache": dict(window_frames=6, sink_frames=1, dtype="float32"),
    },
}


@dataclass
class ModelConfig:
    """The Wan2.1 DiT geometry shared by the student, the teacher and the critic."""

    name: str = "wan-1.3b"  # named size from MODEL_SIZES; its values fill the fields below
    dim: int = 1536  # hidden width (num_heads * head_dim)
    num_heads: int = 12  # attention heads
    num_layers: int = 30  # transformer blocks
    ffn_dim: int = 8960  # feed-forward inner width
    in_channels: int = 16  # latent channels in
    out_channels: int = 16  # latent channels out
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # (t, h, w) patch
    text_dim: int = 4096  # umT5 embedding width
    text_len: int = 512  # text tokens after zero padding (Wan pads prompts to this length)
    freq_dim: int = 256  # sinusoidal timestep embedding width
    eps: float = 1e-6  # norm epsilon
    rope_theta: float = 10000.0  # RoPE base
    cross_attn_norm: bool = True  # affine LayerNorm before cross-attention (Wan2.1: true)

    def __post_init__(self) -> None:
        if self.name not in MODEL_SIZES:
            _fail("model.name", f"one of {sorted(MODEL_SIZES)}", self.name)
        if self.dim % self.num_heads:
            _fail("model.dim", f"a multiple of model.num_heads={self.num_heads}", self.dim)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            _fail("model.patch_size", "three positive ints (t, h, w)", self.patch_size)
        if self.head_dim // 6 < 1:
            _fail("model.num_heads", "a head_dim of at least 6 (RoPE needs a pair per t/h/w axis)", self.num_heads)
        for key in ("num_layers", "ffn_dim", "in_channels", "out_channels", "text_dim", "text_len", "freq_dim"):
            if getattr(self, key) < 1:
                _fail(f"model.{key}", "a positive int", getattr(self, key))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


class AttentionKind(str, Enum):
    mha = "mha"
    mla = "mla"


class AttentionImpl(str, Enum):
    auto = "auto"  # pick by regime (see attention.resolve_impl)
    reference = "reference"  # decompress per-head K/V from the latent, then SDPA
    absorbed_sdpa = "absorbed_sdpa"  # queries absorbed into latent space, MQA over [c; k_rope], V = c, via SDPA
    triton = "triton"  # fused Triton latent attention (bf16), vmla_train.kernels
    triton_fp8 = "triton_fp8"  # fused Triton latent attention with an 8-bit cache (Hopper)


class KNorm(str, Enum):
    rms_scalar = "rms_scalar"  # DESIGN 4 option C: Wan's full-width RMSNorm as a per-token scalar s_t
    none = "none"  # DESIGN 4 option D: no key norm (fine-tune to recover)


@dataclass
class AttentionConfig:
    """Self-attention of the student: Wan MHA or VideoMLA latent attention."""

    kind: AttentionKind = AttentionKind.mla  # mha | mla
    d_c: int = 160  # MLA: shared content latent width per token
    d_r: int = 64  # MLA: decoupled RoPE key width per token (all groups together)
    rope_key_groups: int = 1  # MLA: 1 = one RoPE key shared by all heads; num_heads = one per head
    qk_nope_head_dim: int = -1  # MLA: per-head content q/k width; -1 means model head_dim
    impl: AttentionImpl = AttentionImpl.auto  # MLA: auto | reference | absorbed_sdpa | triton | triton_fp8
    k_norm: KNorm = KNorm.rms_scalar  # MLA: how Wan's full-width key RMSNorm is kept


class PositionScheme(str, Enum):
    relative = "relative"  # temporal RoPE positions by slot order in the cache (StreamingLLM style)
    absolute = "absolute"  # temporal RoPE position = absolute latent frame index (float64, no cap)


@dataclass
class CacheConfig:
    """The latent KV cache used by chunked rollouts (training self-forcing and generation)."""

    window_frames: int = 21  # most recent latent frames attended, the current chunk included
    sink_frames: int = 3  # first latent frames kept forever (never evicted)
    position_scheme: PositionScheme = PositionScheme.relative  # how cached keys get RoPE positions
    dtype: str = "bfloat16"  # storage dtype of the cache buffers


@dataclass
class VideoConfig:
    """Pixel and latent geometry; latent sizes derive from the VAE strides."""

    num_frames: int = 81  # pixel frames per clip
    height: int = 480  # pixels
    width: int = 832  # pixels
    fps: int = 16  # frames per second of clips and outputs
    vae_stride: list[int] = field(default_factory=lambda: [4, 8, 8])  # (t, h, w) VAE compression
    chunk_frames: int = 3  # latent frames generated per self-forcing chunk

    def __post_init__(self) -> None:
        st, sh, sw = self.vae_stride
        if (self.num_frames - 1) % st:
            _fail("video.num_frames", f"1 + a multiple of vae_stride[0]={st}", self.num_frames)
        if self.height % sh or self.width % sw:
            _fail("video.height/width", f"multiples of vae_stride {sh}x{sw}", f"{self.height}x{self.width}")
        if self.latent_frames % self.chunk_frames:
            _fail(
                "video.chunk_frames",
                f"a divisor of the latent frame count {self.latent_frames} (= 1 + (num_frames-1)/{st})",
                self.chunk_frames,
            )

    @property
    def latent_frames(self) -> int:
        return 1 + (self.num_frames - 1) // self.vae_stride[0]

    @property
    def latent_height(self) -> int:
        return self.height // self.vae_stride[1]

    @property
    def latent_width(self) -> int:
        return self.width // self.vae_stride[2]


@dataclass
class RuntimeConfig:
    """Where and how things run."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # compute dtype of the student: float32 | bfloat16 | float16
    seed: int = 0  # global seed
    run_dir: str = "runs/default"  # run folder: checkpoints, resolved config, logs
    progress: bool = True  # rank-0 progress bar


@dataclass
class DemoConfig:
    """The foundation demo: a cached chunk-by-chunk rollout of a random student."""

    num_chunks: int = 4  # chunks generated
    denoising_steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])  # before warp
    shift: float = 5.0  # flow-matching timestep shift


@dataclass
class Config:
    """Root config; sections mirror the packages they configure."""

    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def __post_init__(self) -> None:
        m, a, c, v = self.model, self.attention, self.cache, self.video
        if v.chunk_frames % m.patch_size[0]:
            _fail("video.chunk_frames", f"a multiple of model.patch_size[0]={m.patch_size[0]}", v.chunk_frames)
        if (v.latent_height % m.patch_size[1]) or (v.latent_width % m.patch_size[2]):
            _fail(
                "video.height/width",
                f"latent sizes divisible by the patch {m.patch_size[1]}x{m.patch_size[2]}",
                f"{v.latent_height}x{v.latent_width}",
            )
        if c.window_frames < v.chunk_frames:
            _fail("cache.window_frames", f">= video.chunk_frames={v.chunk_frames} (a window holds a chunk)", c.window_frames)
        if c.sink_frames < 0:
            _fail("cache.sink_frames", ">= 0", c.sink_frames)
        if c.dtype not in _DTYPES:
            _fail("cache.dtype", f"one of {sorted(_DTYPES)}", c.dtype)
        if self.runtime.dtype not in _DTYPES:
            _fail("runtime.dtype", f"one of {sorted(_DTYPES)}", self.runtime.dtype)
        if a.kind == AttentionKind.mla:
            _check_mla(m, a)

    # Derived geometry -------------------------------------------------------------------------
    @property
    def tokens_per_frame(self) -> int:
        """Tokens per latent frame after patching (1560 for 480x832 with patch 1x2x2)."""
        p = self.model.patch_size
        return (self.video.latent_height // p[1]) * (self.video.latent_width // p[2])


_DTYPES = {"float32", "bfloat16", "float16"}


def _check_mla(m: ModelConfig, a: AttentionConfig) -> None:
    if not 1 <= a.d_c <= m.dim:
        _fail("attention.d_c", f"1..model.dim={m.dim} (the joint K/V factorisation has rank <= dim)", a.d_c)
    if a.rope_key_groups < 1 or m.num_heads % a.rope_key_groups:
        _fail("attention.rope_key_groups", f"a divisor of model.num_heads={m.num_heads}", a.rope_key_groups)
    if a.d_r % a.rope_key_groups:
        _fail("attention.d_r", f"a multiple of attention.rope_key_groups={a.rope_key_groups}", a.d_r)
    per_group = a.d_r // a.rope_key_groups
    if per_group % 2 or per_group // 6 < 1:
        _fail(
            "attention.d_r",
            "an even width per RoPE key group of at least 6 (2 values x 3 axes t/h/w); "
            f"got {per_group} per group with rope_key_groups={a.rope_key_groups}",
            a.d_r,
        )
    if per_group > m.head_dim:
        _fail("attention.d_r", f"at most head_dim={m.head_dim} per group (RoPE pairs come from a head)", a.d_r)
    if a.qk_nope_head_dim < -1:
        _fail("attention.qk_nope_head_dim", ">= 0, or -1 for model head_dim", a.qk_nope_head_dim)


def _fail(key: str, expected: str, found: Any) -> None:
    raise ConfigError(f"config key '{key}': expected {expected}, found {found!r}")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_valid_keys(node._get_node(k), full + "."))
    return keys


def _nearest(key: str, schema: DictConfig) -> str:
    valid = _valid_keys(schema)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not near:  # compare the last component too ("attention.dc" -> "attention.d_c")
        leaf = key.split(".")[-1]
        near = [k for k in valid if difflib.get_close_matches(leaf, [k.split(".")[-1]], n=1, cutoff=0.6)]
    return f" (nearest valid key: '{near[0]}')" if near else ""


def _key_of(err: OmegaConfBaseException) -> str:
    full = getattr(err, "full_key", None) or ""
    return str(full)


def _quoted(msg: str) -> str:
    parts = msg.split("'")
    return parts[1] if len(parts) > 2 else msg


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``["a.b=1", "c=[1,2]"]`` -> DictConfig; values are parsed as YAML scalars/lists."""
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r}: expected key=value (e.g. attention.d_c=192)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:  # pragma: no cover - malformed YAML value
        raise ConfigError(f"override could not be parsed: {e}") from None


def load(paths: str | Path | Sequence[str | Path] | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load and validate a config: schema <- model size <- YAML files <- overrides."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    layers: list[DictConfig] = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            layer = OmegaConf.load(p)
        except Exception as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"config file '{p}': expected a mapping at the top level")
        layers.append(layer)
    layers.append(parse_overrides(overrides))
    return from_layers(layers)


def from_layers(layers: Sequence[DictConfig | dict]) -> Config:
    schema = OmegaConf.structured(Config)
    merged_user = OmegaConf.merge(*[OmegaConf.create(l) if isinstance(l, dict) else l for l in layers]) if layers else OmegaConf.create()
    name = OmegaConf.select(merged_user, "model.name", default="wan-1.3b")
    if name not in MODEL_SIZES:
        raise ConfigError(f"config key 'model.name': expected one of {sorted(MODEL_SIZES)}, found {name!r}")
    cfg = schema
    try:
        cfg = OmegaConf.merge(cfg, MODEL_SIZES[name])
        for layer in layers:
            cfg = OmegaConf.merge(cfg, layer)
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = _key_of(e) or _quoted(str(e))
        raise ConfigError(f"unknown config key '{key}'{_nearest(key, schema)}") from None
    except ValidationError as e:
        key = _key_of(e)
        node = OmegaConf.select(schema, key) if key else None
        expected = type(node).__name__ if node is not None and not isinstance(node, (DictConfig, ListConfig)) else "the schema type"
        raise ConfigError(f"config key '{key}': wrong type, expected {expected} (schema default {node!r}); {e.msg.splitlines()[0]}") from None
    try:
        return OmegaConf.to_object(cfg)  # runs every __post_init__
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(f"config key '{_key_of(e)}': {e.msg.splitlines()[0]}") from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    atomic_write_text(Path(path), to_yaml(cfg))


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace(cfg: Config, **sections: Any) -> Config:
    """Copy of ``cfg`` with whole sections or fields replaced, re-validated (``__post_init__`` runs)."""
    return dataclasses.replace(cfg, **sections)


# ----------------------------------------------------------------------------------------------
# KV accounting (used by `vmla-train info`, benchmarks and the conversion report)
# ----------------------------------------------------------------------------------------------
def kv_values_per_token(cfg: Config) -> dict[str, int]:
    """Cached self-attention values per token per layer: MHA (K and V of every head) vs MLA."""
    mha = 2 * cfg.model.dim
    a = cfg.attention
    # MLA caches c (d_c) and the raw RoPE key (d_r); the k-norm scale is recomputed from them.
    return {"mha": mha, "mla": a.d_c + a.d_r}


def kv_reduction(cfg: Config) -> float:
    """Fraction of cached self-attention values saved by MLA (d_c + d_r) against MHA (2 * dim)."""
    v = kv_values_per_token(cfg)
    return 1.0 - v["mla"] / v["mha"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


__all__ = [
    "AttentionConfig",
    "AttentionImpl",
    "AttentionKind",
    "CacheConfig",
    "Config",
    "ConfigError",
    "DemoConfig",
    "KNorm",
    "MODEL_SIZES",
    "ModelConfig",
    "PositionScheme",
    "RuntimeConfig",
    "VideoConfig",
    "kv_reduction",
    "kv_values_per_token",
    "load",
    "save",
    "to_yaml",
]
