"""Minute-scale rollout throughput: random-weight 1.3B students, MHA vs MLA, on one GPU.

    python benchmarks/rollout.py [--out DIR] [--chunks N] [--groups mha,mla,mla_8bit_cache] [--merge]
                                 [--batch-cap N] [--no-window]

Groups: ``mha`` (cuDNN and flash SDPA), ``mla`` (``--mla-impls``: ``attention.impl`` values, 16-bit cache),
``mla_8bit_cache`` (``attention.impl=fused_8bit`` reading and writing ``cache.dtype=8bit``). The fused paths run
the kernel ``attention.kernel=auto`` picks (Gluon on Hopper). ``--merge`` reads result files of the older
spellings too (impl ``triton`` / ``triton_fp8`` / ``absorbed_sdpa``, cache dtype ``fp8``, group
``mla_fp8cache``): their runs are kept under the current names.

Geometry from the config (480x832, chunk 3 latent frames, window 21 + 3 sinks, 4 denoising steps + the
clean cache-writing pass per chunk). A 60 s video is ``latent_frames_for(cfg)`` = 240 latent frames =
80 chunks; every chunk after the window fills (chunk 7) costs the same, so the steady state is measured
directly: the cache is filled with random entries and marked full (as after any number of chunks),
then ``rollout.sample_video`` runs N chunks and the median chunk latency gives frames/s and the 60 s
time. Peak memory is torch's max allocated over the run (weights included); cache_gb the KV buffers.
Max batch: from the measured per-sample memory, confirmed by running it (one chunk); ``--batch-cap N`` runs
min(max batch, N) instead (the run's ``max_batch`` is then false where the cap bit: a 141 GB GPU fits MLA
batches whose two chunks outlast a 10-minute device command). Max window: the largest window (batch 1) whose
cache fits, confirmed by one full-window chunk forward (``--no-window`` skips it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_slug, write_result  # noqa: E402
from vmla_train import config as C  # noqa: E402
from vmla_train import schedule  # noqa: E402
from vmla_train.generate import latent_frames_for  # noqa: E402
from vmla_train.kv_cache import KVCache  # noqa: E402
from vmla_train.rollout import sample_video  # noqa: E402
from vmla_train.student import WanStudent  # noqa: E402

GB = 1 << 30


def build(kind: str, impl: str, cache_dtype: str = "bfloat16") -> WanStudent:
    over = [f"attention.kind={kind}", f"attention.impl={impl}" if kind == "mla" else "attention.impl=auto",
            f"cache.dtype={cache_dtype}"]
    cfg = C.load(None, over)
    torch.manual_seed(0)
    with torch.device("cuda"):
        s = WanStudent(cfg)
    return s.to(torch.bfloat16).eval()


def full_cache(student: WanStudent, batch: int, window: int | None = None) -> KVCache:
    """A cache whose window is full of random entries (the steady state of a long rollout); ``window``
    overrides ``cache.window_frames``."""
    cache = student.new_cache(batch)
    if window:
        cache = dataclasses.replace(cache, window_frames=window)  # re-allocates the buffers for that window
    cache.fill_random(cache.num_slots + student.cfg.video.chunk_frames * 2)
    return cache


def backend(impl: str):
    if impl == "cudnn":
        return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
    if impl == "flash":
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return nullcontext()


def run(student: WanStudent, impl: str, batch: int, chunks: int, window: int | None = None) -> dict:
    cfg = student.cfg
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    gen = torch.Generator(device="cuda").manual_seed(0)
    text = torch.randn(batch, 64, cfg.model.text_dim, device="cuda", generator=gen)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cache = full_cache(student, batch, window)
    stamps = [0.0]

    def on_chunk(i: int, x0: torch.Tensor) -> None:
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    with backend(impl):
        torch.cuda.synchronize()
        stamps[0] = time.perf_counter()
        sample_video(student, text, chunks * cfg.video.chunk_frames, steps, generator=gen, cache=cache,
                     on_chunk=on_chunk, keep=False)
    lat = [b - a for a, b in zip(stamps, stamps[1:])]
    lat = lat[1:] if len(lat) > 1 else lat  # the first chunk also builds the prompt's cross-attention K/V
    chunk_s = statistics.median(lat)
    fps = cfg.video.chunk_frames * batch / chunk_s
    out = dict(attention=cfg.attention.kind.value, impl=impl, cache_dtype=cfg.cache.dtype, batch=batch,
               window_frames=window or cfg.cache.window_frames, frames_per_s=fps,
               video_frames_per_s=fps * cfg.video.vae_stride[0], chunk_latency_s=chunk_s,
               seconds_for_60s_video=latent_frames_for(cfg) * batch / fps,  # wall time for the batch
               peak_mem_gb=torch.cuda.max_memory_allocated() / GB, cache_gb=cache.nbytes() / GB)
    del cache
    return out


def max_batch(student: WanStudent, impl: str, one: dict, two: dict, total: float) -> int:
    per = max(two["peak_mem_gb"] - one["peak_mem_gb"], 1e-3)
    fixed = one["peak_mem_gb"] - per
    return max(1, int((total * 0.93 - fixed) / per))


def fits(fn) -> bool:
    try:
        fn()
        return True
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return False


def largest_window(student: WanStudent, group: str, kind: str, impl: str, one: dict, total: float) -> int:
    """The largest window (latent frames, batch 1) whose cache fits: cache bytes per frame from the batch-1 run
    ``one`` give an estimate, confirmed by one full-window chunk forward (backing off 10 % on OOM)."""
    cfg = student.cfg
    per_frame = one["cache_gb"] / (cfg.cache.sink_frames + cfg.cache.window_frames - cfg.video.chunk_frames)
    w = int((total * 0.9 - (one["peak_mem_gb"] - one["cache_gb"]) * 1.5) / per_frame)
    w -= w % cfg.video.chunk_frames
    need = latent_frames_for(cfg) + cfg.video.chunk_frames  # a whole 60 s history
    if kind == "mla":
        w = min(w, 4 * need)  # past 4 minutes of history the check only costs time
    x = torch.randn(1, cfg.video.chunk_frames, cfg.model.in_channels, cfg.video.latent_height,
                    cfg.video.latent_width, device="cuda", dtype=torch.bfloat16)
    t = torch.full((1, cfg.video.chunk_frames), 500.0, device="cuda")
    text = torch.randn(1, 64, cfg.model.text_dim, device="cuda", dtype=torch.bfloat16)
    while w > cfg.video.chunk_frames:

        def fwd():
            cache = full_cache(student, 1, w)
            with backend(impl), torch.no_grad():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                student(x, t, text, cache=cache)
                torch.cuda.synchronize()
            print(f"{group}: window {w} frames fits (one chunk forward {time.perf_counter() - t0:.2f} s, "
                  f"cache {cache.nbytes() / GB:.1f} GB)", flush=True)

        if fits(fwd):
            break
        w = int(w * 0.9) - int(w * 0.9) % cfg.video.chunk_frames
    print(f"{group}: max window {w} latent frames at batch 1 (60 s history needs {need})", flush=True)
    return w


OLD_GROUPS = {"mla_fp8cache": "mla_8bit_cache"}  # group names of older result files


def current_names(run: dict) -> dict:
    """A run of an older result file with today's spellings (``config.RENAMED_VALUES``: impl ``triton`` ->
    ``fused``, cache dtype ``fp8`` -> ``8bit``, ...); a current run unchanged."""
    impls, dtypes = C.RENAMED_VALUES["attention.impl"], C.RENAMED_VALUES["cache.dtype"]
    out = dict(run, impl=impls.get(run["impl"], run["impl"]))
    if "cache_dtype" in run:
        out["cache_dtype"] = dtypes.get(run["cache_dtype"], run["cache_dtype"])
    return out


def group_of(run: dict) -> str:
    if run["attention"] == "mha":
        return "mha"
    return "mla_8bit_cache" if run.get("cache_dtype") == "8bit" else "mla"


def merged(path: Path, groups: list[str], runs: list[dict], max_window: dict) -> tuple[list[dict], dict]:
    """This command's runs and max windows, plus those of the other groups from ``path`` (if it exists)."""
    if not path.exists():
        return runs, max_window
    old = json.loads(path.read_text())
    kept = [dict(current_names(r), date=r.get("date", old["date"])) for r in old["runs"]]
    kept = [r for r in kept if group_of(r) not in groups]
    windows = {OLD_GROUPS.get(g, g): w for g, w in old.get("max_window_frames", {}).items()}
    windows = {g: w for g, w in windows.items() if g not in groups}
    return kept + runs, {**windows, **max_window}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--mla-impls", default="fused,absorbed", help="comma list of attention.impl values (group mla)")
    p.add_argument("--groups", default="mha,mla", help="comma list of mha, mla, mla_8bit_cache")
    p.add_argument("--batch-cap", type=int, default=0, help="run at most this batch instead of the largest (0: none)")
    p.add_argument("--no-window", action="store_true", help="skip the largest-window search")
    p.add_argument("--merge", action="store_true",
                   help="keep the runs of the other groups from the existing JSON of this device (each run keeps "
                        "its own date): a run of every group exceeds one 10-minute device command")
    args = p.parse_args()
    impls = [i.value for i in C.AttentionImpl]
    for impl in args.mla_impls.split(","):
        if impl not in impls:
            renamed = C.RENAMED_VALUES["attention.impl"].get(impl)
            p.error(f"--mla-impls: {impl!r} " + (f"was renamed to {renamed!r}" if renamed
                                                 else f"is not an attention.impl, expected some of {impls}"))
    dev = torch.cuda.get_device_name()
    total = torch.cuda.get_device_properties(0).total_memory / GB
    print(f"device {dev}, {total:.1f} GiB", flush=True)
    runs, max_window = [], {}
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    def show(r):
        r["date"] = now
        runs.append(r)
        print(f"{r['attention']:3s} {r['impl']:13s} B={r['batch']:3d} W={r['window_frames']:4d} "
              f"{r['frames_per_s']:7.2f} latent fr/s ({r['video_frames_per_s']:6.1f} video fr/s) "
              f"chunk {r['chunk_latency_s']:.3f} s  60 s video in {r['seconds_for_60s_video']:.1f} s  "
              f"peak {r['peak_mem_gb']:.1f} GB cache {r['cache_gb']:.2f} GB", flush=True)

    groups = {"mha": ("mha", ["cudnn", "flash"], "bfloat16"), "mla": ("mla", args.mla_impls.split(","), "bfloat16"),
              "mla_8bit_cache": ("mla", ["fused_8bit"], "8bit")}
    for group in args.groups.split(","):
        if group not in groups:
            raise SystemExit(f"--groups: unknown group {group!r}, expected some of {sorted(groups)}")
        kind, impls, cache_dtype = groups[group]
        student = build(kind, impls[0] if kind == "mla" else "auto", cache_dtype)
        one = run(student, impls[0], 1, 2)  # warm-up (kernel compiles), B=1 and B=2 give per-sample memory
        two = run(student, impls[0], 2, 2)
        mb = max_batch(student, impls[0], one, two, total)
        for impl in impls:
            if kind == "mla":
                for blk in student.blocks:
                    blk.attn1.impl = C.AttentionImpl(impl)
            show(run(student, impl, 1, args.chunks))
        # Largest batch: confirmed by running one chunk (backing off on OOM).
        for impl in impls[:1] if kind == "mla" else impls:
            if kind == "mla":
                for blk in student.blocks:
                    blk.attn1.impl = C.AttentionImpl(impl)
            capped = 0 < args.batch_cap < mb
            b = args.batch_cap if capped else mb
            while b >= 1:
                try:
                    r = run(student, impl, b, 2)
                    r["max_batch"] = not capped
                    show(r)
                    break
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    b = int(b * 0.9)
        if not args.no_window:
            max_window[group] = largest_window(student, group, kind, impls[0], one, total)
        del student
        torch.cuda.empty_cache()

    if args.merge:
        runs, max_window = merged(Path(args.out) / f"rollout-{device_slug(dev)}.json", args.groups.split(","), runs,
                                  max_window)
    out = dict(device=dev, date=now, runs=runs, max_window_frames=max_window)
    write_result("rollout", dev, out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
