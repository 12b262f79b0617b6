"""Training data: typed batches from training/ODE shards, a prompt file, or a synthetic source.

    loader = build_loader(cfg, "latents", rank, world_size)     # or "prompts", "ode"
    for batch in loader: ...                                      # forever, epochs of batches_per_epoch
    state = loader.state_dict(); ...; loader.load_state_dict(state)   # resume continues, never replays

Order (every source): rank ``r`` of ``W`` takes, at its per-rank sample position ``s``, the global
position ``g = s * W + r``; pass ``k = g // N`` over the ``N`` samples uses the seeded permutation
``perm_k`` and the sample is ``perm_k[g % N]``. So every rank yields exactly ``batches_per_epoch``
batches per epoch (no uneven-rank hangs), ranks see disjoint samples within a pass, the order is a pure
function of ``(data.seed, position)``, and the loader state is one integer (global samples consumed):
a resumed run continues exactly where it stopped, even with a different world size or batch size.

Bad samples (a corrupt shard or member, a wrong shape): sample ``i`` is replaced by the next readable
index ``i+1, i+2, ...`` (mod ``N``), a pure function of ``i``, so every rank still yields its batches
and all ranks agree; each replacement is logged (warning) and counted (``batch.skipped``,
``loader.skipped_samples``, kept in the loader state). Only a source with no readable sample raises.

Shards are WebDataset tars (written by ``vmla_train.dataprep``; members ``<key>.<ext>``, keys without
dots) read by random access: each worker scans a shard's tar headers once (seeks, no data read) and
then reads only the members a batch needs (``prompts`` never touches the latents). The per-shard sample
count comes from the folder's ``index.json`` (scanned from the tar when absent).

Sample members (arrays ``.npy``; ``float16``, or ``bfloat16`` stored as its uint16 bits with
``"dtype": "bfloat16"`` in the ``.json``):

- training (``vmla-data encode``): ``latents.npy`` [F, C, H, W] normalised VAE latents,
  ``text.npy`` [L, D] umT5 embedding trimmed to the prompt's L tokens, ``txt`` caption, ``json``.
- ODE (``vmla-data ode-pairs``): ``noise.npy`` [F, C, H, W], ``trajectory.npy`` [K, F, C, H, W],
  ``clean.npy`` [F, C, H, W], ``text.npy``, ``txt``, ``json`` with ``"timesteps"`` [K].
- prompts: ``text.npy``, ``txt``, ``json`` (any training or ODE shard also serves prompts).
"""

from __future__ import annotations

import bisect
import glob
import io
import json
import logging
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .config import Config, ConfigError, DataSource, torch_dtype

KINDS = ("latents", "prompts", "ode")
STAGE_KINDS = {"pretrain": "latents", "adapt": "latents", "ode_init": "ode", "self_forcing": "prompts",
               "causal_cd": "latents"}  # loader per train.stage
