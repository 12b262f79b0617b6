"""The rank study (vmla-analyze rank) and the training-time c_kv occupation monitor."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from vmla_train import analyze as A
from vmla_train import config as C
from vmla_train import convert as V
from vmla_train import rank as R
from vmla_train import wan
from vmla_train.student import WanStudent

QUIET = dict(log=lambda *a: None)
CALIB = ["convert.calib_samples=2", "convert.calib_timesteps=[900,300]"]
MHA = CALIB + ["attention.kind=mha"]  # a Wan checkpoint's own attention, as the rank study reads it


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    cfg = C.load(None, ["model.name=tiny", "attention.kind=mha"])
    ref = wan.build_wan_transformer(cfg.model, seed=0)
    ref.save_pretrained(root / "diff", safe_serialization=True)
    return root / "diff", ref


def test_effective_rank_counts_energy():
    s = torch.tensor([10.0, 5.0, 1.0, 0.1])
    m = torch.diag(s) @ torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0].float()
    total = float((s**2).sum())
    assert R.effective_rank(m, 0.99) == 2  # energies 100, 25, 1, 0.01: 125 >= 0.99 * 126.01
    assert R.effective_rank(m, 0.995) == 3  # 125 < 125.38 <= 126
    assert R.effective_rank(m, (100 + 25) / total) == 2
    assert R.effective_rank(m, (100 + 25.5) / total) == 3
    assert R.effective_rank(m, 1.0) == 4
    assert R.effective_rank(torch.zeros(3, 3), 0.99) == 0


@pytest.mark.timeout(60)
def test_rank_study_of_a_wan_checkpoint(tiny_wan, tmp_path):
    src, ref = tiny_wan
    res = A.rank_study(src, tmp_path / "rank", overrides=CALIB, **QUIET)
    files = {p.name for p in (tmp_path / "rank").iterdir()}
    assert files == {"rank.csv", "rank.json", "rank.png"}
    rows = list(csv.DictReader((tmp_path / "rank" / "rank.csv").open()))
    assert len(rows) == 2 and json.loads((tmp_path / "rank" / "rank.json").read_text())["layers"] == res["layers"]
    sd = ref.state_dict()
    for r in res["layers"]:
        wk, wv = sd[f"blocks.{r['layer']}.attn1.to_k.weight"], sd[f"blocks.{r['layer']}.attn1.to_v.weight"]
        assert r["w_k"] == R.effective_rank(wk) and r["w_v"] == R.effective_rank(wv)
        assert r["w_kv"] == R.effective_rank(torch.cat([wk, wv])) >= max(r["w_k"], r["w_v"])
        for t in (900, 300):
            assert 1 <= r[f"act_k_t{t}"] <= min(res["dim"], res["tokens_per_bucket"])
            assert max(r[f"act_k_t{t}"], r[f"act_v_t{t}"]) <= r[f"act_kv_t{t}"] <= r[f"act_k_t{t}"] + r[f"act_v_t{t}"]
    assert res["tokens_per_bucket"] == 2 * 3 * 8 * 8  # samples x frames x (16/2) x (16/2) tokens


def _latent_shards(folder, latents, texts):
    """One latents shard (as `vmla-data encode` writes them: float32 npy members, an index) of these clips."""
    import webdataset as wds

    from vmla_train.data import INDEX_NAME, encode_array

    folder.mkdir()
    with wds.TarWriter(str(folder / "train-000000.tar")) as w:
        for i, (x, t) in enumerate(zip(latents, texts)):
            w.write({"__key__": f"clip{i:05d}", "latents.npy": encode_array(x, "float32"),
                     "text.npy": encode_array(t, "float32"), "txt": f"caption {i}",
                     "json": json.dumps({"dtype": "float32"}).encode()})
    (folder / INDEX_NAME).write_text(json.dumps({"kind": "latents", "shards": {"train-000000.tar": len(latents)}}))
    return str(folder / "*.tar")


@pytest.mark.timeout(60)
def test_calibration_on_encoded_clips_equals_the_gaussian_path_on_the_same_tensors(tiny_wan, tmp_path):
    """convert.calib_data replaces the seeded Gaussian clean latents and text by the shards' own (the noise
    stays the same draw): shards holding exactly the Gaussian path's tensors give identical block inputs."""
    src, _ = tiny_wan
    source = V.WanSource(src)
    cfg = V.build_config(source, [], MHA)
    m, cc = cfg.model, cfg.convert
    gen = torch.Generator().manual_seed(cc.seed)  # the Gaussian path's draws, in its order
    nf, hh, ww = cc.calib_latent_shape
    x0 = torch.randn(cc.calib_samples, nf, m.in_channels, hh, ww, generator=gen)
    torch.randn(cc.calib_samples, len(cc.calib_timesteps), nf, m.in_channels, hh, ww, generator=gen)  # the noise
    text = torch.randn(cc.calib_samples, cc.calib_text_tokens, m.text_dim, generator=gen)
    pattern = _latent_shards(tmp_path / "shards", x0, text)
    cfg_data = V.build_config(source, [], MHA + [f"convert.calib_data={pattern}"])
    latents, emb = V.calibration_clips(cfg_data)
    assert torch.equal(latents, x0) and torch.equal(emb, text)
    a, b = V.Calibration(source, cfg), V.Calibration(source, cfg_data)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.text_emb, b.text_emb)
    assert torch.equal(a.step(0, source.block(0)), b.step(0, source.block(0)))
    res = A.rank_study(src, tmp_path / "rank", overrides=CALIB + [f"convert.calib_data={pattern}"], **QUIET)
    assert res["calibration"]["data"] == pattern and res["tokens_per_bucket"] == 2 * 3 * 8 * 8


