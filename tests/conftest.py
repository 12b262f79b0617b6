"""Shared fixtures: tiny configs and seeded inputs. GPU tests skip without CUDA."""

from __future__ import annotations

import pytest
import torch

from vmla_train import config as C


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_cfg(*overrides: str) -> C.Config:
    """The tiny debug geometry with float32 caches; extra key=value overrides on top."""
    return C.load(overrides=["model.name=tiny", "cache.dtype=float32", *overrides])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return ((a64 - b64).norm() / b64.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
