"""Benchmark: a prompt switch mid-video on the world, with and without the re-cache (``generate.recache``).

    python benchmarks/prompt_switch.py [--world runs/world] [--student mla/student-sf] [--pairs 16]
                                       [--switch-seconds 3] [--seconds 6] [--device cuda] [--results DIR]

From the world folder of ``benchmarks/world_teacher.sh`` / ``benchmarks/world_student.sh``: ``--pairs``
prompt scripts, each switching from held-out prompt i to held-out prompt i + pairs at ``--switch-seconds``;
``vmla-generate --prompt-script`` of all of them twice, with ``generate.recache=true`` and ``false`` (the same
seeds); ``vmla-world eval --scripts`` of both: each segment against its own prompt (the metrics of the first
prompt, and after the switch: does the video follow the new prompt?) and the visual jump into the switch
frame (1 = none). Prints the table and writes ``<--name>-<device>.json`` with both eval reports' summaries.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, write_result  # noqa: E402
from benchmarks.world_report import _check  # noqa: E402


def switch_run(student: Path, scripts: list[Path], models: Path, out: Path, seconds: float, device: str,
               recache: bool) -> dict:
    """vmla-generate of every script -> mp4s in ``out``; vmla-world eval --scripts of them -> its report (a
    dict), plus the wall seconds of generation."""
    from vmla_train.generate import main as generate_main
    from vmla_train.world.evaluate import main as evaluate_main

    t0 = time.perf_counter()
    script_args = [a for s in scripts for a in ("--prompt-script", str(s))]
    _check(generate_main([str(student), *script_args, f"generate.vae={models}", f"generate.text_encoder={models}",
                          f"generate.out_dir={out}", f"generate.seconds={seconds}", f"generate.recache={recache}",
                          f"runtime.device={device}", "runtime.progress=false"]), f"vmla-generate {student}")
    wall = time.perf_counter() - t0
    _check(evaluate_main(["eval", str(out), "--scripts", "--out", str(out / "report.json")]), f"vmla-world eval {out}")
    report = json.loads((out / "report.json").read_text())
    report["generation_wall_s"] = wall
    return report


def table(rows: dict) -> str:
    lines = ["| re-cache | first prompt: adherence | after the switch: adherence | object adherence | identity | "
             "switch jump | generation s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        b, a = r["before"], r["after"]
        lines.append(f"| {name} | {b['adherence']:.2f} | {a['adherence']:.2f} | {a['object_adherence']:.2f} | "
                     f"{a['identity']:.2f} | {r['switch_jump']:.2f} | {r['generation_wall_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default=str(ROOT / "runs" / "world"), help="the world folder of the two scripts")
    p.add_argument("--student", default="mla/student-sf", help="student folder, relative to --world or absolute")
    p.add_argument("--pairs", type=int, default=16, help="prompt scripts (held-out prompt i -> i + pairs)")
    p.add_argument("--switch-seconds", type=float, default=3.0, help="when the second prompt starts")
    p.add_argument("--seconds", type=float, default=6.0, help="video length")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--name", default="prompt_switch")
    p.add_argument("--results", default=str(RESULTS))
    a = p.parse_args(argv)

    world = Path(a.world)
    student = world / a.student
    heldout_file = world / "clips" / "prompts-heldout.txt"
    missing = [str(x) for x in (student / "config.yaml", world / "models", heldout_file) if not x.exists()]
    if missing:
        print(f"error: prompt_switch: missing {', '.join(missing)}: run benchmarks/world_teacher.sh and "
              "benchmarks/world_student.sh first", file=sys.stderr)
        return 2
    heldout = [x.strip() for x in heldout_file.read_text().splitlines() if x.strip()]
    if not 0 < a.switch_seconds < a.seconds or a.pairs < 1 or 2 * a.pairs > len(heldout):
        print(f"error: prompt_switch: need 0 < --switch-seconds < --seconds and 1 <= --pairs <= {len(heldout) // 2} "
              f"(the held-out prompts of {heldout_file}, two per script)", file=sys.stderr)
        return 2
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    base = world / "prompt_switch" / stamp
    (base / "scripts").mkdir(parents=True)
    scripts = []
    for i in range(a.pairs):
        path = base / "scripts" / f"switch{i:03d}.txt"
        path.write_text(f"0\t{heldout[i]}\n{a.switch_seconds}\t{heldout[i + a.pairs]}\n")
        scripts.append(path)
    rows = {}
    for recache in (True, False):
        rep = switch_run(student, scripts, world / "models", base / f"recache-{str(recache).lower()}", a.seconds,
                         a.device, recache)
        rows[str(recache).lower()] = {k: rep[k] for k in ("before", "after", "switch_jump", "num_switches",
                                                          "generation_wall_s")}
    result = {"device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "student": str(student),
              "pairs": a.pairs, "switch_seconds": a.switch_seconds, "seconds": a.seconds, "eval_folder": str(base),
              "recache": rows}
    print("\n" + table(rows))
    write_result(a.name, result["device"], result, a.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
