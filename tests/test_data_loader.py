"""The training loader: determinism, equal batches per rank, disjoint ranks, resume continuation, shards."""

from __future__ import annotations

import json

import pytest
import torch
import webdataset as wds

from vmla_train import config as C
from vmla_train.data import (INDEX_NAME, LatentBatch, OdeBatch, PromptBatch, build_loader, encode_array,
                             scan_tar)


def _cfg(*overrides: str) -> C.Config:
    return C.load(None, ["model.name=tiny", "data.batch_size=2", "data.batches_per_epoch=4", "data.num_workers=0",
                         "data.synthetic_samples=12", *overrides])


def _keys(batches) -> list[str]:
    return [c for b in batches for c in b.captions]


def _take(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind,cls", [("latents", LatentBatch), ("prompts", PromptBatch), ("ode", OdeBatch)])
def test_synthetic_shapes_and_mask(kind, cls):
    cfg = _cfg()
    b = next(build_loader(cfg, kind))
    assert isinstance(b, cls) and len(b) == 2
    m, v = cfg.model, cfg.video
    assert b.text.shape == (2, m.text_len, m.text_dim) and b.text_mask.dtype == torch.bool
    lengths = b.text_mask.sum(1)
    assert (lengths >= 1).all() and (b.text.abs().sum(-1) > 0).eq(b.text_mask).all()  # zero exactly past length
    lat = (2, v.latent_frames, m.in_channels, v.latent_height, v.latent_width)
    if kind == "latents":
        assert b.latents.shape == lat and b.latents.dtype == torch.float32
    if kind == "ode":
        k = len(cfg.prep.ode.keep_indices)
        assert b.trajectory.shape == (2, k, *lat[1:]) and b.timesteps.shape == (k,)
        assert b.timesteps[0] == 1000.0 and b.timesteps[-1] == 0.0
        assert torch.allclose(b.trajectory[:, 0], b.noise, atol=1e-6) and torch.allclose(b.trajectory[:, -1], b.clean, atol=1e-6)


@pytest.mark.timeout(60)
def test_deterministic_and_seeded():
    a = _keys(_take(build_loader(_cfg(), "prompts"), 6))
    b = _keys(_take(build_loader(_cfg(), "prompts"), 6))
    c = _keys(_take(build_loader(_cfg("data.seed=1"), "prompts"), 6))
    assert a == b and a != c


@pytest.mark.timeout(60)
def test_two_ranks_equal_batches_and_disjoint_pass():
    cfg = _cfg()  # 12 samples, batch 2, 2 ranks: a pass over the data is 3 batches per rank
    r0, r1 = build_loader(cfg, "prompts", 0, 2), build_loader(cfg, "prompts", 1, 2)
    e0, e1 = list(r0.epoch_batches()), list(r1.epoch_batches())
    assert len(e0) == len(e1) == cfg.data.batches_per_epoch and r0.epoch == r1.epoch == 1
    first_pass = _keys(e0[:3]) + _keys(e1[:3])
    assert len(set(first_pass)) == 12  # ranks see disjoint samples; together the whole set once


@pytest.mark.timeout(120)
def test_resume_continues_with_workers_json_state():
    cfg = _cfg("data.num_workers=2")
    ref = _keys(_take(build_loader(cfg, "latents"), 7))
    run = build_loader(cfg, "latents")
    first = _take(run, 3)
    state = json.loads(json.dumps(run.state_dict()))  # small and JSON-serialisable
    run.close()
    resumed = build_loader(cfg, "latents")
    resumed.load_state_dict(state)
    assert _keys(first) + _keys(_take(resumed, 4)) == ref
    resumed.close()


@pytest.mark.timeout(60)
def test_resume_with_other_world_size_continues_globally():
    cfg = _cfg()
    one = build_loader(cfg, "prompts", 0, 1)
    seen = _keys(_take(one, 2))  # 4 samples of the first pass
    state = one.state_dict()
    rest = []
    for r in range(2):
        l = build_loader(cfg, "prompts", r, 2)
        l.load_state_dict(state)
        rest += _keys(_take(l, 2))  # 2 ranks x 2 batches x 2 = the other 8 samples
    assert sorted(set(seen + rest)) == sorted(seen + rest) and len(seen + rest) == 12


def test_state_mismatch_and_bad_kind_are_named():
    l = build_loader(_cfg(), "prompts")
    with pytest.raises(ValueError, match="seed"):
        l.load_state_dict({**l.state_dict(), "seed": 5})
    with pytest.raises(ValueError, match="kind"):
        build_loader(_cfg(), "video")
    with pytest.raises(ValueError, match="data.shards"):
        build_loader(_cfg("data.source=shards"), "latents")


def _write_shard(path, cfg, n, start, dtype, wrong_shape=False):
    m, v = cfg.model, cfg.video
    g = torch.Generator().manual_seed(start)
    with wds.TarWriter(str(path)) as w:
        for i in range(start, start + n):
            shape = (v.latent_frames, m.in_channels, v.latent_height + (2 if wrong_shape else 0), v.latent_width)
            length = 1 + i % m.text_len
            w.write({"__key__": f"clip{i:05d}", "latents.npy": encode_array(torch.randn(shape, generator=g), dtype),
                     "text.npy": encode_array(torch.randn(length, m.text_dim, generator=g), dtype),
                     "txt": f"caption {i}", "json": json.dumps({"dtype": dtype}).encode()})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_shards_source(tmp_path, dtype):
    cfg0 = _cfg()
    _write_shard(tmp_path / "train-000000.tar", cfg0, 3, 0, dtype)
    _write_shard(tmp_path / "train-000001.tar", cfg0, 5, 3, dtype)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"kind": "latents", "shards": {"train-000000.tar": 3, "train-000001.tar": 5}}))
    assert len(scan_tar(str(tmp_path / "train-000001.tar"))) == 5
    workers = "data.num_workers=2" if dtype == "float16" else "data.num_workers=0"  # readers in worker processes too
    cfg = _cfg("data.source=shards", f"data.shards={tmp_path}/train-{{000000..000001}}.tar", "data.batch_size=4", workers)
    l = build_loader(cfg, "latents")
    batches = _take(l, 2)
    assert sorted(_keys(batches)) == [f"caption {i}" for i in range(8)]  # one pass = every sample once
    b = batches[0]
    for j, cap in enumerate(b.captions):
        i = int(cap.split()[1])
        assert b.text_mask[j].sum() == 1 + i % cfg.model.text_len
    p = build_loader(cfg, "prompts")  # prompts come from the same shards
    assert _keys(_take(p, 2)) == _keys(batches)
    assert build_loader(cfg, "latents").state_dict()["num_samples"] == 8


