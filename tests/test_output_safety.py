"""Output folders are safe to write and to load: ``--overwrite`` of ``vmla-train export`` and ``vmla-convert``
replaces only a previous output of the same command, atomically, and never the source, a folder holding it,
a folder inside it or a run folder; student folders carry a manifest (sizes, SHA-256) that ``load_student``
checks. What is guaranteed is stated in docs/fault-tolerance.md."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from vmla_train import checkpoint as ckpt
from vmla_train import cli
from vmla_train import config as C
from vmla_train import convert as V
from vmla_train import student_io
from vmla_train.student import WanStudent
from vmla_train.student_io import CheckpointError, OutputError, load_student, save_student

TINY = ["model.name=tiny", "model.num_layers=1", "attention.kind=mha", "runtime.device=cpu"]
QUIET = dict(log=lambda *a: None)


def _cfg() -> C.Config:
    return C.load(None, TINY)


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return WanStudent(_cfg()).state_dict()


def _fake_run(run: Path, seed: int = 0, step: int = 1) -> Path:
    """A run folder as ``vmla-train fit`` leaves it: one complete checkpoint (written by the checkpoint code
    itself), metrics and a W&B folder. Returns the step folder."""
    cfg = _cfg()
    tmp = ckpt.prepare(run, step)
    torch.save({"model": _state(seed)}, tmp / "student.ckpt")
    ckpt.finalize(run, step, {"stage": "adapt", "strategy": "auto", "world_size": 1}, C.to_yaml(cfg), keep_last=3)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "wandb").mkdir(exist_ok=True)
    (run / "wandb" / "run-1.wandb").write_text("history")
    return ckpt.step_dir(run, step)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative name -> bytes): equal snapshots = nothing touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10  # past the safetensors header: a weight changes, the file still parses
    f.write_bytes(bytes(data))


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


# ----------------------------------------------------------------------------------------------
# --overwrite refuses what is not a previous output of the same command
# ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_export_overwrite_refuses_run_folder_its_parent_and_a_folder_inside_it(tmp_path, capsys):
    run = tmp_path / "runs" / "X"
    _fake_run(run)
    before = _snapshot(tmp_path)
    cases = [(run, "is the source"), (tmp_path / "runs", "contains the source"), (tmp_path, "contains the source")]
    for out, why in cases:
        assert cli.main(["export", str(run), str(out), "--overwrite"]) == 2
        _one_error_line(capsys, f"'{out}'", why)
        assert _snapshot(tmp_path) == before
    # a step folder as SRC: its run folder is protected too
    assert cli.main(["export", str(ckpt.step_dir(run, 1)), str(run), "--overwrite"]) == 2
    _one_error_line(capsys, f"'{run}'", "source")
    # an export inside the run folder may be written, but not replaced
    inside = run / "export"
    assert cli.main(["export", str(run), str(inside)]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(run), str(inside), "--overwrite"]) == 2
    _one_error_line(capsys, f"'{inside}'", "lies inside the source")
    assert (inside / "model.safetensors").is_file() and (run / "checkpoints").is_dir()


@pytest.mark.timeout(30)
def test_export_overwrite_refuses_another_run_and_folders_it_did_not_write(tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other-run"
    _fake_run(run)
    _fake_run(other, seed=1)
    plain = tmp_path / "notes"
    plain.mkdir()
    (plain / "keep.txt").write_text("keep")
    converted = save_student(_state(2), _cfg(), tmp_path / "converted", producer=V.CONVERT_PRODUCER)
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    before = _snapshot(tmp_path)
    cases = [(other, "is a training run folder"), (ckpt.step_dir(other, 1), "kind 'checkpoint' by 'vmla-train fit'"),
             (plain, "no readable manifest.json"), (converted, "by 'vmla-convert'"), (a_file, "is not a folder")]
    for out, why in cases:
        assert cli.main(["export", str(run), str(out), "--overwrite"]) == 2
        _one_error_line(capsys, f"'{out}'", why, "--overwrite replaces only a previous vmla-train export output")
        assert _snapshot(tmp_path) == before
    # without --overwrite any existing OUT is refused
    assert cli.main(["export", str(run), str(plain)]) == 2
    _one_error_line(capsys, f"'{plain}'", "already exists")


@pytest.mark.timeout(30)
def test_convert_overwrite_refuses_source_its_parent_and_inside(tmp_path, capsys):
    sandbox = tmp_path / "sandbox"
    mha2 = save_student(_state(0), _cfg(), sandbox / "mha2")
    sibling = sandbox / "wan-teacher"
    sibling.mkdir()
    (sibling / "weights.safetensors").write_text("precious")
    inner = mha2 / "scratch"
    inner.mkdir()
    before = _snapshot(tmp_path)
    cases = [([str(mha2), str(sandbox), "--to", "diffusers"], sandbox, "contains the source"),
             ([str(mha2), str(mha2), "--to", "diffusers"], mha2, "is the source"),
             ([str(mha2), str(inner), "--to", "diffusers"], inner, "lies inside the source"),
             ([str(mha2), str(mha2), "attention.kind=mha"], mha2, "is the source"),
             ([str(mha2), str(sandbox), "attention.kind=mha"], sandbox, "contains the source")]
    for argv, out, why in cases:
        assert V.main(argv + ["--overwrite"]) == 2
        _one_error_line(capsys, f"'{out}'", why)
        assert _snapshot(tmp_path) == before


@pytest.mark.timeout(30)
def test_convert_overwrite_refuses_an_output_of_another_kind(tmp_path, capsys):
    src = save_student(_state(0), _cfg(), tmp_path / "mha")
    assert V.main([str(src), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert V.main([str(src), str(tmp_path / "s"), "attention.kind=mha"]) == 0
    capsys.readouterr()
    before = _snapshot(tmp_path)
    # a diffusers folder is not a student output and the other way round
    assert V.main([str(src), str(tmp_path / "d"), "attention.kind=mha", "--overwrite"]) == 2
    _one_error_line(capsys, str(tmp_path / "d"), "kind 'diffusers'")
    assert V.main([str(src), str(tmp_path / "s"), "--to", "diffusers", "--overwrite"]) == 2
    _one_error_line(capsys, str(tmp_path / "s"), "kind 'student'")
    assert _snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# --overwrite of a genuine previous output: replaced, atomically
# ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_overwrite_replaces_previous_export_and_diffusers_output(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(run, seed=0)
    out = tmp_path / "export"
    assert cli.main(["export", str(run), str(out)]) == 0
    _fake_run(run, seed=1, step=2)  # training went on
    assert cli.main(["export", str(run), str(out), "--overwrite"]) == 0
    model, _ = load_student(out)
    want = _state(1)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert json.loads((out / "export.json").read_text())["from"].endswith("step-00000002")
    d = tmp_path / "diffusers"
    assert V.main([str(out), str(d), "--to", "diffusers"]) == 0
    assert V.main([str(out), str(d), "--to", "diffusers", "--overwrite"]) == 0
    assert (d / "diffusion_pytorch_model.safetensors").is_file() and (d / "config.json").is_file()
    student_io.verify_manifest(d, "diffusers folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusers", "export", "run"]  # no temp siblings left


@pytest.mark.timeout(30)
def test_failure_mid_write_leaves_previous_output_intact(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _fake_run(run, seed=0)
    out = ckpt.export_student(run, tmp_path / "export")
    before = _snapshot(out)
    _fake_run(run, seed=1, step=2)

    def disk_full(state, folder, max_shard_bytes):
        (folder / student_io.SINGLE_NAME).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(student_io, "save_state_dict", disk_full)
        with pytest.raises(OSError, match="No space left"):
            ckpt.export_student(run, out, overwrite=True)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]

    # the swap itself fails (the rename of the new folder): the previous output is put back
    real_replace = os.replace

    def replace_fails_for_new(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(student_io.os, "replace", replace_fails_for_new)
        with pytest.raises(OSError, match="I/O error"):
            ckpt.export_student(run, out, overwrite=True)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]
    load_student(out)  # still verifies and loads


@pytest.mark.timeout(30)
def test_convert_failure_mid_write_leaves_previous_output_intact(tmp_path, monkeypatch):
    src = save_student(_state(0), _cfg(), tmp_path / "mha")
    out = tmp_path / "d"
    V.export_diffusers(src, out, **QUIET)
    before = _snapshot(out)
    calls = []

    def add_then_fail(self, name, tensor):
        calls.append(name)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(student_io.ShardWriter, "add", add_then_fail)
    with pytest.raises(OSError, match="No space left"):
        V.export_diffusers(src, out, overwrite=True, **QUIET)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["d", "mha"]


# ----------------------------------------------------------------------------------------------
# Student folders: manifest written, verified on load
# ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_student_folders_get_a_manifest(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    exported = ckpt.export_student(run, tmp_path / "export")
    V.convert(exported, tmp_path / "conv", overrides=["attention.kind=mha"], **QUIET)
    written = [(exported, "vmla-train export"), (tmp_path / "conv", "vmla-convert"),
               (save_student(_state(0), _cfg(), tmp_path / "saved"), "save_student")]
    for folder, producer in written:
        manifest = student_io.read_manifest(folder)
        assert (manifest["kind"], manifest["producer"]) == ("student", producer)
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
        assert manifest["files"] == names and {"model.safetensors", "config.yaml"} <= set(names)
        for name in names:
            assert manifest["sizes"][name] == (folder / name).stat().st_size
            assert manifest["sha256"][name] == student_io.sha256_of(folder / name)


@pytest.mark.timeout(30)
def test_bit_flip_in_student_weights_is_detected(tmp_path):
    folder = save_student(_state(0), _cfg(), tmp_path / "student")
    _flip(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"student folder '.*student': file 'model.safetensors' fails its "
                                              r"SHA-256 check \(corrupted\); write the folder again"):
        load_student(folder)
    # the flip is in the weights (the file still parses): unchecked, it would generate silently
    model, _ = load_student(folder, verify=False)
    want = _state(0)
    assert not all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    load_student(folder, ["checkpoint.checksums=false"])  # the command-line opt-out (vmla-generate overrides)
    # sizes are checked even without hashing
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="'model.safetensors' has .* bytes, the manifest says"):
        load_student(folder, verify=False)


@pytest.mark.timeout(30)
def test_sharded_student_names_the_corrupt_shard(tmp_path):
    folder = save_student(_state(0), _cfg(), tmp_path / "student", max_shard_bytes=20_000)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    _flip(shards[-1])
    with pytest.raises(CheckpointError, match=f"'{shards[-1].name}' fails its SHA-256 check"):
        load_student(folder)


@pytest.mark.timeout(30)
def test_student_folder_without_manifest_loads_with_one_warning(tmp_path, caplog):
    folder = save_student(_state(0), _cfg(), tmp_path / "student")
    (folder / "manifest.json").unlink()  # as written before manifests existed
    with caplog.at_level(logging.WARNING, logger="vmla_train.student_io"):
        model, _ = load_student(folder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"'{folder}' has no manifest.json" in warnings[0]
    want = _state(0)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


@pytest.mark.timeout(30)
def test_output_check_is_a_one_line_output_error(tmp_path):
    """The guard itself, without a command: what the CLIs turn into exit 2."""
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(OutputError, match=r"^refusing to replace output folder '.*': it is the source"):
        student_io.check_output(src, True, "student", "vmla-convert", [src])
    student_io.check_output(tmp_path / "new", False, "student", "vmla-convert", [src])  # absent: fine
