"""Student checkpoint folders: ``model.safetensors`` (sharded past a size) + ``config.yaml``.

A student folder is what conversion writes, what ``vmla-train export`` writes and what every CLI
loads by path::

    OUT/
      config.yaml                       the full student config (loadable with vmla_train.config.load)
      model.safetensors                 or model-00001-of-0000N.safetensors + model.safetensors.index.json

Folders are written to a temporary sibling and renamed at the end: a crash never leaves a partial one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file

from . import config as C

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 4 << 30


class CheckpointError(RuntimeError):
    """A checkpoint folder or file that cannot be used; the message names the file or key."""


class AtomicDir:
    """``with AtomicDir(out) as tmp: write into tmp`` -> ``out`` appears complete or not at all."""

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        if self.out.exists() and not self.overwrite:
            raise CheckpointError(f"output folder '{self.out}' already exists (choose another or remove it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.tmp-"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)


def save_state_dict(state: Mapping[str, torch.Tensor], folder: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write ``state`` into ``folder`` as one file or shards + index. Returns the file names."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_NAME))
        return [SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name))
        weight_map.update({k: name for k in shard})
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return names


def state_dict_files(folder: Path) -> list[Path]:
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"'{index}': not a safetensors index ({e})") from None
        files = sorted({folder / n for n in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"'{index}' names shard(s) that do not exist: {missing}")
        return files
    raise CheckpointError(f"'{folder}': no {SINGLE_NAME} and no {INDEX_NAME}")


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in state_dict_files(Path(folder)):
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"'{f}': cannot read safetensors ({e})") from None
    return state


def save_student(state: Mapping[str, torch.Tensor], cfg: C.Config, out: str | Path, overwrite: bool = False,
                 extra_files: Mapping[str, str] | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Atomically write a student folder (weights + config + optional text files)."""
    with AtomicDir(out, overwrite) as tmp:
        save_state_dict(state, tmp, max_shard_bytes)
        (tmp / "config.yaml").write_text(C.to_yaml(cfg))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def load_config(folder: str | Path, overrides: Iterable[str] = ()) -> C.Config:
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"'{folder}' is not a student folder: '{path}' is missing")
    return C.load(path, list(overrides))


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise naming the first missing / unexpected key or shape mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"'{source}' does not match the config's model: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"'{source}': key '{k}' has shape {tuple(v.shape)}, the config's model expects {tuple(own[k].shape)}"
            )


def load_student(folder: str | Path, overrides: Iterable[str] = (), device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None):
    """Build the student from ``folder/config.yaml`` (+ overrides) and load its weights."""
    from .student import WanStudent  # local: keeps this module importable without building models

    cfg = load_config(folder, overrides)
    with torch.device("meta"):
        model = WanStudent(cfg)
    state = load_state_dict(folder)
    check_state_dict(model, state, str(folder))
    model = model.to_empty(device=device)
    model.load_state_dict(state)
    if dtype is not None:
        model = model.to(dtype)
    return model, cfg


class ShardWriter:
    """Write a state dict tensor by tensor: a shard is flushed to disk once it passes ``max_shard_bytes``.

    ``add(name, tensor)`` as tensors become ready, ``close()`` at the end: one shard becomes
    ``model.safetensors``, several become ``model-0000i-of-0000N.safetensors`` + index (the same files
    ``save_state_dict`` writes). At most one shard is held in memory. Write into an ``AtomicDir``.
    """

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []  # (temporary file, keys)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in keys for _, keys in self._written):
            raise CheckpointError(f"tensor '{name}' written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._written):05d}.safetensors"
        save_file(self._pending, str(path))
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush the last shard, give the files their final names, write the index. Returns the names."""
        if self._pending or not self._written:
            self._flush()
        if len(self._written) == 1:
            os.replace(self._written[0][0], self.folder / SINGLE_NAME)
            return [SINGLE_NAME]
        n = len(self._written)
        names, weight_map = [], {}
        for i, (path, keys) in enumerate(self._written):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        (self.folder / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=1))
        return names
