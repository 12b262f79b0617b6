"""How the three roles are built: the student, the teacher (real score) and the critic (fake score).

Pure PyTorch (no Lightning). ``distill.DistillationModule`` holds the roles and their losses; the loop
(``train.fit``) sets the student and the critic up as engines. Every role is seeded from
``runtime.seed``, so every rank builds identical weights. A role with no file is built random only under
``train.allow_random_roles`` (dry runs: tests, benchmarks, the debug configs, the demo); otherwise it is a
``ConfigError`` naming the empty key (``config.missing_role_files`` checks a whole run up front).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import config as C
from . import wan


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


def _refuse_random(cfg: C.Config, key: str, what: str) -> None:
    """A role about to be built random: a ConfigError naming ``key`` unless ``train.allow_random_roles``."""
    if not cfg.train.allow_random_roles:
        raise C.random_roles_error([(key, what)])


def build_teacher(cfg: C.Config, device: torch.device | str = "cpu") -> nn.Module:
    """Frozen real score: diffusers ``WanTransformer3DModel`` from ``train.teacher_path``, or random (seeded)
    with ``train.allow_random_roles`` (dry runs); refused otherwise."""
    if cfg.train.teacher_path:
        teacher = wan.load_wan_transformer(cfg.train.teacher_path, device=device, dtype=torch.float32)
    else:
        _refuse_random(cfg, "train.teacher_path", "the teacher (real score) would be random weights: give its "
                       "diffusers Wan folder")
        teacher = wan.build_wan_transformer(cfg.teacher_model, seed=cfg.runtime.seed + 1, device=device)
    teacher.requires_grad_(False)
    return teacher.eval()


def build_critic(cfg: C.Config, teacher: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Trainable fake score of the student's geometry: from ``train.critic_path`` (a 1.3B Wan), else a copy
    of the teacher when it has the student's geometry, else random (seeded) with ``train.allow_random_roles``
    (dry runs); refused otherwise."""
    if cfg.train.critic_path:
        critic = wan.load_wan_transformer(cfg.train.critic_path, device=device, dtype=torch.float32)
    elif cfg.teacher_model == cfg.model:
        critic = copy.deepcopy(teacher)
    else:
        _refuse_random(cfg, "train.critic_path", f"the critic has the student's geometry ({cfg.model.name}), not the "
                       f"teacher's ({cfg.teacher_model.name}): give a diffusers Wan folder of {cfg.model.name}")
        critic = wan.build_wan_transformer(cfg.model, seed=cfg.runtime.seed + 2, device=device)
    critic.requires_grad_(True)
    return critic.train()


def reads_negative(cfg: C.Config) -> bool:
    """Whether the fit of ``cfg`` reads the negative prompt's embedding: self_forcing (the critic's and the
    real score's guidance), pretrain with ``train.text_dropout``, causal_cd with guidance."""
    t = cfg.train
    cd_guided = t.stage == C.Stage.causal_cd and cfg.cd.guidance_scale != 1.0
    return t.stage == C.Stage.self_forcing or t.text_dropout > 0 or cd_guided


def negative_text(cfg: C.Config) -> torch.Tensor:
    """Embedding [1, Lt, text_dim] of Wan's negative prompt (``wan.WAN_NEGATIVE_PROMPT``), precomputed in
    ``dmd.negative_embedding`` (safetensors key 'text'). Without one, a fixed random embedding where it cannot
    matter (``dmd.guidance_scale`` = 1 weighs the unconditional score 0) or with ``train.allow_random_roles``
    (dry runs); refused otherwise."""
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
    guidance = cfg.cd.guidance_scale if cfg.train.stage == C.Stage.causal_cd else cfg.dmd.guidance_scale
    if guidance != 1.0 or cfg.train.text_dropout > 0:
        _refuse_random(cfg, "dmd.negative_embedding", "the unconditional score would read a random embedding: give "
                       "the file `vmla-data negative-embedding` writes")
    g = torch.Generator().manual_seed(cfg.runtime.seed + 0x4E47)
    return torch.randn(1, m.text_len, m.text_dim, generator=g)


def assert_frozen(teacher: nn.Module) -> None:
    """The teacher is never updated: no parameter requires or holds a gradient."""
    bad = [n for n, p in teacher.named_parameters() if p.requires_grad or p.grad is not None]
    if bad:
        raise RuntimeError(f"teacher parameters {bad[:3]} require or hold gradients: the teacher must stay frozen")
