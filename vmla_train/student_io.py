"""Student checkpoint folders: ``model.safetensors`` (sharded past a size) + ``config.yaml``.

A student folder is what conversion writes, what ``vmla-train export`` writes and what every CLI
loads by path::

    OUT/
      config.yaml                       the full student config (loadable with vmla_train.config.load)
      model.safetensors                 or model-00001-of-0000N.safetensors + model.safetensors.index.json
      manifest.json                     every other file with its size and SHA-256, what wrote the folder
                                        ("kind", "producer"); written last

Folders are written to a temporary sibling and swapped in at the end: a crash never leaves a partial one,
and an output being replaced stays in place until the new one is complete. ``load_student`` checks the
files against the manifest (``verify``; folders written before manifests existed load with a warning).

Manifests are shared with training checkpoints (``write_manifest`` / ``verify_manifest``). They are also
what ``--overwrite`` trusts: ``check_output`` lets a writer replace only a folder whose manifest says the
same producer wrote the same kind of output, and never the source, a folder holding it, a folder inside it
or a training run folder (docs/fault-tolerance.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from . import config as C

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 4 << 30


MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: per-file size + SHA-256
RUN_FOLDER_MARKS = ("checkpoints", "metrics.jsonl", "wandb_run_id")  # what a training run folder holds

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint folder or file that cannot be used; the message names the file or key."""


class OutputError(CheckpointError):
    """An output folder that must not be written or replaced; the message names it and why."""


# ----------------------------------------------------------------------------------------------
# Manifests: every file of a folder with its size and SHA-256 (checkpoints and written outputs)
# ----------------------------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


def write_manifest(folder: Path, checksums: bool = True, **fields) -> dict:
    """Write ``folder/manifest.json`` listing every file below ``folder`` (relative names) with its size in
    bytes and, when ``checksums``, its SHA-256 (None otherwise: reads every file once). ``fields`` (kind,
    producer, step, ...) are stored beside. Call it last: the manifest marks the folder complete."""
    folder = Path(folder)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format_version": MANIFEST_VERSION, **fields, "files": files,
                "sizes": {f: (folder / f).stat().st_size for f in files},
                "sha256": {f: sha256_of(folder / f) if checksums else None for f in files}}
    C.atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, allow_nan=False))
    return manifest


