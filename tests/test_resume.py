"""Exact resume and signal handling.

Tolerance: zero. On CPU the resumed run executes the same kernels on the same shapes in the same
order with the same thread count; every random draw comes from generators keyed by (seed, rank,
iteration), and weights, AdamW moments and step counts are restored bit for bit (float32 values
round-trip exactly through torch.save), so the losses are bitwise equal. Any difference is a bug.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmla_train import checkpoint as ckpt
from vmla_train import config as C
from vmla_train import train

ROOT = Path(__file__).resolve().parents[1]


def _losses(summary):
    return [(h["step"], k, v) for h in summary["history"] for k, v in sorted(h.items()) if k.startswith("loss/")]


@pytest.mark.timeout(90)
def test_resume_is_exact(tmp_path):
    base = ["train.num_steps=5", "checkpoint.every_n_steps=100"]
    full = train.fit(C.load(ROOT / "configs/self_forcing-debug.yaml", base + [f"runtime.run_dir={tmp_path / 'a'}"]))
    # interrupted at step 3 (checkpoint on stop), then resumed by a fresh fit on the same run folder
    part1 = train.fit(C.load(ROOT / "configs/self_forcing-debug.yaml", base + [f"runtime.run_dir={tmp_path / 'b'}"]),
                      stop_after=3)
    assert part1["counters"].step == 3
    assert ckpt.read_train_state(ckpt.latest_checkpoint(tmp_path / "b"))["reason"] == "stop_after"
    part2 = train.fit(C.load(ROOT / "configs/self_forcing-debug.yaml", base + [f"runtime.run_dir={tmp_path / 'b'}"]))
    assert part2["counters"].step == 5 and part2["counters"].student_steps == 3
    assert part2["run_id"] == part1["run_id"]
    assert _losses(part1) + _losses(part2) == _losses(full)  # bitwise
    assert part2["counters"].losses == full["counters"].losses


@pytest.mark.timeout(120)
def test_sigusr1_checkpoints_and_exits_cleanly_then_resumes(tmp_path):
    args = [sys.executable, "-m", "vmla_train.cli", "fit", str(ROOT / "configs/adapt-debug.yaml"),
            f"runtime.run_dir={tmp_path}", "train.num_steps=100000", "checkpoint.every_n_steps=1", "checkpoint.keep_last=1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while ckpt.latest_checkpoint(tmp_path) is None:  # training is under way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert "rank 0: SIGUSR1: checkpoint and stop at iteration" in out
    last = ckpt.latest_checkpoint(tmp_path)
    state = ckpt.read_train_state(last)
    assert state["reason"] == "signal" and state["step"] >= 1
    # the requeued job: same command, fewer total steps -> resumes and finishes
    args[6] = f"train.num_steps={state['step'] + 2}"
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {last}" in done.stdout + done.stderr
    assert ckpt.read_train_state(ckpt.latest_checkpoint(tmp_path))["step"] == state["step"] + 2


_STUCK = """
import os, signal, sys, time
from vmla_train import train
stop = train._StopFlag(0.5)
os.kill(os.getpid(), signal.SIGUSR1)
def stuck_after_the_signal():
    time.sleep(1.5)
if sys.argv[1] == "close":
    stop.close()
stuck_after_the_signal()
print("signum", stop.signum)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("close", [False, True])
def test_a_stop_that_hangs_prints_where(close):
    """checkpoint.stop_traceback_s: still running that long after SIGUSR1, the process prints every thread's
    stack once (naming the function it is stuck in) and goes on; disarmed when fit returns (close)."""
    out = subprocess.run([sys.executable, "-c", _STUCK, "close" if close else "run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=50)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"signum {int(signal.SIGUSR1)}" in out.stdout
    if close:
        assert "stuck_after_the_signal" not in out.stderr
    else:
        assert "Timeout (0:00:00.500000)!" in out.stderr and "in stuck_after_the_signal" in out.stderr
