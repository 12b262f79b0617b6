"""Shared fixtures: tiny configs and seeded inputs. GPU tests skip without CUDA."""

from __future__ import annotations

import os

if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    # CPU machines run the Triton kernels in Triton's interpreter; it must be on before any @triton.jit runs
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


# ----------------------------------------------------------------------------------------------
# A real two-node Slurm cluster (tests marked `slurm`): brought up once per session.
# ----------------------------------------------------------------------------------------------
import shutil  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

CLUSTER_SH = Path(__file__).parent / "slurm" / "cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """``.env`` has SLURM_CONF set; ``.root`` holds the cluster's state and logs.

    In CI (CI=true) a missing Slurm is a failure, not a skip: `.ci/run` installs it.
    """
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        msg = "slurm-wlm not installed or not root (run `tests/slurm/cluster.sh install` as root)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    root = tmp_path_factory.mktemp("slurm")
    up = subprocess.run([str(CLUSTER_SH), "up", str(root)], capture_output=True, text=True, timeout=120)
    if up.returncode:
        pytest.fail(f"slurm cluster did not come up: {up.stdout}{up.stderr}")
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    yield SimpleNamespace(root=root, env=env)
    subprocess.run([str(CLUSTER_SH), "down", str(root)], capture_output=True, timeout=120)
