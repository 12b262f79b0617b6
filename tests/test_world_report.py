"""benchmarks/world_report.py in its quick form: tiny world models (untrained), an MHA and an MLA student
converted from the teacher, both horizons and the rank study (the 8-bit cache needs CUDA: skipped, and said). The report's structure, and
that its numbers are the eval reports of videos generated in this run (not copied)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_world_demo import CONFIG, MODEL, _world_checkpoints

from benchmarks.world_report import main as report_main
from vmla_train import config as C
from vmla_train.convert import main as convert_main
from vmla_train.dataprep.cli import main as data_main


@pytest.mark.timeout(240)
def test_quick_world_report(tmp_path, one_thread):
    world = tmp_path / "world"
    _world_checkpoints(world)
    assert data_main(["world", str(world / "clips"), "num_clips=1", "num_heldout=4", "workers=0", "progress=false"]) == 0
    tiny_rank = ["convert.calib_samples=1", "convert.calib_timesteps=[500]"]
    for tag, extra in (("mha", ["attention.kind=mha"]), ("mla", [])):
        assert convert_main([str(world / "teacher"), str(world / tag / "student-converted"), *MODEL, *extra,
                             *tiny_rank, "--config", CONFIG]) == 0
    seconds = 2 * 81 / 16
    rc = report_main(["--world", str(world), "--variants", "mha", "mla", "--stage", "converted", "--prompts", "1",
                      "--long-seconds", str(seconds), "--device", "cpu", "--results", str(tmp_path / "results")])
    assert rc == 0
    result = json.loads(next((tmp_path / "results").glob("world_report-*.json")).read_text())
    assert set(result["students"]) == {"mha", "mla"} and "CUDA only" in result["eight_bit"]  # no 8-bit cache on CPU
    kv = {tag: row["kv_values"] for tag, row in result["students"].items()}
    dim = C.load(world / "mha" / "student-converted" / "config.yaml").model.dim
    assert kv["mha"] == 2 * dim and kv["mla"] < kv["mha"]  # K and V per token and layer; the latent + RoPE key
    evals = Path(result["eval_folder"])
    for tag, row in result["students"].items():
        for horizon in ("short", "long"):
            rep = json.loads((evals / f"{tag}-{horizon}" / "report.json").read_text())
            assert len(list((evals / f"{tag}-{horizon}").glob("*.mp4"))) == 1 == rep["num_videos"]
            assert row[horizon]["adherence"] == rep["adherence"] and row[horizon]["drift_score"] == rep["drift_score"]
        assert result["students"][tag]["long"]["latent_frames_per_s"] > 0
    assert json.loads((evals / "mla-long" / "report.json").read_text())["num_frames"] > 81  # the long horizon
    ranks = result["ranks"]
    assert len(ranks["teacher"]["w_kv"]) == 2 and "init" in ranks["mla"] and "mha" not in ranks
    texts = [c["claim"] for c in result["claims"]]
    assert any("not low-rank" in t for t in texts) and any("quality retained" in t for t in texts)
    assert all(isinstance(c["holds"], bool) for c in result["claims"])


@pytest.mark.timeout(30)
def test_both_inits_claim_needs_both_inits():
    """The claim that both inits fill the latent's budget is decided only when a spectral and a random variant
    were both adapted and measured; one init alone neither confirms nor refutes it."""
    from benchmarks.world_report import claims

    def occupation(kind, value):
        return {"init_kind": kind, "init": {"c_occupation": [0.5, 0.5]}, "adapted": {"c_occupation": [value, value]}}

    def both_inits(ranks):
        return [c for c in claims({}, ranks, "mha", "mla", None) if c["claim"].startswith("both inits")]

    assert both_inits({"mla": occupation("spectral", 1.0), "mla-mild": occupation("spectral", 1.0)}) == []
    (full,) = both_inits({"mla": occupation("spectral", 1.0), "mla-random": occupation("random", 0.95)})
    assert full["holds"] and full["numbers"]["init"] == {"mla": "spectral", "mla-random": "random"}
    (short,) = both_inits({"mla": occupation("spectral", 1.0), "mla-random": occupation("random", 0.6)})
    assert not short["holds"]


@pytest.mark.timeout(240)
def test_quick_prompt_switch_benchmark(tmp_path, one_thread):
    """benchmarks/prompt_switch.py on tiny untrained world models: both re-cache settings generated and scored
    per segment; the JSON's numbers are those of the eval reports of this run's videos."""
    from benchmarks.prompt_switch import main as switch_main

    world = tmp_path / "world"
    _world_checkpoints(world)
    assert data_main(["world", str(world / "clips"), "num_clips=1", "num_heldout=4", "workers=0", "progress=false"]) == 0
    assert convert_main([str(world / "teacher"), str(world / "mla" / "student-converted"), *MODEL,
                         "convert.calib_samples=1", "convert.calib_timesteps=[500]", "--config", CONFIG]) == 0
    rc = switch_main(["--world", str(world), "--student", "mla/student-converted", "--pairs", "1",
                      "--switch-seconds", "2", "--seconds", str(81 / 16), "--device", "cpu",
                      "--results", str(tmp_path / "results")])
    assert rc == 0
    result = json.loads(next((tmp_path / "results").glob("prompt_switch-*.json")).read_text())
    assert set(result["recache"]) == {"true", "false"}
    for name, row in result["recache"].items():
        rep = json.loads((Path(result["eval_folder"]) / f"recache-{name}" / "report.json").read_text())
        assert row["num_switches"] == rep["num_switches"] == 1 and row["switch_jump"] == rep["switch_jump"]
        assert row["after"] == rep["after"] and rep["recache"] == [name == "true"]
        assert [s["first_frame"] for s in rep["videos"][0]["segments"]][0] == 0
    assert switch_main(["--world", str(world), "--student", "nothing-here", "--device", "cpu"]) == 2


@pytest.mark.timeout(30)
def test_stage_seconds_table(tmp_path):
    """The wall seconds per stage that world_student.sh records for a variant, as world_report shows them."""
    from benchmarks.world_report import stage_seconds, stage_table

    (tmp_path / "tf-cd").mkdir()
    (tmp_path / "tf-cd" / "stage_seconds.json").write_text(json.dumps({"convert": 4.6, "adapt": 120.2, "causal_cd": 60.0,
                                                                     "sf": 300.4}))
    rows = {"tf-cd": {"stage_seconds": stage_seconds(tmp_path / "tf-cd")},
            "df-ode": {"stage_seconds": {"adapt": 100.0, "ode": 50.0, "ode_init": 30.0, "sf": 300.0}},
            "untimed": {"stage_seconds": stage_seconds(tmp_path / "nothing")}}
    lines = stage_table(rows).splitlines()
    assert lines[0] == "| student | convert | adapt | ode | ode_init | causal_cd | sf | total s |"
    assert lines[2] == "| tf-cd | 5 | 120 | - | - | 60 | 300 | 485 |" and lines[3] == "| df-ode | - | 100 | 50 | 30 | - | 300 | 480 |"
    assert len(lines) == 4 and stage_table({"untimed": rows["untimed"]}) is None
