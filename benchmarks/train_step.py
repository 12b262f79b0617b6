"""Self-forcing training step at real geometry with random weights: seconds per critic step and per
student (DMD) step, peak GPU memory, MFU.

    python benchmarks/train_step.py                         # 1.3B MLA student, 1.3B critic, 1.3B teacher
    python benchmarks/train_step.py --teacher wan-14b       # the 14B teacher (if it fits)
    python benchmarks/train_step.py --config configs/self_forcing-debug.yaml --device cpu   # smoke test

Real geometry: configs/self_forcing.yaml (Wan2.1-1.3B, VideoMLA d_c 160 / d_r 64, 21 latent frames at
480x832, chunk 3, batch 1 per GPU, bf16, gradient checkpointing). The steps are the loop's own
(``train.update_role`` with ``DistillationModule.critic_step`` / ``dmd_loss``) on engines set up by
Fabric exactly as ``fit`` does (``--strategy deepspeed`` = ZeRO-2, one engine per trainable model).

Several GPUs: ``--gpus N`` with one process per GPU (each runs batch 1; times are rank 0's).

MFU = model FLOPs of every forward and backward actually run in the step (per GPU) (``flops.FlopCounter``:
2 x parameters applied per token x tokens + 4 x q x kv x dim per layer for attention; backward = 2 x
forward; activation-checkpoint recomputation not counted) / (step time x the GPUs' dense bf16 peak,
989 TFLOP/s for H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from vmla_train import config as C
from vmla_train import data, parallel, recipe, schedule, train
from vmla_train.distill import DistillationModule, RolloutSpec
from vmla_train.ema import EMA
from vmla_train.flops import FlopCounter, peak_tflops
from vmla_train.rollout import draw_exit_steps
from vmla_train.state import TrainState

ROOT = Path(__file__).resolve().parents[1]


def run(args, teacher_size: str) -> dict:
    overrides = [f"strategy.name={args.strategy}", f"strategy.zero_stage={args.zero_stage}", f"strategy.devices={args.gpus}",
                 "data.source=synthetic", "data.num_workers=0", "data.batch_size=1", f"train.global_batch_size={args.gpus}",
                 "logging.wandb_mode=disabled", "train.allow_random_roles=true",  # random teacher/critic: timing only
                 f"runtime.run_dir={args.out_dir}/run", f"strategy.accelerator={'cuda' if args.device == 'cuda' else 'cpu'}"]
    if teacher_size:
        overrides.append(f"train.teacher_size={teacher_size}")
    if args.device == "cpu":
        overrides += ["strategy.name=single", "strategy.precision=32-true"]
    cfg = C.load(ROOT / args.config, overrides + args.overrides)
    fabric = parallel.build_fabric(cfg, 1)
    fabric.launch()
    dev = fabric.device
    t0 = time.perf_counter()
    with torch.device(dev):  # random init directly on the device
        student = recipe.build_student(cfg)
    teacher = recipe.build_teacher(cfg, device=dev)
    critic = recipe.build_critic(cfg, teacher, device=dev)
    if cfg.train.gradient_checkpointing:
        parallel.apply_gradient_checkpointing(student)
        parallel.apply_gradient_checkpointing(critic)
    bf16 = dev.type == "cuda"
    if bf16:
        teacher = teacher.to(torch.bfloat16)
    flops = FlopCounter(cfg, student, teacher, critic)
    module = DistillationModule(cfg, student, teacher, critic)
    so, co = module.configure_optimizers()
    sm, so = fabric.setup(student, so)
    cm, co = fabric.setup(critic, co)
    module.use_engines(sm, cm, dev, next(teacher.parameters()).dtype)
    print(f"setup {time.perf_counter() - t0:.1f} s on {dev}", flush=True)
    loader = data.build_loader(cfg, "prompts", fabric.global_rank, fabric.world_size)
    state = TrainState(fabric, cfg, module, so, co, EMA(0.0, 0, keep=False), loader, "", 1)
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    num_chunks = cfg.video.latent_frames // cfg.video.chunk_frames
    times = {"critic": [], "student": []}
    fl = {"critic": [], "student": []}
    for it in range(args.warmup + args.iters):
        batch = next(loader).to(dev)
        exits = draw_exit_steps(num_chunks, len(steps), torch.Generator().manual_seed(it))
        spec = RolloutSpec(cfg.video.latent_frames, steps, exits, 0)
        gen = torch.Generator(device=dev).manual_seed(it)
        for kind in ("student", "critic"):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            if kind == "student":
                train.update_role(state, "student", lambda b: module.dmd_loss(b, gen, spec), [batch])
                f = flops.student(1, spec)
            else:
                train.update_role(state, "critic", lambda b: module.critic_step(b, gen, spec), [batch])
                f = flops.critic(1, spec)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            fabric.print(f"iter {it} {kind}: {dt:.2f} s, exits {exits}, {f / 1e12:.0f} TFLOP per GPU", flush=True)
            if it >= args.warmup:
                times[kind].append(dt)
                fl[kind].append(f)
    peak = peak_tflops(dev)
    s_c, s_s = sum(times["critic"]) / len(times["critic"]), sum(times["student"]) / len(times["student"])
    total_flops = sum(fl["critic"]) + sum(fl["student"])
    total_time = sum(times["critic"]) + sum(times["student"])
    return {
        "teacher": teacher_size or cfg.model.name, "strategy": f"{args.strategy}{'-zero' + str(args.zero_stage) if args.strategy == 'deepspeed' else ''}"
                                                     f"{'-offload' if cfg.strategy.offload else ''}",
        "gpus": fabric.world_size if dev.type == "cuda" else 0, "rank": fabric.global_rank, "s_per_critic_step": round(s_c, 3), "s_per_student_step": round(s_s, 3),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None,
        "mfu": round(total_flops / total_time / (peak * 1e12), 4) if peak else None,
        "tflop_per_critic_step": round(sum(fl["critic"]) / len(fl["critic"]) / 1e12, 1),
        "tflop_per_student_step": round(sum(fl["student"]) / len(fl["student"]) / 1e12, 1),
        "iters": args.iters, "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "attention_impl": cfg.attention.impl.value,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/self_forcing.yaml")
    p.add_argument("--teacher", default="", help="teacher size (e.g. wan-14b); '' = the student's size")
    p.add_argument("--strategy", default="deepspeed")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--gpus", type=int, default=1, help="processes/GPUs; >1: launch one process per GPU with "
                   "MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK/LOCAL_RANK set (torchrun or a shell loop)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks/results"))
    p.add_argument("--json", default="", help="output JSON (default benchmarks/results/train_step-<device>.json)")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args()
    res = run(args, args.teacher)
    if res.pop("rank") != 0:
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device == "cuda" else "cpu"
    tag = device.replace(" ", "-").replace("/", "-")
    out = Path(args.json or Path(args.out_dir) / f"train_step-{tag}.json")
    prev = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    prev_runs = [r for r in prev.get("runs", []) if (r["teacher"], r["strategy"], r["gpus"]) != (res["teacher"], res["strategy"], res["gpus"])]
    doc = {"device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "runs": prev_runs + [res]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"\n{'teacher':<10} {'strategy':<14} {'gpus':>4} {'s/critic':>9} {'s/student':>10} {'peak GB':>8} {'MFU':>6}")
    for r in doc["runs"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['teacher']:<10} {r['strategy']:<14} {r['gpus']:>4} {r['s_per_critic_step']:>9.2f} "
              f"{r['s_per_student_step']:>10.2f} {str(r['peak_mem_gb']):>8} {mfu:>6}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
