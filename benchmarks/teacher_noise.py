"""Where along the noise schedule a world teacher loses the prompt.

    python benchmarks/teacher_noise.py --teacher runs/world/teacher --models runs/world/models --world runs/world/clips

On the first ``--clips`` held-out scenes of a ``vmla-data world`` folder (rendered, never trained on; ``--split
train``: its training scenes, to compare), encoded by
the world codec (``wan.vae_encode``, the posterior mode, as ``vmla-data encode`` stores them):

1. **x0 error per noise level**: clean latents noised to sigma (one seeded draw), the teacher's x0 estimate
   ``x_t - sigma v`` against them, mean squared error over the latents' variance; with the caption and with the
   negative prompt's embedding (how much the prompt helps at that level).
2. **Restarts**: the same latents noised to the sampler's sigma after ``k`` of ``--steps`` shift-``--shift`` Euler
   steps, then ``wan.euler_sample(start=k)`` with CFG ``--guidance`` to the end, decoded and scored against the
   caption (``metrics.evaluate``): adherence and per-object present / shape / size / direction. ``k = steps`` is
   the codec's reconstruction (the ceiling); ``k = 0`` is plain sampling from the same noise. The level from which
   adherence falls is where the teacher's training is short.

Prints both tables and writes ``<--name>-<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, repo_relative, write_result  # noqa: E402
from vmla_train import schedule, wan  # noqa: E402
from vmla_train.config import MODEL_SIZES, resolve_device  # noqa: E402
from vmla_train.generate import rgb_frames  # noqa: E402
from vmla_train.world import metrics  # noqa: E402
from vmla_train.world.captions import parse_prompt  # noqa: E402
from vmla_train.world.openvid import HELDOUT_SCENES, MANIFEST, SCENES, read_scenes  # noqa: E402
from vmla_train.world.render import render  # noqa: E402

OBJECT_KEYS = metrics.OBJECT_CHECKS


def world_clips(world: Path, n: int, split: str) -> tuple[list[str], np.ndarray, float]:
    """Captions and rendered frames [n, T, H, W, 3] of the first ``n`` scenes of ``split`` (heldout | train),
    and the world's fps."""
    import json

    settings = json.loads((world / MANIFEST).read_text())["settings"]
    path = world / (HELDOUT_SCENES if split == "heldout" else SCENES)
    scenes = read_scenes(path)[:n]
    if len(scenes) < n:
        raise SystemExit(f"teacher_noise: '{path}' has {len(scenes)} scenes, --clips asks for {n}")
    frames = np.stack([render(s, settings["num_frames"]) for _, s in scenes])
    return [c for c, _ in scenes], frames, float(settings["fps"])


def x0_errors(model, x0, text, negative, sigmas, text_len, gen) -> list[dict]:
    """Per sigma: the teacher's x0 error over the latents' variance, with the caption and with the negative."""
    var = float(x0.var())
    rows = []
    for s in sigmas:
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        x_t = (1 - s) * x0 + s * noise
        t = torch.full((x0.shape[0],), schedule.NUM_TRAIN_TIMESTEPS * s, device=x0.device)
        err = {}
        for name, txt in (("prompt", text), ("negative", negative.expand(x0.shape[0], -1, -1))):
            flow = wan.wan_flow(model, x_t, t, txt.to(x0.device), text_len).float()
            err[name] = float((x_t - s * flow - x0).square().mean()) / var
        rows.append({"sigma": s, "x0_error": round(err["prompt"], 4), "x0_error_negative": round(err["negative"], 4),
                     "negative_over_prompt": round(err["negative"] / err["prompt"], 3)})
    return rows


