"""benchmarks/vae_precision.py on a tiny untrained world codec: it runs, and its numbers are what they say
(an fp32 decode compared with itself would be infinite PSNR; bf16 is finite and close)."""

from __future__ import annotations

import json

import pytest

from benchmarks.vae_precision import main
from vmla_train.world.codec import CodecConfig, build_codec


@pytest.mark.timeout(120)
def test_vae_precision_report(tmp_path, one_thread):
    build_codec(CodecConfig(base_dim=8, z_dim=16)).save_pretrained(tmp_path / "vae")
    assert main(["--vae", str(tmp_path / "vae"), "--clips", "1", "--frames", "9", "--device", "cpu",
                 "--results", str(tmp_path / "results")]) == 0
    r = json.loads((tmp_path / "results" / "vae_precision-cpu.json").read_text())
    m = r["mean"]
    assert 30 < m["psnr_bf16_vs_fp32_db"] < float("inf") and r["per_clip"][0]["max_abs_levels"] >= 1
    assert abs(m["psnr_bf16_vs_truth_db"] - m["psnr_fp32_vs_truth_db"]) < 1.0
    assert set(r["world_metrics"]) == {"adherence", "identity", "motion_error", "physics_error"}
