"""Training checkpoints: named files + a JSON manifest written last, atomic, last K kept.

Layout (one folder per save; the manifest is the completion mark)::

    RUN_DIR/checkpoints/step-00000100/
      student/ or student.ckpt     the student engine: weights + AdamW state (Fabric's format for the
                                   strategy: one file on a single device / DDP, a folder of ZeRO or FSDP
                                   shards under DeepSpeed / FSDP; every engine saved to its own path)
      critic/ or critic.ckpt       the critic engine, likewise (self_forcing only)
      ema.safetensors              EMA of the student (rank 0; absent before dmd.ema_start_step, or train.ema_start_step outside self_forcing)
      rng-rank{R}.pt               torch CPU/CUDA, Python and NumPy RNG states of rank R
      loader-rank{R}.json          the data loader's state on rank R
      train_state.json             counters (student/critic steps, iteration), W&B run id, losses so far
      config.yaml                  the resolved config
      manifest.json                what is in here (every file with its size and SHA-256), written
                                   last: a folder without it is incomplete and never loaded

Writes go to ``.tmp-step-NNNNNNNN`` first; rank 0 writes the manifest and renames the folder when
every rank has written its files. Everything loads with ``torch.load(weights_only=True)``, safetensors
or JSON (DeepSpeed engines load through DeepSpeed's own loader, Fabric's ``load``).

Faults (docs/fault-tolerance.md): ``verify`` checks a folder against its manifest (missing file, size,
SHA-256) before anything is loaded; ``usable_checkpoints`` lists the complete ones newest first, and
``resume`` falls back to the next one when a folder fails verification or loading. ``clean_incomplete``
removes temp folders and manifest-less step folders left by a crash. ``save`` names the rank whose write
failed and never leaves a rank waiting for ever (``checkpoint.save_timeout_s``).

Config changes at resume: ``resume`` compares the resolved config with the one each checkpoint holds, prints
every changed key (old -> new) and refuses (``ConfigError``) changes of keys outside ``FREE_KEYS`` unless
``checkpoint.allow_config_change=true``; ``record_config`` keeps the run folder's history of resolved configs
(``config.yaml`` = the first, ``config-resume-<step>.yaml`` per resume that changed something).

The loop's side (every rank, through Fabric) is at the end: ``resume_candidates``, ``save`` and
``resume`` of a ``state.TrainState``, and ``export_student`` (a plain student folder from a checkpoint).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import config as C
from . import parallel
from omegaconf import OmegaConf

from .config import atomic_write_text, honour_umask, json_finite
from .state import TrainState
# the manifest code is shared with student folders (student_io); read_manifest and sha256_of are used from here too
from .student_io import (MANIFEST, STUDENT, CheckpointError, check_output, read_manifest, save_student,  # noqa: F401
                         sha256_of, verify_manifest, write_manifest)

STEP_RE = re.compile(r"^step-(\d{8})$")


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


def verify(folder: Path) -> None:
    """Raise ``CheckpointError`` naming the file when ``folder`` does not match its manifest (missing file,
    size, SHA-256 where recorded)."""
    verify_manifest(folder, "checkpoint")


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
    atomic_write_text(folder / f"loader-rank{rank}.json", json.dumps(loader_state, indent=1, allow_nan=False))


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
    atomic_write_text(tmp / "train_state.json", json.dumps(json_finite(train_state), indent=1, allow_nan=False))
    atomic_write_text(tmp / "config.yaml", config_yaml)
    write_manifest(tmp, checksums, kind="checkpoint", producer="vmla-train fit", step=step, stage=train_state.get("stage"),
                   strategy=train_state.get("strategy"), world_size=train_state.get("world_size"),
                   wandb_run_id=train_state.get("wandb_run_id"))
    honour_umask(tmp)  # mkdtemp and safetensors create 0700 / 0600: teammates must read checkpoints
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


# ----------------------------------------------------------------------------------------------
# Config changes at resume
# ----------------------------------------------------------------------------------------------
# Keys that may differ from the checkpoint's config without changing what the run trains: its length, where
# and how fast it runs, what it logs, validates and saves (a trailing '.' covers a section). Every other key
# (model, attention, cache, video, schedule, optim, dmd, the rest of train/data/runtime/strategy, prep) changes
# the meaning of the run and needs checkpoint.allow_config_change=true. Listed in docs/fault-tolerance.md.
FREE_KEYS = ("train.num_steps", "train.max_consecutive_skips", "train.gradient_checkpointing", "train.compile",
             "train.compile_mode", "train.allow_random_roles",
             "runtime.progress", "runtime.run_dir", "runtime.device",
             "data.num_workers", "data.prefetch_factor", "data.max_open_shards", "strategy.offload",
             "logging.", "checkpoint.", "validation.", "debug.", "demo.", "convert.", "generate.")
RUN_CONFIG = "config.yaml"


def is_free_key(key: str) -> bool:
    """Whether dotted ``key`` may change at resume without ``checkpoint.allow_config_change``."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in FREE_KEYS)


