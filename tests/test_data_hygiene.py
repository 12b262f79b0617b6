"""What the project writes is valid and readable by teammates: `vmla-data raw` rejects rows whose filtered
CSV score is empty or not finite (``NaN < lo`` is false, so they used to pass) and writes the scores of
unfiltered columns as null, never a bare ``NaN``; atomic writes (``atomic_write_text``, ``honour_umask``
for mkdtemp folders and safetensors files) give outputs the user's umask, not mkstemp's 0600."""

from __future__ import annotations

import csv
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
import torch

from vmla_train import config as C
from vmla_train.dataprep import cli
from vmla_train.dataprep.openvid import COLUMNS, Row, csv_filter_reason, read_csvs
from vmla_train.dataprep.testing import make_mp4

TINY = ["model.name=tiny", "video.num_frames=9", "runtime.progress=false"]


def _strict_json(text: str):
    """``json.loads`` that refuses NaN / Infinity (what strict readers, e.g. JavaScript or jq, do)."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards: ``umask(0o077)``."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def _row(**values) -> Row:
    base = {"video": "a.mp4", "caption": "a caption", "aesthetic score": 5.0, "motion score": 1.0,
            "temporal consistency score": 0.9, "fps": 16.0, "seconds": 3.0}
    base.update(values)
    return Row(video="a.mp4", caption=base["caption"], values=base, source="t.csv:2")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), ""])
def test_filtered_score_must_be_a_finite_number(value):
    on = C.RawShardsConfig(min_aesthetic=4.0)
    r = csv_filter_reason(_row(**{"aesthetic score": value}), on)
    assert r is not None and r.reason == "missing aesthetic score" and "prep.raw.min_aesthetic" in r.detail
    off = C.RawShardsConfig()  # every filter at its default: off, so an unmeasured score passes
    assert csv_filter_reason(_row(**{"aesthetic score": value}), off) is None


@pytest.mark.timeout(10)
def test_filters_still_judge_numbers():
    c = C.RawShardsConfig(min_aesthetic=4.0, min_seconds=2.0, min_fps=10.0, max_fps=30.0)
    assert csv_filter_reason(_row(), c) is None
    assert csv_filter_reason(_row(**{"aesthetic score": 3.9}), c).reason == "low aesthetic score"
    assert csv_filter_reason(_row(seconds=1.0), c).reason == "too short"
    assert csv_filter_reason(_row(fps=60.0), c).reason == "fps out of range"
    assert csv_filter_reason(_row(fps=float("nan")), c).reason == "missing fps"
    # max_fps below its default turns the fps filter on by itself; min_* = 0 still drops negative numbers
    assert csv_filter_reason(_row(fps=""), C.RawShardsConfig(max_fps=30.0)).reason == "missing fps"
    assert csv_filter_reason(_row(fps=""), C.RawShardsConfig()) is None
    assert csv_filter_reason(_row(**{"motion score": -1.0}), C.RawShardsConfig()).reason == "low motion score"


@pytest.fixture(scope="module")
def openvid(tmp_path_factory):
    """Four 3 s clips and a CSV: a good row, a NaN and an empty aesthetic score, a NaN motion score."""
    root = tmp_path_factory.mktemp("hygiene")
    (root / "videos").mkdir()
    rows = [("good.mp4", "5.0", "1.5"), ("nan_aes.mp4", "NaN", "1.5"), ("empty_aes.mp4", "", "1.5"),
            ("nan_motion.mp4", "5.0", "nan")]
    with open(root / "OpenVid-1M.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for i, (name, aes, motion) in enumerate(rows):
            (root / "videos" / name).write_bytes(make_mp4(48, 64, 64, 16, seed=i))
            w.writerow([name, f"clip {name}", aes, motion, 0.99, "static", 48, 16.0, 3.0])
    return root


def _raw(root: Path, out: Path, *extra: str) -> int:
    return cli.main(["raw", *TINY, f"prep.raw.csv=[{root}/OpenVid-1M.csv]", f"prep.raw.videos=[{root}/videos]",
                     f"prep.raw.output={out}", "prep.raw.num_workers=0", *extra])


def _samples(folder: Path) -> dict[str, dict]:
    """video name -> the sample's JSON, parsed strictly, over every shard of a raw folder."""
    out = {}
    for shard in sorted(folder.glob("raw-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    meta = _strict_json(tf.extractfile(m).read().decode())
                    out[meta["video"]] = meta
    return out


@pytest.mark.timeout(60)
def test_raw_rejects_missing_filtered_scores(openvid, tmp_path):
    out = tmp_path / "raw"
    assert _raw(openvid, out, "prep.raw.min_aesthetic=4.0") == 0
    assert sorted(_samples(out)) == ["good.mp4", "nan_motion.mp4"]
    rejects = [_strict_json(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    missing = {r["video"]: r for r in rejects if r["reason"] == "missing aesthetic score"}
    assert sorted(missing) == ["empty_aes.mp4", "nan_aes.mp4"]
    assert missing["nan_aes.mp4"]["row"].endswith("OpenVid-1M.csv:3") and "min_aesthetic" in missing["nan_aes.mp4"]["detail"]
    # the unfiltered motion score stays, as null: every file of the folder is strict JSON
    assert _samples(out)["nan_motion.mp4"]["motion score"] is None
    summary = _strict_json((out / "summary.json").read_text())
    assert summary["filtered"]["missing aesthetic score"] == 2 and summary["kept"] == 2
    _strict_json((out / "index.json").read_text())


@pytest.mark.timeout(60)
def test_raw_default_filters_keep_unmeasured_scores(openvid, tmp_path):
    out = tmp_path / "raw"
    assert _raw(openvid, out) == 0
    samples = _samples(out)
    assert sorted(samples) == ["empty_aes.mp4", "good.mp4", "nan_aes.mp4", "nan_motion.mp4"]
    assert samples["nan_aes.mp4"]["aesthetic score"] is None and samples["empty_aes.mp4"]["aesthetic score"] == ""
    assert samples["good.mp4"]["aesthetic score"] == 5.0


@pytest.mark.timeout(10)
def test_read_csvs_parses_nan_as_a_float(tmp_path):
    """The CSV reader hands NaN through as a float (the filters and json_finite decide), not as a bad row."""
    p = tmp_path / "x.csv"
    p.write_text(",".join(COLUMNS) + "\na.mp4,cap,NaN,1,1,static,1,16,2\n")
    (row,) = list(read_csvs([str(p)]))
    assert isinstance(row, Row) and row.values["aesthetic score"] != row.values["aesthetic score"]


@pytest.mark.timeout(10)
def test_json_finite():
    assert C.json_finite({"a": float("nan"), "b": [1.0, float("-inf"), (2, float("inf"))], "c": "NaN", "d": 3}) == \
        {"a": None, "b": [1.0, None, [2, None]], "c": "NaN", "d": 3}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("mask,file_mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_text_honours_umask(umask, tmp_path, mask, file_mode):
    umask(mask)
    p = tmp_path / "sub" / "index.json"
    C.atomic_write_text(p, "{}\n")
    assert p.read_text() == "{}\n" and _mode(p) == file_mode
    C.atomic_write_text(p, "[]\n")  # replacing keeps the umask's mode, leaves no temporary behind
    assert _mode(p) == file_mode and [q.name for q in p.parent.iterdir()] == ["index.json"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_honour_umask_on_a_mkdtemp_folder_of_safetensors(umask, tmp_path, mask):
    """mkdtemp (0700) + safetensors' save_file (0600): the shape of an exported student folder."""
    import tempfile

    from safetensors.torch import save_file

    umask(mask)
    tmp = Path(tempfile.mkdtemp(dir=tmp_path))
    (tmp / "sub").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "model.safetensors"))
    (tmp / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp / "run.sh", 0o755)
    C.honour_umask(tmp)
    assert _mode(tmp) == _mode(tmp / "sub") == 0o777 & ~mask
    assert _mode(tmp / "sub" / "model.safetensors") == 0o666 & ~mask
    assert _mode(tmp / "run.sh") == 0o777 & ~mask  # execute bits kept


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_raw_outputs_honour_umask(openvid, umask, tmp_path, mask):
    umask(mask)
    out = tmp_path / "raw"
    assert _raw(openvid, out) == 0
    files = [out / "index.json", out / "rejects.jsonl", out / "summary.json", *out.glob("raw-*")]
    assert len(files) >= 5 and {f.name: _mode(f) for f in files} == {f.name: 0o666 & ~mask for f in files}
    assert _mode(out) == 0o777 & ~mask
