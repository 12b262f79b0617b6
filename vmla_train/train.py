"""The training loop (Lightning Fabric): batch -> losses -> backward -> step -> logging -> checkpoint.
Read ``fit`` top to bottom.

One loop for every stage (``train.stage``): ``pretrain`` (a bidirectional teacher), ``adapt``, ``ode_init``
and ``causal_cd`` (whose target, the student's EMA, follows every student step) update the student every
iteration; ``self_forcing`` updates the student every ``dmd.critic_steps_per_student_step`` iterations,
then the critic every iteration (Self-Forcing's order).

Who does what (Lightning's "LightningModule with Fabric" pattern):

- ``distill.DistillationModule`` (a ``LightningModule``) holds the roles and the losses:
  ``configure_optimizers``, ``training_step`` (the student's loss of the stage), ``critic_step``,
  ``validation_step``.
- ``fit`` sets the student and the critic up as two engines with ``fabric.setup`` (under DeepSpeed one
  engine each, which Lightning's Trainer cannot hold), calls the module, runs backward and the optimizer
  steps (``parallel.backward`` / ``parallel.optimizer_step``: what differs under DeepSpeed lives there),
  and owns checkpoints (``checkpoint.save`` / ``checkpoint.resume`` of a ``state.TrainState``) and
  logging (``tracking.RunLog``). The teacher is frozen and never set up for training. Our counters
  (``step`` = iteration, ``student_steps``, ``critic_steps``) drive every schedule, never Lightning's.

Batches: ``train.global_batch_size = data.batch_size x world_size x accumulation``; the accumulation is
derived and checked here. Randomness: every draw of an iteration comes from generators keyed by
``(runtime.seed, rank, step)`` (and ``(seed, step)`` for the self-forcing rollout plan, the same on every
rank), so a resumed run draws what the uninterrupted one drew; global RNG states are saved too.

Faults (docs/fault-tolerance.md): resume takes the newest checkpoint that verifies against its
manifest and loads on every rank, falling back (logged) to older ones; a step whose loss or gradient
is non-finite on any rank is skipped on every rank (``train.max_consecutive_skips`` in a row stop the
run after a checkpoint); a failed checkpoint write removes its temp folder, leaves the previous
checkpoints intact and stops or continues per ``checkpoint.on_write_error``.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import config as C
from . import data, parallel, recipe, tracking
from .distill import DistillationModule, keyed_generator
from .ema import EMA
from .flops import FlopCounter, peak_tflops
from .rank import RankOccupationMonitor
from .state import TrainState


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run stopped after checkpointing the last good weights."""