SHARD_KINDS = {"latents": ("latents",), "ode": ("ode",), "prompts": ("latents", "ode")}  # index.json kinds each loader reads
PRODUCERS = {"raw": "vmla-data raw", "latents": "vmla-data encode", "ode": "vmla-data ode-pairs"}  # who writes each kind
INDEX_NAME = "index.json"  # per-folder shard index: {"kind": ..., "shards": {"name.tar": num_samples}}
STATE_VERSION = 1
log = logging.getLogger(__name__)
_MEMBER_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: key = up to the first dot


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
class _Batch:
    def to(self, device: torch.device | str, non_blocking: bool = False):
        """Copy with every tensor moved to ``device`` (captions and other fields unchanged)."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v
        return type(self)(**values)

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class LatentBatch(_Batch):
    """Adapt stage: clean clips and their prompts."""

    latents: Tensor  # [B, F, C, H, W] float32, normalised VAE latents
    text: Tensor  # [B, Lt, text_dim] float32, zero past each prompt's length
    text_mask: Tensor  # [B, Lt] bool
    captions: list[str]
    skipped: int = 0  # unreadable samples replaced while making this batch


@dataclass
class PromptBatch(_Batch):
    """Self-forcing DMD: prompts only."""

    text: Tensor  # [B, Lt, text_dim] float32, zero past each prompt's length
    text_mask: Tensor  # [B, Lt] bool
    captions: list[str]
    skipped: int = 0  # unreadable samples replaced while making this batch


@dataclass
class OdeBatch(_Batch):
    """ODE init: teacher trajectories."""

    noise: Tensor  # [B, F, C, H, W] the teacher's starting noise (t = 1000)
    trajectory: Tensor  # [B, K, F, C, H, W] teacher latents at the kept step indices
    timesteps: Tensor  # [K] float, teacher timesteps of the trajectory latents (1000 = noise)
    clean: Tensor  # [B, F, C, H, W] the teacher's final latent
    text: Tensor  # [B, Lt, text_dim] float32
    text_mask: Tensor  # [B, Lt] bool
    captions: list[str]
    skipped: int = 0  # unreadable samples replaced while making this batch


# ----------------------------------------------------------------------------------------------
# Array members (shared with vmla_train.dataprep, which writes them)
# ----------------------------------------------------------------------------------------------
def encode_array(x: Tensor, dtype: str) -> bytes:
    """Tensor -> ``.npy`` bytes in ``float16`` or ``bfloat16`` (bf16 as its uint16 bits)."""
    x = x.detach().cpu()
    if dtype == "bfloat16":
        arr = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    elif dtype in ("float16", "float32"):
        arr = x.to(torch_dtype(dtype)).numpy()
    else:
        raise ValueError(f"array dtype {dtype!r}: expected float16 | bfloat16 | float32")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_array(data: bytes, dtype: str = "float16", where: str = "", as_float: bool = True) -> Tensor:
    """``.npy`` bytes -> tensor (float32, or the stored float16/bfloat16 with ``as_float=False``);
    ``dtype`` says how uint16 arrays are to be read (bfloat16 bits)."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{where}: not a readable .npy array ({e})") from None
    if arr.dtype == np.uint16:
        if dtype != "bfloat16":
            raise ValueError(f"{where}: uint16 array but the sample's json says dtype={dtype!r}, expected 'bfloat16'")
        t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    elif arr.dtype in (np.float16, np.float32):
        t = torch.from_numpy(arr)
    else:
        raise ValueError(f"{where}: array dtype {arr.dtype}, expected float16, float32 or bfloat16 bits (uint16)")
    return t.float() if as_float else t


# ----------------------------------------------------------------------------------------------
# Shard files: expansion, index, random-access member tables
# ----------------------------------------------------------------------------------------------
def expand_shards(pattern: str | Sequence[str]) -> list[str]:
    """Shard paths from brace patterns (``a-{000000..000009}.tar``), globs and ``::``-joined lists."""
    from webdataset.shardlists import expand_urls  # '::' lists + brace expansion, as webdataset reads them

    parts = [pattern] if isinstance(pattern, str) else list(pattern)
    out: list[str] = []
    for part in parts:
        for e in expand_urls(str(part)):
            if e:
                out.extend(sorted(glob.glob(e)) if glob.has_magic(e) else [e])
    return out


def read_index(folder: str | Path) -> dict:
    """The ``index.json`` of a shard folder, or an empty index."""
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        return {"shards": {}}
    try:
        return json.loads(path.read_text())
    except Exception as e:
        raise ValueError(f"shard index '{path}' is not valid JSON ({e}); delete it to rescan the shards") from None


def scan_tar(path: str) -> "OrderedDict[str, dict[str, tuple[int, int]]]":
    """Sample table of a tar: key -> {ext: (data offset, size)}, in file order (headers only, no data read)."""
    samples: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                match = _MEMBER_RE.match(m.name)
                if not match:
                    continue
                key, ext = match.group(1), match.group(2)
                samples.setdefault(key, {})[ext] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"shard '{path}' is not a readable tar ({e})") from None
    return samples


