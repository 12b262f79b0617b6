"""What the training loop carries from one iteration to the next, in one object (``TrainState``).

A checkpoint holds exactly this (``checkpoint.save`` / ``checkpoint.resume``): the engines and their
optimizers (inside ``module``: the student, and the critic for self_forcing), the EMA of the student, the
data loader's position, the counters, and the W&B run id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as C
from .ema import EMA


@dataclass
class Counters:
    """Our counters drive every schedule (never Lightning's); all are saved in ``train_state.json``."""

    step: int = 0  # iterations done (the schedule clock)
    student_steps: int = 0  # student optimizer steps
    critic_steps: int = 0  # critic optimizer steps
    samples: int = 0  # training samples consumed (all ranks)
    losses: list = field(default_factory=list)  # (step, name, value) of every logged loss, for resume checks
    skipped_steps: int = 0  # iterations whose update was skipped (non-finite loss or gradient on some rank)

    def to_dict(self) -> dict:
        return {"step": self.step, "student_steps": self.student_steps, "critic_steps": self.critic_steps,
                "samples": self.samples, "losses": self.losses, "skipped_steps": self.skipped_steps}

    def load(self, saved: dict) -> None:
        """From a checkpoint's ``train_state.json`` (``losses`` / ``skipped_steps`` absent in older ones)."""
        self.step, self.student_steps = saved["step"], saved["student_steps"]
        self.critic_steps, self.samples = saved["critic_steps"], saved["samples"]
        self.losses = [list(x) for x in saved.get("losses", [])]
        self.skipped_steps = saved.get("skipped_steps", 0)


@dataclass
class TrainState:
    """The loop's state. ``module`` (``distill.DistillationModule``) holds the roles; after ``fabric.setup``
    its ``student`` and ``critic`` are the engines (one DeepSpeed engine each under DeepSpeed)."""

    fabric: Any  # lightning.fabric.Fabric, launched
    cfg: C.Config
    module: Any  # distill.DistillationModule with the engines set up
    student_optimizer: Any  # Fabric-wrapped AdamW of the student
    critic_optimizer: Any  # Fabric-wrapped AdamW of the critic (None unless self_forcing)
    ema: EMA  # EMA of the student's weights (kept on rank 0)
    loader: Any  # data.build_loader's loader: batches and a resumable position
    run_id: str  # the W&B run id, stored in every checkpoint
    accumulation: int  # micro-batches per optimizer step
    counters: Counters = field(default_factory=Counters)
    consecutive_skips: int = 0  # skipped iterations in a row (not saved: a resumed run starts at 0)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.runtime.run_dir)

    @property
    def rank(self) -> int:
        return self.fabric.global_rank

    def engine(self, role: str) -> tuple[Any, Any]:
        """(engine, optimizer) of ``role``: student | critic."""
        if role == "student":
            return self.module.student, self.student_optimizer
        return self.module.critic, self.critic_optimizer
