"""Benchmark: clip decoding (decord vs PyAV) and the training loader, at the config's real geometry.

    python benchmarks/data_prep.py [--config configs/videomla-1.3b.yaml] [--src 1280x720@30] [--seconds 6]
                                   [--reps 3] [--threads 1] [--loader-samples 24] [--loader-batches 60]
                                   [--dmd-step-s 1.0] [--out benchmarks/results/data_prep-cpu.json]

1. Encodes a synthetic H.264 source clip (moving gradients + a panning noise texture, libx264
   ``--preset`` via PyAV) at ``--src`` for
   ``--seconds`` s, then times decode + resize + center-crop of one training clip
   (``video.num_frames`` @ ``video.fps``, ``video.height x width``: 81 x 480 x 832 for Wan2.1) with
   decord and with PyAV, each in this one process with ``--threads`` decoder threads: clips/s per
   worker (a worker = one decoding process, as in ``vmla-data encode``).
2. Writes ``--loader-samples`` training samples at the real latent geometry (random float16
   latents [F', C, H/8, W/8] and umT5-width text of 60-200 tokens) as WebDataset shards, then times
   ``vmla_train.data.build_loader`` (kinds ``latents`` and ``prompts``, batch 1, 2 workers) over
   ``--loader-batches`` batches after a warm-up batch: samples/s of one rank.
3. Compares with the sample rate a DMD step consumes: ``1 / --dmd-step-s`` samples/s per rank.
   The default 1.0 s per sample is an assumption (a self-forcing DMD step on one GPU — rollout of a
   21-frame clip, CFG teacher and critic calls, two backward passes — takes seconds per sample); goals
   from the issue: decord >= 2x PyAV, loader >= 20x the DMD rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmla_train import config as C  # noqa: E402
from vmla_train.data import build_loader, encode_array  # noqa: E402
from vmla_train.dataprep.testing import make_mp4  # noqa: E402
from vmla_train.dataprep.video import ClipSpec, decode_decord, decode_pyav, probe  # noqa: E402


def time_decoder(fn, data: bytes, spec: ClipSpec, reps: int) -> tuple[float, tuple]:
    pr = probe(data, decode_first=False)
    out = fn(data, spec, pr)  # warm-up (and the shape)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(data, spec, pr)
    return reps / (time.perf_counter() - t0), tuple(out.shape)


def write_shards(folder: Path, cfg: C.Config, n: int, per_shard: int = 8) -> int:
    import webdataset as wds

    v, m = cfg.video, cfg.model
    g = torch.Generator().manual_seed(0)
    total = 0
    for s in range(0, n, per_shard):
        with wds.TarWriter(str(folder / f"train-{s // per_shard:06d}.tar")) as w:
            for i in range(s, min(n, s + per_shard)):
                lat = torch.randn(v.latent_frames, m.in_channels, v.latent_height, v.latent_width, generator=g)
                length = int(torch.randint(60, 201, (), generator=g))
                sample = {"__key__": f"clip{i:06d}", "latents.npy": encode_array(lat, "float16"),
                          "text.npy": encode_array(torch.randn(length, m.text_dim, generator=g), "float16"),
                          "txt": f"caption {i}", "json": json.dumps({"dtype": "float16"}).encode()}
                total += sum(len(x) for x in sample.values() if isinstance(x, bytes))
                w.write(sample)
    return total


def time_loader(cfg: C.Config, kind: str, batches: int) -> float:
    loader = build_loader(cfg, kind)
    next(loader)  # workers up
    t0 = time.perf_counter()
    n = sum(len(next(loader)) for _ in range(batches))
    dt = time.perf_counter() - t0
    loader.close()
    return n / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "videomla-1.3b.yaml"))
    p.add_argument("--src", default="1280x720@30", help="source clip WxH@fps")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--preset", default="medium", help="x264 preset of the source (medium: B-frames, CABAC, as real uploads)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="decoder threads per worker (0 = library default)")
    p.add_argument("--loader-samples", type=int, default=24)
    p.add_argument("--loader-batches", type=int, default=60)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--dmd-step-s", type=float, default=1.0, help="assumed DMD step time per sample per rank (s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_prep-cpu.json"))
    a = p.parse_args()

    cfg = C.load(a.config)
    v = cfg.video
    size, fps = a.src.split("@")
    sw, sh = (int(x) for x in size.split("x"))
    t0 = time.perf_counter()
    data = make_mp4(int(a.seconds * int(fps)), sh, sw, int(fps), seed=0, crf=23, gop=int(fps) * 2, preset=a.preset,
                    texture=True)
    print(f"source clip {sw}x{sh} @ {fps} fps, {a.seconds:g} s, x264 {a.preset}, {len(data) / 1e6:.1f} MB (encoded in "
          f"{time.perf_counter() - t0:.1f} s); training clip {v.num_frames} x {v.height} x {v.width} @ {v.fps} fps")
    spec = ClipSpec(v.num_frames, float(v.fps), v.height, v.width, a.threads)
    rates: dict[str, float] = {}
    for rep in range(a.reps):  # alternate the decoders so background load hits both alike; keep the best
        for name, fn in (("decord", decode_decord), ("pyav", decode_pyav)):
            r, shape = time_decoder(fn, data, spec, 1)
            rates[name] = max(rates.get(name, 0.0), r)
    for name in rates:
        print(f"  {name:<7} {rates[name]:.3f} clips/s per worker ({a.threads or 'default'} threads, best of {a.reps}) -> {shape}")

    with tempfile.TemporaryDirectory() as tmp:
        nbytes = write_shards(Path(tmp), cfg, a.loader_samples)
        lcfg = C.load(a.config, ["data.source=shards", f"data.shards={tmp}/train-*.tar", "data.batch_size=1",
                                 f"data.num_workers={a.loader_workers}", "data.batches_per_epoch=1000000"])
        loader_rates = {k: time_loader(lcfg, k, a.loader_batches) for k in ("latents", "prompts")}
    dmd_rate = 1.0 / a.dmd_step_s
    rows = [
        ("decode+resize decord", f"{rates['decord']:.3f} clips/s/worker", ""),
        ("decode+resize PyAV", f"{rates['pyav']:.3f} clips/s/worker", ""),
        ("decord / PyAV", f"{rates['decord'] / rates['pyav']:.2f}x", "goal >= 2x"),
        ("loader latents (batch 1)", f"{loader_rates['latents']:.1f} samples/s/rank",
         f"{loader_rates['latents'] / dmd_rate:.0f}x the DMD rate"),
        ("loader prompts (batch 1)", f"{loader_rates['prompts']:.1f} samples/s/rank",
         f"{loader_rates['prompts'] / dmd_rate:.0f}x the DMD rate (goal >= 20x)"),
    ]
    device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (no GPU)"
    print(f"\ndevice: {device}; assumed DMD step {a.dmd_step_s:g} s/sample/rank -> {dmd_rate:g} samples/s")
    w = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:>26}  {r[2]}")
    result = {
        "device": device, "config": a.config, "source": {"size": [sw, sh], "fps": int(fps), "seconds": a.seconds,
                                                         "mp4_bytes": len(data)},
        "clip": {"num_frames": v.num_frames, "fps": v.fps, "height": v.height, "width": v.width},
        "decoder_threads": a.threads, "reps": a.reps,
        "decode_clips_per_s_per_worker": rates, "decord_over_pyav": rates["decord"] / rates["pyav"],
        "loader": {"samples": a.loader_samples, "shard_bytes": nbytes, "batches": a.loader_batches,
                   "workers": a.loader_workers, "samples_per_s": loader_rates},
        "assumed_dmd_step_s_per_sample": a.dmd_step_s,
        "loader_over_dmd": {k: r / dmd_rate for k, r in loader_rates.items()},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    C.atomic_write_text(Path(a.out), json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