@pytest.mark.timeout(60)
def test_more_shards_than_open_files_scan_each_shard_once(tmp_path, monkeypatch):
    """Random access over more shards than data.max_open_shards: the same batches as with every file open,
    and each shard's headers scanned once per process (an LRU of member tables rescanned on most reads)."""
    import vmla_train.data as data_mod

    cfg0 = _cfg()
    shards = {}
    for s in range(5):
        _write_shard(tmp_path / f"train-{s:06d}.tar", cfg0, 4, 4 * s, "float16")
        shards[f"train-{s:06d}.tar"] = 4
    (tmp_path / INDEX_NAME).write_text(json.dumps({"kind": "latents", "shards": shards}))
    scans = []
    real = data_mod.scan_tar
    monkeypatch.setattr(data_mod, "scan_tar", lambda path: scans.append(path) or real(path))
    pattern = f"data.shards={tmp_path}/train-{{000000..000004}}.tar"
    keys = {}
    for max_open in (2, 16):
        scans.clear()
        cfg = _cfg("data.source=shards", pattern, "data.batch_size=4", "data.num_workers=0", f"data.max_open_shards={max_open}")
        batches = _take(build_loader(cfg, "latents"), 10)  # two passes over the 20 samples
        keys[max_open] = [(b.captions, b.latents) for b in batches]
        assert sorted(scans) == sorted(set(scans)) and len(scans) == 5
    assert all(c2 == c16 and torch.equal(x2, x16) for (c2, x2), (c16, x16) in zip(keys[2], keys[16]))


def test_shards_wrong_geometry_names_the_shard(tmp_path):
    cfg0 = _cfg()
    _write_shard(tmp_path / "bad.tar", cfg0, 2, 0, "float16", wrong_shape=True)
    cfg = _cfg("data.source=shards", f"data.shards={tmp_path}/bad.tar")
    with pytest.raises(ValueError, match="bad.tar.*latents shape"):
        next(build_loader(cfg, "latents"))
    with pytest.raises(FileNotFoundError, match="data.shards"):
        build_loader(_cfg("data.source=shards", f"data.shards={tmp_path}/none-*.tar"), "latents")
