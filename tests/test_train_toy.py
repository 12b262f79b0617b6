"""The learning check's shortened version (benchmarks/toy_distill.py --quick): teacher -> convert ->
adapt -> ode_init -> self_forcing on the toy world, end to end through `train.fit`, exports and the
evaluation. The quick version's threshold is loose: every stage must run and export, every distance
must be finite, and the evaluation must tell the data from itself apart from noise-like samples."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_toy_distill_quick(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import toy_distill
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    res = toy_distill.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    rows = res["rows"]
    assert set(rows) == {"data", "teacher", "untrained", "converted", "adapt", "ode_init", "self_forcing"}
    assert all(math.isfinite(r["mmd"]) and math.isfinite(r["motion_err"]) for r in rows.values())
    # the metric separates the held-out data (noise floor) from an untrained model by a wide margin
    assert rows["data"]["mmd"] < 0.2 * rows["untrained"]["mmd"]
    assert rows["data"]["motion_err"] < 0.05
    assert all(res["losses"][s] for s in ("adapt", "ode_init", "self_forcing"))
    assert json.loads((tmp_path / "out" / "toy_distill-quick.json").read_text())["quick"] is True
    assert (tmp_path / "out" / "toy_distill-quick.png").stat().st_size > 0