@pytest.mark.timeout(60)
def test_calibration_data_errors_name_the_key(tiny_wan, tmp_path):
    src, _ = tiny_wan
    source = V.WanSource(src)
    missing = str(tmp_path / "none" / "*.tar")
    with pytest.raises(V.ConversionError, match="convert.calib_data.*matches no files"):
        V.calibration_clips(V.build_config(source, [], MHA + [f"convert.calib_data={missing}"]))
    m = V.build_config(source, [], MHA).model
    pattern = _latent_shards(tmp_path / "one", [torch.randn(3, m.in_channels, 16, 16)], [torch.randn(4, m.text_dim)])
    with pytest.raises(V.ConversionError, match="'convert.calib_samples'=2: .* holds 1 clips"):
        V.calibration_clips(V.build_config(source, [], MHA + [f"convert.calib_data={pattern}"]))
    odd = _latent_shards(tmp_path / "odd", [torch.randn(3, m.in_channels, 15, 16)] * 2, [torch.randn(4, m.text_dim)] * 2)
    with pytest.raises(V.ConversionError, match="not divisible by the patch"):
        V.Calibration(source, V.build_config(source, [], MHA + [f"convert.calib_data={odd}"]))


@pytest.mark.timeout(60)
def test_rank_study_of_an_mla_student_reports_c_occupation(tiny_wan, tmp_path):
    src, _ = tiny_wan
    V.convert(src, tmp_path / "mla", overrides=["attention.d_c=8", "attention.d_r=6"], **QUIET)
    res = A.rank_study(tmp_path / "mla", tmp_path / "rank", overrides=CALIB, **QUIET)
    assert res["kind"] == "mla" and res["d_c"] == 8
    for r in res["layers"]:
        assert 0 < r["c_occupation"] <= 1.0
        assert r["c_occupation_t900"] == r["act_c_t900"] / 8
        assert r["w_k"] <= 8 and r["w_v"] <= 8  # K and V pass through the d_c bottleneck


def _student_with_latent_rank(rank: int) -> WanStudent:
    cfg = C.load(None, ["model.name=tiny", "attention.kind=mla"])
    torch.manual_seed(0)
    student = WanStudent(cfg)
    with torch.no_grad():
        for blk in student.blocks:
            blk.attn1.to_kv_a.weight[rank:] = 0
            blk.attn1.to_kv_a.bias.zero_()
    return student


def test_monitor_logs_occupation_at_its_interval():
    student = _student_with_latent_rank(5)
    cfg = student.cfg
    batch = {"latents": torch.randn(2, 3, cfg.model.in_channels, 8, 12), "text": torch.randn(2, 4, cfg.model.text_dim)}
    logged = []
    mon = R.RankOccupationMonitor(every_n_steps=3, energy=1.0)
    assert mon.maybe_log(1, student, batch, logged.append) is None and not logged
    student.train()
    metrics = mon.maybe_log(3, student, batch, logged.append)
    assert logged == [metrics] and student.training
    assert metrics["rank/c_kv_occupation/layer_00"] == pytest.approx(5 / cfg.attention.d_c)
    assert metrics["rank/c_kv_occupation/layer_01"] == pytest.approx(5 / cfg.attention.d_c)
    assert metrics["rank/c_kv_occupation/mean"] == pytest.approx(5 / cfg.attention.d_c)
    mha = WanStudent(C.load(None, ["model.name=tiny", "attention.kind=mha"]))
    assert mon.maybe_log(0, mha, batch, logged.append) is None and len(logged) == 1


def test_cli_rank_bad_input_exits_2(tmp_path, capsys):
    assert A.main(["rank", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "o").exists()
