"""Benchmark: what decoding in bf16 costs — the streaming VAE decode of `vmla-generate` in bf16 against fp32.

    python benchmarks/vae_precision.py --vae CODEC_OR_MODELS_FOLDER [--clips 8] [--frames 81] [--chunk 3]
                                       [--device cuda] [--name vae_precision]

World clips (held-out stream, seeded) -> ``wan.vae_encode`` in fp32 -> the same latents decoded chunk by chunk by
``generate.StreamingDecoder`` with the VAE in fp32 and in bf16 (what ``vmla-generate`` uses on a GPU). Reports
the PSNR of the bf16 decode against the fp32 one (the error bf16 adds), each decode's PSNR against the
rendered frames (the codec's own error, for scale), the largest pixel difference in 8-bit levels, and the
world metrics of both decodes against their scenes. Prints a table; writes ``<--name>-<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, write_result  # noqa: E402
from vmla_train import wan  # noqa: E402
from vmla_train.generate import StreamingDecoder, rgb_frames  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def decode(vae, latents: torch.Tensor, chunk: int) -> np.ndarray:
    """Latents [1, F, C, h, w] -> uint8 frames [T, H, W, 3], ``chunk`` latent frames per call (as generation)."""
    dec = StreamingDecoder(vae)
    try:
        parts = [dec(latents[:, i : i + chunk]) for i in range(0, latents.shape[1], chunk)]
    finally:
        dec.close()
    return rgb_frames(torch.cat(parts, 2)[0])


def main(argv: list[str] | None = None) -> int:
    from vmla_train.world import metrics
    from vmla_train.world.codec import clip_seed
    from vmla_train.world.render import render
    from vmla_train.world.scene import sample_scene

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", required=True, help="AutoencoderKLWan folder (or a folder with vae/)")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--chunk", type=int, default=3, help="latent frames per decode call (video.chunk_frames)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--name", default="vae_precision")
    p.add_argument("--results", default=str(RESULTS))
    a = p.parse_args(argv)

    dev = torch.device(a.device)
    vae32 = wan.load_vae(a.vae, device=dev, dtype=torch.float32).eval()
    vae16 = wan.load_vae(a.vae, device=dev, dtype=torch.bfloat16).eval()
    rows, m32, m16 = [], [], []
    for i in range(a.clips):
        scene = sample_scene(clip_seed(0, 1, i), a.size, a.size, a.fps)  # stream 1: held-out clips
        truth = np.asarray(render(scene, a.frames))
        video = torch.as_tensor(truth).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1.0).to(dev)
        latents = wan.vae_encode(vae32, video)  # (1, F, C, h, w), fp32
        f32, f16 = decode(vae32, latents, a.chunk), decode(vae16, latents, a.chunk)
        rows.append({"clip": i, "psnr_bf16_vs_fp32_db": psnr(f16, f32), "max_abs_levels": int(np.abs(
            f16.astype(np.int16) - f32.astype(np.int16)).max()), "psnr_fp32_vs_truth_db": psnr(f32, truth),
            "psnr_bf16_vs_truth_db": psnr(f16, truth)})
        m32.append(metrics.evaluate(f32, scene, fps=a.fps))  # against the scene: exact targets
        m16.append(metrics.evaluate(f16, scene, fps=a.fps))
    keys = ("adherence", "identity", "motion_error", "physics_error")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "clip"}
    world = {k: {"fp32": float(np.mean([m[k] for m in m32])), "bf16": float(np.mean([m[k] for m in m16]))} for k in keys}
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{a.clips} held-out world clips of {a.frames} frames, {a.size}x{a.size}, decoded {a.chunk} latent frames "
          f"per call on {device}")
    print(f"  bf16 decode vs fp32 decode   {mean['psnr_bf16_vs_fp32_db']:.1f} dB (largest difference "
          f"{max(r['max_abs_levels'] for r in rows)} of 255 levels)")
    print(f"  fp32 decode vs rendered      {mean['psnr_fp32_vs_truth_db']:.1f} dB")
    print(f"  bf16 decode vs rendered      {mean['psnr_bf16_vs_truth_db']:.1f} dB")
    for k in keys:
        print(f"  {k:<28} fp32 {world[k]['fp32']:.3f}  bf16 {world[k]['bf16']:.3f}")
    write_result(a.name, device, {"device": device, "vae": a.vae, "clips": a.clips, "frames": a.frames,
                                  "chunk": a.chunk, "mean": mean, "world_metrics": world, "per_clip": rows}, a.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
