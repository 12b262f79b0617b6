"""The validation metrics (``validation.latent_metrics``) on latents of the real channel counts: Fréchet
distance over 2x2-pooled latent frames, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from vmla_train.validation import latent_metrics


@pytest.mark.timeout(60)
@pytest.mark.parametrize("channels", [4, 16])  # 16: Wan's and the world's latents (not the 3 of an RGB probe)
def test_latent_metrics_against_hand_computed_values(channels):
    teacher = torch.randn(2, 21, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    same = latent_metrics(teacher.clone(), teacher)
    assert same["val/psnr"] == math.inf and same["val/ssim"] == pytest.approx(1.0)
    assert abs(same["val/fid"]) < 1e-4
    assert same["val/temporal_student"] == same["val/temporal_teacher"]
    # every latent value + 1: each of the C * 4 pooled features moves its mean by 1, covariances unchanged,
    # so the Fréchet distance is |mu_s - mu_t|^2 = C * 4
    shifted = latent_metrics(teacher + 1.0, teacher)
    assert shifted["val/fid"] == pytest.approx(channels * 4, rel=1e-4)
    assert shifted["val/kid"] > 1.0 > abs(same["val/kid"])