def _first_sample_members(path: str) -> tuple[str, list[str]] | None:
    """(key, member extensions) of the first sample of a tar, reading headers only until the second key
    starts; None when the file is not a readable tar (the bad-sample path reports that when it is read)."""
    key, exts = None, []
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                match = _MEMBER_RE.match(m.name) if m.isfile() else None
                if not match:
                    continue
                if key is not None and match.group(1) != key:
                    break
                key = match.group(1)
                exts.append(match.group(2))
    except (tarfile.TarError, OSError):
        return None
    return (key, exts) if key is not None else None


def check_shards(pattern: str | Sequence[str], kind: str, key: str = "data.shards") -> list[str]:
    """The shard paths of ``pattern`` (``expand_shards``) after checking, before any sample is read, that
    they are files and hold samples of the ``kind`` loader: each folder's ``index.json`` kind, else the
    first sample's members. ``FileNotFoundError`` / ``ConfigError`` naming ``key``, what was found and what
    to give instead."""
    paths = expand_shards(pattern)
    if not paths:
        raise FileNotFoundError(f"config key '{key}': {pattern!r} matches no files (a shard pattern like "
                                f"'/data/latents/latents-{{000000..000099}}.tar' or '/data/latents/*.tar')")
    for p in paths:
        if os.path.isdir(p):
            raise ConfigError(f"config key '{key}': '{p}' is a folder; give its shard files, "
                              f"e.g. {key}='{os.path.join(p, '*.tar')}'")
        if not os.path.isfile(p):
            raise FileNotFoundError(f"config key '{key}': shard '{p}' does not exist")
    need = _ShardSource._EXTS[kind]
    wanted = " or ".join(f"{k} shards (written by `{PRODUCERS[k]}`)" for k in SHARD_KINDS[kind])
    stages = "/".join(st for st, k in STAGE_KINDS.items() if k == kind)
    unknown = []
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in paths):
        found = read_index(folder).get("kind")
        if found is None:
            unknown.append(folder)
        elif found not in SHARD_KINDS[kind]:
            raise ConfigError(f"config key '{key}': '{folder}' holds {found} shards ({INDEX_NAME} kind {found!r}, "
                              f"written by `{PRODUCERS.get(found, '?')}`), but the {kind} loader (train.stage "
                              f"{stages}) reads {wanted}")
    if unknown:  # no index kind: the first sample of the first such shard tells
        first = next(p for p in paths if os.path.dirname(os.path.abspath(p)) in unknown)
        peek = _first_sample_members(first)
        if peek is not None and not set(need) <= set(peek[1]):
            raise ConfigError(f"config key '{key}': shard '{first}' sample '{peek[0]}' has members {sorted(peek[1])}, "
                              f"but the {kind} loader (train.stage {stages}) needs {list(need)}: give {wanted}")
    return paths


def shard_counts(paths: Sequence[str]) -> list[int]:
    """Samples per shard, from each folder's index.json where it lists the shard, else by scanning."""
    indexes: dict[str, dict] = {}
    counts = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"shard '{p}' (from data.shards) does not exist")
        folder = os.path.dirname(os.path.abspath(p))
        if folder not in indexes:
            indexes[folder] = read_index(folder).get("shards", {})
        n = indexes[folder].get(os.path.basename(p))
        counts.append(int(n) if n is not None else len(scan_tar(p)))
    return counts


class _TarTable:
    """The member table of one shard, compact (numpy): each sample's key and the (data offset, size) of
    each member extension, (-1, -1) where a sample lacks one: 16 bytes per member plus the key. The tables
    of every shard a worker reads stay in memory (an OpenVid-1M-size dataset: about 100 MB per worker)."""

    def __init__(self, path: str):
        samples = scan_tar(path)
        self.keys = np.array([k.encode() for k in samples] or [b""], dtype=bytes)[: len(samples)]
        self.exts = sorted({e for members in samples.values() for e in members})
        self.spans = np.full((len(samples), len(self.exts), 2), -1, dtype=np.int64)  # (N, E, [offset, size])
        col = {e: j for j, e in enumerate(self.exts)}
        for i, members in enumerate(samples.values()):
            for ext, span in members.items():
                self.spans[i, col[ext]] = span

    def __len__(self) -> int:
        return len(self.keys)

    def members(self, index: int) -> tuple[str, dict[str, tuple[int, int]]]:
        """Sample ``index``: its key and {ext: (offset, size)} of the members it has."""
        row = self.spans[index]
        return self.keys[index].decode(), {e: (int(row[j, 0]), int(row[j, 1])) for j, e in enumerate(self.exts)
                                           if row[j, 1] >= 0}


