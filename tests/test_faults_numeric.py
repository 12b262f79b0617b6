"""Numerical faults: a NaN loss (injected through the test hook
``debug.inject_nan_steps`` / ``debug.inject_nan_ranks``) skips the update on every rank,
is counted and logged; ``train.max_consecutive_skips`` in a row stop the run after a checkpoint
that holds the last good weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port
from vmla_train import checkpoint as ckpt
from vmla_train import config as C
from vmla_train import train

ROOT = Path(__file__).resolve().parents[1]


def _weights(folder: Path) -> dict:
    return torch.load(folder / "student.ckpt", weights_only=True)["model"]


@pytest.mark.timeout(60)
def test_nan_step_is_skipped_counted_and_logged(tmp_path, capsys):
    cfg = C.load(ROOT / "configs/self_forcing-debug.yaml", [f"runtime.run_dir={tmp_path}", "train.num_steps=4",
                                                           "debug.inject_nan_steps=[1]"])
    out = train.fit(cfg)
    c, h = out["counters"], out["history"]
    assert c.step == 4 and c.skipped_steps == 1
    assert (c.student_steps, c.critic_steps) == (2, 3)  # iteration 1: the critic update was skipped
    assert [x["skipped/critic"] for x in h] == [0.0, 1.0, 0.0, 0.0] and h[1]["counters/skipped_steps"] == 1
    assert "iteration 2: non-finite loss or gradient on some rank, update skipped" in capsys.readouterr().out
    for model in (out["student"], out["critic"]):
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert ckpt.read_train_state(out["checkpoint"])["skipped_steps"] == 1


@pytest.mark.timeout(60)
def test_consecutive_nan_steps_stop_with_last_good_checkpoint(tmp_path):
    cfg = C.load(ROOT / "configs/adapt-debug.yaml", [f"runtime.run_dir={tmp_path}", "train.num_steps=10",
                                                    "checkpoint.every_n_steps=1", "checkpoint.keep_last=10",
                                                    "debug.inject_nan_steps=[2,3,4]", "train.max_consecutive_skips=3"])
    with pytest.raises(train.NonFiniteError, match=r"3 consecutive non-finite steps .* up to iteration 5"):
        train.fit(cfg)
    last = ckpt.latest_checkpoint(tmp_path)
    state = ckpt.read_train_state(last)
    assert (state["reason"], state["step"], state["skipped_steps"], state["student_steps"]) == ("nonfinite", 5, 3, 2)
    good, stopped = _weights(ckpt.step_dir(tmp_path, 2)), _weights(last)
    assert all(torch.equal(good[k], stopped[k]) for k in good)  # skipped steps changed nothing
    assert all(torch.isfinite(v).all() for v in stopped.values())


@pytest.mark.timeout(150)
def test_nan_on_one_rank_is_skipped_on_both_no_hang(tmp_path):
    """2 gloo processes (DDP), NaN injected on rank 1 only: both ranks skip the same iterations, the
    second run of skips stops both ranks (non-zero exit, no hang) after one consistent checkpoint."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "vmla_train.cli", "fit", str(ROOT / "configs/adapt-debug.yaml"),
            f"runtime.run_dir={run}", "strategy.name=ddp", "strategy.devices=2", "strategy.accelerator=cpu",
            "train.global_batch_size=2", "train.num_steps=20", "checkpoint.every_n_steps=100",
            "debug.inject_nan_steps=[1,3,4]", "debug.inject_nan_ranks=[1]", "train.max_consecutive_skips=2"]
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode != 0 and "NonFiniteError: 2 consecutive non-finite steps" in out, out[-3000:]
    assert "iteration 2: non-finite loss or gradient on some rank, update skipped on every rank" in outs[0]
    state = ckpt.read_train_state(ckpt.latest_checkpoint(run))
    assert (state["reason"], state["step"], state["skipped_steps"], state["student_steps"]) == ("nonfinite", 5, 3, 2)
    assert (ckpt.latest_checkpoint(run) / "rng-rank1.pt").is_file()
