"""DMD / critic / ODE / flow-matching losses against hand-computed values."""

import pytest
import torch

from vmla_train import losses, schedule


@pytest.mark.timeout(10)
def test_dmd_loss_and_gradient_hand_computed():
    # Two samples [B=2, F=1, C=1, H=1, W=2].
    x0 = torch.tensor([[1.0, 2.0], [0.0, -1.0]]).reshape(2, 1, 1, 1, 2).requires_grad_(True)
    x_real = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).reshape(2, 1, 1, 1, 2)
    x_fake = torch.tensor([[3.0, 1.0], [0.0, 2.0]]).reshape(2, 1, 1, 1, 2)
    # normalisers: mean|x0 - x_real| = (1 + 2)/2 = 1.5 and (1 + 2)/2 = 1.5
    # grad = (x_fake - x_real) / 1.5 = [[2, 2/3], [-2/3, 2/3]]
    grad = losses.dmd_gradient(x0, x_fake, x_real)
    expect = torch.tensor([[2.0, 2 / 3], [-2 / 3, 2 / 3]], dtype=torch.float64).reshape(2, 1, 1, 1, 2)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, expect, rtol=0, atol=1e-15)
    loss = losses.dmd_loss(x0, grad)
    # loss = 1/2 mean(grad^2) = 1/2 * (4 + 4/9 + 4/9 + 4/9) / 4
    assert loss.dtype == torch.float64
    assert abs(loss.item() - 0.5 * (4 + 12 / 9) / 4) < 1e-14
    loss.backward()
    # d loss / d x0 = grad / numel: the student moves against (x_fake - x_real)
    torch.testing.assert_close(x0.grad.double(), expect / 4, rtol=0, atol=1e-7)


@pytest.mark.timeout(10)
def test_dmd_normaliser_is_per_sample():
    x0 = torch.zeros(2, 1, 1, 1, 2)
    x_real = torch.tensor([[1.0, 1.0], [10.0, 10.0]]).reshape(2, 1, 1, 1, 2)
    x_fake = x_real + 1
    g = losses.dmd_gradient(x0, x_fake, x_real)
    torch.testing.assert_close(g.flatten(1), torch.tensor([[1.0, 1.0], [0.1, 0.1]], dtype=torch.float64))


@pytest.mark.timeout(10)
def test_standard_cfg_weight_is_the_difference_form_plus_one():
    cond, uncond = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(schedule.guide(cond, uncond, 4.0), cond + 3.0 * (cond - uncond))


@pytest.mark.timeout(10)
def test_flow_matching_critic_and_ode_losses():
    x0, noise = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    v = noise - x0
    assert losses.flow_matching_loss(v, x0, noise).item() < 1e-12  # v in float32 vs the float64 target
    assert abs(losses.flow_matching_loss(v + 2.0, x0, noise).item() - 4.0) < 1e-5
    x0g = x0.clone().requires_grad_(True)
    pred = (v + 1.0).requires_grad_(True)
    losses.critic_loss(pred, x0g, noise).backward()
    assert x0g.grad is None and pred.grad is not None
    assert abs(losses.ode_regression_loss(x0 + 3.0, x0).item() - 9.0) < 1e-5  # float32 input rounding