class _ShardReader:
    """Per-process random access to shard samples: the member table of every shard read is kept (a
    shard's headers are scanned once), open file handles are an LRU of ``max_open``. (Bounding the tables
    by the same LRU rescanned a shard on most reads once the shards outnumbered it: with samples drawn
    uniformly over 20 shards of 1000 and 16 cached, 1.3 s per batch of 64 instead of milliseconds.)"""

    def __init__(self, max_open: int):
        self.max_open = max_open
        self.tables: dict[str, _TarTable] = {}
        self.open: OrderedDict[str, Any] = OrderedDict()  # path -> file object, least recently used first

    def _file(self, path: str):
        if path not in self.open:
            if len(self.open) >= self.max_open:
                self.open.popitem(last=False)[1].close()
            self.open[path] = open(path, "rb")
        self.open.move_to_end(path)
        return self.open[path]

    def sample(self, path: str, index: int, exts: Sequence[str], optional: Sequence[str] = ()) -> tuple[str, dict[str, bytes]]:
        if path not in self.tables:
            self.tables[path] = _TarTable(path)
        table = self.tables[path]
        if index >= len(table):
            raise ValueError(f"shard '{path}' holds {len(table)} samples but the index says more (asked {index}); "
                             f"delete {INDEX_NAME} in its folder to rescan")
        key, members = table.members(index)
        f = self._file(path)
        out = {}
        for ext in list(exts) + list(optional):
            if ext not in members:
                if ext in optional:
                    continue
                raise ValueError(f"shard '{path}' sample '{key}' has no '{ext}' member (has {sorted(members)}); "
                                 f"is this the right shard kind for the loader?")
            off, size = members[ext]
            f.seek(off)
            out[ext] = f.read(size)
        return key, out

    def close(self) -> None:
        for f in self.open.values():
            f.close()
        self.open.clear()


# ----------------------------------------------------------------------------------------------
# Sources: random access to N samples
# ----------------------------------------------------------------------------------------------
class _Source:
    kind: str

    def __len__(self) -> int:
        raise NotImplementedError

    def sample(self, i: int) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


_WORDS = ("a", "slow", "fast", "red", "blue", "cat", "dog", "river", "city", "forest", "camera", "pans", "over",
          "walking", "under", "the", "sunset", "rain", "street", "ocean", "mountain", "child", "car", "bird")


