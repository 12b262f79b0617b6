"""Faults around checkpoints : hard kill, corrupt state, disk full, no
pickles, no secrets. What is guaranteed is stated in docs/fault-tolerance.md."""

import ast
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vmla_train import checkpoint as ckpt
from vmla_train import config as C
from vmla_train import train
from vmla_train.student_io import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
ADAPT = ROOT / "configs/adapt-debug.yaml"
SECRET = "secret-test-key-123"


def _fit(run_dir, *overrides, **kw):
    return train.fit(C.load(ADAPT, [f"runtime.run_dir={run_dir}", *overrides]), **kw)


def _student(folder: Path) -> dict:
    return torch.load(folder / "student.ckpt", weights_only=True)["model"]


# ----------------------------------------------------------------------------------------------
# 3. kill -9 mid-step; 9. the W&B key is written nowhere
# ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(150)
def test_kill9_resumes_from_last_complete_checkpoint_and_key_never_written(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, WANDB_API_KEY=SECRET, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "vmla_train.cli", "fit", str(ADAPT), f"runtime.run_dir={run}",
            "train.num_steps=100000", "checkpoint.every_n_steps=1", "checkpoint.keep_last=2", "logging.wandb_mode=offline"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while ckpt.latest_checkpoint(run) is None:  # training is under way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    time.sleep(0.15)  # into the next step (or its save)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    last = ckpt.latest_checkpoint(run)
    step = ckpt.read_train_state(last)["step"]
    # a save cut by the kill: a temp folder and a step folder without a manifest (newer than any other)
    root = ckpt.checkpoint_root(run)
    for name in (".tmp-step-99999998", "step-99999999"):
        (root / name).mkdir(exist_ok=True)
        (root / name / "student.ckpt").write_bytes(b"half a checkpoint")
        (root / name / "train_state.json").write_text(json.dumps({"step": 99999999}))
    assert ckpt.latest_checkpoint(run) == last  # never a candidate

    args[6] = f"train.num_steps={step + 2}"
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert f"resumed from {last} at step {step}" in out
    assert "removed incomplete checkpoint folder" in out and "step-99999999" in out
    assert not (root / ".tmp-step-99999998").exists() and not (root / "step-99999999").exists()
    final = ckpt.read_train_state(ckpt.latest_checkpoint(run))
    assert final["step"] == step + 2
    logged = [s for s, name, _ in final["losses"]]
    assert logged == list(range(1, step + 3))  # every step once: nothing lost, nothing run twice
    metric_steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert metric_steps == list(range(1, step + 3))  # the steps the kill cut short are logged once too
    ckpt.verify(ckpt.latest_checkpoint(run))

    # 9. the key is in no file of the run folder (configs, logs, W&B files, checkpoints), nor in the output
    assert (run / "wandb").is_dir()
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaks = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaks == [] and SECRET not in out


# ----------------------------------------------------------------------------------------------
# 4. corrupt state: truncated / bit-flipped / missing files, pickles, a config that does not fit
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """Checkpoints at steps 2, 3 and 4 of the adapt debug stage."""
    run = tmp_path_factory.mktemp("base") / "run"
    _fit(run, "train.num_steps=4", "checkpoint.every_n_steps=1", "checkpoint.keep_last=3")
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-00000002", "step-00000003", "step-00000004"]
    return run


def _copy(run: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst, ckpt.step_dir(dst, 4), ckpt.step_dir(dst, 3)


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault, file, says", [
    ("truncate", "student.ckpt", "has .* bytes, the manifest says"),
    ("bitflip", "student.ckpt", "fails its SHA-256 check"),
    ("bitflip", "rng-rank0.pt", "fails its SHA-256 check"),
    ("delete", "loader-rank0.json", "listed in manifest.json is missing"),
])
def test_corrupt_checkpoint_falls_back_to_previous(three_checkpoints, tmp_path, capsys, fault, file, says):
    run, newest, previous = _copy(three_checkpoints, tmp_path)
    target = newest / file
    {"truncate": _truncate, "bitflip": _flip, "delete": Path.unlink}[fault](target)
    with pytest.raises(CheckpointError, match=f"'{file}' {says}" if fault != "delete" else f"'{file}' {says}"):
        ckpt.verify(newest)
    out = _fit(run, "train.num_steps=5", "checkpoint.every_n_steps=1", "checkpoint.keep_last=3")
    log = capsys.readouterr().out
    assert f"checkpoint '{newest}'" in log and file in log
    assert f"falling back to the previous complete checkpoint {previous}" in log
    assert f"resumed from {previous} at step 3" in log
    assert out["counters"].step == 5 and [h["step"] for h in out["history"]] == [4, 5]


