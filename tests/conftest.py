"""Shared fixtures: tiny configs and seeded inputs. GPU tests skip without CUDA."""

from __future__ import annotations

import os
import sys

# The tests run as in the activated environment: its console scripts and its tools come first on PATH. DeepSpeed
# compiles its CPU communication op with the first `ninja` on PATH, and ninja rebuilds (about 30 s) whenever a
# different ninja built it last: with the environment's one everywhere, the Slurm jobs (whose PATH starts with
# it) and the other tests share one build.
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join([_BIN, os.environ.get("PATH", "")])

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on a 2-core machine: one intra-op thread each (inherited by the
    # tests' subprocesses), as two 2-thread pools on 2 cores spin against each other (some tests run 4x slower)
    os.environ["OMP_NUM_THREADS"] = "1"

if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    # CPU machines run the Triton kernels in Triton's interpreter; it must be on before any @triton.jit runs
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from vmla_train import config as C

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    for item in items:  # one local Slurm cluster: its tests share one pytest-xdist worker
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_cfg(*overrides: str) -> C.Config:
    """The tiny debug geometry with float32 caches; extra key=value overrides on top."""
    return C.load(overrides=["model.name=tiny", "cache.dtype=float32", *overrides])


def tiny_generate_inputs(folder, prompts_text: str, num_prompts: int, negative: bool = False):
    """What `vmla-generate` reads, tiny and seeded, in ``folder``: a one-layer student folder (student/), a tiny
    VAE (vae/), embeddings (emb.safetensors: ``num_prompts`` prompt rows [+ a negative]) and prompts.txt.
    Returns (config, student folder)."""
    from safetensors.torch import save_file

    from vmla_train import wan
    from vmla_train.student import WanStudent
    from vmla_train.student_io import save_student

    cfg = C.load(None, ["model.name=tiny", "model.num_layers=1", "runtime.device=cpu", "cache.window_frames=6"])
    torch.manual_seed(0)
    ckpt = save_student(WanStudent(cfg).state_dict(), cfg, folder / "student")
    wan.tiny_vae(seed=0).save_pretrained(folder / "vae")
    emb = {"prompt_embeds": torch.randn(num_prompts, 8, cfg.model.text_dim)}
    if negative:
        emb["negative_embeds"] = torch.randn(1, 8, cfg.model.text_dim)
    save_file(emb, str(folder / "emb.safetensors"))
    (folder / "prompts.txt").write_text(prompts_text)
    return cfg, ckpt


def free_port() -> int:
    """A free TCP port for a test's rendezvous (MASTER_PORT), drawn below the kernel's ephemeral range: a port the
    kernel handed out (bind to 0) and freed can be given again as the source port of any other connection before
    the rank binds it (seen: a rank's store client reset by a stranger on that port, then a 30-minute retry).
    Also clear of the test cluster's Slurm ports and of the master ports slurm/train.sbatch derives for its first
    job ids (20000 + id)."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(21000, 29000)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port in 21000-29000")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return ((a64 - b64).norm() / b64.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread: for tests of tiny models, where on a shared 2-core machine a second thread only
    slows their many small ops (the world codec's by about ten times)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