class _SyntheticSource(_Source):
    """Deterministic samples at the config's latent geometry: smooth fields drifting over frames (so a
    model can learn something), random prompt embeddings of per-sample length, word captions."""

    def __init__(self, cfg: Config, kind: str):
        self.cfg, self.kind = cfg, kind
        self.n = cfg.data.synthetic_samples

    def __len__(self) -> int:
        return self.n

    def _latents(self, g: torch.Generator) -> Tensor:
        v, m = self.cfg.video, self.cfg.model
        f, c, h, w = v.latent_frames, m.in_channels, v.latent_height, v.latent_width
        base = torch.randn(1, c, max(1, h // 4), max(1, w // 4), generator=g)
        field_ = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)[0]  # (C, H, W)
        field_ = field_ / field_.std().clamp_min(1e-6)
        step = int(torch.randint(-2, 3, (), generator=g))
        return torch.stack([torch.roll(field_, shifts=step * t, dims=-1) for t in range(f)])  # (F, C, H, W)

    def sample(self, i: int) -> dict:
        m = self.cfg.model
        g = torch.Generator().manual_seed(_seed_of(self.cfg.data.seed, 0x5EED, i))
        length = int(torch.randint(1, m.text_len + 1, (), generator=g))
        words = [_WORDS[int(j)] for j in torch.randint(0, len(_WORDS), (int(torch.randint(3, 12, (), generator=g)),), generator=g)]
        out = {"key": f"synthetic{i:08d}", "caption": f"clip {i}: " + " ".join(words),
               "text": torch.randn(length, m.text_dim, generator=g)}
        if self.kind == "prompts":
            return out
        clean = self._latents(g)
        if self.kind == "latents":
            out["latents"] = clean
            return out
        # ODE: the straight flow-matching path between noise and the clean latent at the kept timesteps.
        from .schedule import add_noise, euler_sigmas

        o = self.cfg.prep.ode
        sigmas = euler_sigmas(o.num_steps, o.shift)
        t = torch.tensor([1000.0 * float(sigmas[k]) for k in o.keep_indices], dtype=torch.float64)
        noise = torch.randn(clean.shape, generator=g)
        traj = torch.stack([add_noise(clean[None], noise[None], tk[None])[0] for tk in t])  # (K, F, C, H, W)
        out.update(noise=noise, clean=clean, trajectory=traj, timesteps=t.float())
        return out


class _ShardSource(_Source):
    """Samples of WebDataset shards written by vmla_train.dataprep, by random access."""

    _EXTS = {"latents": ("latents.npy", "text.npy"), "prompts": ("text.npy",),
             "ode": ("noise.npy", "trajectory.npy", "clean.npy", "text.npy")}

    def __init__(self, cfg: Config, kind: str):
        self.cfg, self.kind = cfg, kind
        self.paths = check_shards(cfg.data.shards, kind)
        counts = shard_counts(self.paths)
        self.cum = np.cumsum(counts).tolist()
        if not self.cum or self.cum[-1] == 0:
            raise ValueError(f"data.shards={cfg.data.shards!r}: {len(self.paths)} shards but no samples")
        self.reader: _ShardReader | None = None

    def __len__(self) -> int:
        return self.cum[-1]

    def sample(self, i: int) -> dict:
        if self.reader is None:  # created lazily: one per worker process
            self.reader = _ShardReader(self.cfg.data.max_open_shards)
        s = bisect.bisect_right(self.cum, i)
        local = i - (self.cum[s - 1] if s else 0)
        path = self.paths[s]
        key, raw = self.reader.sample(path, local, self._EXTS[self.kind], optional=("txt", "json"))
        meta = json.loads(raw["json"]) if "json" in raw else {}
        dtype = meta.get("dtype", "float16")
        where = f"shard '{path}' sample '{key}'"
        out = {"key": key, "caption": raw["txt"].decode("utf-8") if "txt" in raw else "",
               "text": decode_array(raw["text.npy"], dtype, where + " text.npy", as_float=False)}
        for name in ("latents", "noise", "trajectory", "clean"):  # stored dtype; converted when batched
            if f"{name}.npy" in raw:
                out[name] = decode_array(raw[f"{name}.npy"], dtype, f"{where} {name}.npy", as_float=False)
        if self.kind == "ode":
            if "timesteps" not in meta:
                raise ValueError(f"{where}: ODE sample without 'timesteps' in its json")
            out["timesteps"] = torch.tensor(meta["timesteps"], dtype=torch.float32)
        out["where"] = where
        return out

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


class _PromptsFileSource(_Source):
    """Prompts of a text file (one per line, blank lines skipped); embedded when a batch is made."""

    kind = "prompts"

    def __init__(self, cfg: Config):
        path = Path(cfg.data.prompts_file)
        if path.is_dir():
            raise ConfigError(f"config key 'data.prompts_file': '{path}' is a folder; expected a text file, "
                              "one prompt per line")
        if not path.is_file():
            raise FileNotFoundError(f"data.prompts_file '{path}' does not exist")
        self.prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not self.prompts:
            raise ValueError(f"data.prompts_file '{path}' holds no prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, i: int) -> dict:
        return {"key": f"prompt{i:08d}", "caption": self.prompts[i]}


# ----------------------------------------------------------------------------------------------
# Order and batches
# ----------------------------------------------------------------------------------------------
class _Order:
    """Global position -> sample index: a fresh seeded permutation of the N samples per pass."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def __call__(self, g: int) -> int:
        k, j = divmod(g, self.n)
        if k not in self._perms:
            if len(self._perms) >= 2:
                self._perms.popitem(last=False)
            self._perms[k] = np.random.Generator(np.random.PCG64(_seed_of(self.seed, 0x0DE5, k))).permutation(self.n)
        return int(self._perms[k][j])


def _pad_text(items: list[Tensor], text_len: int, text_dim: int, where: list[str]) -> tuple[Tensor, Tensor]:
    """Per-sample [L_i, D] -> ([B, text_len, D] float32 zero-padded, mask [B, text_len]); one write per element."""
    text = torch.empty(len(items), text_len, text_dim)
    mask = torch.zeros(len(items), text_len, dtype=torch.bool)
    for b, (t, w) in enumerate(zip(items, where)):
        if t.ndim != 2 or t.shape[1] != text_dim:
            raise ValueError(f"{w}: text embedding shape {tuple(t.shape)}, expected [L, model.text_dim={text_dim}]")
        n = min(t.shape[0], text_len)
        text[b, :n].copy_(t[:n])  # converts the stored dtype
        text[b, n:].zero_()
        mask[b, :n] = True
    return text, mask


class _Batcher:
    """Builds batch number ``p`` of one rank (a pure function of the position)."""

    def __init__(self, cfg: Config, kind: str, source: _Source, rank: int, world_size: int):
        self.cfg, self.kind, self.source = cfg, kind, source
        self.rank, self.world = rank, world_size
        self.order = _Order(len(source), cfg.data.seed)
        v, m = cfg.video, cfg.model
        self.latent_shape = (v.latent_frames, m.in_channels, v.latent_height, v.latent_width)

    def indices(self, p: int) -> list[int]:
        b = self.cfg.data.batch_size
        return [self.order((p * b + j) * self.world + self.rank) for j in range(b)]

    def _stack(self, samples: list[dict], name: str, where: list[str], lead: tuple[int, ...] = ()) -> Tensor:
        """Stack one latent field of every sample into float32 [B, *lead, F, C, H, W], checking shapes."""
        want = lead + self.latent_shape
        out = torch.empty(len(samples), *want)
        for b, (s, w) in enumerate(zip(samples, where)):
            x = s[name]
            if tuple(x.shape) != want:
                raise ValueError(f"{w}: {name} shape {tuple(x.shape)}, expected {list(want)} "
                                 f"(video.num_frames/height/width and model.in_channels of this config)")
            out[b].copy_(x)  # converts the stored dtype
        return out

    def _check(self, s: dict) -> None:
        """The shapes a batch needs, per sample (so a bad one is replaced, not the whole batch lost)."""
        where, m = s.get("where", s["key"]), self.cfg.model
        t = s.get("text")
        if t is not None and (t.ndim != 2 or t.shape[1] != m.text_dim):
            raise ValueError(f"{where}: text embedding shape {tuple(t.shape)}, expected [L, model.text_dim={m.text_dim}]")
        for name in ("latents", "noise", "clean"):
            if name in s and tuple(s[name].shape) != self.latent_shape:
                raise ValueError(f"{where}: {name} shape {tuple(s[name].shape)}, expected {list(self.latent_shape)} "
                                 f"(video.num_frames/height/width and model.in_channels of this config)")

    def _readable(self, i: int) -> tuple[dict, int]:
        """Sample ``i``, or the next readable index after it (mod N); returns it and how many were skipped."""
        n, first = len(self.source), None
        for k in range(n):
            j = (i + k) % n
            try:
                s = self.source.sample(j)
                self._check(s)
                return s, k
            except (ValueError, OSError) as e:
                first = first or e
                log.warning("data: skipping sample %d (%s); trying sample %d", j, e, (j + 1) % n)
        raise ValueError(f"{first} -- and none of the source's {n} samples is readable") from None

    def __call__(self, p: int):
        read = [self._readable(i) for i in self.indices(p)]
        samples, skipped = [s for s, _ in read], sum(k for _, k in read)
        where = [s.get("where", s["key"]) for s in samples]
        captions = [s["caption"] for s in samples]
        m = self.cfg.model
        if "text" not in samples[0]:  # prompts file: embedded in the main process (see StatefulLoader)
            return PromptBatch(text=torch.empty(0), text_mask=torch.empty(0, dtype=torch.bool), captions=captions,
                               skipped=skipped)
        text, mask = _pad_text([s["text"] for s in samples], m.text_len, m.text_dim, where)
        if self.kind == "prompts":
            return PromptBatch(text=text, text_mask=mask, captions=captions, skipped=skipped)
        if self.kind == "latents":
            return LatentBatch(latents=self._stack(samples, "latents", where), text=text, text_mask=mask, captions=captions,
                               skipped=skipped)
        ts = samples[0]["timesteps"]
        for s, w in zip(samples, where):
            if not torch.equal(s["timesteps"], ts):
                raise ValueError(f"{w}: ODE timesteps {s['timesteps'].tolist()} differ from {ts.tolist()} "
                                 f"of {where[0]} (mixing shards made with different prep.ode settings)")
        k = ts.numel()
        return OdeBatch(noise=self._stack(samples, "noise", where), trajectory=self._stack(samples, "trajectory", where, (k,)),
                        timesteps=ts, clean=self._stack(samples, "clean", where), text=text, text_mask=mask,
                        captions=captions, skipped=skipped)


class _BatchStream(torch.utils.data.IterableDataset):
    """Worker ``w`` of ``W`` makes batches start + w, start + w + W, ...; the DataLoader's round-robin
    over workers returns them in order."""

    def __init__(self, batcher: _Batcher, start: int):
        self.batcher, self.start = batcher, start

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        p = self.start + w
        try:
            while True:
                yield p, self.batcher(p)
                p += n
        finally:
            self.batcher.source.close()


class StatefulLoader:
    """Endless, deterministic, resumable batches of one kind for one rank (see the module docstring)."""

    def __init__(self, cfg: Config, kind: str, source: _Source, rank: int, world_size: int):
        self.cfg, self.kind, self.rank, self.world_size = cfg, kind, rank, world_size
        self.batcher = _Batcher(cfg, kind, source, rank, world_size)
        self.position = 0  # batches this rank has consumed
        self.skipped_samples = 0  # unreadable samples replaced so far on this rank (see the module docstring)
        self._it: Iterator | None = None
        self._text_model = None

    # -- epochs ---------------------------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        return self.cfg.data.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    @property
    def batch_in_epoch(self) -> int:
        return self.position % self.batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def num_samples(self) -> int:
        return len(self.batcher.source)

    def epoch_batches(self) -> Iterator:
        """The rest of the current epoch (exactly ``batches_per_epoch`` batches from an epoch start)."""
        for _ in range(self.batches_per_epoch - self.batch_in_epoch):
            yield next(self)

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> "StatefulLoader":
        return self

    def __next__(self):
        if self._it is None:
            self._it = self._start(self.position)
        p, batch = next(self._it)
        if p != self.position:  # the round-robin order is the determinism guarantee: check it
            raise RuntimeError(f"loader produced batch {p}, expected {self.position} (rank {self.rank})")
        self.position += 1
        self.skipped_samples += batch.skipped
        if isinstance(batch, PromptBatch) and batch.text.numel() == 0:
            batch = self._embed(batch.captions)
        return batch

    def _start(self, start: int) -> Iterator:
        d = self.cfg.data
        stream = _BatchStream(self.batcher, start)
        if d.num_workers == 0:
            return iter(stream)
        dl = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=d.num_workers,
                                         prefetch_factor=d.prefetch_factor, persistent_workers=False)
        return iter(dl)

    def close(self) -> None:
        """Stop the worker processes (a later ``next`` restarts them at the current position)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        elif it is not None and hasattr(it, "close"):
            it.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _embed(self, captions: list[str]) -> PromptBatch:
        """Prompts-file source: umT5 embeddings of the captions (model from data.text_encoder, loaded once)."""
        from . import wan

        if self._text_model is None:
            self._text_model = wan.load_text_encoder(self.cfg.data.text_encoder, dtype=torch.float32)
        tok, enc = self._text_model
        text, mask = wan.encode_prompts(tok, enc, captions, self.cfg.model.text_len)
        if text.shape[-1] != self.cfg.model.text_dim:
            raise ValueError(f"data.text_encoder '{self.cfg.data.text_encoder}' gives width {text.shape[-1]}, "
                             f"expected model.text_dim={self.cfg.model.text_dim}")
        return PromptBatch(text=text.float().cpu(), text_mask=mask.cpu(), captions=captions)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Small, JSON-able: the global number of samples consumed (all ranks) plus what it depends on."""
        d = self.cfg.data
        return {
            "version": STATE_VERSION, "kind": self.kind, "source": d.source.value, "seed": d.seed,
            "num_samples": self.num_samples, "batch_size": d.batch_size, "world_size": self.world_size,
            "position": self.position, "global_samples": self.position * d.batch_size * self.world_size,
            "skipped_samples": self.skipped_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the samples ``state`` had consumed. World size and batch size may differ from
        the saved run as long as the global sample count divides evenly into this run's batches."""
        d = self.cfg.data
        for key, mine in (("version", STATE_VERSION), ("kind", self.kind), ("source", d.source.value),
                          ("seed", d.seed), ("num_samples", self.num_samples)):
            if state.get(key) != mine:
                raise ValueError(f"loader state '{key}' is {state.get(key)!r} but this loader has {mine!r}: "
                                 "the saved order does not apply (same data.seed and shards needed)")
        step = d.batch_size * self.world_size
        g = int(state["global_samples"])
        if g % step:
            raise ValueError(f"loader state: {g} samples consumed is not a multiple of data.batch_size x "
                             f"world_size = {step}; resume with a batch size / world size that divides it")
        self.close()
        self.position = g // step
        self.skipped_samples = int(state.get("skipped_samples", 0))


def build_loader(cfg: Config, kind: str, rank: int = 0, world_size: int = 1) -> StatefulLoader:
    """Batches of ``kind`` (``latents`` | ``prompts`` | ``ode``) for ``rank`` of ``world_size``."""
    if kind not in KINDS:
        raise ValueError(f"loader kind {kind!r}: expected one of {list(KINDS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in 0..world_size-1 (world_size={world_size})")
    d = cfg.data
    if d.source == DataSource.shards and not d.shards:
        raise ValueError("config key 'data.shards': expected a shard pattern when data.source=shards, found ''")
    if d.source == DataSource.prompts_file and not (d.prompts_file and d.text_encoder):
        raise ValueError("config keys 'data.prompts_file' and 'data.text_encoder': both needed when "
                         f"data.source=prompts_file, found {d.prompts_file!r}, {d.text_encoder!r}")
    if d.source == DataSource.synthetic:
        source: _Source = _SyntheticSource(cfg, kind)
    elif d.source == DataSource.shards:
        source = _ShardSource(cfg, kind)
    else:
        if kind != "prompts":
            raise ValueError(f"data.source=prompts_file gives prompts only, but the '{kind}' loader was asked for")
        source = _PromptsFileSource(cfg)
        from .wan import text_encoder_folders

        text_encoder_folders(d.text_encoder, key="data.text_encoder")  # a wrong folder fails here, not at the first batch
    return StatefulLoader(cfg, kind, source, rank, world_size)


__all__ = ["KINDS", "STAGE_KINDS", "LatentBatch", "OdeBatch", "PromptBatch", "StatefulLoader", "build_loader", "check_shards", "decode_array",
           "encode_array", "expand_shards", "read_index", "scan_tar", "shard_counts"]
