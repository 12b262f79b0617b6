"""A resume with a changed config: every changed key printed (old -> new), keys that change the meaning of
the run refused (exit 2) unless ``checkpoint.allow_config_change=true``, the run folder's history of resolved
configs kept (``config.yaml`` stays the first, ``config-resume-<step>.yaml`` per changed resume).

Runs of the tiny adapt config on CPU, two or three iterations each (about a second).
"""

from pathlib import Path

import pytest

from vmla_train import checkpoint as ckpt
from vmla_train import cli
from vmla_train import config as C
from vmla_train import train

ROOT = Path(__file__).resolve().parents[1]
ADAPT = ROOT / "configs/adapt-debug.yaml"  # optim.student_lr 1e-3, checkpoint every 2 iterations
CHANGE = "config change at resume"


def _fit(run_dir, *overrides, **kw):
    return train.fit(C.load(ADAPT, [f"runtime.run_dir={run_dir}", *overrides]), **kw)


def _change_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(CHANGE)]


def _history(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("config*.yaml"))


class _Printer:
    """Fabric's ``print`` (rank 0), collected."""

    def __init__(self):
        self.lines = []

    def print(self, line: str) -> None:
        self.lines.append(line)


@pytest.mark.timeout(60)
def test_changed_lr_is_refused_without_the_opt_in(tmp_path, capsys):
    _fit(tmp_path, "train.num_steps=2")
    first = (tmp_path / "config.yaml").read_bytes()
    capsys.readouterr()
    rc = cli.main(["fit", str(ADAPT), f"runtime.run_dir={tmp_path}", "train.num_steps=3", "optim.student_lr=0.01"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert _change_lines(out) == [f"{CHANGE} from step-00000002: train.num_steps: 2 -> 3",
                                  f"{CHANGE} from step-00000002: optim.student_lr: 0.001 -> 0.01"]
    (line,) = err.strip().splitlines()  # one line naming the key and the way out
    assert line.startswith("error: resuming") and "optim.student_lr" in line and "train.num_steps" not in line
    assert "checkpoint.allow_config_change=true" in line
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000002"  # nothing trained
    assert (tmp_path / "config.yaml").read_bytes() == first and _history(tmp_path) == ["config.yaml"]


@pytest.mark.timeout(60)
def test_changed_lr_is_accepted_with_the_opt_in_and_the_history_kept(tmp_path, capsys):
    _fit(tmp_path, "train.num_steps=2")
    first = (tmp_path / "config.yaml").read_bytes()
    capsys.readouterr()
    changed = ["optim.student_lr=0.01", "checkpoint.allow_config_change=true"]
    out = _fit(tmp_path, "train.num_steps=3", *changed)
    printed = capsys.readouterr().out
    assert out["counters"].step == 3 and out["history"][-1]["lr/student"] == 0.01  # the new rate trains
    assert _change_lines(printed) == [f"{CHANGE} from step-00000002: train.num_steps: 2 -> 3",
                                      f"{CHANGE} from step-00000002: optim.student_lr: 0.001 -> 0.01",
                                      f"{CHANGE} from step-00000002: checkpoint.allow_config_change: false -> true"]
    assert "warning: resuming with optim.student_lr changed (checkpoint.allow_config_change=true)" in printed
    assert (tmp_path / "config.yaml").read_bytes() == first  # the first config, untouched
    assert C.load(tmp_path / "config.yaml").optim.student_lr == 1e-3
    assert C.load(tmp_path / "config-resume-00000002.yaml").optim.student_lr == 0.01
    # the next resume compares with the checkpoint of step 3, which holds the new rate: only num_steps changed
    _fit(tmp_path, "train.num_steps=4", *changed)
    assert _change_lines(capsys.readouterr().out) == [f"{CHANGE} from step-00000003: train.num_steps: 3 -> 4"]
    assert _history(tmp_path) == ["config-resume-00000002.yaml", "config-resume-00000003.yaml", "config.yaml"]
    assert C.load(tmp_path / "config-resume-00000003.yaml").train.num_steps == 4
    assert (tmp_path / "config.yaml").read_bytes() == first


@pytest.mark.timeout(60)
def test_extending_num_steps_needs_no_opt_in_but_is_printed(tmp_path, capsys):
    _fit(tmp_path, "train.num_steps=2")
    first = (tmp_path / "config.yaml").read_bytes()
    capsys.readouterr()
    assert _fit(tmp_path, "train.num_steps=3")["counters"].step == 3
    printed = capsys.readouterr().out
    assert _change_lines(printed) == [f"{CHANGE} from step-00000002: train.num_steps: 2 -> 3"]
    assert "warning: resuming with" not in printed
    assert (tmp_path / "config.yaml").read_bytes() == first
    assert _history(tmp_path) == ["config-resume-00000002.yaml", "config.yaml"]


@pytest.mark.timeout(60)
def test_identical_resume_prints_nothing_extra(tmp_path, capsys):
    _fit(tmp_path, "train.num_steps=3", stop_after=1)  # checkpoint at 1 on stop
    first = (tmp_path / "config.yaml").read_bytes()
    capsys.readouterr()
    assert _fit(tmp_path, "train.num_steps=3")["counters"].step == 3
    printed = capsys.readouterr().out
    assert "resumed from" in printed and not _change_lines(printed) and "warning" not in printed
    assert (tmp_path / "config.yaml").read_bytes() == first and _history(tmp_path) == ["config.yaml"]


@pytest.mark.timeout(30)
def test_video_and_model_changes_are_refused_free_keys_are_not(tmp_path):
    """``check_config`` on a checkpoint folder's config.yaml alone (it runs before anything is loaded)."""
    folder = tmp_path / "step-00000004"
    C.save(C.load(ADAPT), folder / "config.yaml")
    printer = _Printer()
    with pytest.raises(C.ConfigError, match=r"alter the meaning of the run: model\.num_layers, video\.num_frames \("):
        ckpt.check_config(printer, C.load(ADAPT, ["video.num_frames=33", "model.num_layers=3"]), folder)
    assert printer.lines == [f"{CHANGE} from step-00000004: model.num_layers: 2 -> 3",
                             f"{CHANGE} from step-00000004: video.num_frames: 21 -> 33"]  # schema order
    free = ["train.num_steps=9", "logging.every_n_steps=5", "checkpoint.keep_last=7", "validation.every_n_steps=3",
            "runtime.progress=true", "data.num_workers=1", "runtime.run_dir=elsewhere"]
    assert [k for k, _, _ in ckpt.check_config(_Printer(), C.load(ADAPT, free), folder)] == \
        ["runtime.run_dir", "runtime.progress", "data.num_workers", "train.num_steps", "logging.every_n_steps",
         "validation.every_n_steps", "checkpoint.keep_last"]
    for key in ("train.stage", "train.global_batch_size", "runtime.seed", "schedule.shift", "dmd.guidance_scale",
                "attention.d_c", "data.source", "data.shards", "optim.critic_lr", "cache.window_frames"):
        assert not ckpt.is_free_key(key), key


@pytest.mark.timeout(30)
def test_a_checkpoint_config_that_does_not_load_is_refused(tmp_path):
    folder = tmp_path / "step-00000004"
    folder.mkdir()
    (folder / "config.yaml").write_text("model: {no_such_key: 1}\n")
    with pytest.raises(C.ConfigError, match="step-00000004': its config.yaml does not load"):
        ckpt.check_config(_Printer(), C.load(ADAPT), folder)
    assert ckpt.check_config(_Printer(), C.load(ADAPT, ["checkpoint.allow_config_change=true"]), folder) == []