class _StopFlag:
    """SIGUSR1 (Slurm's ``--signal=USR1@120``) and SIGTERM: checkpoint and stop at the next step boundary. A run
    still going ``traceback_s`` seconds after the first signal prints every thread's Python stack to stderr once
    (where a stop hangs) and goes on; ``close`` disarms that when ``fit`` returns."""

    def __init__(self, traceback_s: float):
        self.signum, self.traceback_s = 0, traceback_s
        for s in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        if not self.signum and self.traceback_s > 0 and sys.__stderr__ is not None:
            faulthandler.dump_traceback_later(self.traceback_s, exit=False, file=sys.__stderr__)
        self.signum = signum

    def close(self) -> None:
        faulthandler.cancel_dump_traceback_later()


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
# The loop
# ----------------------------------------------------------------------------------------------
def fit(cfg: C.Config, stop_after: int | None = None) -> dict:
    """Train ``cfg.train.stage`` to ``train.num_steps`` iterations, resuming from the run folder's latest
    complete checkpoint. ``stop_after`` (tests) stops like a signal would after that many iterations of
    this process. Returns a summary (counters, the metrics of every iteration, the last checkpoint)."""
    run_dir = Path(cfg.runtime.run_dir)
    accum = accumulation_steps(cfg, world_size_of(cfg))
    C.check_role_files(cfg)  # a teacher / critic / negative prompt / VAE with no path: refused before any process starts

    # 1. Fabric and processes (one per device; launched by srun / torchrun / our test harness).
    fabric = parallel.build_fabric(cfg, accum)
    fabric.launch()
    rank, dev = fabric.global_rank, fabric.device
    if fabric.world_size != world_size_of(cfg):
        raise C.ConfigError(f"config key 'strategy.devices': {cfg.strategy.devices} x {cfg.strategy.num_nodes} nodes "
                            f"but {fabric.world_size} processes were launched")
    stop = _StopFlag(cfg.checkpoint.stop_traceback_s)

    # 2. Resume candidates (verified and loaded in 4.) and the W&B run: the checkpoints' run, or a new one.
    candidates = ckpt.resume_candidates(fabric, run_dir) if cfg.checkpoint.resume else []
    fresh = not cfg.checkpoint.resume  # starting over: a new W&B run, not the folder's old one
    run_id = fabric.broadcast(tracking.run_id_for(run_dir, ckpt.saved_run_id(candidates), fresh) if rank == 0 else None)
    log = tracking.RunLog(fabric, cfg, run_dir, run_id)

    # 3. The roles (the same seed on every rank: the engines start equal); one engine per trainable role.
    module = DistillationModule.from_config(cfg)
    flops = FlopCounter(cfg, module.student, module.teacher, module.critic)
    student_opt, *critic_opt = module.configure_optimizers()
    student, student_opt = fabric.setup(module.student, student_opt)
    critic, critic_opt = fabric.setup(module.critic, *critic_opt) if critic_opt else (None, None)
    module.use_engines(student, critic, dev, parallel.compute_dtype(cfg, fabric))

    # 4. The state a checkpoint holds (data: fixed batches per epoch on every rank, resumed exactly).
    sf, cd = cfg.train.stage == C.Stage.self_forcing, cfg.train.stage == C.Stage.causal_cd
    # The EMA of the student: DMD's output or the other stages' optional one (rank 0 keeps it), or causal_cd's
    # target (every rank runs it)
    decay, start = (cfg.dmd.ema_decay, cfg.dmd.ema_start_step) if sf else (cfg.train.ema_decay, cfg.train.ema_start_step)
    ema = EMA(cfg.cd.ema_decay, 0, keep=True) if cd else EMA(decay, start, keep=rank == 0)
    monitor = RankOccupationMonitor(cfg.logging.rank_every_n_steps) if cfg.logging.rank_every_n_steps > 0 else None
    kind = data.STAGE_KINDS[cfg.train.stage.value]
    state = TrainState(fabric, cfg, module, student_opt, critic_opt, ema, data.build_loader(cfg, kind, rank, fabric.world_size),
                       run_id, accum)
    resumed = ckpt.resume(state, candidates)  # prints changed config keys; refuses those that alter the run
    if rank == 0:
        ckpt.record_config(run_dir, cfg, resumed)  # config.yaml (the first), config-resume-<step>.yaml
    if resumed is not None:
        fabric.print(f"resumed from {resumed} at step {state.counters.step}")
    log.start(state.counters.step)
    fixed_text = _fixed_prompts(cfg, dev)
    if cd:  # the target starts as the stage-1 weights (a copy) or as the checkpoint's EMA
        if not ema.shadow:
            ema.update(student.module, 0, parallel.gatherer(fabric))
        module.sync_target(ema.shadow)

    # 5. Iterations.
    c = state.counters
    peak = peak_tflops(dev)
    last_ckpt, run_iters, history, samples = None, 0, [], []
    while c.step < cfg.train.num_steps:
        # 5a. A signal on any rank stops every rank at the same step boundary (after a checkpoint).
        if parallel.any_rank(fabric, stop.signum or (stop_after is not None and run_iters >= stop_after)):
            if stop.signum:
                print(f"rank {rank}: {signal.Signals(stop.signum).name}: checkpoint and stop at iteration {c.step}",
                      flush=True)
            last_ckpt = ckpt.save(state, "signal" if stop.signum else "stop_after")
            break
        t0 = time.perf_counter()
        # 5b. The micro-batches, this rank's generator, the self-forcing rollout plan (the same on every rank).
        gen = keyed_generator(dev, cfg.runtime.seed, rank, c.step)  # every draw of this rank and iteration
        inject = _inject_nan(cfg, c.step, rank)  # test hook (debug.inject_nan_steps)
        batches = [next(state.loader).to(dev) for _ in range(accum)]
        spec = module.rollout_spec(c.step)  # None but in self_forcing
        metrics, it_flops = {"perf/data_s": time.perf_counter() - t0}, 0.0  # waiting for the loader (mean over ranks)
        # 5c. Student: loss per micro-batch (training_step: adapt / ode_init / DMD), backward, clip + step.
        if module.student_turn(c.step):
            metrics |= update_role(state, "student", lambda b: module.training_step(b, gen, spec), batches, inject)
            parallel.assert_no_grads(fabric, module.critic, "DMD student step produced critic gradients")
            if not metrics["skipped/student"]:
                c.student_steps += 1
                ema.update(student.module, c.step, parallel.gatherer(fabric))
                if cd:
                    module.sync_target(ema.shadow)
            it_flops += sum(flops.student(b.text.shape[0], spec) for b in batches)
        # 5d. Critic (self_forcing): flow matching on a no-grad rollout of the same plan.
        if critic is not None:
            metrics |= update_role(state, "critic", lambda b: module.critic_step(b, gen, spec), batches, inject)
            c.critic_steps += 0 if metrics["skipped/critic"] else 1
            it_flops += sum(flops.critic(b.text.shape[0], spec) for b in batches)
            recipe.assert_frozen(module.teacher)
        c.step += 1
        run_iters += 1
        c.samples += cfg.train.global_batch_size
        if monitor is not None:  # c_kv rank occupation (adapt/ODE: the clean latents; DMD: pure noise at t = 1000)
            monitor.maybe_log(c.step, student, module.rank_probe(batches[0], gen), metrics.update)

        # 5e. Logging: metrics averaged over ranks, rates, MFU, memory; skipped steps counted.
        metrics = _iteration_metrics(state, metrics, time.perf_counter() - t0, it_flops, peak)
        history.append({"step": c.step, **metrics})
        log.iteration(c.step, metrics, metrics["perf/s_per_step"])

        # 5f. Non-finite steps: skipped above on every rank; too many in a row stop after a checkpoint
        #     (the weights in it are the last good ones: skipped steps changed nothing).
        if state.consecutive_skips:
            fabric.print(f"warning: iteration {c.step}: non-finite loss or gradient on some rank, update skipped "
                         f"on every rank ({state.consecutive_skips} in a row, {c.skipped_steps} in all)")
        if state.consecutive_skips >= cfg.train.max_consecutive_skips:
            last_ckpt = ckpt.save(state, "nonfinite")
            log.close(success=False)
            state.loader.close()
            raise NonFiniteError(
                f"{state.consecutive_skips} consecutive non-finite steps (train.max_consecutive_skips="
                f"{cfg.train.max_consecutive_skips}) up to iteration {c.step}: stopping; checkpoint "
                f"{last_ckpt} holds the last good weights")

        # 5g. Periodic validation / sample video and checkpoint.
        if c.step < cfg.train.num_steps:
            _validate_and_sample(state, log, fixed_text, samples, final=False)
            if c.step % cfg.checkpoint.every_n_steps == 0:
                last_ckpt = ckpt.save(state, "periodic")
    else:
        last_ckpt = ckpt.save(state, "end")
        _validate_and_sample(state, log, fixed_text, samples, final=True)
    log.close(success=True)
    state.loader.close()
    stop.close()
    return {"counters": c, "history": history, "checkpoint": last_ckpt, "run_id": run_id, "rank": rank,
            "student": student, "critic": critic, "fabric": fabric, "ema": ema, "samples": samples,
            "teacher": module.teacher, "module": module}


