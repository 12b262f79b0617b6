"""Shared pieces of the data-preparation stages: ranks, atomic shard writing, rejects, index, summary.

Every output shard is written under a temporary name next to its final one and renamed when complete;
a small sidecar ``<shard>.json`` (written first) holds its sample count and the rejects met while
making it. A stage re-run skips every shard whose final name exists, so a killed job resumes without
duplicates; the folder's ``index.json`` (shard -> samples) and ``rejects.jsonl`` are rebuilt from the
sidecars at the end of each run.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import atomic_write_text
from ..data import INDEX_NAME
from .video import Reject

REJECTS_NAME = "rejects.jsonl"
SUMMARY_NAME = "summary.json"


def dist_env(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(rank, world) of this process for splitting shards: torchrun (RANK/WORLD_SIZE), a Slurm array
    (task index among SLURM_ARRAY_TASK_COUNT tasks) times the tasks of each array element
    (SLURM_PROCID/SLURM_NTASKS), or (0, 1)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    rank, world = 0, 1
    if "SLURM_PROCID" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", "1"))
    if "SLURM_ARRAY_TASK_ID" in env:
        count = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
        task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        rank, world = task * world + rank, count * world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in 0..{world - 1} (from the torchrun/Slurm environment)")
    return rank, world


def reject_record(r: Reject, **where: Any) -> dict:
    return {"reason": r.reason, "detail": r.detail, **where}


def tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp")


def finish_shard(final: Path, num_samples: int, rejects: list[dict], extra: dict | None = None) -> None:
    """Sidecar first, then rename the finished temp tar to its final name (the completion marker)."""
    sidecar = {"shard": final.name, "num_samples": num_samples, "rejects": rejects, **(extra or {})}
    atomic_write_text(final.with_suffix(".json"), json.dumps(sidecar, indent=1, allow_nan=False))
    tmp = tmp_path(final)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def rebuild_index(folder: Path, kind: str, extra_rejects: list[dict] = ()) -> dict:
    """``index.json`` (shard -> samples) and ``rejects.jsonl`` of a folder from its finished shards'
    sidecars (plus ``extra_rejects`` met before any shard, e.g. CSV rows)."""
    shards, rejects = {}, list(extra_rejects)
    for sidecar in sorted(folder.glob("*.json")):
        if sidecar.name in (INDEX_NAME, SUMMARY_NAME) or not sidecar.with_suffix(".tar").is_file():
            continue
        try:
            s = json.loads(sidecar.read_text())
        except Exception:
            continue  # a sidecar being written by another rank: picked up by the next rebuild
        shards[s["shard"]] = int(s["num_samples"])
        rejects.extend(s.get("rejects", []))
    index = {"kind": kind, "num_samples": sum(shards.values()), "shards": shards}
    atomic_write_text(folder / INDEX_NAME, json.dumps(index, indent=1, allow_nan=False))
    atomic_write_text(folder / REJECTS_NAME, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rejects))
    return index


@dataclass
class Summary:
    """Counts of one stage run: kept, filtered by reason, failed by reason, bytes, time."""

    stage: str
    kept: int = 0
    filtered: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, other: "Summary | dict") -> None:
        o = other if isinstance(other, dict) else other.as_dict()
        self.kept += o["kept"]
        self.filtered.update(o["filtered"])
        self.failed.update(o["failed"])
        self.bytes_in += o["bytes_in"]
        self.bytes_out += o["bytes_out"]
        self.shards_written += o["shards_written"]
        self.shards_skipped += o["shards_skipped"]

    def as_dict(self) -> dict:
        dt = time.perf_counter() - self.t0
        return {"stage": self.stage, "kept": self.kept, "filtered": dict(self.filtered), "failed": dict(self.failed),
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "shards_written": self.shards_written,
                "shards_skipped": self.shards_skipped, "seconds": round(dt, 3),
                "mb_per_s_in": round(self.bytes_in / 1e6 / max(dt, 1e-9), 3),
                "mb_per_s_out": round(self.bytes_out / 1e6 / max(dt, 1e-9), 3)}

    def text(self) -> str:
        d = self.as_dict()
        lines = [f"{self.stage}: kept {d['kept']}, filtered {sum(self.filtered.values())}, failed {sum(self.failed.values())}; "
                 f"shards written {d['shards_written']}, skipped (already done) {d['shards_skipped']}",
                 f"  read {d['bytes_in'] / 1e6:.1f} MB ({d['mb_per_s_in']:.1f} MB/s), wrote {d['bytes_out'] / 1e6:.1f} MB "
                 f"({d['mb_per_s_out']:.1f} MB/s) in {d['seconds']:.1f} s"]
        for title, c in (("filtered", self.filtered), ("failed", self.failed)):
            for reason, n in c.most_common():
                lines.append(f"  {title:<8} {reason:<28} {n}")
        return "\n".join(lines)


def write_summary(folder: Path, summary: Summary, name: str = SUMMARY_NAME) -> None:
    atomic_write_text(folder / name, json.dumps(summary.as_dict(), indent=1, allow_nan=False))


def finish_run(folder: Path, kind: str, summary: Summary, summary_name: str = SUMMARY_NAME,
               extra_rejects: list[dict] = ()) -> dict:
    """The end of a stage run on one rank: rebuild the folder's index, write and print this run's summary."""
    index = rebuild_index(folder, kind, extra_rejects)
    write_summary(folder, summary, summary_name)
    print(summary.text())
    print(f"{summary.stage}: index holds {len(index['shards'])} shards, {index['num_samples']} samples")
    return index
