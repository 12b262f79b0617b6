"""slurm/train.sbatch on the local two-node Slurm cluster (tests/slurm/cluster.sh): a whole run, and the
same run preempted twice (SIGUSR1 through Slurm, then `scontrol requeue`), resumed to the same weights;
then the same pair under DeepSpeed ZeRO-2 (two engines: student and critic).

All jobs: the tiny self_forcing debug config, 2 nodes x 1 task, DDP (or DeepSpeed) over gloo on CPU, one core per task
(OMP_NUM_THREADS=1 from --cpus-per-task), W&B offline, a checkpoint every 10 of 100 iterations
(~0.1 s each: enough that the job cannot finish before a signal sent a few steps in reaches it).

Tolerance: zero. The preempted job runs the same kernels on the same shapes with the same thread count;
every random draw of an iteration comes from generators keyed by (seed, rank, iteration); weights, AdamW
moments, EMA, counters, RNG and loader states are restored bit for bit from the checkpoint (float32
round-trips exactly; under DeepSpeed each rank's ZeRO shard holds its fp32 master partition and moments,
and the engines' step counters); gloo's all-reduce of two ranks is a fixed-order sum. So every logged loss and every
final tensor equals the uninterrupted run's exactly; any difference is a bug (a step run twice, a lost
update, a wrong RNG or data position).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vmla_train import checkpoint as ckpt

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/self_forcing-debug.yaml"
STEPS = 100
OVERRIDES = [f"train.num_steps={STEPS}", "train.global_batch_size=2", "strategy.name=ddp", "logging.wandb_mode=offline",
             "checkpoint.every_n_steps=10", "checkpoint.keep_last=100"]
# the sbatch script's GPU defaults replaced for CPU nodes (its header shows this command)
CPU_JOB = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _env(cluster) -> dict:
    return {**cluster.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "VMLA_ACCELERATOR": "cpu"}


def _sh(args: list[str], env: dict, cwd: Path | None = None) -> str:
    r = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{' '.join(args)}: {r.stdout}{r.stderr}"
    return r.stdout


def _job(job_id: str, env: dict) -> tuple[str, int]:
    """(JobState, Restarts) from slurmctld."""
    out = _sh(["scontrol", "show", "job", "-o", job_id], env)
    return re.search(r"JobState=(\S+)", out).group(1), int(re.search(r"Restarts=(\d+)", out).group(1))


def _log(tmp_path: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("**/*.out")))


TERMINAL_GRACE_S = 20.0  # a requeued job shows COMPLETED/CANCELLED for a moment while its ranks still save


def _wait(what: str, cond, job_id: str, env: dict, tmp_path: Path, timeout: float):
    """Poll ``cond`` (every 0.1 s) until it returns something truthy; fail early when the job has stayed
    in a terminal state for ``TERMINAL_GRACE_S`` (a requeue passes through one on its way to PENDING)."""
    deadline = time.monotonic() + timeout
    terminal_since = None
    while True:
        got = cond()
        if got:
            return got
        state, _ = _job(job_id, env)
        if state not in TERMINAL:
            terminal_since = None
        elif terminal_since is None:
            terminal_since = time.monotonic()
        elif time.monotonic() - terminal_since > TERMINAL_GRACE_S and not cond():
            pytest.fail(f"job {job_id} ended ({state}) before {what}:\n{_log(tmp_path)[-6000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s (job {job_id} {state}):\n{_log(tmp_path)[-6000:]}")
        time.sleep(0.1)


def _metrics(run: Path) -> list[dict]:
    """RUN_DIR/metrics.jsonl (rank 0, one line per iteration run); a line being written is left out."""
    f = run / "metrics.jsonl"
    lines = f.read_text().split("\n")[:-1] if f.is_file() else []
    return [json.loads(line) for line in lines]


def _losses(rows: list[dict]) -> list[tuple]:
    return [(r["step"], k, v) for r in rows for k, v in sorted(r.items()) if k.startswith("loss/")]


def _signal_checkpoints(run: Path) -> list[int]:
    """Steps of the complete checkpoints written on a signal (a folder being replaced is skipped)."""
    found = []
    for p in ckpt.complete_checkpoints(run):
        try:
            state = ckpt.read_train_state(p)
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if state["reason"] == "signal":
            found.append(state["step"])
    return found


def _final_tensors(run: Path) -> dict[str, torch.Tensor]:
    folder = ckpt.step_dir(run, STEPS)
    out = {}
    for engine in ("student", "critic"):
        state = torch.load(folder / f"{engine}.ckpt", map_location="cpu", weights_only=True)
        out |= {f"{engine}/{k}": v for k, v in state["model"].items()}
        for i, s in state["optimizer"]["state"].items():
            out |= {f"{engine}/adam/{i}/{k}": v for k, v in s.items() if torch.is_tensor(v)}
    out |= {f"ema/{k}": v for k, v in load_file(str(folder / "ema.safetensors")).items()}
    return out


def _wandb_runs(run: Path) -> list[str]:
    """Run ids of the offline W&B run folders (one per process start; a requeue appends a folder)."""
    return [p.name.rsplit("-", 1)[1] for p in sorted((run / "wandb").glob("offline-run-*"))]


def _check_finished_run(run: Path, starts: int) -> str:
    """Common end state of both jobs: the expected steps, once each, and one W&B run; returns its id."""
    last = ckpt.latest_checkpoint(run)
    state = ckpt.read_train_state(last)
    assert last == ckpt.step_dir(run, STEPS) and state["reason"] == "end"
    assert (state["step"], state["critic_steps"], state["student_steps"]) == (STEPS, STEPS, STEPS // 2)
    assert [r["step"] for r in _metrics(run)] == list(range(1, STEPS + 1))  # every iteration logged exactly once
    assert [x[0] for x in state["losses"]] == [x[0] for x in _losses(_metrics(run))]
    run_id = (run / "wandb_run_id").read_text().strip()
    assert state["wandb_run_id"] == run_id
    assert _wandb_runs(run) == [run_id] * starts, sorted((run / "wandb").iterdir())
    for d in (run / "wandb").glob("offline-run-*"):
        assert (d / f"run-{run_id}.wandb").stat().st_size > 0
    return run_id


# ----------------------------------------------------------------------------------------------
# 1. The whole run (submitted like a user would: slurm/submit_train.sh with 0 GPUs per node)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory):
    """The uninterrupted job: run folder, job id, Slurm log and wall time."""
    tmp = tmp_path_factory.mktemp("slurm-ref")
    env = {**_env(slurm_cluster), "JOB_NAME": "ref", "SBATCH_TIMELIMIT": "10"}
    t0 = time.monotonic()
    out = _sh([str(ROOT / "slurm/submit_train.sh"), "2", "0", str(CONFIG), *OVERRIDES], env, cwd=tmp)
    job_id = re.search(r"Submitted batch job (\d+)", out).group(1)
    try:
        _wait("the end of the job", lambda: _job(job_id, env)[0] in TERMINAL, job_id, env, tmp, timeout=90)
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
    state, restarts = _job(job_id, env)
    return {"run": tmp / "runs" / "ref", "job": job_id, "state": state, "restarts": restarts, "log": _log(tmp),
            "seconds": time.monotonic() - t0}


@pytest.mark.timeout(150)
def test_two_node_job_trains_checkpoints_and_finishes(reference):
    log, run = reference["log"], reference["run"]
    assert (reference["state"], reference["restarts"]) == ("COMPLETED", 0), log[-6000:]
    assert "2 nodes x 1 tasks" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-6000:]
    assert "distributed_backend=gloo" in log and "resumed from" not in log
    _check_finished_run(run, starts=1)
    steps = [int(p.name.split("-")[1]) for p in ckpt.complete_checkpoints(run)]
    assert steps == list(range(10, STEPS + 1, 10))
    for rank in (0, 1):  # both ranks wrote their RNG and data position
        assert (ckpt.step_dir(run, STEPS) / f"loader-rank{rank}.json").is_file()


# ----------------------------------------------------------------------------------------------
# 2. Preemption: SIGUSR1 through Slurm (the script requeues), then `scontrol requeue` (SIGTERM)
# ----------------------------------------------------------------------------------------------
def _submit_preempted(cluster, tmp_path: Path, name: str, overrides: list[str]) -> tuple[Path, str, int, int]:
    """``sbatch slurm/train.sbatch`` preempted twice: SIGUSR1 through Slurm (the script requeues), then
    `scontrol requeue` (SIGTERM); waits for the end. Returns (run folder, log, first and second signal step)."""
    env = _env(cluster)
    run = tmp_path / "runs" / name
    out = _sh(["sbatch", "--parsable", f"--job-name={name}", f"--output={tmp_path}/%x-%j.out", *CPU_JOB,
               str(ROOT / "slurm/train.sbatch"), str(CONFIG), *overrides], env, cwd=tmp_path)
    job_id = out.strip().split(";")[0]
    steps_run = lambda: len(_metrics(run))  # noqa: E731
    try:
        # a) SIGUSR1 to every task (what --signal=USR1@120 delivers before the time limit) once training runs
        _wait("2 iterations", lambda: steps_run() >= 2, job_id, env, tmp_path, timeout=60)
        _sh(["scancel", "--signal=USR1", job_id], env)
        first = _wait("a checkpoint on SIGUSR1", lambda: _signal_checkpoints(run), job_id, env, tmp_path, 30)[0]
        # the script requeues the job; it resumes from that checkpoint and trains on
        _wait("iterations after the requeue", lambda: steps_run() >= first + 2, job_id, env, tmp_path, timeout=60)
        assert _job(job_id, env)[1] == 1
        # b) `scontrol requeue`: Slurm SIGTERMs every process of the job (the script too) and restarts it
        _sh(["scontrol", "requeue", job_id], env)
        second = _wait("a checkpoint on SIGTERM", lambda: _signal_checkpoints(run)[1:], job_id, env, tmp_path, 45)[0]
        # the end: COMPLETED after both restarts, every iteration run (a requeue passes through COMPLETED)
        _wait("the end of the job", lambda: _job(job_id, env) == ("COMPLETED", 2) and steps_run() >= STEPS,
              job_id, env, tmp_path, timeout=180)  # on a loaded 2-core machine the last restart once took over 120 s
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
    log = _log(tmp_path)
    assert _job(job_id, env) == ("COMPLETED", 2), log[-6000:]
    return run, log, first, second


def _check_resumed_like_reference(run: Path, log: str, first: int, second: int, reference_run: Path) -> None:
    """Each restart resumed from the checkpoint its signal wrote, no iteration ran twice, one W&B run id,
    and every logged loss equals the uninterrupted run's bit for bit."""
    assert first < second < STEPS and first >= 2
    assert "stopped by signal: requeueing job" in log
    resumed = [int(s) for s in re.findall(r"resumed from \S+/step-\d+ at step (\d+)", log)]
    assert sorted(set(resumed)) == [first, second], log[-6000:]
    for restart in (0, 1, 2):
        assert f"restart {restart}:" in log
    # no iteration ran twice (metrics.jsonl gets one line per iteration run, appended across restarts),
    # the same W&B run continued in every start, and the end state equals the uninterrupted run's exactly
    run_id = _check_finished_run(run, starts=3)
    assert run_id != (reference_run / "wandb_run_id").read_text().strip()  # two runs, two ids
    assert _losses(_metrics(run)) == _losses(_metrics(reference_run))  # bitwise, every iteration
    assert ckpt.read_train_state(ckpt.step_dir(run, STEPS))["losses"] == \
        ckpt.read_train_state(ckpt.step_dir(reference_run, STEPS))["losses"]


