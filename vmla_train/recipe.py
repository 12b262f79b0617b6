"""The three roles (teacher = real score, critic = fake score, student) and each stage's loss.

Pure PyTorch (no Lightning): the loop passes in the engine-wrapped student and critic; the teacher is a
frozen plain module. Every random draw comes from the ``torch.Generator`` the loop hands in (one per
rank and iteration), so a resumed run draws exactly what the uninterrupted run drew.

Shapes: latents [B, F, C, H, W]; text [B, Lt, text_dim]; student timesteps per frame [B, F];
teacher/critic timesteps per sample [B] (DMD, critic) through ``wan.wan_flow``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from . import config as C
from . import losses, schedule, wan
from .attention import FrameMask
from .rollout import self_forcing_rollout


# ----------------------------------------------------------------------------------------------
# Roles
# ----------------------------------------------------------------------------------------------
def teacher_model_config(cfg: C.Config) -> C.ModelConfig:
    """Geometry of the teacher/critic: ``train.teacher_size`` (e.g. wan-14b) or the student's."""
    name = cfg.train.teacher_size or cfg.model.name
    if name == cfg.model.name:
        return cfg.model
    sizes = C.MODEL_SIZES[name]["model"]
    return C.ModelConfig(**{**{f: getattr(cfg.model, f) for f in cfg.model.__dataclass_fields__}, "name": name, **sizes})


def build_student(cfg: C.Config) -> nn.Module:
    """The student: from ``train.student_path`` (a student folder) or randomly initialised (seeded)."""
    from .student import WanStudent
    from .student_io import load_student

    if cfg.train.student_path:
        model, scfg = load_student(cfg.train.student_path)
        for section in ("model", "attention"):
            if getattr(scfg, section) != getattr(cfg, section):
                raise ValueError(f"student folder '{cfg.train.student_path}': its config.yaml '{section}' section "
                                 f"differs from the run config's; use the folder's values in the run config")
        return model
    torch.manual_seed(cfg.runtime.seed)
    return WanStudent(cfg)


def build_teacher(cfg: C.Config, device: torch.device | str = "cpu") -> nn.Module:
    """Frozen real score: diffusers ``WanTransformer3DModel`` from ``train.teacher_path`` or random (seeded)."""
    if cfg.train.teacher_path:
        teacher = wan.load_wan_transformer(cfg.train.teacher_path, device=device, dtype=torch.float32)
    else:
        teacher = wan.build_wan_transformer(teacher_model_config(cfg), seed=cfg.runtime.seed + 1, device=device)
    teacher.requires_grad_(False)
    return teacher.eval()