def run_training_demo(cfg: C.Config) -> dict:
    """`make demo`: the tiny self_forcing stage from scratch, then a summary of what it wrote."""
    t0 = time.perf_counter()
    out = fit(cfg)
    print_summary(cfg, out, time.perf_counter() - t0, "demo")
    return out


def print_summary(cfg: C.Config, out: dict, seconds: float, label: str) -> None:
    """Rank 0 prints what a finished ``fit`` (its return value ``out``) did and wrote: iterations and
    optimizer steps, the losses of the last logged iteration, the checkpoint, sample videos, the W&B run
    folders and the command that exports the student."""
    if out["rank"] != 0:
        return
    run_dir = Path(cfg.runtime.run_dir)
    c = out["counters"]
    wandb_dirs = sorted(str(p) for p in (run_dir / "wandb").glob("*run-*")) if (run_dir / "wandb").is_dir() else []
    print(f"{label}: {c.step} iterations ({c.student_steps} student / {c.critic_steps} critic steps) of "
          f"{cfg.train.stage.value} in {seconds:.1f} s")
    last = max((step for step, _, _ in c.losses), default=None)  # counters.losses: [iteration, key, value] rows
    if last is not None:
        losses = ", ".join(f"{k.removeprefix('loss/')} {v:.4g}" for step, k, v in c.losses if step == last)
        print(f"  losses       {losses}  (iteration {last})")
    print(f"  checkpoint   {out['checkpoint']}")
    for f in out["samples"]:
        print(f"  sample video {f}")
    for d in wandb_dirs:
        print(f"  W&B run      {d}  (upload: wandb sync --append {d})")
    if not wandb_dirs:
        print(f"  W&B run      none (logging.wandb_mode={cfg.logging.wandb_mode})")
    print(f"  export with  vmla-train export {run_dir} OUT_FOLDER")


