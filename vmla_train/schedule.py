"""Flow matching as Wan uses it: one module for every stage (adapt, ODE init, DMD, generation).

Conventions: timesteps ``t`` in [0, 1000], ``sigma = t / 1000``; ``x_t = (1 - sigma) x0 + sigma eps``;
the network predicts the flow ``v = eps - x0``, so ``x0 = x_t - sigma v``. The shift warps a uniform
sigma towards noise: ``sigma' = s sigma / (1 + (s - 1) sigma)``. Classifier-free guidance is the
standard ``uncond + w (cond - uncond)`` (``guide``). Arithmetic on sigmas and the x0 <-> flow
conversions run in float64 and return the input dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000.0  # Wan's timestep scale: t = 1000 * sigma


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def warp_timesteps(steps: Sequence[float], shift: float) -> list[float]:
    """Warp a denoising step list through the shift: [1000, 750, 500, 250] -> [1000, 937.5, 833.3, 625]."""
    return [NUM_TRAIN_TIMESTEPS * float(shift_sigma(t / NUM_TRAIN_TIMESTEPS, shift)) for t in steps]


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64) / NUM_TRAIN_TIMESTEPS


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sigma [B] or [B, F] -> broadcastable to x [B, F, C, H, W], float64."""
    s = sigma.to(torch.float64)
    return s.reshape(*s.shape, *([1] * (x.ndim - s.ndim)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps with sigma = t / 1000 per sample [B] or per frame [B, F]."""
    s = _bcast(sigma_of(t), x0)
    return ((1 - s) * x0.to(torch.float64) + s * noise.to(torch.float64)).to(x0.dtype)


def x0_from_flow(x_t: torch.Tensor, flow: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - sigma * v."""
    s = _bcast(sigma_of(t), x_t)
    return (x_t.to(torch.float64) - s * flow.to(torch.float64)).to(x_t.dtype)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``uncond + w (cond - uncond)`` (w = ``scale``; w = 1 is no guidance), on
    flows or x0 predictions alike, in the inputs' dtype."""
    return uncond + scale * (cond - uncond)


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target v = eps - x0."""
    return (noise.to(torch.float64) - x0.to(torch.float64)).to(x0.dtype)


def sample_training_t(
    shape: Sequence[int], shift: float, generator: torch.Generator | None = None, t_min: float = 0.0,
    t_max: float = NUM_TRAIN_TIMESTEPS, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """t ~ U[0, 1000) warped through the shift and clamped to [t_min, t_max] (float64)."""
    u = torch.rand(*shape, generator=generator, dtype=torch.float64, device=device)
    t = NUM_TRAIN_TIMESTEPS * shift_sigma(u, shift)
    return t.clamp(t_min, t_max)


def euler_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """Sigmas [num_steps + 1] from 1 to 0, shifted: the teacher's many-step Euler sampler."""
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


def euler_step(x_t: torch.Tensor, flow: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of dx/dsigma = v from sigma to sigma_next."""
    return (x_t.to(torch.float64) + (sigma_next - sigma) * flow.to(torch.float64)).to(x_t.dtype)