@pytest.mark.timeout(60)
def test_pickled_object_is_refused_even_with_a_matching_manifest(three_checkpoints, tmp_path, capsys):
    """An rng file replaced by a pickle that runs code on load, the manifest rewritten to match it:
    torch.load(weights_only=True) refuses it (the code never runs) and the previous checkpoint is used."""
    run, newest, previous = _copy(three_checkpoints, tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"torch": torch.get_rng_state(), "payload": Evil()}, newest / "rng-rank0.pt")
    manifest = ckpt.read_manifest(newest)
    manifest["sha256"]["rng-rank0.pt"] = ckpt.sha256_of(newest / "rng-rank0.pt")
    manifest["sizes"]["rng-rank0.pt"] = (newest / "rng-rank0.pt").stat().st_size
    (newest / ckpt.MANIFEST).write_text(json.dumps(manifest))
    ckpt.verify(newest)  # passes: only the loader can refuse it
    out = _fit(run, "train.num_steps=5")
    log = capsys.readouterr().out
    assert "does not load: UnpicklingError" in log and f"resumed from {previous}" in log
    assert not marker.exists() and out["counters"].step == 5


@pytest.mark.timeout(60)
def test_config_that_does_not_fit_names_file_and_key(three_checkpoints, tmp_path):
    run, newest, previous = _copy(three_checkpoints, tmp_path)
    with pytest.raises(CheckpointError) as e:
        # (without the opt-in the change is refused before loading: tests/test_resume_config.py)
        _fit(run, "train.num_steps=5", "attention.d_c=16", "checkpoint.allow_config_change=true")
    msg = str(e.value)
    for folder in (newest, previous, ckpt.step_dir(run, 2)):  # every candidate tried, each reason given
        assert f"checkpoint '{folder}' does not load" in msg
    assert "size mismatch for" in msg and "checkpoint.resume=false" in msg


@pytest.mark.timeout(30)
def test_only_checkpoint_corrupt_is_a_clear_error(three_checkpoints, tmp_path):
    run, newest, _ = _copy(three_checkpoints, tmp_path)
    for old in ckpt.complete_checkpoints(run)[:-1]:
        shutil.rmtree(old)
    _flip(newest / "student.ckpt")
    with pytest.raises(CheckpointError, match="student.ckpt' fails its SHA-256 check"):
        _fit(run, "train.num_steps=5")


@pytest.mark.timeout(30)
def test_without_checksums_sizes_still_catch_truncation(tmp_path):
    _fit(tmp_path, "train.num_steps=2", "checkpoint.checksums=false")
    last = ckpt.latest_checkpoint(tmp_path)
    assert set(ckpt.read_manifest(last)["sha256"].values()) == {None}
    _truncate(last / "student.ckpt")
    with pytest.raises(CheckpointError, match="'student.ckpt' has .* bytes, the manifest says"):
        _fit(tmp_path, "train.num_steps=3", "checkpoint.checksums=false")


# ----------------------------------------------------------------------------------------------
# 6. disk full during a checkpoint write
# ----------------------------------------------------------------------------------------------
def _disk_full_at(monkeypatch, step: int) -> None:
    """The rank files of ``step`` hit ENOSPC halfway (a partial file is left in the temp folder)."""
    real = ckpt.save_rank_files

    def save_rank_files(folder, rank, loader_state):
        if folder.name == f".tmp-step-{step:08d}":
            (folder / f"rng-rank{rank}.pt").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / f"rng-rank{rank}.pt"))
        return real(folder, rank, loader_state)

    monkeypatch.setattr(ckpt, "save_rank_files", save_rank_files)


@pytest.mark.timeout(60)
def test_disk_full_stop_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _disk_full_at(monkeypatch, 4)
    with pytest.raises(ckpt.CheckpointWriteError, match="No space left on device.*previous checkpoint intact"):
        _fit(tmp_path, "train.num_steps=6", "checkpoint.every_n_steps=2", "checkpoint.on_write_error=stop")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]  # temp folder removed
    previous = ckpt.latest_checkpoint(tmp_path)
    ckpt.verify(previous)
    monkeypatch.undo()  # space again: the next start resumes from it
    out = _fit(tmp_path, "train.num_steps=6", "checkpoint.every_n_steps=2")
    assert [h["step"] for h in out["history"]] == [3, 4, 5, 6]


@pytest.mark.timeout(60)
def test_disk_full_continue_trains_on(tmp_path, monkeypatch, capsys):
    _disk_full_at(monkeypatch, 4)
    out = _fit(tmp_path, "train.num_steps=6", "checkpoint.every_n_steps=2", "checkpoint.on_write_error=continue")
    assert out["counters"].step == 6
    assert "could not be written" in capsys.readouterr().out
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000006"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


# ----------------------------------------------------------------------------------------------
# 9. every load of a file from disk is weights_only / safetensors / JSON
# ----------------------------------------------------------------------------------------------
def test_every_torch_load_is_weights_only():
    calls = []
    for path in sorted((ROOT / "vmla_train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute) or node.func.attr != "load":
                continue
            owner = ast.unparse(node.func.value)
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" or owner.endswith("fabric"):
                calls.append(where)
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{where}: {owner}.load without weights_only=True"
            if owner in ("pickle", "dill", "cloudpickle"):
                pytest.fail(f"{where}: {owner}.load of a file")
            if owner in ("np", "numpy"):
                kw = {k.arg: k.value for k in node.keywords}
                assert not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value), where
    assert len(calls) >= 4  # the checkpoint, export and student loaders are all seen
