"""Training losses as pure functions (no models, no Lightning): DMD, critic flow matching, ODE regression.

Shapes: latents ``[B, F, C, H, W]``; every loss returns a float64 scalar averaged over all elements
(the reduction Self-Forcing uses), so loss magnitudes do not depend on the clip size.

DMD (Yin et al., "One-step Diffusion with Distribution Matching Distillation", eq. 7-8; the
normalised form of DMD2 / Self-Forcing)::

    grad   = (x_fake - x_real) / mean|x0 - x_real|        per sample, float64      (eq. 7)
    loss   = 1/2 * mean((x0 - sg(x0 - grad))^2)                                     (eq. 8)
    d loss / d x0 = grad / numel(x0)

so a gradient step on the student moves x0 along ``-(x_fake - x_real)``: towards the real score's
prediction and away from the fake (critic) score's.
"""

from __future__ import annotations

import torch

from . import schedule


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dim, shaped to broadcast against x: [B, 1, ..., 1]."""
    return x.flatten(1).mean(1).reshape(-1, *([1] * (x.ndim - 1)))


def dmd_gradient(x0: torch.Tensor, x_fake: torch.Tensor, x_real: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The DMD gradient ``(x_fake - x_real) / mean|x0 - x_real|`` per sample, float64, no grad."""
    with torch.no_grad():
        x0, x_fake, x_real = (t.detach().to(torch.float64) for t in (x0, x_fake, x_real))
        normaliser = _per_sample_mean((x0 - x_real).abs()).clamp_min(eps)  # (B, 1, 1, 1, 1)
        return (x_fake - x_real) / normaliser


def dmd_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``1/2 mean((x0 - sg(x0 - grad))^2)`` in float64: its gradient w.r.t. x0 is ``grad / numel``."""
    x = x0.to(torch.float64)
    target = (x - grad.to(torch.float64)).detach()
    return 0.5 * torch.mean((x - target) ** 2)


def flow_matching_loss(flow_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE between the predicted flow and ``v = eps - x0`` (adapt stage and the critic), float64."""
    target = schedule.flow_target(x0.detach().to(torch.float64), noise.to(torch.float64))
    return torch.mean((flow_pred.to(torch.float64) - target) ** 2)


def critic_loss(flow_pred: torch.Tensor, x0_generated: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The fake score's denoising loss on the student's (detached) samples: flow matching on them."""
    return flow_matching_loss(flow_pred, x0_generated.detach(), noise)


def consistency_loss(x0_pred: torch.Tensor, x0_target: torch.Tensor) -> torch.Tensor:
    """Consistency distillation: MSE between the student's x0 at the earlier point and the (detached)
    target's x0 at the later point, float64."""
    return torch.mean((x0_pred.to(torch.float64) - x0_target.detach().to(torch.float64)) ** 2)


def ode_regression_loss(x0_pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """ODE init: MSE between the student's x0 from a trajectory point and the trajectory's end, float64."""
    return torch.mean((x0_pred.to(torch.float64) - clean.detach().to(torch.float64)) ** 2)
