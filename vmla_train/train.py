"""The training loop (Lightning Fabric): engines, steps, checkpoints, logging. Read ``fit`` top to bottom.

One loop for the three stages (``train.stage``):

- ``adapt``: student flow matching on latent batches (block-causal, per-chunk timesteps);
- ``ode_init``: student regression on teacher ODE trajectories;
- ``self_forcing``: per iteration, a student DMD step every ``dmd.critic_steps_per_student_step``
  iterations, then a critic step (Self-Forcing's order).

Engines (DESIGN 2): the student and the critic are each ``fabric.setup(model, AdamW)`` on their own:
under DeepSpeed that is one engine each; ``fabric.backward(loss, model=engine)`` before each engine's
``step``. The teacher is frozen and never set up for training. Our counters (``step`` = iteration,
``student_steps``, ``critic_steps``) drive every schedule, never Lightning's.

Batches: ``train.global_batch_size = data.batch_size x world_size x accumulation``; the accumulation
is derived and checked here. Randomness: every draw of an iteration comes from generators seeded by
``(runtime.seed, rank, step)`` (and ``(seed, step)`` on rank 0 for the exit steps), so a resumed run
draws what the uninterrupted one drew; global RNG states are saved too.

Faults (README "Fault tolerance"): resume takes the newest checkpoint that verifies against its
manifest and loads on every rank, falling back (logged) to older ones; a step whose loss or gradient
is non-finite on any rank is skipped on every rank (``train.max_consecutive_skips`` in a row stop the
run after a checkpoint); a failed checkpoint write removes its temp folder, leaves the previous
checkpoints intact and stops or continues per ``checkpoint.on_write_error``.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import config as C
from . import data, parallel, recipe, schedule, tracking, validation
from .analyze import RankOccupationMonitor
from .ema import EMA
from .attention import FrameMask
from .rollout import draw_exit_steps
from .student_io import CheckpointError

# Dense bf16 peak (TFLOP/s, no sparsity) per device for the MFU estimate.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0}


class StopRequested(Exception):
    pass


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run stopped after checkpointing the last good weights."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, ...) and ``checkpoint.on_write_error=stop``."""


@dataclass
class Counters:
    step: int = 0  # iterations done (the schedule clock)
    student_steps: int = 0  # student optimizer steps
    critic_steps: int = 0  # critic optimizer steps
    samples: int = 0  # training samples consumed (all ranks)
    losses: list = field(default_factory=list)  # (step, name, value) of every logged loss, for resume checks
    skipped_steps: int = 0  # iterations whose update was skipped (non-finite loss or gradient on some rank)


# ----------------------------------------------------------------------------------------------
# Signals: SIGUSR1 (Slurm's --signal=USR1@120) and SIGTERM checkpoint and stop at the next step
# ----------------------------------------------------------------------------------------------
class _StopFlag:
    def __init__(self):
        self.signum = 0

    def install(self) -> None:
        for s in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signum = signum


