"""benchmarks/generate.py runs end to end on a CPU at the tiny geometry (its numbers there mean nothing; the
GPU run is the benchmark): the table prints, the JSON holds every part per chunk, and the derived numbers are
computed from the measured ones."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_generate_benchmark_tiny_cpu_run(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)  # write_result also copies into $OUT when it is set
    spec = importlib.util.spec_from_file_location("generate_bench", ROOT / "benchmarks" / "generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--device", "cpu", "--chunks", "2", "--warmup", "1",
            "--modes", "bf16", "--text-encoder", "--overlap", "--vae-channels-last", "--switch", "--results",
            str(tmp_path)]
    assert bench.main(args) == 0
    assert "video fps" in capsys.readouterr().out
    result = json.loads((tmp_path / "generate-cpu.json").read_text())
    r = result["modes"]["bf16"]
    assert len(r["per_chunk"]) == 2 and r["chunks"] == 2
    for row in r["per_chunk"]:
        assert all(row[k] > 0 for k in ("denoise_s", "decode_s", "wall_s"))
        assert row["wall_s"] >= row["denoise_s"] and row["frames"] == 4 * 3  # 3 latent frames -> 12 video frames
    assert r["video_fps"] == pytest.approx(r["frames_per_chunk"] / r["wall_s"])
    assert result["decode_tflop_per_chunk"] > 0  # counted on the meta device
    assert result["config"] == "configs/tiny.yaml"  # the repository's configs are recorded relative to it
    assert r["decode_tflops"] == pytest.approx(result["decode_tflop_per_chunk"] / r["decode_s"])
    assert r["first_chunk"]["frames"] == 1 + 4 * 2  # the causal first latent frame
    assert r["time_to_first_frame_s"] == pytest.approx(
        result["text_encoder_s"] + r["first_chunk"]["denoise_s"] + r["first_chunk"]["decode_s"])
    o = result["modes"]["bf16+overlap"]  # decode + frames out on the output worker while the next chunk denoises
    assert result["overlap"] and result["vae_channels_last"] and len(o["per_chunk"]) == 2
    assert all(row[k] > 0 for row in o["per_chunk"] for k in ("denoise_s", "decode_s", "wall_s"))
    assert o["video_fps"] == pytest.approx(o["frames_per_chunk"] / o["wall_s"])
    for row in (r, o):  # the switch chunk re-runs the window: its extra time is the switch's cost
        w = row["switch"]
        assert w["switch_cost_s"] == pytest.approx(w["switch_chunk_denoise_s"] - w["median_denoise_s"])
        assert w["cost_in_chunks"] == pytest.approx(w["switch_cost_s"] / w["median_denoise_s"])
        assert w["recached_slots"] > 0 and w["chunk"] >= 2
    assert bench.main([*args[:-2], "--modes", "fp4", "--results", str(tmp_path)]) == 2
