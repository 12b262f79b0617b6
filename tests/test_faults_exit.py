"""A rank whose run finished leaves in bounded time: a process-group teardown or an exit hook that hangs (a
W&B service that a Slurm requeue killed under an earlier process, a peer that already left) cannot keep the
rank, and with it its Slurm job, alive. Each is cut short after its grace with one line on stderr; the
rank's exit status is kept."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmla_train import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(60)
def test_a_hanging_exit_hook_is_cut_short_with_the_rank_status():
    code = ("import atexit, time\n"
            "from vmla_train import cli\n"
            "atexit.register(lambda: print('hook ran', flush=True))\n"
            "atexit.register(lambda: time.sleep(120))  # hooks run last-registered first: this one blocks\n"
            "cli._leave(3, grace_s=1.0)\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert time.monotonic() - t0 < 30
    assert r.returncode == 3, r.stderr
    assert "exit hooks still running after 1 s; exiting with status 3" in r.stderr
    assert "hook ran" not in r.stdout  # cut short while the blocking hook ran


@pytest.mark.timeout(60)
def test_exit_hooks_that_finish_run_and_the_status_is_kept():
    code = ("import atexit\n"
            "from vmla_train import cli\n"
            "atexit.register(lambda: print('hook ran', flush=True))\n"
            "cli._leave(0, grace_s=30.0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert r.returncode == 0 and "hook ran" in r.stdout and "warning" not in r.stderr


@pytest.mark.timeout(60)
def test_a_hanging_process_group_teardown_is_left_behind(monkeypatch, capsys):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: time.sleep(30))  # a daemon thread, left asleep
    t0 = time.monotonic()
    cli._destroy_process_group(grace_s=0.5)
    assert time.monotonic() - t0 < 5
    assert "the process group's teardown did not finish in 0.5 s; leaving it" in capsys.readouterr().err