def _same_tensors(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys() and any(k.startswith("student/") for k in ours)
    different = [k for k in ref if not (torch.equal(ours[k], ref[k]) if torch.is_tensor(ref[k]) else ours[k] == ref[k])]
    assert not different, f"{len(different)} of {len(ref)} entries differ, e.g. {different[:5]}"


@pytest.mark.timeout(300)
def test_preempted_job_resumes_to_the_same_weights(slurm_cluster, reference, tmp_path):
    run, log, first, second = _submit_preempted(slurm_cluster, tmp_path, "pre", OVERRIDES)
    _check_resumed_like_reference(run, log, first, second, reference["run"])
    _same_tensors(_final_tensors(run), _final_tensors(reference["run"]))


# ----------------------------------------------------------------------------------------------
# 3. DeepSpeed ZeRO-2 (student and critic: one engine each), the same two preemptions. Tolerance: zero, as
#    above: each rank's fp32 master partition, AdamW moments and the engines' step counters come back from
#    its ZeRO shard; the reduce-scatter of two gloo ranks is a fixed-order sum.
# ----------------------------------------------------------------------------------------------
DS_OVERRIDES = [o for o in OVERRIDES if not o.startswith("strategy.name=")] + ["strategy.name=deepspeed",
                                                                                "strategy.zero_stage=2"]
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def _final_deepspeed(run: Path) -> dict:
    """Every tensor of the last checkpoint's ZeRO files (the model states and each rank's optimizer shard:
    fp32 master partition and AdamW moments) per engine, the engines' step counters, and the EMA."""
    folder = ckpt.step_dir(run, STEPS)
    out = {}

    def walk(x, key):
        if torch.is_tensor(x):
            out[key] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{key}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{key}/{i}")

    for engine in ("student", "critic"):
        files = sorted((folder / engine / "checkpoint").glob("*.pt"))
        assert [f.name for f in files] == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                           "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
        for f in files:  # DeepSpeed's own files hold Python objects (its loss scaler): this run's output, trusted here
            state = torch.load(f, map_location="cpu", weights_only=False)
            walk({k: v for k, v in state.items() if k != "ds_config"}, f"{engine}/{f.stem}")
            if f.name.startswith("mp_rank"):
                out |= {f"{engine}/{k}": state[k] for k in ENGINE_COUNTERS}
    out |= {f"ema/{k}": v for k, v in load_file(str(folder / "ema.safetensors")).items()}
    return out


@pytest.fixture(scope="module")
def ds_reference(slurm_cluster, tmp_path_factory):
    """The uninterrupted DeepSpeed ZeRO-2 job (sbatch slurm/train.sbatch, CPU arguments): its run folder."""
    tmp = tmp_path_factory.mktemp("slurm-ds-ref")
    env = _env(slurm_cluster)
    out = _sh(["sbatch", "--parsable", "--job-name=dsref", f"--output={tmp}/%x-%j.out", *CPU_JOB,
               str(ROOT / "slurm/train.sbatch"), str(CONFIG), *DS_OVERRIDES], env, cwd=tmp)
    job_id = out.strip().split(";")[0]
    try:
        _wait("the end of the job", lambda: _job(job_id, env)[0] in TERMINAL, job_id, env, tmp, timeout=120)
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
    log = _log(tmp)
    assert _job(job_id, env) == ("COMPLETED", 0), log[-6000:]
    assert "initializing deepspeed distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-6000:]
    _check_finished_run(tmp / "runs" / "dsref", starts=1)
    return tmp / "runs" / "dsref"


@pytest.mark.timeout(360)
def test_deepspeed_zero2_preempted_job_resumes_to_the_same_weights(slurm_cluster, ds_reference, tmp_path):
    run, log, first, second = _submit_preempted(slurm_cluster, tmp_path, "dspre", DS_OVERRIDES)
    assert "initializing deepspeed distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
    _check_resumed_like_reference(run, log, first, second, ds_reference)
    ours, ref = _final_deepspeed(run), _final_deepspeed(ds_reference)
    assert ours["critic/global_steps"] == STEPS and ours["student/global_steps"] == STEPS // 2
    _same_tensors(ours, ref)
