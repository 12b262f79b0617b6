"""The distillation module: the three roles and each stage's loss, a ``LightningModule`` driven by Fabric.

Lightning's "LightningModule with Fabric" pattern: the module holds the models and the research code
(``configure_optimizers``, ``training_step``, ``critic_step``, ``validation_step``); the Fabric loop
(``train.fit``) sets the engines up, calls these methods, runs backward and the optimizer steps, and owns
checkpoints and logging. The student and the critic are set up as two engines (one DeepSpeed engine each,
which Lightning's Trainer cannot hold), so the module itself is never set up whole: ``use_engines`` hands
the engines back and the step methods run through them.

Roles:

- student: the causal MLA student, trained in every stage (``pretrain``: a bidirectional mha student, the
  teacher-to-be);
- teacher: the real score, a frozen diffusers Wan (self_forcing, and validation's reference);
- critic: the fake score, a trainable diffusers Wan of the student's geometry (self_forcing);
- cd_frozen, cd_target: causal_cd's frozen stage-1 model and the EMA target, students of the student's
  config, both starting from ``train.student_path`` (the target follows the EMA: ``sync_target``).

Stages (``train.stage``), each ``training_step`` on one micro-batch:

- ``pretrain``: the teacher's own training: flow matching on real latents, bidirectional, one timestep
  per sample (Wan's pretraining objective);
- ``adapt``: flow matching on real latents, block-causal, one timestep per chunk; earlier chunks noisy at
  their own t (``train.context=diffusion_forcing``) or clean (``teacher_forcing``, as a cached rollout sees them);
- ``ode_init``: regression to the teacher ODE trajectory's end from one kept point per chunk;
- ``self_forcing``: the DMD loss on the student's own rollout (``dmd_loss``), and the critic's flow
  matching on a no-grad rollout (``critic_step``);
- ``causal_cd``: consistency distillation of the causal student from its frozen stage-1 self along the
  latter's guided flow-matching ODE, with clean context (``cd_loss``); the target is the student's EMA.

Randomness: every draw comes from the ``torch.Generator`` the loop hands in (one per rank and iteration),
so a resumed run draws exactly what the uninterrupted run drew.

Shapes: latents [B, F, C, H, W]; text [B, Lt, text_dim]; student timesteps per frame [B, F];
teacher/critic timesteps per sample [B] (DMD, critic) through ``wan.wan_flow``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from . import config as C
from . import losses, parallel, recipe, schedule, validation, wan
from .attention import FrameMask
from .rollout import draw_exit_steps, self_forcing_rollout


def keyed_generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator seeded by a tuple of ints (e.g. seed, rank, iteration) through NumPy's SeedSequence."""
    seed = int(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class RolloutSpec:
    """What the self-forcing rollout of one iteration looks like (shared by the student and critic steps)."""

    num_frames: int  # latent frames generated
    timesteps: list[float]  # warped denoising steps
    exit_steps: list[int]  # per chunk; the same on every rank
    window_start: int  # first frame of the clip-length window that DMD / the critic see


class DistillationModule(L.LightningModule):
    """The roles (``student``, ``teacher``, ``critic``; engines after ``use_engines``) and their losses.

    ``snapshot_cache``: the rollout's grad-carrying forwards read a snapshot of the cache (needed when the
    student's blocks recompute in backward: ``train.gradient_checkpointing``).
    """

    def __init__(self, cfg: C.Config, student: torch.nn.Module, teacher: torch.nn.Module | None = None,
                 critic: torch.nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.student, self.teacher, self.critic = student, teacher, critic
        self.new_cache = student.new_cache  # bound to the raw student (engines forward attributes too)
        self.cd_frozen = self.cd_target = None
        if cfg.train.stage == C.Stage.causal_cd:  # both start as the student's (stage-1) weights, frozen
            self.cd_frozen = copy.deepcopy(student).requires_grad_(False).eval()
            self.cd_target = copy.deepcopy(student).requires_grad_(False).eval()
        self.neg_text = recipe.negative_text(cfg) if recipe.reads_negative(cfg) else None  # [1, Lt, text_dim]
        self.rollout_dtype = next(student.parameters()).dtype
        self.snapshot_cache = cfg.train.gradient_checkpointing
        self.vae = None  # loaded on the first sample video
        v, s = cfg.video, cfg.schedule
        self.timesteps = schedule.warp_timesteps(s.denoising_steps, s.shift)
        self.rollout_frames = cfg.train.rollout_frames or v.latent_frames
        if self.rollout_frames < v.latent_frames or self.rollout_frames % v.chunk_frames:
            raise C.ConfigError(f"config key 'train.rollout_frames': expected 0 or a multiple of video.chunk_frames >= "
                                f"video.latent_frames={v.latent_frames}, found {self.rollout_frames}")

    @classmethod
    def from_config(cls, cfg: C.Config) -> DistillationModule:
        """The roles ``train.stage`` needs, seeded identically on every rank (the engines start equal):
        the student; the teacher for self_forcing or validation; the critic for self_forcing.
        ``train.gradient_checkpointing`` wraps the trainable models' blocks from outside. A file the run needs
        and lacks (``config.missing_role_files``) is a ``ConfigError`` before any model is built."""
        C.check_role_files(cfg)
        sf = cfg.train.stage == C.Stage.self_forcing
        student = recipe.build_student(cfg)
        teacher = recipe.build_teacher(cfg) if sf or cfg.validation.every_n_steps > 0 else None
        critic = recipe.build_critic(cfg, teacher) if sf else None
        if cfg.train.compile:
            parallel.apply_compile(student, cfg.train.compile, cfg.train.compile_mode)
        if cfg.train.gradient_checkpointing:
            for model in (student, critic):
                if model is not None:
                    parallel.apply_gradient_checkpointing(model)
        return cls(cfg, student, teacher, critic)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """AdamW of the student and (self_forcing) of the critic: ``optim`` betas and weight decay, own lrs."""
        o = self.cfg.optim
        adamw = dict(betas=tuple(o.betas), weight_decay=o.weight_decay)
        optimizers = [torch.optim.AdamW(self.student.parameters(), lr=o.student_lr, **adamw)]
        if self.critic is not None:
            optimizers.append(torch.optim.AdamW(self.critic.parameters(), lr=o.critic_lr, **adamw))
        return optimizers

    def use_engines(self, student, critic, device: torch.device, teacher_dtype: torch.dtype) -> None:
        """After ``fabric.setup``: the steps run through the engines; the frozen teacher (in
        ``teacher_dtype``) and the negative prompt move to ``device``."""
        self.student, self.critic = student, critic
        self.rollout_dtype = next(student.parameters()).dtype
        kw = {} if teacher_dtype == torch.float32 else {"dtype": teacher_dtype}
        for role in ("teacher", "cd_frozen", "cd_target"):
            if getattr(self, role) is not None:
                setattr(self, role, getattr(self, role).to(device=device, **kw))
        if self.neg_text is not None:
            self.neg_text = self.neg_text.to(device)

    # ------------------------------------------------------------------------------------------
    # The iteration's plan
    # ------------------------------------------------------------------------------------------
    def student_turn(self, step: int) -> bool:
        """Whether iteration ``step`` updates the student: always, but in self_forcing every
        ``dmd.critic_steps_per_student_step``-th iteration (then the critic, every iteration)."""
        sf = self.cfg.train.stage == C.Stage.self_forcing
        return not sf or step % self.cfg.dmd.critic_steps_per_student_step == 0

    def rollout_spec(self, step: int) -> RolloutSpec | None:
        """Iteration ``step``'s self-forcing rollout (None in the other stages): the exit step of each chunk
        and the clip window, from generators keyed by (seed, step) alone, so the same on every rank."""
        if self.cfg.train.stage != C.Stage.self_forcing:
            return None
        v, seed = self.cfg.video, self.cfg.runtime.seed
        num_chunks = self.rollout_frames // v.chunk_frames
        exits = draw_exit_steps(num_chunks, len(self.timesteps), keyed_generator(torch.device("cpu"), seed, step))
        start_chunk = int(torch.randint(0, num_chunks - v.latent_frames // v.chunk_frames + 1, (1,),
                                        generator=keyed_generator(torch.device("cpu"), seed, step, 1)))
        return RolloutSpec(self.rollout_frames, self.timesteps, exits, start_chunk * v.chunk_frames)

    # ------------------------------------------------------------------------------------------
    # Losses: the student's (per stage) and the critic's
    # ------------------------------------------------------------------------------------------
    def training_step(self, batch, gen: torch.Generator, spec: RolloutSpec | None = None) -> tuple[torch.Tensor, dict]:
        """The student's loss on one micro-batch for ``train.stage``: (loss, metrics to log)."""
        stage = self.cfg.train.stage
        if stage == C.Stage.pretrain:
            return self.pretrain_loss(batch, gen)
        if stage == C.Stage.adapt:
            return self.adapt_loss(batch, gen)
        if stage == C.Stage.ode_init:
            return self.ode_init_loss(batch, gen)
        if stage == C.Stage.causal_cd:
            return self.cd_loss(batch, gen)
        return self.dmd_loss(batch, gen, spec)

    def pretrain_loss(self, batch, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Bidirectional flow matching on real latents with one shifted timestep per sample (Wan's own
        pretraining objective: the teacher's training). No mask: every frame attends to every frame.
        With ``train.text_dropout`` p, each sample's text is the negative prompt's embedding with
        probability p, so the teacher also learns the prediction classifier-free guidance contrasts with."""
        x0, text = batch.latents, batch.text  # (B, F, C, H, W), (B, Lt, D)
        t = schedule.sample_training_t((x0.shape[0],), self.cfg.schedule.shift, generator=gen,
                                       device=gen.device).float()  # (B,)
        noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.dtype)
        x_t = schedule.add_noise(x0, noise, t)
        if self.cfg.train.text_dropout > 0:
            drop = torch.rand(x0.shape[0], generator=gen, device=gen.device) < self.cfg.train.text_dropout  # (B,)
            neg = torch.zeros_like(text[:1])
            neg[:, : self.neg_text.shape[1]] = self.neg_text.to(text)  # zero-padded to the batch's text length
            text = torch.where(drop.to(text.device)[:, None, None], neg, text)
        flow = self.student(x_t, t, text, mask=None)
        loss = losses.flow_matching_loss(flow, x0, noise)
        return loss, {"loss/pretrain": loss.detach()}

    def adapt_loss(self, batch, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Block-causal flow matching on real latents with one timestep per chunk; earlier chunks are the
        noisy ones (diffusion forcing) or the clean ones (teacher forcing), by ``train.context``."""
        x0 = batch.latents  # (B, F, C, H, W)
        b, f = x0.shape[:2]
        t = self._chunk_timesteps(b, f, gen)  # (B, F)
        noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.dtype)
        x_t = schedule.add_noise(x0, noise, t)
        if self.cfg.train.context == C.Context.teacher_forcing:
            flow = self.clean_context_flow(self.student, x0, x_t, t, batch.text)
        else:
            flow = self.student(x_t, t, batch.text, mask=FrameMask(self.cfg.video.chunk_frames))
        loss = losses.flow_matching_loss(flow, x0, noise)
        return loss, {"loss/adapt": loss.detach()}

    def clean_context_flow(self, model, clean: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                           text: torch.Tensor) -> torch.Tensor:
        """``model``'s flow for the noisy chunks ``x_t`` [B, F, C, H, W] at ``t`` [B, F], each chunk seeing the
        *clean* frames ``clean`` of the earlier chunks: one forward over [clean; noisy] (2F frames, the clean
        copy at t = 0, both at positions 0 .. F-1) under the teacher-forcing mask; returns the noisy half's
        flow [B, F, C, H, W]. Equal to denoising each chunk with a cache that holds the clean frames."""
        f, dtype = x_t.shape[1], next(model.parameters()).dtype  # frozen roles run in the compute dtype
        x = torch.cat([clean, x_t], 1).to(dtype)  # (B, 2F, C, H, W)
        tt = torch.cat([torch.zeros_like(t), t], 1)  # (B, 2F)
        flow = model(x, tt, text, mask=FrameMask(self.cfg.video.chunk_frames, teacher_forcing=True))
        return flow[:, f:]

    def cd_loss(self, batch, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Causal consistency distillation, top to bottom (every forward with the clean context).

        1. Per chunk an adjacent pair (s_n, s_n+1) of the discrete schedule, ``cd.num_steps`` + 1 shifted Euler
           sigmas from 1 to 0 (``schedule.euler_sigmas``, ``schedule.shift``), n uniform in [0, cd.num_steps).
        2. x_t = (1 - s_n) x0 + s_n eps on real latents x0.
        3. The frozen stage-1 model's flow at (x_t, s_n), guided, uncond + w (cond - uncond) with
           w = ``cd.guidance_scale``; one Euler step to s_n+1: x_next.
        4. The EMA target's x0 at (x_next, s_n+1), no grad (x_next itself where s_n+1 = 0: at t = 0 the
           consistency function is the identity).
        5. The student's x0 at (x_t, s_n); loss = mean (x0_student - x0_target)^2 in float64.
        """
        cd, chunk = self.cfg.cd, self.cfg.video.chunk_frames
        x0, text = batch.latents, batch.text  # (B, F, C, H, W), (B, Lt, D)
        b, f = x0.shape[:2]
        sigmas = schedule.euler_sigmas(cd.num_steps, self.cfg.schedule.shift).to(gen.device)  # (N + 1,)
        n = torch.randint(0, cd.num_steps, (b, f // chunk), generator=gen, device=gen.device).repeat_interleave(chunk, 1)
        t = (sigmas[n] * schedule.NUM_TRAIN_TIMESTEPS).float()  # 1. (B, F)
        t_next = (sigmas[n + 1] * schedule.NUM_TRAIN_TIMESTEPS).float()
        noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.dtype)
        x_t = schedule.add_noise(x0, noise, t)  # 2.
        with torch.no_grad():
            flow = self.clean_context_flow(self.cd_frozen, x0, x_t, t, text)  # 3.
            if cd.guidance_scale != 1.0:
                neg = self.neg_text.to(text).expand(b, -1, -1)
                uncond = self.clean_context_flow(self.cd_frozen, x0, x_t, t, neg)
                flow = schedule.guide(flow.double(), uncond.double(), cd.guidance_scale)
            s, s_next = (schedule.sigma_of(v)[..., None, None, None] for v in (t, t_next))  # (B, F, 1, 1, 1)
            x_next = schedule.euler_step(x_t, flow, s, s_next)
            target = schedule.x0_from_flow(x_next, self.clean_context_flow(self.cd_target, x0, x_next, t_next, text),
                                           t_next)  # 4.
            target = torch.where((t_next == 0)[..., None, None, None], x_next, target)
        x0_student = schedule.x0_from_flow(x_t, self.clean_context_flow(self.student, x0, x_t, t, text), t)  # 5.
        loss = losses.consistency_loss(x0_student, target)
        return loss, {"loss/cd": loss.detach(), "cd/t_mean": t.mean().detach()}

    @torch.no_grad()
    def sync_target(self, shadow: dict[str, torch.Tensor]) -> None:
        """causal_cd: the target's weights <- the EMA ``shadow`` (float32, the student's parameter names)."""
        for name, p in self.cd_target.named_parameters():
            if name not in shadow:
                raise KeyError(f"causal_cd: the EMA has no '{name}' (its names follow the student's parameters)")
            p.copy_(shadow[name])

    def ode_init_loss(self, batch, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Regression to the teacher trajectory's end from one kept trajectory point per chunk."""
        traj, ts = batch.trajectory, batch.timesteps.to(batch.trajectory.device)  # (B, K, F, C, H, W), (K,)
        b, k, f = traj.shape[:3]
        chunk = self.cfg.video.chunk_frames
        usable = int((ts > 0).sum())  # trajectory points that are not already clean
        if usable < 1:
            raise ValueError(f"ODE batch timesteps {ts.tolist()}: no point with t > 0 to regress from")
        idx = torch.randint(0, usable, (b, f // chunk), generator=gen, device=gen.device).repeat_interleave(chunk, 1)  # (B, F)
        x_t = traj[torch.arange(b, device=traj.device)[:, None], idx.to(traj.device), torch.arange(f, device=traj.device)[None]]  # (B, F, C, H, W)
        t = ts[idx.to(ts.device)].float()  # (B, F)
        flow = self.student(x_t, t, batch.text, mask=FrameMask(chunk))
        x0 = schedule.x0_from_flow(x_t, flow, t)
        loss = losses.ode_regression_loss(x0, batch.clean)
        return loss, {"loss/ode": loss.detach()}

    def dmd_loss(self, batch, gen: torch.Generator, spec: RolloutSpec) -> tuple[torch.Tensor, dict]:
        """The student's DMD loss (Self-Forcing's generator loss; DMD: Yin et al. 2024, eq. 7-8), top to bottom.

        1. Self-forcing rollout: x0 = G(noise) chunk by chunk, grad only through each chunk's exit step.
        2. One DMD timestep per sample: t ~ U[0, 1000), shifted (``schedule.shift``), clamped to
           [``dmd.t_min``, ``dmd.t_max``].
        3. Noise the detached sample to t: x_t = (1 - sigma) x0 + sigma eps.
        4. Real score: the frozen teacher's x0 with classifier-free guidance against Wan's negative prompt,
           uncond + w (cond - uncond), w = ``dmd.guidance_scale``.
        5. Fake score: the critic's x0, conditional only.
        6. DMD gradient (x_fake - x_real) / mean|x0 - x_real| per sample (eq. 7), float64, no grad.
        7. Loss 1/2 mean(x0 - sg(x0 - grad))^2 in float64 (eq. 8): its gradient w.r.t. x0 is the DMD gradient.
        The critic only scores (no grad reaches it); the teacher is frozen.
        """
        d = self.cfg.dmd
        text = batch.text
        b = text.shape[0]
        # 1.
        x0 = self.rollout(batch, gen, spec, self.snapshot_cache)  # (B, F, C, H, W), grad
        # 2.
        t = schedule.sample_training_t((b,), self.cfg.schedule.shift, generator=gen, t_min=d.t_min, t_max=d.t_max,
                                       device=gen.device).float()
        # 3.
        noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.dtype)
        x_t = schedule.add_noise(x0.detach(), noise, t)
        with torch.no_grad():
            # 4.
            cond = self._x0(self.teacher, x_t, t, text)
            uncond = self._x0(self.teacher, x_t, t, self.neg_text.to(text.device).expand(b, -1, -1))
            x_real = schedule.guide(cond.double(), uncond.double(), d.guidance_scale)
            # 5.
            x_fake = self._x0(self.critic, x_t, t, text)
        # 6.
        grad = losses.dmd_gradient(x0, x_fake, x_real)
        # 7.
        loss = losses.dmd_loss(x0, grad)
        return loss, {"loss/dmd": loss.detach(), "dmd/grad_abs_mean": grad.abs().mean().detach(),
                      "dmd/t_mean": t.mean().detach()}

    def critic_step(self, batch, gen: torch.Generator, spec: RolloutSpec) -> tuple[torch.Tensor, dict]:
        """The critic's loss (the fake score learns the student's distribution), top to bottom.

        1. Rollout without grad (the exit steps of this iteration's student step).
        2. t per sample, shifted and clamped as in DMD; x_t = (1 - sigma) x0 + sigma eps.
        3. Critic flow prediction with grad; loss = mean((v - (eps - x0))^2).
        """
        d = self.cfg.dmd
        with torch.no_grad():  # 1.
            x0 = self.rollout(batch, gen, spec, snapshot_cache=False)
        b = x0.shape[0]
        t = schedule.sample_training_t((b,), self.cfg.schedule.shift, generator=gen, t_min=d.t_min, t_max=d.t_max,
                                       device=gen.device).float()  # 2.
        noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.dtype)
        x_t = schedule.add_noise(x0, noise, t)
        flow = wan.wan_flow(self.critic, x_t, t, batch.text, self.cfg.model.text_len)  # 3.
        loss = losses.critic_loss(flow, x0, noise)
        return loss, {"loss/critic": loss.detach()}

    def rollout(self, batch, gen: torch.Generator, spec: RolloutSpec, snapshot_cache: bool) -> torch.Tensor:
        """The student's self-forcing rollout of ``spec`` on a fresh cache, cut to its clip window."""
        v, m = self.cfg.video, self.cfg.model
        cache = self.new_cache(batch.text.shape[0])
        x0 = self_forcing_rollout(self.student, cache, batch.text, spec.num_frames, v.chunk_frames,
                                  (m.in_channels, v.latent_height, v.latent_width), spec.timesteps, spec.exit_steps,
                                  gen, dtype=self.rollout_dtype, snapshot_cache=snapshot_cache)
        return x0[:, spec.window_start: spec.window_start + v.latent_frames]  # (B, F_clip, C, H, W)

    def _x0(self, model, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x0 prediction of a diffusers Wan (teacher or critic) with one timestep per sample [B]."""
        flow = wan.wan_flow(model, x_t, t, text, self.cfg.model.text_len)
        return schedule.x0_from_flow(x_t, flow.to(x_t.dtype), t)

    def _chunk_timesteps(self, batch: int, num_frames: int, gen: torch.Generator) -> torch.Tensor:
        """One shifted t per chunk (diffusion forcing), repeated over the chunk's frames: [B, F] float32."""
        chunk = self.cfg.video.chunk_frames
        t = schedule.sample_training_t((batch, num_frames // chunk), self.cfg.schedule.shift, generator=gen,
                                       device=gen.device)
        return t.repeat_interleave(chunk, dim=1).float()

    # ------------------------------------------------------------------------------------------
    # Validation, sample videos, the rank monitor's input
    # ------------------------------------------------------------------------------------------
    def validation_step(self, texts: torch.Tensor, step: int) -> dict[str, float]:
        """Student few-step vs teacher many-step on the fixed prompts ``texts`` [N, Lt, D] (``validation``);
        appends to RUN_DIR/validation.json. Every rank runs it (ZeRO-3 gathers need all)."""
        return validation.validate(self.cfg, self.student, self.new_cache, self.teacher, texts,
                                   Path(self.cfg.runtime.run_dir), step)

    def sample_mp4(self, text: torch.Tensor, path: Path) -> Path:
        """A sample video of the student on ``text`` [1, Lt, D] (fixed noise); the VAE loads on first use."""
        if self.vae is None:
            self.vae = validation.load_vae(self.cfg)
        return validation.sample_mp4(self.cfg, self.student, self.new_cache, text, self.vae, path)

    def rank_probe(self, batch, gen: torch.Generator) -> dict:
        """Input of the ``c_kv`` rank-occupation forward: the batch's clean latents, or (prompt batches)
        noise at t = 1000."""
        lat = getattr(batch, "latents", None)
        if lat is None:
            lat = getattr(batch, "clean", None)
        mask = FrameMask(self.cfg.video.chunk_frames)
        if lat is not None:
            return {"latents": lat, "text": batch.text, "mask": mask}
        v, m = self.cfg.video, self.cfg.model
        noise = torch.randn(batch.text.shape[0], v.latent_frames, m.in_channels, v.latent_height, v.latent_width,
                            generator=gen, device=gen.device)
        return {"latents": noise, "text": batch.text, "t": torch.full((noise.shape[0],), 1000.0, device=noise.device),
                "mask": mask}
