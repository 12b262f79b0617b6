"""Benchmark: train the world's video codec (a small AutoencoderKLWan) on rendered world clips.

    python benchmarks/world_codec.py [--out runs/world-codec] [--steps 3000] [--time-limit 540] [--budget S]
                                     [--height 64] [--width 64] [--frames 17] [--batch 16] [--lr 2e-4]
                                     [--base-dim 32] [--dim-mult 1 2 4 4] [--temporal-downsample 0 1 1]
                                     [--num-res-blocks 1] [--z-dim 16]
                                     [--kl-weight 1e-5] [--workers N] [--device cuda] [--init-from CODEC [--inflate]]
                                     [--one-pass]

Calls ``vmla_train.world.codec.train_codec``: clips rendered on the fly by DataLoader workers, L1 + MSE
+ KL, AdamW with bf16 autocast on CUDA, a resumable checkpoint in ``--out``. If ``--time-limit``
seconds of training pass first, the state is saved and the same command continues it; ``--budget``
instead fits the number of steps (and the learning-rate schedule) to that many seconds. At the end the
latent statistics go into ``--out/vae/config.json``, and the held-out PSNR of the ``wan.vae_encode`` ->
``wan.vae_decode`` round trip and the world metrics of round-tripped full-length clips (the metric
ceiling) are measured; prints a table (step, loss, train PSNR, seconds) and writes
``benchmarks/results/<--name>-<device>.json``. ``--one-pass``: training steps run the codec over each clip in
one pass (``wan.vae_encode_whole`` / ``vae_decode_whole``) instead of diffusers' chunk loop (``python
benchmarks/codec_step.py`` times both).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, write_result  # noqa: E402
from vmla_train.world.codec import CodecConfig, train_codec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    d = CodecConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "world-codec"), help="run folder (state, vae/, codec.json)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps in total")
    p.add_argument("--time-limit", type=float, default=None, help="seconds of training before saving and stopping")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--frames", type=int, default=17, help="frames per clip (1 + 4k)")
    p.add_argument("--batch", type=int, default=16, help="clips per step")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--budget", type=float, default=None, help="seconds of training: fits the step count to them")
    p.add_argument("--init-from", default=None, help="start from this codec's weights (same widths; a fresh --out)")
    p.add_argument("--base-dim", type=int, default=d.base_dim)
    p.add_argument("--dim-mult", type=int, nargs="+", default=d.dim_mult)
    p.add_argument("--temporal-downsample", type=int, nargs="+", default=None,
                   help="per spatial downsampling, 1 = also 2x in time (default: Wan's, the last two: 4x in time)")
    p.add_argument("--num-res-blocks", type=int, default=d.num_res_blocks)
    p.add_argument("--z-dim", type=int, default=d.z_dim, help="latent channels (the DiT's model.in_channels)")
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--inflate", action="store_true",
                   help="with --init-from a codec trained on --frames 1: start from it applied frame by frame")
    p.add_argument("--one-pass", action="store_true",
                   help="training steps run the codec over each clip in one pass, not diffusers' chunk loop "
                        "(the same function up to rounding; evaluations always take the chunked path)")
    p.add_argument("--workers", type=int, default=None, help="render processes (default: cores - 2, 0 on CPU)")
    p.add_argument("--stats-clips", type=int, default=256, help="clips for latents_mean / latents_std")
    p.add_argument("--eval-clips", type=int, default=64, help="held-out clips for the PSNR")
    p.add_argument("--ceiling-clips", type=int, default=32, help="held-out clips for the metric ceiling (0: skip)")
    p.add_argument("--ceiling-frames", type=int, default=81, help="frames of those clips (the world's length)")
    p.add_argument("--name", default="world_codec", help="result file prefix: <name>-<device>.json")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", default=str(RESULTS), help="folder for world_codec-<device>.json")
    a = p.parse_args(argv)

    try:
        temporal = ([bool(t) for t in a.temporal_downsample] if a.temporal_downsample is not None
                    else CodecConfig.wan_temporal(len(a.dim_mult) - 1))
        codec = CodecConfig(base_dim=a.base_dim, dim_mult=a.dim_mult, num_res_blocks=a.num_res_blocks, z_dim=a.z_dim,
                            temperal_downsample=temporal)
        report = train_codec(a.out, a.height, a.width, a.frames, a.steps, a.batch, a.lr, a.device, a.seed,
                             time_limit_s=a.time_limit, codec=codec, kl_weight=a.kl_weight,
                             num_workers=a.workers, stats_clips=a.stats_clips, eval_clips=a.eval_clips,
                             log_every=a.log_every, budget_s=a.budget, ceiling_clips=a.ceiling_clips,
                             ceiling_frames=a.ceiling_frames, init_from=a.init_from, inflate=a.inflate,
                             one_pass=a.one_pass)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not report["done"]:
        print(f"stopped at step {report['steps']} of {report['target_steps']}: run the same command again", flush=True)
        return 0
    print(f"\n{'step':>7} {'loss':>8} {'PSNR dB':>8} {'s':>7}")
    for h in report["history"]:
        print(f"{h['step']:7d} {h['loss']:8.4f} {h['psnr']:8.2f} {h['s']:7.1f}")
    print(f"held-out PSNR {report['psnr_heldout_db']:.2f} dB ({report['eval_clips']} clips), "
          f"{report['params'] / 1e6:.2f} M params, {report['train_s']:.0f} s training on {report['device']}",
          flush=True)
    write_result(a.name, report["device"], report, a.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