def score(videos: list[np.ndarray], captions: list[str], fps: float) -> dict:
    """Adherence and the per-object checks of ``videos`` against their captions."""
    r = metrics.evaluate_many(((v, parse_prompt(c)) for v, c in zip(videos, captions)), fps=fps)
    return {"adherence": round(r["adherence"], 3),
            **{k: round(v, 3) for k, v in r["per_object"].items() if k in OBJECT_KEYS},
            "objects": r["per_object"]["objects"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="diffusers WanTransformer3DModel folder")
    p.add_argument("--models", required=True, help="the world's models folder (vae/, tokenizer/, text_encoder/)")
    p.add_argument("--world", required=True, help="a `vmla-data world` folder (its held-out scenes)")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="held-out scenes, or the folder's training scenes (the first clips a teacher trained on "
                        "with the same seed: its generalisation gap)")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--starts", default="48,36,30,24,16,8,0", help="restart step indices (steps = reconstruction)")
    p.add_argument("--sigmas", default="0.5,0.7,0.8,0.9,0.95,0.98", help="noise levels of the x0 error")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--text-len", type=int, default=MODEL_SIZES["world"]["model"]["text_len"],
                   help="the teacher's text slots (the world size's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--name", default="teacher_noise")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    dev = resolve_device(args.device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    starts = [int(k) for k in args.starts.split(",")]
    if any(not 0 <= k <= args.steps for k in starts):
        raise SystemExit(f"teacher_noise: --starts {args.starts}: each must be in 0..{args.steps}")

    model = wan.load_wan_transformer(args.teacher, dev, dtype).eval()
    vae = wan.load_vae(Path(args.models) / "vae", dev, torch.float32 if dev.type == "cpu" else torch.bfloat16)
    tok, enc = wan.load_text_encoder(args.models, dev, torch.float32)
    captions, frames, fps = world_clips(Path(args.world), args.clips, args.split)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        x0, text = [], []
        for lo in range(0, len(captions), args.batch_size):
            px = torch.from_numpy(frames[lo: lo + args.batch_size]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
            x0.append(wan.vae_encode(vae, px.to(dev)))  # [B, F, C, h, w]
            text.append(wan.encode_prompts(tok, enc, captions[lo: lo + args.batch_size], args.text_len)[0])
        x0, text = torch.cat(x0).float(), torch.cat(text)
        negative = wan.encode_prompts(tok, enc, [wan.WAN_NEGATIVE_PROMPT], args.text_len)[0]
        probe = x0_errors(model, x0, text, negative, [float(s) for s in args.sigmas.split(",")], args.text_len, gen)
        sig = schedule.euler_sigmas(args.steps, args.shift)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        restarts = []
        for k in starts:
            s = float(sig[k])
            videos = []
            for lo in range(0, len(captions), args.batch_size):
                sl = slice(lo, lo + args.batch_size)
                x = (1 - s) * x0[sl] + s * noise[sl]
                x, _ = wan.euler_sample(model, x, text[sl], args.steps, args.shift, args.text_len, negative,
                                        args.guidance, start=k)
                videos += [rgb_frames(v) for v in wan.vae_decode(vae, x)]
            restarts.append({"start_step": k, "sigma": round(s, 4), **score(videos, captions, fps)})
            print(f"restart at step {k:2d} (sigma {s:.3f}): " + ", ".join(
                f"{key} {restarts[-1][key]}" for key in ("adherence", *OBJECT_KEYS)), flush=True)
    print("\nx0 error / latent variance   sigma: " + "  ".join(f"{r['sigma']:.2f}" for r in probe))
    print("  with the caption                  " + "  ".join(f"{r['x0_error']:.3f}" for r in probe))
    print("  with the negative prompt          " + "  ".join(f"{r['x0_error_negative']:.3f}" for r in probe))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {"device": name, "date": time.strftime("%Y-%m-%d"), "teacher": repo_relative(Path(args.teacher)),
              "world": repo_relative(Path(args.world)), "clips": len(captions), "split": args.split,
              "steps": args.steps, "shift": args.shift, "guidance": args.guidance, "seed": args.seed,
              "seconds": round(time.perf_counter() - t0, 1), "x0_error": probe, "restarts": restarts}
    write_result(args.name, name, result, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
