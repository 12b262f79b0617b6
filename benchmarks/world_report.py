"""Benchmark: the paper in miniature on the world — students side by side, the 8-bit cache, the rank study.

    python benchmarks/world_report.py [--world runs/world] [--variants mha mla mla-random mla-mild]
                                      [--stage sf] [--prompts 32] [--long-seconds 60] [--eight-bit mla]
                                      [--device cuda] [--name world_report] [--results DIR]

Reads what ``benchmarks/world_teacher.sh`` and ``benchmarks/world_student.sh`` (one ``TAG`` per variant) wrote
in ``--world``: the teacher, the world's models and held-out prompts, and per variant ``<TAG>/student-<stage>``
(plus ``student-converted`` and ``student-adapt`` for the rank study). For every variant, with the project's
own commands: ``vmla-generate`` of the held-out prompts at the training length and at ``--long-seconds``
(sliding window + sinks), ``vmla-world eval`` of both (short-horizon metrics; long-horizon drift and
per-segment identity); the ``--eight-bit`` variant once more with the 8-bit cache. Then ``vmla-analyze``'s
rank study of the trained teacher (99 %-energy ranks of K/V weights and activations against d_c) and of each
MLA variant's c_kv occupation at conversion and after adaptation. Every number comes from the videos and
checkpoints of this run (the eval reports are kept beside them). The paper's claims are marked holds / does
not hold with the numbers; a claim whose variants were not run is left out, not failed (the two inits need a
spectral and a random variant). Prints the tables and writes ``<--name>-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, write_result  # noqa: E402
from vmla_train import config as C  # noqa: E402

SHORT = ("adherence", "object_adherence", "identity", "motion_error", "physics_error", "background")
LOWER_IS_BETTER = {"motion_error", "physics_error", "background", "drift_score", "chunk_jump"}


def _check(rc, what: str) -> None:
    if rc not in (0, None):
        raise SystemExit(f"world_report: {what} failed (exit {rc})")


def generate_and_score(student: Path, prompts: Path, world: Path, out: Path, seconds: float, device: str,
                       extra: list[str]) -> dict:
    """vmla-generate of every prompt -> mp4s in ``out``; vmla-world eval of them -> its report (a dict), plus
    the wall seconds of generation and the latent frames it made."""
    from vmla_train.generate import latent_frames_for
    from vmla_train.generate import main as generate_main
    from vmla_train.world.evaluate import main as evaluate_main

    cfg = C.load(student / "config.yaml")
    models = world / "models"
    t0 = time.perf_counter()
    _check(generate_main([str(student), str(prompts), f"generate.vae={models}", f"generate.text_encoder={models}",
                          f"generate.out_dir={out}", f"generate.seconds={seconds}", f"runtime.device={device}",
                          "runtime.progress=false", *extra]), f"vmla-generate {student}")
    wall = time.perf_counter() - t0
    args = ["eval", str(out), "--prompts", str(prompts), "--out", str(out / "report.json"),
            "--chunk-frames", str(cfg.video.chunk_frames), "--temporal-stride", str(cfg.video.vae_stride[0])]
    if (world / "clips").is_dir():
        args += ["--world", str(world / "clips")]
    _check(evaluate_main(args), f"vmla-world eval {out}")
    report = json.loads((out / "report.json").read_text())
    n_prompts = len([p for p in prompts.read_text().splitlines() if p.strip()])
    frames = latent_frames_for(C.replace(cfg, generate=C.replace(cfg.generate, seconds=seconds)))
    report["generation"] = {"wall_s": wall, "latent_frames": frames * n_prompts,
                            "latent_frames_per_s": frames * n_prompts / wall, "video_seconds": seconds}
    return report


def summary(report: dict) -> dict:
    """The numbers of one eval report that the tables show."""
    out = {k: report[k] for k in SHORT + ("drift_score", "chunk_jump") if k in report}
    if "frechet_distance" in report:
        out["frechet_distance"], out["frechet_floor"] = report["frechet_distance"], report.get("frechet_floor")
    ident = report.get("curves", {}).get("identity", [])
    out["identity_kept_segments"] = sum(1 for x in ident if x >= 1.0) / len(ident) if ident else None
    out["latent_frames_per_s"] = report["generation"]["latent_frames_per_s"]
    return out


def stage_seconds(variant: Path) -> dict | None:
    """The wall seconds of each stage that ``world_student.sh`` recorded for a variant, if it did."""
    path = variant / "stage_seconds.json"
    return json.loads(path.read_text()) if path.is_file() else None


def stage_table(rows: dict) -> str | None:
    """Wall seconds per training stage of each variant (world_student.sh's record), or None without one."""
    timed = {tag: r["stage_seconds"] for tag, r in rows.items() if r.get("stage_seconds")}
    if not timed:
        return None
    stages = [s for s in ("convert", "adapt", "ode", "ode_init", "causal_cd", "sf") if any(s in t for t in timed.values())]
    lines = ["| student | " + " | ".join(stages) + " | total s |", "| --- |" + " ---: |" * (len(stages) + 1)]
    for tag, t in timed.items():
        cells = [f"{t[s]:.0f}" if s in t else "-" for s in stages]
        lines.append(f"| {tag} | " + " | ".join(cells) + f" | {sum(t.get(s, 0.0) for s in stages):.0f} |")
    return "\n".join(lines)


def within(a: float, b: float, rel: float, key: str) -> bool:
    """Whether ``a`` is no worse than ``b`` by more than ``rel`` (relative; lower-is-better keys flip)."""
    if key in LOWER_IS_BETTER:
        return a <= b * (1 + rel) + 1e-9
    return a >= b * (1 - rel) - 1e-9


def rank_part(world: Path, variants: list[str], device: str, out: Path, calib_clips: int = 16) -> dict:
    """The rank study of the teacher and each MLA variant's c_kv occupation (init and after adaptation); its
    CSV / JSON / PNG folders go into this report's ``out`` folder. Activations are measured on the first
    ``calib_clips`` encoded world clips (``<world>/train``, the input the models were trained on) where that
    folder holds them, else on seeded Gaussian latents (recorded in the result)."""
    from vmla_train.analyze import rank_study
    from vmla_train.data import expand_shards, shard_counts

    pattern = str(world / "train" / "raw-*.tar")
    available = sum(shard_counts(expand_shards(pattern))) if calib_clips > 0 else 0
    calib = [f"convert.calib_data={pattern}", f"convert.calib_samples={min(calib_clips, available)}"] if available else []
    ranks = {}
    teacher = rank_study(world / "teacher", out / "rank-teacher",
                         overrides=["attention.kind=mha", f"runtime.device={device}", *calib])
    layers = teacher["layers"]
    acts = [v for row in layers for k, v in row.items() if k.startswith(("act_k_", "act_v_"))]
    ranks["teacher"] = {"dim": teacher["dim"], "w_k": [r["w_k"] for r in layers], "w_v": [r["w_v"] for r in layers],
                      "w_kv": [r["w_kv"] for r in layers], "median_activation_rank": median(acts) if acts else None,
                      "tokens_per_bucket": teacher["tokens_per_bucket"], "calibration": teacher["calibration"]}
    for tag in variants:
        for when, name in (("init", "student-converted"), ("adapted", "student-adapt")):
            folder = world / tag / name
            cfg = C.load(folder / "config.yaml") if (folder / "config.yaml").is_file() else None
            if cfg is None or cfg.attention.kind != C.AttentionKind.mla:
                continue
            r = rank_study(folder, out / f"rank-{tag}-{when}", config_paths=[folder / "config.yaml"],
                           overrides=[f"runtime.device={device}", *calib])
            ranks.setdefault(tag, {})[when] = {"d_c": r["d_c"], "c_occupation": [row["c_occupation"] for row in r["layers"]]}
            ranks[tag]["init_kind"] = cfg.convert.init  # spectral | random
    return ranks


def claims(rows: dict, ranks: dict, base: str, mla: str, eight: str | None) -> list[dict]:
    """The paper's claims, each with the numbers that decide it (None where a part is missing)."""
    out = []

    def claim(text, holds, numbers):
        out.append({"claim": text, "holds": holds, "numbers": numbers})

    t = ranks.get("teacher")
    if t:
        d = t["dim"]
        claim("the trained teacher's K/V are not low-rank (99 %-energy rank of [W_k; W_v] >= half the width)",
              median(t["w_kv"]) >= d / 2, {"median_rank_w_kv": median(t["w_kv"]), "dim": d,
                                           "median_activation_rank": t["median_activation_rank"]})
    occ = {tag: r for tag, r in ranks.items() if tag != "teacher"}
    adapted = {tag: median(r["adapted"]["c_occupation"]) for tag, r in occ.items() if "adapted" in r}
    if adapted:
        claim("the bottleneck sets the rank: c_kv fills its budget after adaptation (median occupation >= 0.9)",
              all(v >= 0.9 for v in adapted.values()), {"median_occupation_adapted": adapted})
        init = {tag: median(r["init"]["c_occupation"]) for tag, r in occ.items() if "init" in r}
        kinds = {occ[tag]["init_kind"] for tag in adapted}
        if {"spectral", "random"} <= kinds:  # decided only where both inits were adapted and measured
            claim("both inits fill the budget (every MLA variant >= 0.9 after adaptation)",
                  all(v >= 0.9 for v in adapted.values()),
                  {"median_occupation_init": init, "median_occupation_adapted": adapted,
                   "init": {tag: occ[tag]["init_kind"] for tag in adapted}})
    if base in rows and mla in rows:
        s_m, s_b = rows[mla]["short"], rows[base]["short"]
        keys = [k for k in SHORT if k in s_m and k in s_b]
        claim(f"quality retained: every short-horizon metric of {mla} within 10 % of {base}",
              all(within(s_m[k], s_b[k], 0.10, k) for k in keys), {k: [s_m[k], s_b[k]] for k in keys})
        l_m, l_b = rows[mla]["long"], rows[base]["long"]
        claim(f"better at long horizons: drift of {mla} no worse than {base}'s",
              l_m["drift_score"] <= l_b["drift_score"] + 1e-9, {"drift": [l_m["drift_score"], l_b["drift_score"]]})
    if eight and f"{eight}-8bit" in rows and eight in rows:
        a, b = rows[f"{eight}-8bit"]["short"], rows[eight]["short"]
        keys = [k for k in SHORT if k in a and k in b]
        claim("the 8-bit cache: short-horizon metrics within 2 % of the bf16 cache",
              all(within(a[k], b[k], 0.02, k) for k in keys), {k: [a[k], b[k]] for k in keys})
    return out


def table(rows: dict) -> str:
    head = ("| student | KV values/token/layer | adherence | identity | motion err | physics err | chunk seam jump | "
            "drift (long) | identity kept (long) | latent frames/s |")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for tag, r in rows.items():
        s, lg = r["short"], r["long"]
        kept, seam = lg["identity_kept_segments"], s.get("chunk_jump")
        lines.append(f"| {tag} | {r['kv_values']} | {s['adherence']:.2f} | {s['identity']:.2f} | {s['motion_error']:.3f} | "
                     f"{s['physics_error']:.3f} | {'-' if seam is None else f'{seam:.2f}'} | {lg['drift_score']:.3f} | "
                     f"{'-' if kept is None else f'{kept:.2f}'} | {s['latent_frames_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default=str(ROOT / "runs" / "world"), help="the world folder of the two scripts")
    p.add_argument("--variants", nargs="+", default=["mha", "mla", "mla-random", "mla-mild"], help="TAGs to compare")
    p.add_argument("--baseline", default="mha", help="the variant the MLA claims compare with")
    p.add_argument("--main", default="mla", help="the MLA variant at the paper's ratio")
    p.add_argument("--stage", default="sf", help="which export of each variant: student-<stage>")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts per horizon")
    p.add_argument("--long-seconds", type=float, default=60.0, help="the long horizon (>= 4x the training length)")
    p.add_argument("--eight-bit", default="mla", help="variant also generated with the 8-bit cache ('' = none)")
    p.add_argument("--no-rank", action="store_true", help="skip the rank study")
    p.add_argument("--calib-clips", type=int, default=16,
                   help="encoded world clips (<world>/train) the rank study's activations are measured on (0 = "
                        "seeded Gaussian latents, also used when the world has no encoded clips)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--name", default="world_report")
    p.add_argument("--results", default=str(RESULTS))
    a = p.parse_args(argv)

    world = Path(a.world)
    students = {tag: world / tag / f"student-{a.stage}" for tag in a.variants}
    missing = [str(s) for s in students.values() if not (s / "config.yaml").is_file()]
    for need in (world / "models", world / "clips" / "prompts-heldout.txt"):
        if not need.exists():
            missing.append(str(need))
    if missing:
        print(f"error: world_report: missing {', '.join(missing)}: run benchmarks/world_teacher.sh and "
              "benchmarks/world_student.sh (TAG=<variant>) first", file=sys.stderr)
        return 2
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    base_dir = world / "report" / stamp
    base_dir.mkdir(parents=True)
    prompts = base_dir / "prompts.txt"
    heldout = [x for x in (world / "clips" / "prompts-heldout.txt").read_text().splitlines() if x.strip()]
    prompts.write_text("\n".join(heldout[: a.prompts]) + "\n")
    runs = [(tag, students[tag], []) for tag in a.variants]
    eight_note = None
    if a.eight_bit and a.device.startswith("cuda"):
        runs.append((f"{a.eight_bit}-8bit", students[a.eight_bit], ["cache.dtype=8bit", "attention.impl=fused_8bit"]))
    elif a.eight_bit:
        eight_note = "skipped: the 8-bit cache's fused kernel runs on CUDA only"
        print(f"world_report: 8-bit cache {eight_note}")
    rows = {}
    for tag, student, extra in runs:
        cfg = C.load(student / "config.yaml", extra)
        short_s = cfg.video.num_frames / cfg.video.fps
        row = {"student": str(student), "kind": cfg.attention.kind.value, "overrides": extra,
               "kv_values": C.kv_values_per_token(cfg)[cfg.attention.kind.value],
               "stage_seconds": stage_seconds(student.parent)}
        for horizon, seconds in (("short", short_s), ("long", a.long_seconds)):
            rep = generate_and_score(student, prompts, world, base_dir / f"{tag}-{horizon}", seconds, a.device, extra)
            row[horizon] = summary(rep)
        rows[tag] = row
    ranks = {} if a.no_rank else rank_part(world, a.variants, a.device, base_dir, a.calib_clips)
    result = {"device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "world": str(world), "stage": a.stage,
              "prompts": a.prompts, "long_seconds": a.long_seconds, "eval_folder": str(base_dir),
              "students": rows, "ranks": ranks, "eight_bit": eight_note or f"{a.eight_bit}-8bit",
              "claims": claims(rows, ranks, a.baseline, a.main, a.eight_bit or None)}
    print("\n" + table(rows))
    if (stages := stage_table(rows)) is not None:
        print("\n" + stages)
    for c in result["claims"]:
        print(f"- {'holds' if c['holds'] else 'does not hold'}: {c['claim']}  {json.dumps(c['numbers'])}")
    write_result(a.name, result["device"], result, a.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