# ----------------------------------------------------------------------------------------------
# One optimizer step, the iteration's metrics, validation
# ----------------------------------------------------------------------------------------------
def update_role(state: TrainState, role: str, loss_of, batches: list, inject: bool = False) -> dict[str, float]:
    """One optimizer step of ``role`` (student | critic) on the iteration's micro-batches: 1. warm-up
    learning rate (by the role's own step counter), 2. loss per micro-batch, 3. backward (DeepSpeed
    micro-steps between), 4. clip + step, skipped on every rank when a loss or the gradient is non-finite
    on any rank. Returns the metrics averaged over the micro-batches, the gradient norm and the skip."""
    fabric, o, c = state.fabric, state.cfg.optim, state.counters
    engine, optimizer = state.engine(role)
    base_lr, steps = (o.student_lr, c.student_steps) if role == "student" else (o.critic_lr, c.critic_steps)
    set_lr(optimizer, base_lr, steps, o.warmup_steps)  # 1.
    out: dict[str, float] = {}
    finite, logged = [], []
    for i, batch in enumerate(batches):
        loss, metrics = loss_of(batch)  # 2.
        loss = loss * float("nan") if inject else loss  # debug.inject_nan_steps (test hook)
        finite.append(torch.isfinite(loss.detach()).all())  # on the device: no wait before the backward
        parallel.backward(fabric, loss, engine, optimizer, state.accumulation, last=i == len(batches) - 1)  # 3.
        logged.append(metrics)
    # read on the host only now, once every backward is queued (the host queues the backward while the forward runs)
    finite_loss = bool(torch.stack(finite).all())
    for metrics in logged:
        for k, v in metrics.items():
            out[k] = out.get(k, 0.0) + float(v) / state.accumulation
    out[f"grad_norm/{role}"], stepped = parallel.optimizer_step(fabric, engine, optimizer, o.grad_clip,  # 4.
                                                                finite_loss)
    out[f"skipped/{role}"] = float(not stepped)
    return out