def _generator(device: torch.device, *key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


def accumulation_steps(cfg: C.Config, world_size: int) -> int:
    per_step = cfg.data.batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise C.ConfigError(
            f"config key 'train.global_batch_size': expected a multiple of data.batch_size x world size = "
            f"{cfg.data.batch_size} x {world_size} = {per_step}, found {cfg.train.global_batch_size}")
    return cfg.train.global_batch_size // per_step


def world_size_of(cfg: C.Config) -> int:
    return cfg.strategy.devices * cfg.strategy.num_nodes


# ----------------------------------------------------------------------------------------------
# FLOPs (for the MFU estimate): model FLOPs of the forwards and backwards actually run
# ----------------------------------------------------------------------------------------------
def forward_flops(model_cfg: C.ModelConfig, block_params: int, text_kv_params: int, batch: int, q_tokens: int,
                  kv_tokens: int, text_tokens: int) -> float:
    """2 x (params applied per token) x tokens + attention products (QK^T and AV: 4 x q x kv x dim per
    layer for self-attention, the same with the text for cross-attention). Recomputation is not counted."""
    dense = 2.0 * q_tokens * (block_params - text_kv_params) + 2.0 * text_tokens * text_kv_params
    attn = 4.0 * q_tokens * (kv_tokens + text_tokens) * model_cfg.dim * model_cfg.num_layers
    return batch * (dense + attn)


def _param_split(model: torch.nn.Module) -> tuple[int, int]:
    total, text_kv = 0, 0
    for n, p in model.named_parameters():
        numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += numel
        if ".attn2.to_k." in n or ".attn2.to_v." in n:
            text_kv += numel
    return total, text_kv


class FlopCounter:
    """FLOPs of one self-forcing / adapt / ODE iteration, from the config and the exit steps."""

    def __init__(self, cfg: C.Config, student: torch.nn.Module, teacher: torch.nn.Module | None,
                 critic: torch.nn.Module | None = None):
        self.cfg = cfg
        self.student = _param_split(student)
        self.teacher = _param_split(teacher) if teacher is not None else (0, 0)
        self.critic_p = _param_split(critic) if critic is not None else self.teacher
        self.tcfg = recipe.teacher_model_config(cfg)

    def _s(self, b, q, kv):
        return forward_flops(self.cfg.model, *self.student, b, q, kv, self.cfg.model.text_len)

    def _t(self, b, q):
        return forward_flops(self.tcfg, *self.teacher, b, q, q, self.cfg.model.text_len)

    def _c(self, b, q):
        return forward_flops(self.cfg.model, *self.critic_p, b, q, q, self.cfg.model.text_len)

    def rollout(self, b: int, num_frames: int, exit_steps: list[int], grad: bool) -> float:
        c, tpf = self.cfg.cache, self.cfg.tokens_per_frame
        chunk = self.cfg.video.chunk_frames
        total, cached = 0.0, 0
        for e in exit_steps:
            q, kv = chunk * tpf, (min(cached, c.window_frames - chunk + c.sink_frames) + chunk) * tpf
            total += (e + 1) * self._s(b, q, kv) + self._s(b, q, kv)  # denoise steps + clean re-run
            if grad:
                total += 2 * self._s(b, q, kv)  # backward of the exit step
            cached += chunk
        return total

    def student_dmd(self, b, spec) -> float:
        clip = self.cfg.video.latent_frames * self.cfg.tokens_per_frame
        return self.rollout(b, spec.num_frames, spec.exit_steps, True) + 2 * self._t(b, clip) + self._c(b, clip)

    def critic(self, b, spec) -> float:
        clip = self.cfg.video.latent_frames * self.cfg.tokens_per_frame
        return self.rollout(b, spec.num_frames, spec.exit_steps, False) + 3 * self._c(b, clip)  # fwd + bwd

    def full_student(self, b) -> float:
        tokens = self.cfg.video.latent_frames * self.cfg.tokens_per_frame
        return 3 * self._s(b, tokens, tokens)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in name:
            return v
    return None


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def fit(cfg: C.Config, stop_after: int | None = None) -> dict:
    """Train ``cfg.train.stage`` to ``train.num_steps`` iterations, resuming from the run folder's latest
    complete checkpoint. ``stop_after`` (tests) stops like a signal would after that many iterations of
    this process. Returns a summary (counters, the losses of every iteration, the last checkpoint)."""
    stage = cfg.train.stage
    sf = stage == C.Stage.self_forcing
    run_dir = Path(cfg.runtime.run_dir)
    accum = accumulation_steps(cfg, world_size_of(cfg))

    # 1. Fabric and processes (one per device; launched by srun / torchrun / our test harness).
    fabric = parallel.build_fabric(cfg, accum)
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    if world != world_size_of(cfg):
        raise C.ConfigError(f"config key 'strategy.devices': {cfg.strategy.devices} x {cfg.strategy.num_nodes} nodes "
                            f"but {world} processes were launched")
    ds, zero3 = parallel.is_deepspeed(fabric), parallel.is_zero3(fabric)
    dev = fabric.device
    stop = _StopFlag()
    stop.install()

    # 2. Resume point (the latest complete checkpoint of the run folder) and the W&B run.
    #    Folders a crash left incomplete are removed; the candidates are verified and loaded in step 5.
    candidates: list[Path] = []
    if cfg.checkpoint.resume:
        if rank == 0:
            for p in ckpt.clean_incomplete(run_dir):
                fabric.print(f"removed incomplete checkpoint folder {p} (no manifest: a save was interrupted)")
        fabric.barrier()
        candidates = ckpt.usable_checkpoints(run_dir)
    saved_id = next((i for i in map(_saved_run_id, candidates) if i), None)
    fresh = not cfg.checkpoint.resume  # starting over: a new W&B run, not the folder's old one
    run_id = fabric.broadcast(tracking.run_id_for(run_dir, saved_id, fresh) if rank == 0 else None)
    logger = tracking.build_logger(cfg, run_dir, run_id) if rank == 0 else None
    if rank == 0:
        C.save(cfg, run_dir / "config.yaml")

    # 3. Roles. The same seed on every rank: the engines start from identical weights.
    student = recipe.build_student(cfg)
    teacher = recipe.build_teacher(cfg) if sf or cfg.validation.every_n_steps > 0 else None
    critic = recipe.build_critic(cfg, teacher) if sf else None
    if cfg.train.gradient_checkpointing:
        parallel.apply_gradient_checkpointing(student)
        if critic is not None:
            parallel.apply_gradient_checkpointing(critic)
    flops = FlopCounter(cfg, student, teacher, critic)
    new_cache = student.new_cache  # bound to the raw module (engines forward attributes too)

    # 4. One engine per trainable model.
    o = cfg.optim
    adamw = dict(betas=tuple(o.betas), weight_decay=o.weight_decay)
    student_m, opt_s = fabric.setup(student, torch.optim.AdamW(student.parameters(), lr=o.student_lr, **adamw))
    critic_m = opt_c = None
    if sf:
        critic_m, opt_c = fabric.setup(critic, torch.optim.AdamW(critic.parameters(), lr=o.critic_lr, **adamw))
        neg_text = recipe.negative_text(cfg).to(dev)
    if teacher is not None:
        compute_dtype = torch.bfloat16 if fabric.device.type == "cuda" and "bf16" in parallel.resolve_precision(
            cfg, parallel.resolve_accelerator(cfg)) else torch.float32
        teacher = teacher.to(device=dev) if compute_dtype == torch.float32 else teacher.to(device=dev, dtype=compute_dtype)
    rollout_dtype = next(student_m.parameters()).dtype
    ema = EMA(cfg.dmd.ema_decay, cfg.dmd.ema_start_step, keep=rank == 0)
    monitor = RankOccupationMonitor(cfg.logging.rank_every_n_steps) if cfg.logging.rank_every_n_steps > 0 else None

    # 5. Data: fixed batches per epoch on every rank; state resumes exactly.
    kind = {"adapt": "latents", "ode_init": "ode", "self_forcing": "prompts"}[stage.value]
    loader = data.build_loader(cfg, kind, rank, world)

    counters = Counters()
    resume = _resume(fabric, run_dir, candidates, lambda folder, saved: _restore(
        fabric, folder, rank, student_m, opt_s, critic_m, opt_c, ema, loader, counters, saved, ds))
    if resume is not None:
        fabric.print(f"resumed from {resume} at step {counters.step}")
    if rank == 0:  # iterations past the resume point are re-run: drop their lines so each step is logged once
        _trim_metrics(run_dir / "metrics.jsonl", counters.step)

    # Fixed prompts for validation and sample videos: the first prompt batches of rank 0's order.
    fixed = data.build_loader(cfg, "prompts", 0, 1)
    fixed_text = torch.cat([next(fixed).text for _ in range(max(1, cfg.validation.num_prompts) // cfg.data.batch_size + 1)])
    fixed_text = fixed_text[: max(1, cfg.validation.num_prompts)].to(dev)
    fixed.close()

    def media(final: bool) -> None:
        """Validation metrics and a sample video (every rank runs the rollouts: ZeRO-3 needs all)."""
        v, lg = cfg.validation, cfg.logging
        if teacher is not None and v.every_n_steps > 0 and (final or counters.step % v.every_n_steps == 0):
            out = validation.validate(cfg, student_m, new_cache, teacher, fixed_text, run_dir, counters.step)
            if logger is not None:
                logger.log_metrics(out, step=counters.step)
            fabric.print("validation: " + ", ".join(f"{k.split('/')[-1]} {x:.4g}" for k, x in out.items()))
        if lg.sample_every_n_steps > 0 and (final or counters.step % lg.sample_every_n_steps == 0):
            nonlocal vae
            vae = vae if vae is not None else validation.load_vae(cfg)
            path = run_dir / "samples" / f"step-{counters.step:08d}.mp4"
            validation.sample_mp4(cfg, student_m, new_cache, fixed_text[:1], vae, path)
            if rank == 0:
                tracking.log_video(logger, "samples/video", path, counters.step, cfg.video.fps)
                summary_files.append(str(path))

    vae = None
    summary_files: list[str] = []

    def save(reason: str) -> Path | None:
        return _save(fabric, cfg, run_dir, rank, student_m, opt_s, critic_m, opt_c, ema, loader, counters,
                     run_id, world, ds, reason)

    # 6. Iterations.
    from tqdm import tqdm

    bar = tqdm(total=cfg.train.num_steps, initial=counters.step, disable=rank != 0 or not cfg.runtime.progress,
               unit="it", dynamic_ncols=True)
    timesteps = schedule.warp_timesteps(cfg.dmd.denoising_steps, cfg.dmd.shift)
    rollout_frames = cfg.train.rollout_frames or cfg.video.latent_frames
    if rollout_frames < cfg.video.latent_frames or rollout_frames % cfg.video.chunk_frames:
        raise C.ConfigError(f"config key 'train.rollout_frames': expected 0 or a multiple of video.chunk_frames >= "
                            f"video.latent_frames={cfg.video.latent_frames}, found {rollout_frames}")
    num_chunks = rollout_frames // cfg.video.chunk_frames
    peak = peak_tflops(dev)
    last_ckpt = None
    run_iters = 0
    consecutive_skips = 0
    history: list[dict] = []
    while counters.step < cfg.train.num_steps:
        # 6a. A signal on any rank stops every rank at the same step boundary (after a checkpoint).
        requested = stop.signum or (stop_after is not None and run_iters >= stop_after)
        flag = fabric.all_reduce(torch.tensor(float(bool(requested)), device=dev), reduce_op="max")
        if float(flag) > 0:
            last_ckpt = save("signal" if stop.signum else "stop_after")
            break
        t0 = time.perf_counter()
        gen = _generator(dev, cfg.runtime.seed, rank, counters.step)  # every draw of this rank and iteration
        inject = _inject_nan(cfg, counters.step, rank)  # test hook (train.debug_inject_nan_steps)
        batches = [next(loader).to(dev) for _ in range(accum)]
        metrics: dict[str, float] = {}
        it_flops = 0.0
        if sf:
            # 6b. Self-forcing: the exit steps are drawn once per iteration on rank 0 and broadcast.
            exits = draw_exit_steps(num_chunks, len(timesteps), _generator(torch.device("cpu"), cfg.runtime.seed, counters.step))
            start_chunk = int(torch.randint(0, num_chunks - cfg.video.latent_frames // cfg.video.chunk_frames + 1, (1,),
                                            generator=_generator(torch.device("cpu"), cfg.runtime.seed, counters.step, 1)))
            spec = recipe.RolloutSpec(rollout_frames, timesteps, exits, start_chunk * cfg.video.chunk_frames)
            set_lr(opt_c, o.critic_lr, counters.critic_steps, o.warmup_steps)
            if counters.step % cfg.dmd.critic_steps_per_student_step == 0:
                set_lr(opt_s, o.student_lr, counters.student_steps, o.warmup_steps)
                metrics.update(_student_dmd_step(fabric, cfg, student_m, opt_s, critic_m, teacher, new_cache, batches,
                                                 neg_text, spec, gen, rollout_dtype, ds, accum, inject))
                if not metrics["skipped/student"]:
                    counters.student_steps += 1
                    ema.update(student_m.module if hasattr(student_m, "module") else student_m, counters.step,
                               lambda m: parallel.gathered(m, zero3))
                it_flops += sum(flops.student_dmd(b.text.shape[0], spec) for b in batches)
            metrics.update(_critic_step(fabric, cfg, student_m, critic_m, opt_c, new_cache, batches, spec, gen,
                                        rollout_dtype, ds, accum, inject))
            counters.critic_steps += 0 if metrics["skipped/critic"] else 1
            it_flops += sum(flops.critic(b.text.shape[0], spec) for b in batches)
            recipe.assert_frozen(teacher)
        else:
            # 6c. Adapt / ODE init: one student step on accumulated micro-batches.
            loss_fn = recipe.adapt_loss if stage == C.Stage.adapt else recipe.ode_loss
            set_lr(opt_s, o.student_lr, counters.student_steps, o.warmup_steps)
            metrics.update(_simple_step(fabric, cfg, student_m, opt_s, loss_fn, batches, gen, ds, accum, inject))
            counters.student_steps += 0 if metrics["skipped/student"] else 1
            it_flops += sum(flops.full_student(b.text.shape[0]) for b in batches)
        counters.step += 1
        run_iters += 1
        counters.samples += cfg.train.global_batch_size
        if monitor is not None:  # c_kv rank occupation (adapt/ODE: the clean latents; DMD: pure noise at t = 1000)
            monitor.maybe_log(counters.step, student_m, _rank_probe(batches[0], gen, cfg), metrics.update)

        # 6d. Logging: losses (mean over ranks), rates, MFU, memory.
        dt = time.perf_counter() - t0
        metrics = {k: float(fabric.all_reduce(torch.as_tensor(v, dtype=torch.float64, device=dev).float(),
                                                reduce_op="mean")) for k, v in metrics.items()}
        tokens = cfg.train.global_batch_size * cfg.tokens_per_frame * (rollout_frames if sf else cfg.video.latent_frames)
        skipped = any(v for k, v in metrics.items() if k.startswith("skipped/"))  # identical on every rank
        counters.skipped_steps += int(skipped)
        consecutive_skips = consecutive_skips + 1 if skipped else 0
        metrics["data/skipped_samples"] = float(fabric.all_reduce(
            torch.tensor(float(loader.skipped_samples), device=dev), reduce_op="sum"))
        metrics.update({"perf/s_per_step": dt, "perf/samples_per_s": cfg.train.global_batch_size / dt,
                        "perf/tokens_per_s": tokens / dt, "lr/student": opt_s.param_groups[0]["lr"],
                        "counters/skipped_steps": counters.skipped_steps,
                        "counters/student_steps": counters.student_steps, "counters/critic_steps": counters.critic_steps})
        if peak is not None:
            metrics["perf/mfu"] = it_flops / dt / (peak * 1e12)
            metrics["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
        for k, v in metrics.items():
            if k.startswith("loss/"):
                counters.losses.append([counters.step, k, v])
        history.append({"step": counters.step, **metrics})
        if rank == 0:  # RUN_DIR/metrics.jsonl: one line per iteration (trimmed to the resume point at start)
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": counters.step, **metrics}) + "\n")
        if rank == 0 and logger is not None and counters.step % cfg.logging.every_n_steps == 0:
            try:
                logger.log_metrics(metrics, step=counters.step)
            except Exception as e:  # W&B's service process died (Slurm's requeue SIGTERMs every job process):
                fabric.print(f"warning: W&B logging failed ({type(e).__name__}: {e}); continuing without W&B")
                logger = None  # ... the stop flag still checkpoints at this step boundary
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items() if k.startswith("loss/")} |
                        {"it/s": f"{1 / dt:.2f}"})

        # 6e. Non-finite steps: skipped above on every rank; too many in a row stop after a checkpoint
        #     (the weights in it are the last good ones: skipped steps changed nothing).
        if skipped:
            fabric.print(f"warning: iteration {counters.step}: non-finite loss or gradient on some rank, update skipped "
                         f"on every rank ({consecutive_skips} in a row, {counters.skipped_steps} in all)")
        if consecutive_skips >= cfg.train.max_consecutive_skips:
            last_ckpt = save("nonfinite")
            bar.close()
            loader.close()
            raise NonFiniteError(
                f"{consecutive_skips} consecutive non-finite steps (train.max_consecutive_skips="
                f"{cfg.train.max_consecutive_skips}) up to iteration {counters.step}: stopping; checkpoint "
                f"{last_ckpt} holds the last good weights")

        # 6f. Periodic validation / sample video and checkpoint.
        if counters.step < cfg.train.num_steps:
            media(final=False)
        if counters.step % cfg.checkpoint.every_n_steps == 0 and counters.step < cfg.train.num_steps:
            last_ckpt = save("periodic")
    else:
        last_ckpt = save("end")
        media(final=True)
    bar.close()
    if rank == 0 and logger is not None:
        import wandb

        try:
            logger.finalize("success")
            wandb.finish()
        except Exception as e:  # a dead W&B service (see the loop) must not fail a run that checkpointed
            fabric.print(f"warning: W&B finish failed ({type(e).__name__}: {e})")
    loader.close()
    return {"counters": counters, "history": history, "checkpoint": last_ckpt, "run_id": run_id, "rank": rank,
            "student": student_m, "critic": critic_m, "fabric": fabric, "ema": ema, "samples": summary_files,
            "teacher": teacher}


def run_training_demo(cfg: C.Config) -> dict:
    """`make demo`: the tiny self_forcing stage from scratch, then a summary of what it wrote."""
    t0 = time.perf_counter()
    out = fit(cfg)
    if out["rank"] == 0:
        run_dir = Path(cfg.runtime.run_dir)
        c = out["counters"]
        wandb_dirs = sorted(str(p) for p in (run_dir / "wandb").glob("*run-*")) if (run_dir / "wandb").is_dir() else []
        print(f"demo: {c.step} iterations ({c.student_steps} student / {c.critic_steps} critic steps) of "
              f"{cfg.train.stage.value} in {time.perf_counter() - t0:.1f} s")
        print(f"  checkpoint   {out['checkpoint']}")
        for f in out["samples"]:
            print(f"  sample video {f}")
        for d in wandb_dirs:
            print(f"  W&B run      {d}  (upload: wandb sync --append {d})")
        print(f"  export with  vmla-train export {run_dir} OUT_FOLDER")
    return out


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------
def _rank_probe(batch, gen: torch.Generator, cfg: C.Config) -> dict:
    """Input of the rank-occupation forward: the batch's clean latents, or noise at t = 1000 for prompts."""
    lat = getattr(batch, "latents", None)
    if lat is None:
        lat = getattr(batch, "clean", None)
    if lat is not None:
        return {"latents": lat, "text": batch.text, "mask": FrameMask(cfg.video.chunk_frames)}
    v, m = cfg.video, cfg.model
    noise = torch.randn(batch.text.shape[0], v.latent_frames, m.in_channels, v.latent_height, v.latent_width,
                        generator=gen, device=gen.device)
    return {"latents": noise, "text": batch.text, "t": torch.full((noise.shape[0],), 1000.0, device=noise.device),
            "mask": FrameMask(cfg.video.chunk_frames)}


def set_lr(opt, base_lr: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up over ``optim.warmup_steps`` optimizer steps of this model (our counter), then constant."""
    lr = base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def _inject_nan(cfg: C.Config, step: int, rank: int) -> bool:
    """Test hook: is this iteration's loss made NaN on this rank (``train.debug_inject_nan_steps/ranks``)?"""
    t = cfg.train
    return step in t.debug_inject_nan_steps and (not t.debug_inject_nan_ranks or rank in t.debug_inject_nan_ranks)


def _optimizer_step(fabric, cfg: C.Config, model, opt, ds: bool, finite_loss: bool = True) -> tuple[float, bool]:
    """Clip and step one engine; returns the gradient norm before clipping and whether it stepped.
    A non-finite loss or gradient norm on any rank skips the update on every rank (the flag is
    all-reduced, so no rank diverges). DeepSpeed steps inside its engine: no skip there."""
    if ds:
        opt.step()  # DeepSpeed clips (gradient_clipping) and steps at the accumulation boundary
        norm = model._forward_module.get_global_grad_norm() if hasattr(model, "_forward_module") else None
        opt.zero_grad()
        return (float(norm) if norm is not None else float("nan")), True
    if cfg.optim.grad_clip > 0:
        norm = fabric.clip_gradients(model, opt, max_norm=cfg.optim.grad_clip, error_if_nonfinite=False)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    finite = float(finite_loss and bool(torch.isfinite(torch.as_tensor(norm))))
    finite = float(fabric.all_reduce(torch.tensor(finite, device=fabric.device), reduce_op="min"))
    if finite:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm), bool(finite)


def _backward(fabric, loss: torch.Tensor, model, ds: bool, accum: int, last: bool) -> None:
    """DeepSpeed divides by its gradient_accumulation_steps itself and steps at its boundary; the other
    strategies get the loss divided here and skip the gradient sync of all but the last micro-batch."""
    if ds:
        fabric.backward(loss.float(), model=model)
        return
    with fabric.no_backward_sync(model, enabled=not last):
        fabric.backward(loss.float() / accum, model=model)


def _accumulate(fabric, model, opt, batches, loss_of, ds: bool, accum: int, inject: bool) -> tuple[dict, bool]:
    """1. loss per micro-batch, 2. backward (DeepSpeed micro-steps between), metrics averaged over the
    micro-batches. Returns (metrics, whether every loss was finite); the caller does 3. the step."""
    out: dict[str, float] = {}
    finite = True
    for i, batch in enumerate(batches):
        loss, m = loss_of(batch)  # 1.
        loss = loss * float("nan") if inject else loss  # train.debug_inject_nan_steps (test hook)
        finite = finite and bool(torch.isfinite(loss.detach()))
        _backward(fabric, loss, model, ds, accum, i == len(batches) - 1)  # 2.
        if ds and i < len(batches) - 1:
            opt.step()  # DeepSpeed: a micro-step (no update before the boundary)
        for k, v in m.items():
            out[k] = out.get(k, 0.0) + float(v) / accum
    return out, finite


def _simple_step(fabric, cfg, student, opt, loss_fn, batches, gen, ds, accum, inject=False) -> dict:
    """Adapt / ODE init: loss, backward, then 3. clip + step (skipped on every rank if non-finite)."""
    out, finite = _accumulate(fabric, student, opt, batches, lambda b: loss_fn(student, b, cfg, gen), ds, accum, inject)
    out["grad_norm/student"], stepped = _optimizer_step(fabric, cfg, student, opt, ds, finite)  # 3.
    out["skipped/student"] = float(not stepped)
    return out


def _student_dmd_step(fabric, cfg, student, opt, critic, teacher, new_cache, batches, neg_text, spec, gen, dtype,
                      ds, accum, inject=False) -> dict:
    """Student update (DMD, recipe.dmd_student_loss numbers its steps): the critic only scores."""
    def loss_of(batch):
        return recipe.dmd_student_loss(student, new_cache, teacher, critic, batch, neg_text, cfg, spec, gen, dtype,
                                       snapshot_cache=cfg.train.gradient_checkpointing)

    out, finite = _accumulate(fabric, student, opt, batches, loss_of, ds, accum, inject)
    if not ds:
        for p in critic.parameters():  # the critic scored under no_grad: nothing may have reached it
            assert p.grad is None, "DMD student step produced critic gradients"
    out["grad_norm/student"], stepped = _optimizer_step(fabric, cfg, student, opt, ds, finite)
    out["skipped/student"] = float(not stepped)
    return out


def _critic_step(fabric, cfg, student, critic, opt, new_cache, batches, spec, gen, dtype, ds, accum, inject=False) -> dict:
    """Critic update: flow matching on a no-grad student rollout (recipe.critic_flow_loss)."""
    out, finite = _accumulate(fabric, critic, opt, batches,
                              lambda b: recipe.critic_flow_loss(student, new_cache, critic, b, cfg, spec, gen, dtype),
                              ds, accum, inject)
    out["grad_norm/critic"], stepped = _optimizer_step(fabric, cfg, critic, opt, ds, finite)
    out["skipped/critic"] = float(not stepped)
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoint save / restore
# ----------------------------------------------------------------------------------------------
def _sharded(fabric) -> bool:
    from lightning.fabric.strategies import DeepSpeedStrategy, FSDPStrategy

    return isinstance(fabric.strategy, (DeepSpeedStrategy, FSDPStrategy))


def _save(fabric, cfg, run_dir, rank, student, opt_s, critic, opt_c, ema, loader, counters, run_id, world, ds,
          reason) -> Path | None:
    """Write a checkpoint (temp folder, manifest last, rename). A write error on any rank (disk full,
    ...) removes the temp folder on every rank's behalf, leaves the previous checkpoints as they were,
    and raises or returns None per ``checkpoint.on_write_error``."""
    step = counters.step
    tmp = ckpt.tmp_dir(run_dir, step)
    error = ""

    def failed_anywhere() -> bool:
        return float(fabric.all_reduce(torch.tensor(float(bool(error)), device=fabric.device), reduce_op="max")) > 0

    try:
        if rank == 0:
            ckpt.prepare(run_dir, step)
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    if not failed_anywhere():  # (also the barrier: the temp folder exists before any rank writes)
        try:
            sharded = _sharded(fabric)
            fabric.save(ckpt.engine_path(tmp, "student", sharded), {"model": student, "optimizer": opt_s})
            if critic is not None:
                fabric.save(ckpt.engine_path(tmp, "critic", sharded), {"model": critic, "optimizer": opt_c})
            ckpt.save_rank_files(tmp, rank, loader.state_dict())
            if rank == 0:
                ckpt.save_ema(tmp, ema.state_dict())
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            error = f"{type(e).__name__}: {e}"
    final = None
    if not failed_anywhere() and rank == 0:
        state = {"stage": cfg.train.stage.value, "strategy": cfg.strategy.name, "world_size": world,
                 "step": counters.step, "student_steps": counters.student_steps, "critic_steps": counters.critic_steps,
                 "samples": counters.samples, "losses": counters.losses, "skipped_steps": counters.skipped_steps,
                 "wandb_run_id": run_id, "reason": reason, "time": time.time()}
        try:
            final = ckpt.finalize(run_dir, step, state, C.to_yaml(cfg), cfg.checkpoint.keep_last,
                                  cfg.checkpoint.checksums)
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
    if failed_anywhere():
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        msg = (f"checkpoint of step {step} could not be written to '{tmp}' ({error or 'failed on another rank'}); "
               f"previous checkpoint intact: {ckpt.latest_checkpoint(run_dir)}")
        if cfg.checkpoint.on_write_error == "stop":
            raise CheckpointWriteError(msg + " (checkpoint.on_write_error=stop)")
        fabric.print(f"warning: {msg}; training continues (checkpoint.on_write_error=continue)")
        return None
    return ckpt.step_dir(run_dir, step) if final is None else final


def _trim_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to ``last_step`` (all of them gone on a fresh start)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    C.atomic_write_text(path, "".join(line + "\n" for line in kept))


def _saved_run_id(folder: Path) -> str | None:
    try:
        return ckpt.read_train_state(folder).get("wandb_run_id")
    except (OSError, ValueError):
        return None


def _resume(fabric, run_dir: Path, candidates: list[Path], restore) -> Path | None:
    """Restore the newest of ``candidates`` that verifies (rank 0: files, sizes, SHA-256 against the
    manifest) and loads on every rank; otherwise log why and fall back to the next older one. None
    without candidates; ``CheckpointError`` naming every folder and reason when none is usable."""
    reasons = []
    for folder in candidates:
        error = ""
        if fabric.global_rank == 0:
            try:
                ckpt.verify(folder)
            except CheckpointError as e:
                error = str(e)
        bad = fabric.all_reduce(torch.tensor(float(bool(error)), device=fabric.device), reduce_op="max")
        if float(bad) == 0:
            try:
                restore(folder, ckpt.read_train_state(folder))
            except Exception as e:  # any failure to load (unpickling refused, shape mismatch, ...): fall back
                error = f"checkpoint '{folder}' does not load: {type(e).__name__}: {e}"
            bad = fabric.all_reduce(torch.tensor(float(bool(error)), device=fabric.device), reduce_op="max")
        if float(bad) == 0:
            return folder
        reasons.append(error or f"checkpoint '{folder}' failed on another rank")
        older = candidates[candidates.index(folder) + 1:]
        fabric.print(f"warning: {reasons[-1]}; " + (f"falling back to the previous complete checkpoint {older[0]}"
                                                   if older else "no older complete checkpoint"))
    if candidates:
        raise CheckpointError(f"no usable checkpoint in '{ckpt.checkpoint_root(run_dir)}' "
                              f"(checkpoint.resume=false starts afresh): " + " | ".join(reasons))
    return None


def _restore(fabric, folder, rank, student, opt_s, critic, opt_c, ema, loader, counters, saved, ds) -> None:
    if saved.get("world_size") not in (None, fabric.world_size) and ds:
        raise RuntimeError(f"checkpoint '{folder}' was written by {saved['world_size']} ranks; DeepSpeed shards need the "
                           f"same world size ({fabric.world_size} now)")
    sharded = _sharded(fabric)
    fabric.load(ckpt.engine_path(folder, "student", sharded), {"model": student, "optimizer": opt_s}, weights_only=True)
    if critic is not None:
        fabric.load(ckpt.engine_path(folder, "critic", sharded), {"model": critic, "optimizer": opt_c}, weights_only=True)
    rng, loader_state = ckpt.load_rank_files(folder, rank)
    ckpt.set_rng_state(rng)
    loader.load_state_dict(loader_state)
    ema.load_state_dict(ckpt.load_ema(folder)) if rank == 0 else None
    counters.step = saved["step"]
    counters.student_steps = saved["student_steps"]
    counters.critic_steps = saved["critic_steps"]
    counters.samples = saved["samples"]
    counters.losses = [list(x) for x in saved.get("losses", [])]
    counters.skipped_steps = saved.get("skipped_steps", 0)


# ----------------------------------------------------------------------------------------------
# Export: a plain student folder from a training checkpoint (ZeRO shards consolidated)
# ----------------------------------------------------------------------------------------------
def export_student(run_dir: str | Path, out: str | Path, use_ema: bool = False, overwrite: bool = False) -> Path:
    from .student_io import save_student

    folder = ckpt.latest_checkpoint(run_dir) if not str(run_dir).rstrip("/").split("/")[-1].startswith("step-") else Path(run_dir)
    if folder is None or not (folder / ckpt.MANIFEST).is_file():
        raise FileNotFoundError(f"'{run_dir}' holds no complete checkpoint (checkpoints/step-*/manifest.json)")
    ckpt.verify(folder)  # CheckpointError naming a missing, truncated or corrupted file
    cfg = C.load(folder / "config.yaml")
    if use_ema:
        state = ckpt.load_ema(folder)
        if not state:
            raise FileNotFoundError(f"checkpoint '{folder}' has no ema.safetensors (EMA starts at dmd.ema_start_step)")
    elif (folder / "student").is_dir() and (folder / "student" / "checkpoint").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder / "student"), tag="checkpoint")
    elif (folder / "student.ckpt").is_file():
        state = torch.load(folder / "student.ckpt", map_location="cpu", weights_only=True)["model"]
    else:
        raise FileNotFoundError(f"checkpoint '{folder}': no student.ckpt and no DeepSpeed student/ folder "
                                "(FSDP sharded checkpoints: consolidate with lightning's fsdp tools first)")
    state = {k.removeprefix("_forward_module.").removeprefix("module."): v.float().contiguous() for k, v in state.items()}
    return save_student(state, cfg, out, overwrite=overwrite,
                        extra_files={"export.json": json.dumps({"from": str(folder), "ema": use_ema}, indent=1)})
