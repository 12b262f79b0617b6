"""Training step of a latents stage (the world teacher's pretraining by default) with and without
``train.compile``: seconds per step, samples/s, MFU, peak GPU memory, and optionally the top GPU kernels.

    python benchmarks/pretrain_step.py                                  # world teacher, batch 256, eager vs inductor
    python benchmarks/pretrain_step.py --batch 256,512 --compile inductor,inductor:reduce-overhead \
        --name pretrain_step_modes                                      # a mode (CUDA graphs) and a larger batch
    python benchmarks/pretrain_step.py --compile "" --profile 5          # where an eager step's GPU time goes
    python benchmarks/pretrain_step.py --config configs/pretrain-debug.yaml --batch 2 --compile ",aot_eager"  # CPU smoke

The step is the fit's own (``DistillationModule.from_config`` -> ``fabric.setup`` -> ``train.update_role``
with ``training_step``), on synthetic latents and text at the config's geometry (``data.source=synthetic``;
a seeded stand-in for the negative prompt's embedding when the config's file is absent),
bf16-mixed on CUDA as ``configs/world/world-pretrain.yaml`` trains. The first ``--warmup`` steps (compilation
included) are not timed; their time is reported as ``first_steps_s``. MFU = the loop's own FLOP count
(``flops.FlopCounter``) / (step time x the GPU's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, gpu_kernels, repo_relative, write_result  # noqa: E402
from vmla_train import config as C  # noqa: E402
from vmla_train import data, parallel, recipe, train  # noqa: E402
from vmla_train.distill import DistillationModule  # noqa: E402
from vmla_train.ema import EMA  # noqa: E402
from vmla_train.flops import FlopCounter, peak_tflops  # noqa: E402
from vmla_train.state import TrainState  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run(args, batch_size: int, variant: str, scratch: Path) -> dict:
    """One row: ``variant`` = ``backend[:mode]`` (``train.compile`` and ``train.compile_mode``; "" = eager)."""
    cpu = args.device == "cpu"
    backend, _, mode = variant.partition(":")
    overrides = ["data.source=synthetic", "data.num_workers=0", f"data.batch_size={batch_size}",
                 f"data.synthetic_samples={batch_size}", f"train.global_batch_size={batch_size}",
                 "logging.wandb_mode=disabled", "strategy.name=single", f"runtime.run_dir={scratch / 'run'}",
                 f"strategy.accelerator={'cpu' if cpu else 'cuda'}", f"runtime.device={args.device}"]
    overrides += ["strategy.precision=32-true"] if cpu else []
    overrides += [f"train.compile='{backend}'", f"train.compile_mode='{mode}'"]  # '' = eager, whatever the config says
    cfg = C.load(ROOT / args.config, overrides + args.overrides)
    if recipe.reads_negative(cfg) and not Path(cfg.dmd.negative_embedding).is_file():
        # timing only: a seeded stand-in of the negative prompt's embedding at the config's text geometry
        from safetensors.torch import save_file

        neg = scratch / "negative-stand-in.safetensors"
        m = cfg.model
        save_file({"text": torch.randn(1, m.text_len, m.text_dim, generator=torch.Generator().manual_seed(0))}, neg)
        cfg = C.load(ROOT / args.config, overrides + args.overrides + [f"dmd.negative_embedding={neg}"])
    torch._dynamo.reset()
    fabric = parallel.build_fabric(cfg, 1)
    dev = fabric.device
    torch.manual_seed(0)
    module = DistillationModule.from_config(cfg)
    flops = FlopCounter(cfg, module.student, module.teacher, module.critic)
    opt, *_ = module.configure_optimizers()
    student, opt = fabric.setup(module.student, opt)
    module.use_engines(student, None, dev, parallel.compute_dtype(cfg, fabric))
    kind = data.STAGE_KINDS[cfg.train.stage.value]
    loader = data.build_loader(cfg, kind, 0, 1)
    state = TrainState(fabric, cfg, module, opt, None, EMA(0.0, 0, keep=False), loader, "", 1)
    batch = next(loader).to(dev)  # one batch, reused: the loader's speed is not what this measures

    def step(i: int) -> None:
        gen = torch.Generator(device=dev).manual_seed(i)
        train.update_role(state, "student", lambda b: module.training_step(b, gen, None), [batch])

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    _sync(dev)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    _sync(dev)
    dt = (time.perf_counter() - t0) / args.steps
    f = flops.student(batch_size)
    peak = peak_tflops(dev)
    row = {"compile": backend or "eager", "compile_mode": mode, "batch": batch_size, "s_per_step": round(dt, 4),
           "samples_per_s": round(batch_size / dt, 1), "first_steps_s": round(first, 1), "warmup": args.warmup,
           "steps": args.steps, "tflop_per_step": round(f / 1e12, 3),
           "mfu": round(f / dt / (peak * 1e12), 4) if peak else None,
           "peak_mem_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None}
    if args.profile and dev.type == "cuda":
        row["top_kernels"] = _profile(step, args.profile, args.top)
    print(" | ".join(f"{k} {v}" for k, v in row.items() if k != "top_kernels"), flush=True)
    for k in row.get("top_kernels", []):
        print(f"    {k['ms_per_step']:8.2f} ms  {k['calls_per_step']:6.0f} calls  {k['name'][:100]}")
    return row


def try_run(args, batch_size: int, variant: str, scratch: Path) -> dict:
    """``run``, or a row that names the variant and its error (a mode that fails is a result too)."""
    try:
        return run(args, batch_size, variant, scratch)
    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
        backend, _, mode = variant.partition(":")
        row = {"compile": backend or "eager", "compile_mode": mode, "batch": batch_size,
               "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return row


def _profile(step, n: int, top: int) -> list[dict]:
    """The ``top`` GPU kernels by their summed GPU time over ``n`` steps, per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            step(10_000 + i)
        torch.cuda.synchronize()
    events = gpu_kernels(prof)
    total = sum(e.self_device_time_total for e in events)
    rows = [{"name": "(all kernels)", "ms_per_step": round(total / 1e3 / n, 3),
             "calls_per_step": sum(e.count for e in events) / n}]
    rows += [{"name": e.key, "ms_per_step": round(e.self_device_time_total / 1e3 / n, 3), "calls_per_step": e.count / n}
             for e in events[:top]]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/world/world-pretrain.yaml")
    p.add_argument("--batch", default="256", help="comma-separated batch sizes (a row per batch and variant)")
    p.add_argument("--compile", default=",inductor",
                   help="comma-separated train.compile backends, each optionally :train.compile_mode ('' = eager)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile", type=int, default=0, help="profile this many more steps per variant (CUDA)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--name", default="pretrain_step", help="result file prefix: <name>-<device>.json")
    p.add_argument("--results", default=str(RESULTS), help="folder of the result file")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args(argv)
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as scratch:  # the run folder and a stand-in negative embedding
        rows = [try_run(args, int(b), v, Path(scratch)) for b in args.batch.split(",") for v in args.compile.split(",")]
    result = {"device": dev_name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "config": repo_relative(ROOT / args.config), "overrides": args.overrides, "rows": rows}
    write_result(args.name, dev_name, result, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
