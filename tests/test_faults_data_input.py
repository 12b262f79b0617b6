"""Data and input faults: corrupt shards and samples during training,
bad configs / CLI input before any process group, unsafe paths in data prep."""

import json
import zipfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from vmla_train import cli, parallel, train
from vmla_train import config as C
from vmla_train.data import INDEX_NAME, build_loader, encode_array, scan_tar

ROOT = Path(__file__).resolve().parents[1]
ADAPT = ROOT / "configs/adapt-debug.yaml"


# ----------------------------------------------------------------------------------------------
# 7. a corrupt shard and a corrupt sample: replaced by the next readable sample, counted, logged
# ----------------------------------------------------------------------------------------------
def _write_shard(path: Path, cfg: C.Config, first: int, n: int) -> None:
    m, v = cfg.model, cfg.video
    g = torch.Generator().manual_seed(first)
    with wds.TarWriter(str(path)) as w:
        for i in range(first, first + n):
            w.write({"__key__": f"clip{i:05d}",
                     "latents.npy": encode_array(torch.randn(v.latent_frames, m.in_channels, v.latent_height,
                                                             v.latent_width, generator=g), "float16"),
                     "text.npy": encode_array(torch.randn(1 + i % m.text_len, m.text_dim, generator=g), "float16"),
                     "txt": f"caption {i}", "json": json.dumps({"dtype": "float16"}).encode()})


@pytest.fixture()
def bad_shards(tmp_path):
    """8 samples: shard 0 fine (0-2), shard 1 with sample 4's latents overwritten (3-5), shard 2 not a
    tar at all (6-7; its count comes from index.json, so the fault shows up only when it is read)."""
    cfg = C.load(ADAPT)
    _write_shard(tmp_path / "s-000000.tar", cfg, 0, 3)
    _write_shard(tmp_path / "s-000001.tar", cfg, 3, 3)
    off, size = scan_tar(str(tmp_path / "s-000001.tar"))["clip00004"]["latents.npy"]
    with open(tmp_path / "s-000001.tar", "r+b") as f:
        f.seek(off)
        f.write(b"\xff" * size)
    (tmp_path / "s-000002.tar").write_bytes(b"this is not a tar file" * 10)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"kind": "latents", "shards": {"s-000000.tar": 3, "s-000001.tar": 3,
                                                                                 "s-000002.tar": 2}}))
    return f"{tmp_path}/s-{{000000..000002}}.tar"


@pytest.mark.timeout(60)
def test_corrupt_samples_replaced_identically_on_every_rank(bad_shards, caplog):
    cfg = C.load(ADAPT, ["data.source=shards", f"data.shards={bad_shards}", "data.batch_size=2",
                         "data.batches_per_epoch=2", "train.global_batch_size=4"])
    loaders = [build_loader(cfg, "latents", r, 2) for r in range(2)]
    batches = [[next(l) for _ in range(2)] for l in loaders]  # one epoch on 2 ranks = one pass over the 8 samples
    assert [len(b) for b in batches] == [2, 2]  # every rank got every batch: nobody waits on a skip
    caps = sorted(c for b in batches[0] + batches[1] for c in b.captions)
    # 4 -> 5, 6 -> 7 -> 0, 7 -> 0: the next readable index, the same whichever rank reads it
    assert caps == sorted(["caption 0", "caption 1", "caption 2", "caption 3", "caption 5", "caption 5",
                           "caption 0", "caption 0"])
    assert sum(l.skipped_samples for l in loaders) == 4  # reads skipped: 4, 6, 7 (twice: once for 6, once itself)
    assert loaders[0].state_dict()["skipped_samples"] + loaders[1].state_dict()["skipped_samples"] == 4
    assert "s-000002.tar' is not a readable tar" in caplog.text and "'clip00004' latents.npy: not a readable" in caplog.text
    again = build_loader(cfg, "latents", 1, 2)  # deterministic: a fresh loader reads the same batches
    assert [next(again).captions for _ in range(2)] == [b.captions for b in batches[1]]