def verify_manifest(folder: Path, what: str = "checkpoint", checksums: bool = True, hint: str = "") -> None:
    """Raise ``CheckpointError`` naming the file when ``folder`` does not match its manifest: a listed file
    missing, a size that differs, a SHA-256 that differs (hashed only when ``checksums`` and recorded).
    ``what`` names the folder's kind in the message, ``hint`` (appended) says what to do."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what} '{folder}': unreadable {MANIFEST} ({e}){hint}") from None
    sums = manifest.get("sha256")
    if sums is None:  # format 1: names only
        sums = {f: None for f in manifest.get("files", [])}
    for name, digest in sums.items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"{what} '{folder}': file '{name}' listed in {MANIFEST} is missing{hint}")
        size = manifest.get("sizes", {}).get(name)
        if size is not None and f.stat().st_size != size:
            raise CheckpointError(f"{what} '{folder}': file '{name}' has {f.stat().st_size} bytes, the manifest "
                                  f"says {size} (truncated or overwritten){hint}")
        if checksums and digest is not None and sha256_of(f) != digest:
            raise CheckpointError(f"{what} '{folder}': file '{name}' fails its SHA-256 check (corrupted){hint}")


# ----------------------------------------------------------------------------------------------
# Output folders: what --overwrite may replace, and the atomic write / swap
# ----------------------------------------------------------------------------------------------
def is_run_folder(folder: Path) -> bool:
    """A training run folder (``vmla-train fit``'s ``runtime.run_dir``). Its checkpoint folders are refused
    by their manifests (kind ``checkpoint``)."""
    return any((Path(folder) / m).exists() for m in RUN_FOLDER_MARKS)


def check_output(out: str | Path, overwrite: bool, kind: str, producer: str, sources: Sequence[str | Path] = ()) -> None:
    """Raise ``OutputError`` (one line naming ``out`` and why) unless ``out`` may be written: it does not exist,
    or ``overwrite`` is set and ``out`` is a previous output of ``producer`` of the same ``kind`` (its
    manifest says so) that is not one of ``sources``, does not contain one, does not lie inside one and is
    not a training run folder."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise OutputError(f"output folder '{out}' already exists (choose another or remove it; --overwrite "
                          f"replaces only a previous {producer} output)")
    target = out.resolve()
    reason = ""
    for src in sources:
        s = Path(src).resolve()
        if target == s:
            reason = f"is the source '{src}'"
        elif s.is_relative_to(target):
            reason = f"contains the source '{src}'"
        elif target.is_relative_to(s):
            reason = f"lies inside the source '{src}'"
        if reason:
            break
    if not reason:
        if not target.is_dir():
            reason = "is not a folder"
        elif is_run_folder(target):
            reason = "is a training run folder (checkpoints, metrics, W&B)"
        else:
            try:
                mark = read_manifest(target)
            except (OSError, ValueError):
                mark = None
            if not isinstance(mark, dict) or (mark.get("kind"), mark.get("producer")) != (kind, producer):
                found = "no readable " + MANIFEST if not isinstance(mark, dict) else \
                    f"a {MANIFEST} of kind '{mark.get('kind')}' by '{mark.get('producer')}'"
                reason = f"is not a previous {producer} output ({found})"
    if reason:
        raise OutputError(f"refusing to replace output folder '{out}': it {reason}; --overwrite replaces only a "
                          f"previous {producer} output (choose another folder or remove it yourself)")


class AtomicDir:
    """``with AtomicDir(out) as tmp: write into tmp`` -> ``out`` appears complete or not at all.

    The new folder is written to a temporary sibling ``.OUT.tmp-*``; on success an existing ``out`` is
    moved aside (``.OUT.old-*``), the new folder renamed to ``out`` and the old one removed, so the previous
    output stays intact until the new one is complete (a failure while writing removes only the temporary
    folder; a failed rename puts the old one back). With ``kind`` and ``producer`` the folder gets a
    manifest (``write_manifest``, SHA-256 when ``checksums``) and ``check_output`` guards ``out`` against
    ``sources`` (before writing and again before the swap); without them any ``out`` may be replaced when
    ``overwrite`` (outputs that are not pipeline folders, e.g. a report).
    """

    def __init__(self, out: str | Path, overwrite: bool = False, kind: str | None = None, producer: str | None = None,
                 sources: Sequence[str | Path] = (), checksums: bool = True):
        self.out = Path(out)
        self.overwrite = overwrite
        self.kind, self.producer, self.sources, self.checksums = kind, producer, tuple(sources), checksums

    def _check(self) -> None:
        if self.kind is not None:
            check_output(self.out, self.overwrite, self.kind, self.producer or self.kind, self.sources)
        elif self.out.exists() and not self.overwrite:
            raise OutputError(f"output folder '{self.out}' already exists (choose another or remove it)")

    def __enter__(self) -> Path:
        self._check()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.tmp-"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            if self.kind is not None:
                write_manifest(self.tmp, self.checksums, kind=self.kind, producer=self.producer or self.kind)
            self._check()  # out may have appeared or changed while the new folder was written
            C.honour_umask(self.tmp)  # mkdtemp and safetensors create 0700 / 0600: teammates must read outputs
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if not (self.out.exists() or self.out.is_symlink()):
            os.replace(self.tmp, self.out)
            return
        old = self.out.with_name(f".{self.out.name}.old-{self.tmp.name.rsplit('-', 1)[-1]}")
        os.replace(self.out, old)
        try:
            os.replace(self.tmp, self.out)
        except BaseException:
            os.replace(old, self.out)  # the previous output back where it was
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


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
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1, allow_nan=False))
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


STUDENT = "student"  # the manifest's kind of a student folder
STUDENT_HINT = ("; write the folder again (vmla-convert / vmla-train export) or restore it from a copy, "
                "then load it again")


def save_student(state: Mapping[str, torch.Tensor], cfg: C.Config, out: str | Path, overwrite: bool = False,
                 extra_files: Mapping[str, str] | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 producer: str = "save_student", sources: Sequence[str | Path] = ()) -> Path:
    """Atomically write a student folder (weights + config + optional text files + manifest, SHA-256 per
    ``cfg.checkpoint.checksums``). ``overwrite`` replaces only a previous student folder of ``producer``
    that is none of ``sources`` nor holds or lies inside one (``check_output``)."""
    with AtomicDir(out, overwrite, kind=STUDENT, producer=producer, sources=sources,
                   checksums=cfg.checkpoint.checksums) as tmp:
        save_state_dict(state, tmp, max_shard_bytes)
        (tmp / "config.yaml").write_text(C.to_yaml(cfg))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def verify_student(folder: str | Path, checksums: bool = True) -> None:
    """Check a student folder against its manifest (sizes; SHA-256 when ``checksums``): ``CheckpointError``
    naming the file and what to do. A folder without a manifest (written before manifests existed) passes
    with a one-line warning."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        verify_manifest(folder, "student folder", checksums, STUDENT_HINT)
    else:
        log.warning(f"student folder '{folder}' has no {MANIFEST} (written by an older version): its files are "
                    f"not verified; write it again to add one")


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
                 dtype: torch.dtype | None = None, verify: bool | None = None):
    """Build the student from ``folder/config.yaml`` (+ overrides) and load its weights, after checking the
    files against the folder's manifest (``verify_student``). ``verify``: hash every file (SHA-256); None
    follows ``checkpoint.checksums`` of the folder's config + overrides (``checkpoint.checksums=false`` on a
    command line skips the hashing); sizes are always checked."""
    from .student import WanStudent  # local: keeps this module importable without building models

    cfg = load_config(folder, overrides)
    verify_student(folder, cfg.checkpoint.checksums if verify is None else verify)
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
            json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=1, allow_nan=False))
        return names