def _flat(cfg: C.Config) -> dict[str, Any]:
    """The resolved config as {dotted key: value}; lists are one value (``schedule.denoising_steps``)."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True), "")
    return out


def config_changes(old: C.Config, new: C.Config) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key whose resolved value differs, in schema order."""
    a, b = _flat(old), _flat(new)
    return [(k, a.get(k), b.get(k)) for k in b if a.get(k) != b.get(k)] + [(k, a[k], None) for k in a if k not in b]


def saved_config(folder: Path) -> C.Config:
    """The resolved config a checkpoint holds (``folder/config.yaml``); ``ConfigError`` naming the folder when it
    does not load under this version's schema."""
    try:
        return C.load(folder / RUN_CONFIG)
    except C.ConfigError as e:
        raise C.ConfigError(f"checkpoint '{folder}': its {RUN_CONFIG} does not load ({e}); pass "
                            f"checkpoint.allow_config_change=true to resume without comparing configs") from None


def check_config(fabric, cfg: C.Config, folder: Path) -> list[tuple[str, Any, Any]]:
    """Compare ``cfg`` with the config of checkpoint ``folder`` before it is loaded: rank 0 prints one line per
    changed key (old -> new); a change of a key outside ``FREE_KEYS`` raises ``ConfigError`` (one line naming
    the keys) unless ``checkpoint.allow_config_change``. Every rank reads the same files, so every rank
    raises together. Returns the changes."""
    try:
        old = saved_config(folder)
    except C.ConfigError:
        if not cfg.checkpoint.allow_config_change:
            raise
        fabric.print(f"warning: checkpoint '{folder}': {RUN_CONFIG} does not load; resuming without comparing "
                     "configs (checkpoint.allow_config_change=true)")
        return []
    changes = config_changes(old, cfg)
    for key, a, b in changes:
        fabric.print(f"config change at resume from {folder.name}: {key}: {_shown(a)} -> {_shown(b)}")
    bound = [key for key, _, _ in changes if not is_free_key(key)]
    if bound and not cfg.checkpoint.allow_config_change:
        raise C.ConfigError(
            f"resuming '{folder}' would change keys that alter the meaning of the run: {', '.join(bound)} (keep the "
            f"checkpoint's values, train in a new runtime.run_dir, or pass checkpoint.allow_config_change=true)")
    if bound:
        fabric.print(f"warning: resuming with {', '.join(bound)} changed (checkpoint.allow_config_change=true)")
    return changes


def _shown(value: Any) -> str:
    return "<absent>" if value is None else json.dumps(value)


def record_config(run_dir: str | Path, cfg: C.Config, resumed: Path | None) -> Path | None:
    """Rank 0, after ``resume``: keep the run folder's history of resolved configs (atomic writes).
    A fresh start (nothing resumed) writes ``config.yaml``; a resume never rewrites it (one from before it
    existed gets the checkpoint's config) and writes ``config-resume-<step>.yaml`` when ``cfg`` differs from
    the checkpoint's config (``-2``, ``-3``... when a different one of that step is already there). Returns
    the file written, or None."""
    run_dir = Path(run_dir)
    first, text = run_dir / RUN_CONFIG, C.to_yaml(cfg)
    if resumed is None:
        atomic_write_text(first, text)
        return first
    if not first.is_file():
        atomic_write_text(first, (resumed / RUN_CONFIG).read_text())
    try:
        if not config_changes(saved_config(resumed), cfg):
            return None
    except C.ConfigError:  # unreadable old config, resumed with allow_config_change: record the new one
        pass
    step, n = read_train_state(resumed)["step"], 1
    path = run_dir / f"config-resume-{step:08d}.yaml"
    while path.is_file() and path.read_text() != text:
        n += 1
        path = run_dir / f"config-resume-{step:08d}-{n}.yaml"
    atomic_write_text(path, text)
    return path


