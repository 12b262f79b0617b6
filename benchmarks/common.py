"""Shared by the benchmark scripts: where results go and how they are written (atomically)."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def repo_relative(path: str | Path) -> str:
    """``path`` as recorded in a result: relative to the repository when inside it, else as given."""
    p = Path(path).resolve()
    return p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else str(path)


def device_slug(device: str) -> str:
    return device.replace(" ", "_").replace("/", "_")


def write_result(prefix: str, device: str, payload: dict, folder: str | Path = RESULTS) -> Path:
    """Write ``<prefix>-<device>.json`` into ``folder`` (and into ``$OUT`` on the GPU machine)."""
    name = f"{prefix}-{device_slug(device)}.json"
    path = Path(folder) / name
    for d in {Path(folder), Path(os.environ.get("OUT", folder))}:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{name}.tmp"
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, d / name)
    print(f"wrote {path}")
    return path


def gpu_kernels(prof) -> list:
    """The GPU kernels of a ``torch.profiler`` run, the most summed GPU time first: its key averages with
    GPU time, less user annotations (``Optimizer.step#...`` and the like span kernels already counted)."""
    events = [e for e in prof.key_averages()
              if e.self_device_time_total > 0 and not getattr(e, "is_user_annotation", False)]
    return sorted(events, key=lambda e: e.self_device_time_total, reverse=True)