def set_lr(opt, base_lr: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up over ``optim.warmup_steps`` optimizer steps of this model (our counter), then constant."""
    lr = base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def _inject_nan(cfg: C.Config, step: int, rank: int) -> bool:
    """Test hook: is this iteration's loss made NaN on this rank (``debug.inject_nan_steps/ranks``)?"""
    d = cfg.debug
    return step in d.inject_nan_steps and (not d.inject_nan_ranks or rank in d.inject_nan_ranks)


def _iteration_metrics(state: TrainState, metrics: dict, seconds: float, flops: float, peak: float | None) -> dict:
    """The iteration's metrics averaged over ranks, plus skips (counted in the state), data, rates, learning
    rate, counters, MFU and peak memory (CUDA). Losses are also kept in ``counters.losses`` (resume checks)."""
    fabric, cfg, c = state.fabric, state.cfg, state.counters
    dev = fabric.device
    metrics = {k: float(fabric.all_reduce(torch.as_tensor(v, dtype=torch.float64, device=dev).float(), reduce_op="mean"))
               for k, v in metrics.items()}
    skipped = any(v for k, v in metrics.items() if k.startswith("skipped/"))  # identical on every rank
    c.skipped_steps += int(skipped)
    state.consecutive_skips = state.consecutive_skips + 1 if skipped else 0
    metrics["data/skipped_samples"] = float(fabric.all_reduce(
        torch.tensor(float(state.loader.skipped_samples), device=dev), reduce_op="sum"))
    frames = state.module.rollout_frames if cfg.train.stage == C.Stage.self_forcing else cfg.video.latent_frames
    tokens = cfg.train.global_batch_size * cfg.tokens_per_frame * frames
    metrics.update({"perf/s_per_step": seconds, "perf/samples_per_s": cfg.train.global_batch_size / seconds,
                    "perf/tokens_per_s": tokens / seconds, "lr/student": state.student_optimizer.param_groups[0]["lr"],
                    "counters/skipped_steps": c.skipped_steps, "counters/student_steps": c.student_steps,
                    "counters/critic_steps": c.critic_steps})
    if peak is not None:
        metrics["perf/mfu"] = flops / seconds / (peak * 1e12)
        metrics["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    c.losses += [[c.step, k, v] for k, v in metrics.items() if k.startswith("loss/")]
    return metrics


def _fixed_prompts(cfg: C.Config, device: torch.device) -> torch.Tensor:
    """The prompts of validation and sample videos: the first prompt batches of rank 0's order [N, Lt, D]."""
    n = max(1, cfg.validation.num_prompts)
    fixed = data.build_loader(cfg, "prompts", 0, 1)
    text = torch.cat([next(fixed).text for _ in range(n // cfg.data.batch_size + 1)])
    fixed.close()
    return text[:n].to(device)


def _validate_and_sample(state: TrainState, log: tracking.RunLog, texts: torch.Tensor, samples: list[str],
                         final: bool) -> None:
    """At their intervals and at the end: validation metrics (``validation_step``) and a sample video on the
    fixed prompts ``texts``. Every rank runs the rollouts (ZeRO-3 gathers need all)."""
    cfg, module, step = state.cfg, state.module, state.counters.step
    v, lg = cfg.validation, cfg.logging
    if module.teacher is not None and v.every_n_steps > 0 and (final or step % v.every_n_steps == 0):
        out = module.validation_step(texts, step)
        log.metrics(out, step)
        state.fabric.print("validation: " + ", ".join(f"{k.split('/')[-1]} {x:.4g}" for k, x in out.items()))
    if lg.sample_every_n_steps > 0 and (final or step % lg.sample_every_n_steps == 0):
        path = state.run_dir / "samples" / f"step-{step:08d}.mp4"
        module.sample_mp4(texts[:1], path)
        if state.rank == 0:
            log.video("samples/video", path, step)
            samples.append(str(path))