# ----------------------------------------------------------------------------------------------
# The loop's side: resume candidates, save and resume a TrainState (every rank, through Fabric)
# ----------------------------------------------------------------------------------------------
class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, ...) and ``checkpoint.on_write_error=stop``."""


def resume_candidates(fabric, run_dir: Path) -> list[Path]:
    """The run folder's complete checkpoints, newest first (verified and loaded by ``resume``). Rank 0
    first removes the folders a crash left incomplete."""
    if fabric.global_rank == 0:
        for p in clean_incomplete(run_dir):
            fabric.print(f"removed incomplete checkpoint folder {p} (no manifest: a save was interrupted)")
    fabric.barrier()
    return usable_checkpoints(run_dir)


def saved_run_id(candidates: list[Path]) -> str | None:
    """The W&B run id of the newest candidate that has one."""
    for folder in candidates:
        try:
            run_id = read_train_state(folder).get("wandb_run_id")
        except (OSError, ValueError):
            continue
        if run_id:
            return run_id
    return None


def save(state: TrainState, reason: str) -> Path | None:
    """Write a checkpoint of ``state`` (temp folder, manifest last, rename). The ranks agree three times:
    1. the temp folder exists (rank 0 made it), 2. every rank wrote its part (engine shards, RNG, loader
    state), 3. rank 0 wrote the manifest. A write error on any rank (disk full, ...; inside DeepSpeed's
    collective save it is held until 2., ``parallel.deferred_write_errors``) removes the temp folder,
    leaves the previous checkpoints as they were, names the failed rank, and raises
    ``CheckpointWriteError`` or returns None per ``checkpoint.on_write_error``. A rank still waiting at 2.
    after ``checkpoint.save_timeout_s`` (a rank died or left a collective save) stops with one line
    (``_SaveWatchdog``) instead of hanging."""
    fabric, cfg, run_dir, step = state.fabric, state.cfg, state.run_dir, state.counters.step
    tmp = tmp_dir(run_dir, step)
    error = ""
    with _SaveWatchdog(cfg.checkpoint.save_timeout_s, run_dir, step):
        try:
            if state.rank == 0:
                prepare(run_dir, step)
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
        failed = parallel.failed_ranks(fabric, bool(error))  # 1. (also the barrier: the temp folder exists)
        if not failed:
            error = _write_rank_part(state, tmp)
            failed = parallel.failed_ranks(fabric, bool(error))  # 2.
    final = None
    if not failed and state.rank == 0:
        train_state = {"stage": cfg.train.stage.value, "strategy": cfg.strategy.name, "world_size": fabric.world_size,
                       **state.counters.to_dict(), "wandb_run_id": state.run_id, "reason": reason, "time": time.time()}
        try:
            final = finalize(run_dir, step, train_state, C.to_yaml(cfg), cfg.checkpoint.keep_last, cfg.checkpoint.checksums)
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
    if not failed:
        failed = parallel.failed_ranks(fabric, bool(error))  # 3.
    if failed:
        if state.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        what = f"rank {state.rank}: {error}" if error else f"failed on rank {_ranks(failed)}; its log has the error"
        msg = (f"checkpoint of step {step} could not be written to '{tmp}' ({what}); "
               f"previous checkpoint intact: {latest_checkpoint(run_dir)}")
        if cfg.checkpoint.on_write_error == "stop":
            raise CheckpointWriteError(msg + " (checkpoint.on_write_error=stop)")
        fabric.print(f"warning: {msg}; training continues (checkpoint.on_write_error=continue)")
        return None
    return step_dir(run_dir, step) if final is None else final


def _write_rank_part(state: TrainState, tmp: Path) -> str:
    """This rank's part of a checkpoint in ``tmp``: the engines (every rank: Fabric saves per strategy), its
    RNG and loader state, the EMA (rank 0). Returns the first write error ('' = none); a failure is also
    left as ``tmp/.failed-rank{R}`` for the watchdog's line."""
    fabric = state.fabric
    errors: list[str] = []
    try:
        sharded = parallel.is_sharded(fabric)
        for role in ("student", "critic"):
            engine, optimizer = state.engine(role)
            if engine is not None:
                with parallel.deferred_write_errors(fabric, engine, errors):
                    fabric.save(engine_path(tmp, role, sharded), {"model": engine, "optimizer": optimizer})
        if not errors:
            save_rank_files(tmp, state.rank, state.loader.state_dict())
            if state.rank == 0:
                save_ema(tmp, state.ema.state_dict())
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        errors.append(f"{type(e).__name__}: {e}")
    if errors:
        try:
            (tmp / f"{FAILED_PREFIX}{state.rank}").write_text(errors[0])
        except OSError:
            pass
    return errors[0] if errors else ""


