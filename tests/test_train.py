"""The Fabric loop: the three stages from their debug twins, checkpoints, export, the demo."""

from pathlib import Path

import pytest
import torch

from vmla_train import checkpoint as ckpt
from vmla_train import config as C
from vmla_train import train
from vmla_train.student_io import load_student

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stage", ["adapt", "ode_init"])
def test_stage_runs_and_checkpoints(tmp_path, stage):
    cfg = C.load(ROOT / f"configs/{stage}-debug.yaml", [f"runtime.run_dir={tmp_path}", "train.num_steps=2"])
    out = train.fit(cfg)
    name = "loss/adapt" if stage == "adapt" else "loss/ode"
    assert [h["step"] for h in out["history"]] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h[name])) for h in out["history"])
    done = ckpt.complete_checkpoints(tmp_path)
    assert [p.name for p in done] == ["step-00000002"]
    manifest = ckpt.read_manifest(done[-1])
    assert {"student.ckpt", "rng-rank0.pt", "loader-rank0.json", "train_state.json", "config.yaml"} <= set(manifest["files"])
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    # everything but the engine files loads with weights_only / JSON
    torch.load(done[-1] / "rng-rank0.pt", weights_only=True)
    torch.load(done[-1] / "student.ckpt", weights_only=True)


@pytest.mark.timeout(60)
def test_self_forcing_export_and_keep_last(tmp_path):
    cfg = C.load(ROOT / "configs/self_forcing-debug.yaml", [f"runtime.run_dir={tmp_path}", "train.num_steps=4",
                                                           "checkpoint.every_n_steps=1", "checkpoint.keep_last=2"])
    out = train.fit(cfg)
    c = out["counters"]
    assert (c.step, c.student_steps, c.critic_steps) == (4, 2, 4)  # ratio 2: student at iterations 0 and 2
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    last = ckpt.latest_checkpoint(tmp_path)
    assert (last / "critic.ckpt").is_file() and (last / "ema.safetensors").is_file()
    state = ckpt.read_train_state(last)
    assert state["wandb_run_id"] == (tmp_path / "wandb_run_id").read_text().strip()
    # export -> a plain student folder with the trained weights
    folder = train.export_student(tmp_path, tmp_path / "export")
    model, scfg = load_student(folder)
    trained = out["student"].module.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
    assert scfg.model == cfg.model and scfg.attention == cfg.attention
    ema_folder = train.export_student(tmp_path, tmp_path / "export-ema", use_ema=True)
    assert (ema_folder / "model.safetensors").is_file()


@pytest.mark.timeout(30)
def test_global_batch_must_divide():
    cfg = C.load(ROOT / "configs/adapt-debug.yaml", ["train.global_batch_size=3", "data.batch_size=2"])
    with pytest.raises(C.ConfigError, match="train.global_batch_size"):
        train.accumulation_steps(cfg, 1)
    cfg = C.load(ROOT / "configs/adapt-debug.yaml", ["train.global_batch_size=8", "data.batch_size=2"])
    assert train.accumulation_steps(cfg, 2) == 2
    with pytest.raises(C.ConfigError, match="strategy.devices"):
        C.load(ROOT / "configs/adapt-debug.yaml", ["strategy.devices=2"])


@pytest.mark.timeout(90)
def test_demo_artefacts(tmp_path):
    """`make demo`, shortened: checkpoint, sample mp4, offline W&B run."""
    cfg = C.load(ROOT / "configs/demo.yaml", [f"runtime.run_dir={tmp_path}", "train.num_steps=3", "runtime.progress=false"])
    out = train.run_training_demo(cfg)
    assert out["checkpoint"] is not None and (out["checkpoint"] / "manifest.json").is_file()
    mp4 = Path(out["samples"][0])
    assert mp4.is_file() and mp4.stat().st_size > 0
    import av

    with av.open(str(mp4)) as f:
        frames = sum(1 for _ in f.decode(video=0))
    assert frames == cfg.video.num_frames
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


@pytest.mark.timeout(60)
def test_wandb_run_id_continues_on_resume_and_is_new_when_starting_over(tmp_path):
    def run(steps, resume):
        cfg = C.load(ROOT / "configs/adapt-debug.yaml", [f"runtime.run_dir={tmp_path}", f"train.num_steps={steps}",
                                                         f"checkpoint.resume={str(resume).lower()}"])
        return train.fit(cfg)["run_id"]

    first = run(1, resume=True)
    assert run(2, resume=True) == first  # resumed: the same W&B run
    again = run(1, resume=False)  # starting over in the same folder: a new run
    assert again != first
    assert (tmp_path / "wandb_run_id").read_text().strip() == again
