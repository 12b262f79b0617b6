"""The grad-carrying exit step of self-forcing: one cached chunk forward + backward through the student at
the 1.3B geometry (random weights, bf16, a full 21 + 3-frame window), per ``attention.backward`` path —
the measurement behind that config key (the fused kernels are forward-only).

    python benchmarks/exit_step.py [--layers N] [--out DIR]

Prints and writes ``benchmarks/results/exit_step-<device>.json``: per path, ms for the forward + backward
of ``layers`` blocks (do_bench median), peak memory, and the relative difference of the input gradient to
the ``reference`` path (same weights, same inputs). The no-grad forward through ``attention.impl=auto``
(the kernel) is timed alongside, as what the non-exit denoising steps of a rollout pay.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402
from benchmarks.rollout import full_cache  # noqa: E402
from vmla_train import config as C  # noqa: E402
from vmla_train.student import WanStudent  # noqa: E402

GB = 2**30


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    import triton

    dev = torch.cuda.get_device_name()
    cfg = C.load(None, [f"model.num_layers={args.layers}"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        student = WanStudent(cfg).to(torch.bfloat16)
    v = cfg.video
    x = torch.randn(1, v.chunk_frames, cfg.model.in_channels, v.latent_height, v.latent_width, device="cuda",
                    dtype=torch.bfloat16)
    t = torch.full((1, v.chunk_frames), 500.0, device="cuda")
    text = torch.randn(1, 64, cfg.model.text_dim, device="cuda", dtype=torch.bfloat16)
    cache = full_cache(student, 1)
    print(f"device {dev}; {args.layers} blocks, chunk {v.chunk_frames} frames, window "
          f"{cfg.cache.window_frames} + {cfg.cache.sink_frames} sinks", flush=True)

    def step(path: str):
        for blk in student.blocks:
            blk.attn1.backward = C.AttentionImpl(path)
        xg = x.clone().requires_grad_(True)
        out = student(xg, t, text, cache=cache)  # write_cache=False: the cache is read only
        out.float().square().mean().backward()
        return xg.grad

    rows, grads = [], {}
    for path in ("reference", "absorbed"):
        student.zero_grad(set_to_none=True)
        grads[path] = step(path).float()
        torch.cuda.reset_peak_memory_stats()
        ms = float(triton.testing.do_bench(lambda: step(path), warmup=3, rep=30, return_mode="median"))
        peak = torch.cuda.max_memory_allocated() / GB
        rows.append(dict(path=path, fwd_bwd_ms=ms, peak_gb=peak))
    for r in rows:
        g = grads[r["path"]]
        r["grad_rel_diff_vs_reference"] = float((g - grads["reference"]).norm() / grads["reference"].norm())
    with torch.no_grad():
        for blk in student.blocks:
            blk.attn1.impl = C.AttentionImpl.auto
        fwd = float(triton.testing.do_bench(lambda: student(x, t, text, cache=cache), warmup=3, rep=30,
                                            return_mode="median"))
    for r in rows:
        print(f"backward={r['path']:14s} fwd+bwd {r['fwd_bwd_ms']:8.2f} ms  peak {r['peak_gb']:5.2f} GB  "
              f"input-grad diff vs reference {r['grad_rel_diff_vs_reference']:.1e}", flush=True)
    print(f"no-grad forward through impl=auto (the kernel): {fwd:.2f} ms", flush=True)
    out = dict(device=dev, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), layers=args.layers,
               chunk_frames=v.chunk_frames, window_frames=cfg.cache.window_frames,
               sink_frames=cfg.cache.sink_frames, runs=rows, nograd_forward_auto_ms=fwd)
    write_result("exit_step", dev, out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