FAILED_PREFIX = ".failed-rank"  # tmp/.failed-rank{R}: rank R's write error (read by the watchdog of a waiting rank)


def _ranks(ranks) -> str:
    return ", ".join(str(r) for r in ranks)


class _SaveWatchdog:
    """Around the ranks' writes and their agreement: a rank still inside after ``seconds`` (0 = never) is
    waiting in a collective that will not complete (another rank died, or left DeepSpeed's collective save
    on an error that was not a file write). It prints one line on stderr, naming the temp folder, the
    ranks that recorded an error (``.failed-rank{R}`` files) and the previous checkpoint, and ends this
    process with exit status 1 (a thread cannot interrupt a blocked collective). The temp folder is left
    for the next start to remove (``clean_incomplete``); the previous checkpoints are untouched."""

    def __init__(self, seconds: float, run_dir: Path, step: int):
        self.seconds, self.run_dir, self.step = seconds, Path(run_dir), step
        self._timer = None

    def __enter__(self):
        if self.seconds > 0:
            self._timer = threading.Timer(self.seconds, self._expired)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def line(self) -> str:
        tmp = tmp_dir(self.run_dir, self.step)
        reports = sorted(tmp.glob(f"{FAILED_PREFIX}*")) if tmp.is_dir() else []
        failed = "; ".join(f"rank {p.name.removeprefix(FAILED_PREFIX)}: {_first_line(p)}" for p in reports)
        return (f"checkpoint of step {self.step}: the ranks did not finish writing '{tmp}' within "
                f"checkpoint.save_timeout_s={self.seconds:g} s ({failed or 'no rank recorded a write error: one died or hangs'}); "
                f"stopping this rank; previous checkpoint intact: {latest_checkpoint(self.run_dir)}")

    def _expired(self) -> None:
        try:
            line = self.line()
        except Exception as e:  # the line must not keep the process from stopping
            line = f"checkpoint of step {self.step}: the ranks did not agree within {self.seconds:g} s ({e})"
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def _first_line(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError as e:
        return f"(report unreadable: {e})"
    return text.splitlines()[0] if text else "(empty report)"


def resume(state: TrainState, candidates: list[Path]) -> Path | None:
    """Restore ``state`` from the newest of ``candidates`` that verifies (rank 0: files, sizes, SHA-256
    against the manifest) and loads on every rank; otherwise log why and fall back to the next older one.
    Before loading, ``check_config`` prints the keys changed since that checkpoint and raises ``ConfigError``
    for a change that alters the run (no fallback: an older checkpoint would not make it right).
    None without candidates; ``CheckpointError`` naming every folder and reason when none is usable."""
    fabric = state.fabric
    reasons = []
    for i, folder in enumerate(candidates):
        error = ""
        if state.rank == 0:
            try:
                verify(folder)
            except CheckpointError as e:
                error = str(e)
        bad = parallel.any_rank(fabric, bool(error))
        if not bad:
            check_config(fabric, state.cfg, folder)  # ConfigError (no fallback) for a change that alters the run
            try:
                _restore(state, folder, read_train_state(folder))
            except Exception as e:  # any failure to load (unpickling refused, shape mismatch, ...): fall back
                error = f"checkpoint '{folder}' does not load: {type(e).__name__}: {e}"
            bad = parallel.any_rank(fabric, bool(error))
        if not bad:
            return folder
        reasons.append(error or f"checkpoint '{folder}' failed on another rank")
        older = candidates[i + 1:]
        fabric.print(f"warning: {reasons[-1]}; " + (f"falling back to the previous complete checkpoint {older[0]}"
                                                   if older else "no older complete checkpoint"))
    if candidates:
        raise CheckpointError(f"no usable checkpoint in '{checkpoint_root(state.run_dir)}' "
                              f"(checkpoint.resume=false starts afresh): " + " | ".join(reasons))
    return None


def _restore(state: TrainState, folder: Path, saved: dict) -> None:
    """Engines and optimizers (Fabric's loader for the strategy), RNG and data position of this rank, the
    EMA (rank 0) and the counters."""
    fabric = state.fabric
    parallel.check_resume_world_size(fabric, saved.get("world_size"), folder)
    sharded = parallel.is_sharded(fabric)
    for role in ("student", "critic"):
        engine, optimizer = state.engine(role)
        if engine is not None:
            fabric.load(engine_path(folder, role, sharded), {"model": engine, "optimizer": optimizer}, weights_only=True)
    rng, loader_state = load_rank_files(folder, state.rank)
    set_rng_state(rng)
    state.loader.load_state_dict(loader_state)
    if state.ema.keep:  # rank 0 for DMD's EMA; every rank for causal_cd's target
        state.ema.load_state_dict(load_ema(folder))
    state.counters.load(saved)


# ----------------------------------------------------------------------------------------------
# Export: a plain student folder from a training checkpoint (ZeRO shards consolidated)
# ----------------------------------------------------------------------------------------------
EXPORT_PRODUCER = "vmla-train export"


def export_student(run_dir: str | Path, out: str | Path, use_ema: bool = False, overwrite: bool = False) -> Path:
    """The latest complete checkpoint of ``run_dir`` (or the ``step-*`` folder given) -> a student folder.
    ``overwrite`` replaces only a previous export (its manifest says so), never the run folder, a folder
    holding it or one inside it (``student_io.check_output``: ``OutputError``, checked before any loading)."""
    is_step = Path(run_dir).name.startswith("step-")
    run_folder = Path(run_dir).parent.parent if is_step and Path(run_dir).parent.name == "checkpoints" else Path(run_dir)
    sources = (run_folder, Path(run_dir))
    check_output(out, overwrite, STUDENT, EXPORT_PRODUCER, sources)
    folder = latest_checkpoint(run_dir) if not is_step else Path(run_dir)
    if folder is None or not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"'{run_dir}' holds no complete checkpoint (checkpoints/step-*/manifest.json)")
    verify(folder)  # CheckpointError naming a missing, truncated or corrupted file
    cfg = C.load(folder / "config.yaml")
    if use_ema:
        state = load_ema(folder)
        if not state:
            raise FileNotFoundError(f"checkpoint '{folder}' has no ema.safetensors (self_forcing keeps an EMA from "
                                    "dmd.ema_start_step; the other stages only with train.ema_decay > 0, from "
                                    "train.ema_start_step)")
    elif (folder / "student").is_dir() and (folder / "student" / "checkpoint").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder / "student"), tag="checkpoint")
    elif (folder / "student.ckpt").is_file():
        state = torch.load(folder / "student.ckpt", map_location="cpu", weights_only=True)["model"]
    else:
        raise FileNotFoundError(f"checkpoint '{folder}': no student.ckpt and no DeepSpeed student/ folder "
                                "(FSDP sharded checkpoints: consolidate with lightning's fsdp tools first)")
    state = {k.removeprefix("_forward_module.").removeprefix("module."): v.float().contiguous() for k, v in state.items()}
    return save_student(state, cfg, out, overwrite=overwrite, producer=EXPORT_PRODUCER, sources=sources,
                        extra_files={"export.json": json.dumps({"from": str(folder), "ema": use_ema}, indent=1, allow_nan=False)})
