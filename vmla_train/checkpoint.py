"""Training checkpoints: named files + a JSON manifest written last, atomic, last K kept.

Layout (one folder per save; the manifest is the completion mark)::

    RUN_DIR/checkpoints/step-00000100/
      student/ or student.ckpt     the student engine: weights + AdamW state (Fabric's format for the
                                   strategy: one file on a single device / DDP, a folder of ZeRO or FSDP
                                   shards under DeepSpeed / FSDP; every engine saved to its own path)
      critic/ or critic.ckpt       the critic engine, likewise (self_forcing only)
      ema.safetensors              EMA of the student (rank 0; absent before dmd.ema_start_step)
      rng-rank{R}.pt               torch CPU/CUDA, Python and NumPy RNG states of rank R
      loader-rank{R}.json          the data loader's state on rank R
      train_state.json             counters (student/critic steps, iteration), W&B run id, losses so far
      config.yaml                  the resolved config
      manifest.json                what is in here (every file with its size and SHA-256), written
                                   last: a folder without it is incomplete and never loaded

Writes go to ``.tmp-step-NNNNNNNN`` first; rank 0 writes the manifest and renames the folder when
every rank has written its files. Everything loads with ``torch.load(weights_only=True)``, safetensors
or JSON (DeepSpeed engines load through DeepSpeed's own loader, Fabric's ``load``).

Faults (README "Fault tolerance"): ``verify`` checks a folder against its manifest (missing file, size,
SHA-256) before anything is loaded; ``usable_checkpoints`` lists the complete ones newest first, and the
loop falls back to the next one when a folder fails verification or loading. ``clean_incomplete``
removes temp folders and manifest-less step folders left by a crash.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import atomic_write_text
from .student_io import CheckpointError

STEP_RE = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: per-file size + SHA-256 in the manifest


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step-{step:08d}"


def tmp_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f".tmp-step-{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders (with a manifest), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def usable_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, newest first (the resume order: fall back down the list)."""
    return complete_checkpoints(run_dir)[::-1]


def clean_incomplete(run_dir: str | Path) -> list[Path]:
    """Rank 0 at start: remove what a crash left behind (temp folders, step folders without a
    manifest); they are never loaded either way. Returns what was removed."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and (p.name.startswith(".tmp-step-") or
                                                          (STEP_RE.match(p.name) and not (p / MANIFEST).is_file()))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(folder: Path) -> None:
    """Raise ``CheckpointError`` naming the file when ``folder`` does not match its manifest."""
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{folder}': unreadable {MANIFEST} ({e})") from None
    sums = manifest.get("sha256")
    if sums is None:  # format 1: names only
        sums = {f: None for f in manifest.get("files", [])}
    for name, digest in sums.items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint '{folder}': file '{name}' listed in {MANIFEST} is missing")
        size = manifest.get("sizes", {}).get(name)
        if size is not None and f.stat().st_size != size:
            raise CheckpointError(f"checkpoint '{folder}': file '{name}' has {f.stat().st_size} bytes, the manifest "
                                  f"says {size} (truncated or overwritten)")
        if digest is not None and sha256_of(f) != digest:
            raise CheckpointError(f"checkpoint '{folder}': file '{name}' fails its SHA-256 check (corrupted)")


def engine_path(folder: Path, name: str, sharded: bool) -> Path:
    """Where an engine is saved: a folder for sharded strategies, a file otherwise."""
    return folder / (name if sharded else f"{name}.ckpt")


# ----------------------------------------------------------------------------------------------
# RNG states (per rank)
# ----------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every RNG that can influence training on this rank, as tensors / ints (weights_only-loadable)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python_version": py[0],
        "python_state": torch.tensor(py[1], dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": np_state[2],
        "numpy_has_gauss": np_state[3],
        "numpy_cached_gauss": np_state[4],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()), None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]),
                         int(state["numpy_has_gauss"]), float(state["numpy_cached_gauss"])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Save / load of the small files (the engines are saved by the loop through Fabric)
# ----------------------------------------------------------------------------------------------
def save_rank_files(folder: Path, rank: int, loader_state: dict) -> None:
    torch.save(rng_state(), folder / f"rng-rank{rank}.pt")
    atomic_write_text(folder / f"loader-rank{rank}.json", json.dumps(loader_state, indent=1))


def load_rank_files(folder: Path, rank: int) -> tuple[dict, dict]:
    rng_file, loader_file = folder / f"rng-rank{rank}.pt", folder / f"loader-rank{rank}.json"
    for f in (rng_file, loader_file):
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint '{folder}' has no '{f.name}': saved with fewer ranks than rank {rank}?")
    return torch.load(rng_file, weights_only=True), json.loads(loader_file.read_text())


def save_ema(folder: Path, ema_state: dict[str, torch.Tensor]) -> None:
    if ema_state:
        save_file({k: v.contiguous() for k, v in ema_state.items()}, str(folder / "ema.safetensors"))


def load_ema(folder: Path) -> dict[str, torch.Tensor]:
    f = folder / "ema.safetensors"
    return load_file(str(f)) if f.is_file() else {}


def finalize(run_dir: str | Path, step: int, train_state: dict, config_yaml: str, keep_last: int,
             checksums: bool = True) -> Path:
    """Rank 0, after every rank wrote its files: state + config + manifest (last), rename, prune.
    ``checksums``: SHA-256 per file (reads everything back once; off for very large engines)."""
    tmp, final = tmp_dir(run_dir, step), step_dir(run_dir, step)
    atomic_write_text(tmp / "train_state.json", json.dumps(train_state, indent=1))
    atomic_write_text(tmp / "config.yaml", config_yaml)
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    manifest = {"format_version": FORMAT_VERSION, "step": step, "stage": train_state.get("stage"),
                "strategy": train_state.get("strategy"), "world_size": train_state.get("world_size"),
                "wandb_run_id": train_state.get("wandb_run_id"), "files": files,
                "sizes": {f: (tmp / f).stat().st_size for f in files},
                "sha256": {f: sha256_of(tmp / f) if checksums else None for f in files}}
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prepare(run_dir: str | Path, step: int) -> Path:
    """Rank 0, before any rank writes: a fresh temp folder (removing a stale one from a crash)."""
    tmp = tmp_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def read_train_state(folder: Path) -> dict:
    return json.loads((folder / "train_state.json").read_text())


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())
