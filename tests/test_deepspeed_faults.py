"""Faults under DeepSpeed (ZeRO-2, student + critic engines) in 2 CPU processes (DeepSpeed's CPU accelerator +
gloo), through the real loop (``train.fit``):

- a non-finite loss on one rank skips the update on both ranks: weights, fp32 master partition and AdamW
  moments unchanged on each rank, counted like the other strategies count it, training goes on finitely;
  both kinds are covered: a NaN loss (NaN gradients, which DeepSpeed's own overflow check also sees) and
  a NaN constant added to the loss (finite gradients: only our check sees it);
- a write error on one rank inside DeepSpeed's collective save stops both ranks with one line naming the
  temp folder and the rank, leaves the previous checkpoint intact and resumable;
- a rank that leaves the collective save on an error that is not a file write makes the others wait in
  a barrier: ``checkpoint.save_timeout_s`` stops every rank with one line instead of a hang.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from vmla_train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/self_forcing-debug.yaml"
DEEPSPEED = ["strategy.name=deepspeed", "strategy.devices=2", "strategy.zero_stage=2", "strategy.accelerator=cpu",
             "train.global_batch_size=2"]

WORKER = r'''
import errno, json, os, sys, torch
from vmla_train import config as C, train

mode, run_dir = sys.argv[1], sys.argv[2]
cfg = C.load(sys.argv[3], [f"runtime.run_dir={run_dir}", *sys.argv[4:]])
rank = int(os.environ["RANK"])
report = {}

if mode == "nan":
    def state_of(engine):
        """This rank's view: the whole weights (ZeRO-2 keeps them whole on every rank), its fp32 master
        partition and the AdamW moments of that partition."""
        ds = engine._forward_module
        zero = ds.optimizer
        out = {f"w/{n}": p.detach().clone() for n, p in ds.module.named_parameters()}
        out |= {f"master/{i}": t.detach().clone() for i, t in enumerate(zero.single_partition_of_fp32_groups)}
        for i, st in enumerate(zero.optimizer.state.values()):
            out |= {f"adam/{i}/{k}": v.clone() for k, v in st.items() if torch.is_tensor(v)}
        return out

    real_update = train.update_role

    def update_role(state, role, loss_of, batches, inject=False):
        step = state.counters.step
        if step == 1 and rank == 0:  # a NaN constant: the loss is NaN, its gradients finite
            inner = loss_of
            loss_of = lambda b: (lambda loss, m: (loss + torch.tensor(float("nan")), m))(*inner(b))
        engine, _ = state.engine(role)
        before = state_of(engine)
        out = real_update(state, role, loss_of, batches, inject)
        after = state_of(engine)
        ds = engine._forward_module
        report.setdefault(str(step), {})[role] = {
            "unchanged": before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before),
            "finite": all(bool(torch.isfinite(v).all()) for v in after.values()), "skipped": out[f"skipped/{role}"],
            "global_steps": ds.global_steps, "micro_steps": ds.micro_steps, "ds_skipped": ds.skipped_steps}
        return out

    train.update_role = update_role
elif mode == "write_error":  # rank 1's ZeRO optimizer shard of the step-2 checkpoint hits ENOSPC
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if rank == 1 and ".tmp-step-00000002" in str(f) and "optim_states" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
elif mode == "leave_collective":  # rank 1 leaves DeepSpeed's save of step 2 before its barriers
    from deepspeed.runtime.engine import DeepSpeedEngine
    real_zero = DeepSpeedEngine._save_zero_checkpoint

    def save_zero(self, save_path, tag):
        if rank == 1 and ".tmp-step-00000002" in str(save_path):
            raise OSError(errno.EIO, "injected: rank 1 leaves the collective save", str(save_path))
        return real_zero(self, save_path, tag)

    DeepSpeedEngine._save_zero_checkpoint = save_zero

rc = 0
try:
    out = train.fit(cfg)
    c = out["counters"]
    print("RESULT " + json.dumps({"rank": rank, "report": report, "counters": c.to_dict(), "checkpoint": str(out["checkpoint"]),
                                  "history": [{k: v for k, v in h.items() if k.startswith(("skipped/", "counters/", "loss/", "grad_norm/"))}
                                              for h in out["history"]]}), flush=True)
except Exception as e:
    print(f"ERROR {type(e).__name__}: {e}", flush=True)
    rc = 1
import torch.distributed as dist
if dist.is_initialized():
    dist.destroy_process_group()
sys.stdout.flush()
os._exit(rc)  # as vmla_train.cli.entry does for a rank: no interpreter teardown under live comm threads
'''


def _launch(tmp_path: Path, mode: str, run: Path, *overrides: str, timeout: float = 240) -> list[tuple[int, str]]:
    """The worker as 2 ranks (the env torchrun / srun would give); (exit status, output) per rank. A rank
    still running after ``timeout`` s fails the test (a hang)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        procs.append(subprocess.Popen([sys.executable, str(script), mode, str(run), str(CONFIG), *DEEPSPEED, *overrides],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"rank {procs.index(p)} still running after {timeout} s (a hang):\n"
                        + (p.communicate()[0] or "")[-3000:])
        outs.append((p.returncode, out))
    return outs


def _result(out: str) -> dict:
    line = [x for x in out.splitlines() if x.startswith("RESULT ")]
    assert line, out[-4000:]
    return json.loads(line[-1].removeprefix("RESULT "))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("accumulation", [1, 2])
def test_deepspeed_nonfinite_steps_skipped_on_every_rank(tmp_path, accumulation):
    """Iteration 1 (critic only): a NaN constant added to rank 0's loss (finite gradients); iteration 2
    (student and critic): NaN loss on rank 1 (debug.inject_nan_steps). Both skipped on both ranks; with 2
    micro-batches per step the engines' micro-steps stay at 2 per optimizer step."""
    run = tmp_path / "run"
    outs = _launch(tmp_path, "nan", run, "train.num_steps=5", "checkpoint.every_n_steps=100",
                   "debug.inject_nan_steps=[2]", "debug.inject_nan_ranks=[1]",
                   f"train.global_batch_size={2 * accumulation}")
    for rc, out in outs:
        assert rc == 0, out[-4000:]
    results = [_result(out) for _, out in outs]
    for r in results:
        rep = r["report"]
        updates = [(int(step), role) for step in rep for role in rep[step]]
        assert sorted(updates) == [(0, "critic"), (0, "student"), (1, "critic"), (2, "critic"), (2, "student"),
                                   (3, "critic"), (4, "critic"), (4, "student")]
        for step, role in updates:
            x = rep[str(step)][role]
            poisoned = step in (1, 2)
            assert x["unchanged"] == poisoned, (r["rank"], step, role, x)  # weights, master, moments
            assert x["skipped"] == float(poisoned) and x["finite"], (r["rank"], step, role, x)
        # the engines' own counters stay consistent: one global step per boundary, skips counted there too
        assert rep["4"]["critic"]["global_steps"] == 5 and rep["4"]["critic"]["ds_skipped"] == 2
        assert rep["4"]["student"]["global_steps"] == 3 and rep["4"]["student"]["ds_skipped"] == 1
        assert all(x["micro_steps"] == x["global_steps"] * accumulation for s in rep.values() for x in s.values())
        # counted as under single / DDP / FSDP: skipped iterations, and the optimizer steps that happened
        c = r["counters"]
        assert (c["step"], c["skipped_steps"], c["student_steps"], c["critic_steps"]) == (5, 2, 2, 3)
        h = r["history"]
        assert [x["skipped/critic"] for x in h] == [0.0, 1.0, 1.0, 0.0, 0.0]
        assert [x["counters/skipped_steps"] for x in h] == [0, 1, 2, 2, 2]
        assert all(v == v and abs(v) != float("inf") for x in h[3:] for k, v in x.items() if k.startswith("loss/"))
    assert "iteration 3: non-finite loss or gradient on some rank, update skipped on every rank (2 in a row, 2 in all)" \
        in outs[0][1]
    assert ckpt.read_train_state(ckpt.latest_checkpoint(run))["skipped_steps"] == 2


@pytest.mark.timeout(420)
def test_deepspeed_write_error_on_one_rank_stops_both_and_resumes(tmp_path):
    """ENOSPC on rank 1's ZeRO shard inside DeepSpeed's collective save of step 2: both ranks stop (no
    hang) with one line naming the temp folder and rank 1; step 1 stays intact and the run resumes there."""
    run = tmp_path / "run"
    keys = ("checkpoint.every_n_steps=1", "checkpoint.keep_last=10")
    t0 = time.monotonic()
    outs = _launch(tmp_path, "write_error", run, "train.num_steps=3", *keys, timeout=200)
    seconds = time.monotonic() - t0
    tmp = ckpt.tmp_dir(run, 2)
    for rank, (rc, out) in enumerate(outs):
        errors = [x for x in out.splitlines() if x.startswith("ERROR ")]
        assert rc == 1 and len(errors) == 1, out[-4000:]
        assert errors[0].startswith(f"ERROR CheckpointWriteError: checkpoint of step 2 could not be written to '{tmp}' (")
        assert errors[0].endswith(f"previous checkpoint intact: {ckpt.step_dir(run, 1)} (checkpoint.on_write_error=stop)")
    assert "(rank 1: OSError: [Errno 28] No space left on device" in outs[1][1]
    assert "(failed on rank 1; its log has the error)" in outs[0][1]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]  # temp folder removed
    ckpt.verify(ckpt.step_dir(run, 1))
    # resumable: the same run without the fault resumes from step 1 and finishes
    outs = _launch(tmp_path, "none", run, "train.num_steps=3", *keys)
    for rc, out in outs:
        assert rc == 0, out[-4000:]
    assert f"resumed from {ckpt.step_dir(run, 1)} at step 1" in outs[0][1]
    assert [_result(out)["counters"]["step"] for _, out in outs] == [3, 3]
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-00000001", "step-00000002", "step-00000003"]
    print(f"write error stop: {seconds:.1f} s")