def build_critic(cfg: C.Config, teacher: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Trainable fake score of the student's geometry: from ``train.critic_path`` (a 1.3B Wan), else a copy
    of the teacher when it has the student's geometry, else random (seeded; tests and benchmarks)."""
    if cfg.train.critic_path:
        critic = wan.load_wan_transformer(cfg.train.critic_path, device=device, dtype=torch.float32)
    elif teacher_model_config(cfg) == cfg.model:
        critic = copy.deepcopy(teacher)
    else:
        critic = wan.build_wan_transformer(cfg.model, seed=cfg.runtime.seed + 2, device=device)
    critic.requires_grad_(True)
    return critic.train()


def negative_text(cfg: C.Config) -> torch.Tensor:
    """Embedding [1, Lt, text_dim] of Wan's negative prompt (``wan.WAN_NEGATIVE_PROMPT``), precomputed in
    ``dmd.negative_embedding`` (safetensors key 'text'); without one a fixed random embedding (synthetic)."""
    m = cfg.model
    if cfg.dmd.negative_embedding:
        from safetensors.torch import load_file

        state = load_file(cfg.dmd.negative_embedding)
        if "text" not in state:
            raise KeyError(f"dmd.negative_embedding '{cfg.dmd.negative_embedding}' has no key 'text'")
        t = state["text"].float()
        if t.ndim == 2:
            t = t[None]
        if t.shape[-1] != m.text_dim or t.shape[1] > m.text_len:
            raise ValueError(f"dmd.negative_embedding: shape {tuple(t.shape)}, expected [1, <= {m.text_len}, {m.text_dim}]")
        return t
    g = torch.Generator().manual_seed(cfg.runtime.seed + 0x4E47)
    return torch.randn(1, m.text_len, m.text_dim, generator=g)


def assert_frozen(teacher: nn.Module) -> None:
    """The teacher is never updated: no parameter requires or holds a gradient."""
    bad = [n for n, p in teacher.named_parameters() if p.requires_grad or p.grad is not None]
    if bad:
        raise RuntimeError(f"teacher parameters {bad[:3]} require or hold gradients: the teacher must stay frozen")


# ----------------------------------------------------------------------------------------------
# Stage losses
# ----------------------------------------------------------------------------------------------
def _chunk_timesteps(cfg: C.Config, batch: int, num_frames: int, gen: torch.Generator) -> torch.Tensor:
    """One shifted t per chunk (diffusion forcing), repeated over the chunk's frames: [B, F] float32."""
    chunk = cfg.video.chunk_frames
    t = schedule.sample_training_t((batch, num_frames // chunk), cfg.dmd.shift, generator=gen, device=gen.device)
    return t.repeat_interleave(chunk, dim=1).float()


def adapt_loss(student, batch, cfg: C.Config, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Block-causal flow matching on real latents with per-chunk timesteps (diffusion forcing)."""
    x0 = batch.latents  # (B, F, C, H, W)
    b, f = x0.shape[:2]
    t = _chunk_timesteps(cfg, b, f, gen)  # (B, F)
    noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.dtype)
    x_t = schedule.add_noise(x0, noise, t)
    flow = student(x_t, t, batch.text, mask=FrameMask(cfg.video.chunk_frames))
    loss = losses.flow_matching_loss(flow, x0, noise)
    return loss, {"loss/adapt": loss.detach()}


def ode_loss(student, batch, cfg: C.Config, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Regression to the teacher trajectory's end from one kept trajectory point per chunk."""
    traj, ts = batch.trajectory, batch.timesteps.to(batch.trajectory.device)  # (B, K, F, C, H, W), (K,)
    b, k, f = traj.shape[:3]
    chunk = cfg.video.chunk_frames
    usable = int((ts > 0).sum())  # trajectory points that are not already clean
    if usable < 1:
        raise ValueError(f"ODE batch timesteps {ts.tolist()}: no point with t > 0 to regress from")
    idx = torch.randint(0, usable, (b, f // chunk), generator=gen, device=gen.device).repeat_interleave(chunk, 1)  # (B, F)
    x_t = traj[torch.arange(b, device=traj.device)[:, None], idx.to(traj.device), torch.arange(f, device=traj.device)[None]]  # (B, F, C, H, W)
    t = ts[idx.to(ts.device)].float()  # (B, F)
    flow = student(x_t, t, batch.text, mask=FrameMask(chunk))
    x0 = schedule.x0_from_flow(x_t, flow, t)
    loss = losses.ode_regression_loss(x0, batch.clean)
    return loss, {"loss/ode": loss.detach()}


@dataclass
class RolloutSpec:
    """What the self-forcing rollout of one iteration looks like (shared by the student and critic steps)."""

    num_frames: int  # latent frames generated
    timesteps: list[float]  # warped denoising steps
    exit_steps: list[int]  # per chunk, drawn on rank 0 and broadcast
    window_start: int  # first frame of the clip-length window that DMD / the critic see


def rollout(student, new_cache, batch, cfg: C.Config, spec: RolloutSpec, gen: torch.Generator, dtype: torch.dtype,
            snapshot_cache: bool) -> torch.Tensor:
    v, m = cfg.video, cfg.model
    cache = new_cache(batch.text.shape[0])
    x0 = self_forcing_rollout(student, cache, batch.text, spec.num_frames, v.chunk_frames,
                              (m.in_channels, v.latent_height, v.latent_width), spec.timesteps, spec.exit_steps,
                              gen, dtype=dtype, snapshot_cache=snapshot_cache)
    return x0[:, spec.window_start: spec.window_start + v.latent_frames]  # (B, F_clip, C, H, W)


def _x0(model, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_len: int) -> torch.Tensor:
    """x0 prediction of a diffusers Wan (teacher or critic) with one timestep per sample [B]."""
    flow = wan.wan_flow(model, x_t, t, text, text_len)
    return schedule.x0_from_flow(x_t, flow.to(x_t.dtype), t)


def dmd_student_loss(student, new_cache, teacher, critic, batch, neg_text: torch.Tensor, cfg: C.Config,
                     spec: RolloutSpec, gen: torch.Generator, dtype: torch.dtype,
                     snapshot_cache: bool = False) -> tuple[torch.Tensor, dict]:
    """The DMD generator loss of Self-Forcing (DESIGN 5), top to bottom.

    1. Self-forcing rollout: x0 = G(noise) chunk by chunk, grad only through each chunk's exit step.
    2. One DMD timestep per sample: t ~ U[0, 1000), shifted (s = dmd.shift), clamped to [t_min, t_max].
    3. Diffuse the (detached) sample: x_t = (1 - sigma) x0 + sigma eps.
    4. Real score (frozen teacher) with CFG on the difference against Wan's negative prompt.
    5. Fake score (critic), conditional only.
    6. DMD gradient (x_fake - x_real) / mean|x0 - x_real| and loss 1/2 mean(x0 - sg(x0 - grad))^2, float64.
    """
    m, d = cfg.model, cfg.dmd
    text = batch.text
    b = text.shape[0]
    # 1.
    x0 = rollout(student, new_cache, batch, cfg, spec, gen, dtype, snapshot_cache)  # (B, F, C, H, W), grad
    # 2.
    t = schedule.sample_training_t((b,), d.shift, generator=gen, t_min=d.t_min, t_max=d.t_max, device=gen.device).float()
    # 3.
    noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.dtype)
    x_t = schedule.add_noise(x0.detach(), noise, t)
    with torch.no_grad():
        # 4.
        cond = _x0(teacher, x_t, t, text, m.text_len)
        uncond = _x0(teacher, x_t, t, neg_text.to(text.device).expand(b, -1, -1), m.text_len)
        x_real = losses.cfg_combine(cond.double(), uncond.double(), d.guidance)
        # 5.
        x_fake = _x0(critic, x_t, t, text, m.text_len)
    # 6.
    grad = losses.dmd_gradient(x0, x_fake, x_real)
    loss = losses.dmd_loss(x0, grad)
    return loss, {"loss/dmd": loss.detach(), "dmd/grad_abs_mean": grad.abs().mean().detach(),
                  "dmd/t_mean": t.mean().detach()}


def critic_flow_loss(student, new_cache, critic, batch, cfg: C.Config, spec: RolloutSpec, gen: torch.Generator,
                     dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """The critic's update: flow matching on a no-grad self-forcing rollout of the student.

    1. Rollout without grad (same exit steps as the student's step of this iteration).
    2. t per sample, shifted and clamped as in DMD; x_t = (1 - sigma) x0 + sigma eps.
    3. Critic flow prediction with grad; loss = mean((v - (eps - x0))^2).
    """
    d = cfg.dmd
    with torch.no_grad():  # 1.
        x0 = rollout(student, new_cache, batch, cfg, spec, gen, dtype, snapshot_cache=False)
    b = x0.shape[0]
    t = schedule.sample_training_t((b,), d.shift, generator=gen, t_min=d.t_min, t_max=d.t_max, device=gen.device).float()  # 2.
    noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.dtype)
    x_t = schedule.add_noise(x0, noise, t)
    flow = wan.wan_flow(critic, x_t, t, batch.text, cfg.model.text_len)  # 3.
    loss = losses.critic_loss(flow, x0, noise)
    return loss, {"loss/critic": loss.detach()}