@pytest.mark.timeout(60)
def test_training_over_corrupt_shards_runs_and_logs_skips(bad_shards, tmp_path):
    cfg = C.load(ADAPT, ["data.source=shards", f"data.shards={bad_shards}", "data.batch_size=8",
                         "train.global_batch_size=8", "train.num_steps=1", f"runtime.run_dir={tmp_path / 'run'}"])
    out = train.fit(cfg)
    assert out["history"][0]["data/skipped_samples"] == 4 and torch.isfinite(torch.tensor(out["history"][0]["loss/adapt"]))


@pytest.mark.timeout(30)
def test_no_readable_sample_is_an_error_naming_the_shard(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"garbage" * 50)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"kind": "latents", "shards": {"x.tar": 2}}))
    cfg = C.load(ADAPT, ["data.source=shards", f"data.shards={tmp_path}/x.tar"])
    with pytest.raises(ValueError, match="x.tar' is not a readable tar.*none of the source's 2 samples is readable"):
        next(build_loader(cfg, "latents"))


# ----------------------------------------------------------------------------------------------
# 8. bad configuration / CLI input: exit 2 naming the key, before any process group
# ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("overrides, key", [
    (["train.num_stepz=3"], "unknown config key 'train.num_stepz' (nearest valid key: 'train.num_steps')"),
    (["train.num_steps=many"], "config key 'train.num_steps': expected an integer, found 'many'"),
    (["cache.window_frames=2"], "config key 'cache.window_frames': expected >= video.chunk_frames=3"),
    (["attention.d_c=4096"], "config key 'attention.d_c': expected 1..model.dim=48"),
    (["strategy.name=ddp", "strategy.devices=2", "train.global_batch_size=3"],
     "config key 'train.global_batch_size': expected a multiple of data.batch_size x world size = 1 x 2 = 2, found 3"),
    (["checkpoint.on_write_error=ignore"], "config key 'checkpoint.on_write_error': expected stop | continue"),
    (["train.max_consecutive_skips=0"], "config key 'train.max_consecutive_skips': expected >= 1"),
    (["train.num_steps"], "override 'train.num_steps': expected key=value"),
])
def test_bad_input_exits_2_naming_the_key_before_any_worker(monkeypatch, capsys, tmp_path, overrides, key):
    def no_workers(*a, **k):
        raise AssertionError("a process group was about to start")

    monkeypatch.setattr(parallel, "build_fabric", no_workers)
    assert cli.main(["fit", str(ADAPT), f"runtime.run_dir={tmp_path}", *overrides]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
# 9. data prep never follows a path outside its inputs (CSV video column, zip members)
# ----------------------------------------------------------------------------------------------
def test_data_prep_rejects_paths_outside_its_inputs(tmp_path):
    from vmla_train.dataprep.openvid import Row, index_clips, read_csvs

    (tmp_path / "secret.mp4").write_bytes(b"outside the inputs")
    csv = tmp_path / "in" / "rows.csv"
    csv.parent.mkdir()
    csv.write_text("video,caption\n../secret.mp4,escape\n/etc/passwd,absolute\nsub/../../secret.mp4,nested\nok.mp4,fine\n")
    out = list(read_csvs([str(csv)]))
    rows = [r for r in out if isinstance(r, Row)]
    assert [r.video for r in rows] == ["ok.mp4"]
    assert sum("is not a bare file name" in str(r) for r in out if not isinstance(r, Row)) == 3
    clips = tmp_path / "in" / "clips"
    clips.mkdir()
    with zipfile.ZipFile(clips / "part.zip", "w") as z:
        z.writestr("../secret.mp4", b"x")
        z.writestr("/abs/evil.mp4", b"x")
        z.writestr("good/ok.mp4", b"x")
    (clips / "link.mp4").symlink_to(tmp_path / "secret.mp4")  # a folder entry resolving outside the root
    rejects = []
    found = index_clips([str(clips)], rejects)
    assert set(found) == {"ok.mp4"} and found["ok.mp4"].member == "good/ok.mp4"
    assert sorted(r.reason for r in rejects) == ["unsafe path", "unsafe zip member", "unsafe zip member"]
