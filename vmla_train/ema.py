"""Exponential moving average of the student's weights (float32 copy on the device, rank 0 only).

``update`` runs on every rank (under ZeRO-3 the parameters are gathered, a collective), but only
rank 0 keeps the average. Schedules use our own student-step counter: the EMA starts at
``dmd.ema_start_step`` as a copy of the weights, then ``ema = decay * ema + (1 - decay) * w``.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, decay: float, start_step: int, keep: bool):
        self.decay, self.start_step, self.keep = decay, start_step, keep
        self.shadow: dict[str, torch.Tensor] = {}

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, gather) -> None:
        """After student step ``step``; ``gather(model)`` is a context making the parameters whole."""
        if not self.enabled or step < self.start_step:
            return
        with gather(model):
            if not self.keep:
                return
            params = {n: p for n, p in model.named_parameters()}
            if not self.shadow:  # first update: a copy
                self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
                return
            dev = next(iter(params.values())).device
            if next(iter(self.shadow.values())).device != dev:  # loaded from a checkpoint on the CPU
                self.shadow = {k: v.to(dev) for k, v in self.shadow.items()}
            # one multi-tensor kernel instead of a launch per parameter (the same lerp per element)
            torch._foreach_lerp_([self.shadow[n] for n in params], [p.detach().float() for p in params.values()],
                                 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.float().clone() for k, v in state.items()}