@pytest.mark.timeout(300)
def test_deepspeed_rank_leaving_collective_save_times_out(tmp_path):
    """Rank 1 leaves DeepSpeed's save of step 2 early (an error that is not a file write): rank 0 waits in
    DeepSpeed's barrier, rank 1 in the agreement. Without the timeout both hang forever; with
    checkpoint.save_timeout_s=20 both stop with one line naming the folder and rank 1's error."""
    run = tmp_path / "run"
    t0 = time.monotonic()
    outs = _launch(tmp_path, "leave_collective", run, "train.num_steps=3", "checkpoint.every_n_steps=1",
                   "checkpoint.keep_last=10", "checkpoint.save_timeout_s=20", timeout=200)
    tmp = ckpt.tmp_dir(run, 2)
    for rc, out in outs:
        lines = [x for x in out.splitlines() if x.startswith("error: checkpoint of step 2")]
        assert rc == 1 and len(lines) == 1, out[-4000:]
        assert lines[0] == (f"error: checkpoint of step 2: the ranks did not finish writing '{tmp}' within "
                            f"checkpoint.save_timeout_s=20 s (rank 1: OSError: [Errno 5] injected: rank 1 leaves the "
                            f"collective save: '{tmp / 'student'}'); stopping this rank; previous checkpoint intact: "
                            f"{ckpt.step_dir(run, 1)}")
    assert time.monotonic() - t0 < 150
    assert ckpt.latest_checkpoint(run) == ckpt.step_dir(run, 1)
    ckpt.verify(ckpt.step_dir(run, 1))  # intact; the temp folder is removed at the next start
