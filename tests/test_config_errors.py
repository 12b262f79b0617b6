"""Values of the wrong shape or type, in YAML files and key=value overrides: one ConfigError line that says
what the key expects and what was found, and every CLI exits 2 with that line (no traceback). Also the
summary `vmla-train fit` prints at the end of a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmla_train import analyze, cli, convert, generate
from vmla_train import config as C
from vmla_train.dataprep import cli as data_cli
from vmla_train.student import WanStudent
from vmla_train.student_io import save_student

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny.yaml"
ADAPT = ROOT / "configs/adapt-debug.yaml"

SECTION = "config key 'attention': expected a section (attention.kind=..., attention.d_c=..., ...), found the scalar 'mha'"
# (overrides, the whole error line)
CASES = [
    (["attention=mha"], SECTION),
    (["model=3"], "config key 'model': expected a section (model.name=..., model.dim=..., ...), found the scalar 3"),
    (["model.patch_size={a: 1}"], "config key 'model.patch_size': expected a list of 3 integers, found {'a': 1}"),
    (["model.patch_size=3"], "config key 'model.patch_size': expected a list of 3 integers, found the scalar 3"),
    (["model.patch_size=[1,a,2]"], "config key 'model.patch_size[1]': expected an integer, found 'a'"),
    (["debug.inject_nan_steps=3"], "config key 'debug.inject_nan_steps': expected a list of integers, found the scalar 3"),
    (["attention.kind=mhaa"], "config key 'attention.kind': expected one of mha, mla, found 'mhaa'"),
    (["attention.kind=[mha]"], "config key 'attention.kind': expected one of mha, mla, found ['mha']"),
    (["model.dim="], "config key 'model.dim': expected an integer, found an empty value"),
    (["attention.kind="], "config key 'attention.kind': expected one of mha, mla, found an empty value"),
    (["model.dim=abc"], "config key 'model.dim': expected an integer, found 'abc'"),
    (["model.dim={a: 1}"], "config key 'model.dim': expected an integer, found {'a': 1}"),
    (["model.eps=abc"], "config key 'model.eps': expected a number, found 'abc'"),
    (["model.cross_attn_norm=maybe"], "config key 'model.cross_attn_norm': expected true or false, found 'maybe'"),
    (["runtime.dtype=[1]"], "config key 'runtime.dtype': expected a string, found [1]"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("overrides, line", CASES)
def test_load_says_what_the_key_expects(overrides, line):
    with pytest.raises(C.ConfigError) as e:
        C.load(TINY, overrides)
    assert str(e.value) == line


@pytest.mark.timeout(30)
@pytest.mark.parametrize("yaml_text, line", [
    ("attention: mla\n", "config key 'attention': expected a section (attention.kind=..., attention.d_c=..., ...), "
                         "found the scalar 'mla'"),
    ("model:\n  patch_size: {a: 1}\n", "config key 'model.patch_size': expected a list of 3 integers, found {'a': 1}"),
    ("model:\n  dim:\n", "config key 'model.dim': expected an integer, found an empty value"),
    ("train: [1, 2]\n", "config key 'train': expected a section (train.stage=..., train.num_steps=..., ...), found [1, 2]"),
])
def test_yaml_file_values_of_the_wrong_shape(tmp_path, yaml_text, line):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(C.ConfigError) as e:
        C.load([TINY, path])
    assert str(e.value) == line


@pytest.mark.timeout(30)
def test_a_later_layer_may_fix_an_earlier_one_and_renames_still_name_the_new_spelling(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("attention: {impl: triton}\n")
    assert C.load([TINY, path], ["attention.impl=fused"]).attention.impl == C.AttentionImpl.fused
    with pytest.raises(C.ConfigError, match="attention.impl: 'triton' was renamed to 'fused'"):
        C.load([TINY, path])
    with pytest.raises(C.ConfigError, match="unknown config key 'attention.dc' \\(nearest valid key: 'attention.d_c'\\)"):
        C.load(TINY, ["attention.dc={a: 1}"])


def _one_error_line(capsys, line: str) -> None:
    err = capsys.readouterr().err
    assert err == f"error: {line}\n", err
    assert "Traceback" not in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overrides, line", CASES)
def test_vmla_train_exits_2_with_the_line(capsys, overrides, line):
    assert cli.main(["info", str(TINY), *overrides]) == 2
    _one_error_line(capsys, line)


@pytest.fixture(scope="module")
def mha_student(tmp_path_factory) -> Path:
    """A tiny one-layer mha student folder: the source convert and analyze read, the folder generate reads."""
    cfg = C.load(TINY, ["attention.kind=mha", "model.num_layers=1"])
    return save_student(WanStudent(cfg).state_dict(), cfg, tmp_path_factory.mktemp("mha") / "student")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tool", ["vmla-train", "vmla-data", "vmla-generate", "vmla-convert", "vmla-analyze"])
def test_every_cli_exits_2_on_a_scalar_section(capsys, tmp_path, mha_student, tool):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a ball\n")
    main, argv = {
        "vmla-train": (cli.main, ["fit", str(TINY)]),
        "vmla-data": (data_cli.main, ["encode", str(TINY)]),
        "vmla-generate": (generate.main, [str(mha_student), str(prompts)]),
        "vmla-convert": (convert.main, [str(mha_student), str(tmp_path / "out")]),
        "vmla-analyze": (analyze.main, ["rank", str(mha_student), "--out", str(tmp_path / "rank")]),
    }[tool]
    assert main([*argv, "attention=mha"]) == 2
    _one_error_line(capsys, SECTION)
    assert not (tmp_path / "out").exists() and not (tmp_path / "rank").exists()


@pytest.mark.timeout(120)
def test_fit_prints_a_summary(capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert cli.main(["fit", str(ADAPT), f"runtime.run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("fit: "):].splitlines()
    assert lines[0].startswith("fit: 3 iterations (3 student / 0 critic steps) of adapt in ")
    assert lines[1].startswith("  losses       adapt ") and lines[1].endswith("(iteration 3)")
    loss = float(lines[1].split()[2])
    assert loss > 0
    assert lines[2] == f"  checkpoint   {run_dir / 'checkpoints' / 'step-00000003'}"
    assert (run_dir / "checkpoints" / "step-00000003").is_dir()
    assert lines[3] == "  W&B run      none (logging.wandb_mode=disabled)"
    assert lines[4] == f"  export with  vmla-train export {run_dir} OUT_FOLDER"
