"""No silent random roles: a file a training run needs and lacks is refused unless the run opts in.

Through `vmla-train fit` (the CLI's ``main``): each missing key (``train.teacher_path``, ``train.critic_path``,
``dmd.negative_embedding``, ``logging.vae_path``) exits 2 with one line naming it and the opt-in
``train.allow_random_roles``, before the run folder is touched; the opt-in trains on random stand-ins; real
files need no opt-in. The role builders refuse the same way when called directly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vmla_train import config as C
from vmla_train import recipe, wan
from vmla_train.cli import main as train_main
from vmla_train.distill import DistillationModule

ROOT = Path(__file__).resolve().parents[1]
SF = str(ROOT / "configs/self_forcing-debug.yaml")
ADAPT = str(ROOT / "configs/adapt-debug.yaml")
QUICK = ["train.num_steps=1", "checkpoint.every_n_steps=1", "logging.wandb_mode=disabled", "runtime.progress=false"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A tiny teacher folder (diffusers Wan) and a negative-prompt embedding file at the debug geometry."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("roles")
    cfg = C.load(SF)
    wan.build_wan_transformer(cfg.teacher_model, seed=7).save_pretrained(root / "teacher")
    save_file({"text": torch.randn(cfg.model.text_len - 2, cfg.model.text_dim)}, str(root / "negative.safetensors"))
    return {"teacher": str(root / "teacher"), "negative": str(root / "negative.safetensors")}


def _fit(config: str, run_dir: Path, *overrides: str) -> int:
    return train_main(["fit", config, f"runtime.run_dir={run_dir}", *QUICK, *overrides])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("config, overrides, key", [
    (SF, ["dmd.negative_embedding={negative}"], "train.teacher_path"),
    (SF, ["train.teacher_path={teacher}"], "dmd.negative_embedding"),
    (SF, ["train.teacher_path={teacher}", "dmd.negative_embedding={negative}", "train.teacher_size=world"],
     "train.critic_path"),
    (ADAPT, ["validation.every_n_steps=1"], "train.teacher_path"),
    (ADAPT, ["logging.sample_every_n_steps=1"], "logging.vae_path"),
], ids=["sf-teacher", "sf-negative", "sf-critic", "validation-teacher", "samples-vae"])
def test_each_missing_file_is_refused_by_name(tmp_path, capsys, files, config, overrides, key):
    run_dir = tmp_path / "run"
    rc = _fit(config, run_dir, "train.allow_random_roles=false", *(o.format(**files) for o in overrides))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and f"config key '{key}' is empty" in err, err
    assert "train.allow_random_roles=true" in err, err
    others = {"train.teacher_path", "train.critic_path", "dmd.negative_embedding", "logging.vae_path"} - {key}
    assert not any(f"'{k}'" in err for k in others), err  # only what is missing is named
    assert not run_dir.exists()  # refused before the run folder, Fabric or W&B


@pytest.mark.timeout(60)
def test_opt_in_trains_on_random_roles(tmp_path, capsys):
    """The debug config opts in: a self_forcing step with a random teacher, critic and negative prompt."""
    assert C.load(SF).train.allow_random_roles
    assert _fit(SF, tmp_path / "run") == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


@pytest.mark.timeout(60)
def test_real_files_need_no_opt_in(tmp_path, capsys, files):
    real = [f"train.teacher_path={files['teacher']}", f"dmd.negative_embedding={files['negative']}",
            "train.allow_random_roles=false"]
    assert _fit(SF, tmp_path / "run", *real) == 0, capsys.readouterr().err
    cfg = C.load(SF, real)
    assert C.missing_role_files(cfg) == []
    module = DistillationModule.from_config(cfg)
    saved = wan.load_wan_transformer(files["teacher"], dtype=torch.float32).state_dict()
    for role in (module.teacher, module.critic):  # the critic starts as a copy of the teacher (same geometry)
        assert all(torch.equal(role.state_dict()[k], w) for k, w in saved.items())
    # guidance 1 weighs the unconditional score 0: no negative embedding needed
    assert C.missing_role_files(C.load(SF, [real[0], "train.allow_random_roles=false", "dmd.guidance_scale=1.0"])) == []


@pytest.mark.timeout(30)
def test_builders_refuse_random_roles_without_the_opt_in():
    """Direct callers of the role builders (benchmarks, scripts) get the same refusal."""
    strict = C.load(SF, ["train.allow_random_roles=false", "train.teacher_size=world"])
    with pytest.raises(C.ConfigError, match="'train.teacher_path' is empty"):
        recipe.build_teacher(strict)
    with pytest.raises(C.ConfigError, match="'dmd.negative_embedding' is empty"):
        recipe.negative_text(strict)
    teacher = recipe.build_teacher(C.load(SF, ["train.teacher_size=world"]))  # the debug config opts in
    with pytest.raises(C.ConfigError, match="'train.critic_path' is empty"):
        recipe.build_critic(strict, teacher)
    assert recipe.negative_text(C.load(SF, ["train.allow_random_roles=false", "dmd.guidance_scale=1.0"])).ndim == 3
