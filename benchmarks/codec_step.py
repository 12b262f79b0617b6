"""Benchmark: one training step of the world codec, diffusers' chunk loop against the one-pass path.

    python benchmarks/codec_step.py [--batch 64] [--frames 49] [--height 64] [--width 64] [--steps 5]
                                    [--codecs s8 s4] [--device cuda] [--results benchmarks/results]

A training step of ``world.codec.codec_loss`` (encode, posterior sample, decode, L1 + MSE + KL; backward and
an AdamW step; bf16 autocast on CUDA) on random clips in [-1, 1], per codec geometry (``s8``: the default
``CodecConfig`` at base width 16, 8x in space; ``s4``: ``dim_mult`` 1 2 4, 4x in space; both 4x in time) and
per path: ``chunked`` runs ``AutoencoderKLWan.encode`` / ``decode`` (diffusers' loop: 1 + 4 + 4 ... frames
through the encoder, one latent frame at a time through the decoder, with its feature cache); ``one_pass``
runs ``wan.vae_encode_whole`` / ``vae_decode_whole`` over the whole clip. The first step of each is a
warm-up (cuDNN autotuning), the median of the next ``--steps`` is reported with the peak memory, and the two
paths' losses on the same weights and noise are compared (equal up to float rounding; fp32 on a CPU, bf16
autocast on CUDA). Prints a table row by row; writes ``benchmarks/results/codec_step-<device>.json`` after every
row (a run cut off by a time limit keeps the rows it measured).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, write_result  # noqa: E402
from vmla_train.world.codec import CodecConfig, build_codec, codec_loss  # noqa: E402

CODECS = {"s8": CodecConfig(base_dim=16, z_dim=16),
          "s4": CodecConfig(base_dim=16, z_dim=16, dim_mult=[1, 2, 4], temperal_downsample=[True, True])}


def time_path(vae, video: torch.Tensor, one_pass: bool, steps: int, device: torch.device) -> dict:
    """Median seconds of a full training step over ``steps`` steps after one warm-up, and the peak memory."""
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-6)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(steps + 1):
        torch.manual_seed(i)  # the same posterior noise per step on both paths
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = codec_loss(vae, video, 1e-5, one_pass)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return dict(step_s=statistics.median(times[1:]), first_step_s=times[0], losses=losses,
                peak_gb=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--frames", type=int, default=49, help="frames per clip (1 + 4k)")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (after one warm-up)")
    p.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", default=str(RESULTS))
    a = p.parse_args(argv)
    if a.batch < 1 or a.steps < 1 or a.frames < 1 or (a.frames - 1) % 4:
        print(f"error: needs --batch, --steps >= 1 and --frames = 1 + 4k; got {a.batch}, {a.steps}, {a.frames}",
              file=sys.stderr)
        return 2
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    video = torch.rand(a.batch, 3, a.frames, a.height, a.width, generator=torch.Generator().manual_seed(0))
    video = video.mul(2).sub(1).to(device)
    rows: dict[str, dict] = {}
    payload = dict(device=name, date=dt.date.today().isoformat(), batch=a.batch, frames=a.frames, height=a.height,
                   width=a.width, steps=a.steps, command="python benchmarks/codec_step.py " + " ".join(
                       argv if argv is not None else sys.argv[1:]), rows=rows)
    print(f"\nworld codec training step, batch {a.batch} x {a.frames} frames of {a.height}x{a.width}, {name}")
    print(f"{'codec path':<14} {'step s':>8} {'clips/s':>9} {'peak GB':>8} {'first loss':>11} {'speed-up':>9}",
          flush=True)
    for codec in a.codecs:
        start = build_codec(CODECS[codec], seed=0).state_dict()
        for one_pass in (False, True):
            vae = build_codec(CODECS[codec], seed=0).to(device).train()
            vae.load_state_dict(start)
            key = f"{codec} {'one_pass' if one_pass else 'chunked'}"
            rows[key] = r = time_path(vae, video, one_pass, a.steps, device)
            del vae
            if device.type == "cuda":
                torch.cuda.empty_cache()
            peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
            print(f"{key:<14} {r['step_s']:8.3f} {a.batch / r['step_s']:9.1f} {peak:>8} {r['losses'][0]:11.5f} "
                  f"{rows[codec + ' chunked']['step_s'] / r['step_s']:8.2f}x", flush=True)
            write_result("codec_step", name, payload, a.results)  # after every row: a cut-off run keeps its rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
