"""`vmla-train demo configs/world/demo.yaml`: the world demo runs its five steps on a folder of world
checkpoints (tiny, seeded, untrained: teacher/, student/, models/) and writes what it says; a prompt the world
cannot stage and a folder without the checkpoints are one line each (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vmla_train import config as C
from vmla_train.cli import main as train_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/world/demo.yaml")
# tiny widths of the world size (text_dim stays the world text encoder's width)
MODEL = ["model.dim=24", "model.num_heads=2", "model.num_layers=2", "model.ffn_dim=48", "model.freq_dim=32",
         "attention.d_c=12", "attention.d_r=12"]


def _world_checkpoints(folder: Path) -> None:
    """teacher/ (a random bidirectional DiT in the diffusers layout), student/ (it converted to MLA), models/."""
    from vmla_train.convert import export_diffusers
    from vmla_train.convert import main as convert_main
    from vmla_train.student import WanStudent
    from vmla_train.student_io import save_student
    from vmla_train.world.codec import CodecConfig, build_codec
    from vmla_train.world.text import build_text_encoder, world_words

    cfg = C.load(CONFIG, [*MODEL, "attention.kind=mha"])
    torch.manual_seed(0)
    save_student(WanStudent(cfg).state_dict(), cfg, folder / "teacher-student")
    export_diffusers(folder / "teacher-student", folder / "teacher")
    assert convert_main([str(folder / "teacher"), str(folder / "student"), *MODEL, "--config", CONFIG]) == 0
    build_text_encoder(folder / "models", world_words(), d_model=cfg.model.text_dim, num_layers=1, num_heads=2)
    build_codec(CodecConfig(base_dim=8, z_dim=cfg.model.in_channels)).save_pretrained(folder / "models" / "vae")


@pytest.mark.timeout(180)
def test_world_demo_writes_a_scored_video_of_the_prompt(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("WANDB_MODE", "offline")
    world, run = tmp_path / "world", tmp_path / "run"
    _world_checkpoints(world)
    prompt = "a big green square slides to the right slowly"
    assert train_main(["demo", CONFIG, *MODEL, f"demo.world={world}", f"runtime.run_dir={run}", "train.num_steps=2",
                       f"demo.prompt={prompt}", "runtime.progress=false"]) == 0
    videos = list(run.glob("samples-*/*.mp4"))
    assert [v.name for v in videos] == [f"{prompt}-0.mp4"]
    reports = list(run.glob("report-*.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["num_videos"] == 1 and 0.0 <= report["adherence"] <= 1.0 and "chunk_jump" in json.dumps(report)
    assert (run / "prompt.txt").read_text() == prompt + "\n"
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000002"]
    assert list((run / "wandb").glob("offline-run-*"))  # the offline W&B run
    assert C.load(run / "student" / "config.yaml").attention.kind == C.AttentionKind.mla
    assert (run / "converted" / "model.safetensors").is_file()  # the teacher converted on the way


@pytest.mark.timeout(60)
def test_world_demo_refuses_an_unknown_prompt_and_missing_checkpoints(tmp_path, capsys):
    world = tmp_path / "world"
    for name in ("teacher", "student", "models"):
        (world / name).mkdir(parents=True)
    assert train_main(["demo", CONFIG, f"demo.world={world}", "demo.prompt=a purple elephant dances",
                       f"runtime.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "demo.prompt" in err[0] and "purple" in err[0], err
    (world / "student").rmdir()
    assert train_main(["demo", CONFIG, f"demo.world={world}", f"runtime.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "demo.world" in err[0] and "student/" in err[0] and "teacher/" not in err[0], err
    assert not (tmp_path / "run").exists()  # nothing written before the inputs check out
