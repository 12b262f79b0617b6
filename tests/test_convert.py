"""Wan -> student conversion: key mapping, both layouts, exactness ladder, round trip, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vmla_train import config as C
from vmla_train import convert as V
from vmla_train import student_io, wan, wan_keys

TINY = ["model.name=tiny"]
FULL_RANK = ["attention.qk_nope_head_dim=0", "attention.rope_key_groups=4", "attention.d_r=48", "attention.d_c=48"]
QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random diffusers Wan in both layouts: diffusers folder, original folder (prefixed, sharded + index)."""
    root = tmp_path_factory.mktemp("wan")
    cfg = C.load(None, TINY + ["attention.kind=mha"])
    ref = wan.build_wan_transformer(cfg.model, seed=0).eval()
    diff = root / "Wan2.1-T2V-tiny-Diffusers"
    (diff / "transformer").mkdir(parents=True)
    ref.save_pretrained(diff / "transformer", safe_serialization=True)
    orig = root / "Wan2.1-T2V-tiny"
    orig.mkdir()
    state = {wan_keys.ORIGINAL_PREFIX + wan_keys.diffusers_to_original(k): v.clone() for k, v in ref.state_dict().items()}
    names = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(orig / f))
    (orig / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    m = cfg.model
    (orig / "config.json").write_text(json.dumps(dict(
        _class_name="WanModel", model_type="t2v", dim=m.dim, num_heads=m.num_heads, num_layers=m.num_layers, ffn_dim=m.ffn_dim,
        in_dim=m.in_channels, out_dim=m.out_channels, text_dim=m.text_dim, text_len=m.text_len, freq_dim=m.freq_dim, eps=m.eps)))
    torch.manual_seed(1)
    x = torch.randn(2, 3, m.in_channels, 8, 8)  # (B, F, C, H, W)
    t = torch.tensor([999.0, 400.0])
    text = torch.randn(2, 5, m.text_dim)
    with torch.no_grad():
        out = wan.wan_flow(ref, x, t, text, m.text_len)
    return dict(root=root, diff=diff, orig=orig, ref=ref, cfg=cfg, inputs=(x, t, text), out=out)


def _flow(folder: Path, inputs) -> torch.Tensor:
    student, _ = student_io.load_student(folder)
    with torch.no_grad():
        return student.eval()(*inputs)


def test_key_mapping_hand_names_and_bijection(tiny):
    o2d = wan_keys.original_to_diffusers
    assert o2d("blocks.0.norm3.weight") == "blocks.0.norm2.weight"
    assert o2d("head.modulation") == "scale_shift_table"
    assert o2d("blocks.7.modulation") == "blocks.7.scale_shift_table"
    assert o2d("model.diffusion_model.blocks.3.self_attn.o.bias") == "blocks.3.attn1.to_out.0.bias"
    assert o2d("blocks.2.cross_attn.norm_k.weight") == "blocks.2.attn2.norm_k.weight"
    assert o2d("blocks.1.ffn.0.weight") == "blocks.1.ffn.net.0.proj.weight"
    assert o2d("time_projection.1.bias") == "condition_embedder.time_proj.bias"
    assert o2d("text_embedding.2.weight") == "condition_embedder.text_embedder.linear_2.weight"
    assert o2d("head.head.weight") == "proj_out.weight"
    for k in tiny["ref"].state_dict():
        assert o2d(wan_keys.diffusers_to_original(k)) == k
    with pytest.raises(wan_keys.KeyMappingError, match="img_emb"):
        o2d("img_emb.proj.0.weight")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("layout", ["orig", "diff"])
def test_both_layouts_convert_to_mha_equal_to_diffusers(tiny, tmp_path, layout):
    out = tmp_path / "student"
    report = V.convert(tiny[layout], out, overrides=["attention.kind=mha"], **QUIET)
    assert report["layout"] == ("original" if layout == "orig" else "diffusers")
    state = student_io.load_state_dict(out)
    ref_state = tiny["ref"].state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)  # identity copy
    torch.testing.assert_close(_flow(out, tiny["inputs"]), tiny["out"], atol=1e-5, rtol=1e-5)
    assert all(r["attn_out_rel_err"] == 0.0 for r in report["layers"])


@pytest.mark.timeout(60)
def test_full_rank_mla_conversion_reproduces_mha(tiny, tmp_path):
    out = tmp_path / "full"
    report = V.convert(tiny["orig"], out, overrides=FULL_RANK, **QUIET)
    for r in report["layers"]:
        assert r["attn_out_rel_err"] < 1e-5 and r["k_rel_err"] < 1e-6 and r["v_rel_err"] < 1e-6
    for impl in ("reference", "absorbed"):
        student, _ = student_io.load_student(out, [f"attention.impl={impl}"])
        with torch.no_grad():
            got = student.eval()(*tiny["inputs"])
        torch.testing.assert_close(got, tiny["out"], atol=2e-5, rtol=1e-4)


@pytest.mark.timeout(60)
def test_reduced_rank_error_falls_as_d_c_grows(tiny, tmp_path):
    # d_r=6: one RoPE pair per axis in the shared key, the other 3 pairs per head go through the latent.
    errs = []
    for dc in (4, 8, 16, 32, 48):
        rep = V.convert(tiny["diff"], tmp_path / f"dc{dc}", overrides=["attention.d_r=6", f"attention.d_c={dc}"], **QUIET)
        errs.append([rep["summary"][k] for k in ("attn_out_rel_err_mean", "k_rel_err_mean", "v_rel_err_mean")])
    for key in range(3):
        col = [e[key] for e in errs]
        assert all(a > b for a, b in zip(col, col[1:])), (key, col)
    assert 0.0 < errs[0][0] < 2.0


@pytest.mark.timeout(60)
def test_activation_pca_beats_weights_on_its_calibration_batch(tiny, tmp_path):
    common = ["attention.d_r=6", "attention.d_c=16", "convert.calib_samples=2"]
    w = V.convert(tiny["diff"], tmp_path / "w", overrides=common, **QUIET)["summary"]
    a = V.convert(tiny["diff"], tmp_path / "a", overrides=common + ["convert.factorization=activations"], **QUIET)["summary"]
    assert a["v_rel_err_mean"] < w["v_rel_err_mean"]


@pytest.mark.timeout(60)
def test_random_init_follows_wan_linear_init(tiny, tmp_path):
    out = tmp_path / "rand"
    report = V.convert(tiny["diff"], out, overrides=["convert.init=random"], **QUIET)
    state = student_io.load_state_dict(out)
    ref = tiny["ref"].state_dict()
    w = state["blocks.0.attn1.to_kv_a.weight"]
    bound = (6.0 / sum(w.shape)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound and w.std() > 0.3 * bound
    assert torch.count_nonzero(state["blocks.0.attn1.to_kv_a.bias"]) == 0
    assert torch.equal(state["blocks.0.attn1.to_out.0.weight"], ref["blocks.0.attn1.to_out.0.weight"])
    assert torch.equal(state["blocks.1.ffn.net.2.weight"], ref["blocks.1.ffn.net.2.weight"])
    assert not torch.equal(state["blocks.0.attn1.to_kv_a.weight"], state["blocks.1.attn1.to_kv_a.weight"])
    assert report["layers"][0]["k_rel_err"] is None and report["target"]["init"] == "random"
    assert torch.isfinite(_flow(out, tiny["inputs"])).all()


@pytest.mark.timeout(60)
def test_round_trip_original_diffusers_student_diffusers_is_lossless(tiny, tmp_path):
    from diffusers import WanTransformer3DModel

    d1, s, d2 = tmp_path / "d1", tmp_path / "s", tmp_path / "d2"
    V.export_diffusers(tiny["orig"], d1, **QUIET)
    V.convert(d1, s, overrides=["attention.kind=mha"], **QUIET)
    V.export_diffusers(s, d2, **QUIET)
    orig = {}
    for f in sorted(tiny["orig"].glob("*.safetensors")):
        orig.update(load_file(str(f)))
    final = load_file(str(d2 / "diffusion_pytorch_model.safetensors"))
    assert len(final) == len(orig)
    for k, v in orig.items():
        assert torch.equal(final[wan_keys.original_to_diffusers(k)], v), k
    # from_pretrained needs `accelerate` for Wan (keep_in_fp32_modules); the config + state dict are what it reads.
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(d2))
    model.load_state_dict(final)
    ref = tiny["ref"].state_dict()
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
    with pytest.raises(V.ConversionError, match="MLA student"):
        mla = tmp_path / "mla"
        V.convert(tiny["diff"], mla, **QUIET)
        V.export_diffusers(mla, tmp_path / "d3", **QUIET)
    assert not (tmp_path / "d3").exists()
    # convert.dtype casts the exported tensors (a shippable bf16 teacher); the values are the rounded originals
    V.export_diffusers(s, tmp_path / "d16", overrides=["convert.dtype=bfloat16"], **QUIET)
    half = load_file(str(tmp_path / "d16" / "diffusion_pytorch_model.safetensors"))
    assert half.keys() == final.keys()
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], final[k].to(torch.bfloat16)) for k in final)


@pytest.mark.timeout(30)
def test_sharded_output_and_cli(tiny, tmp_path, capsys):
    out = tmp_path / "sharded"
    assert V.main([str(tiny["diff"]), str(out), "attention.kind=mha", "convert.max_shard_gb=0.00002"]) == 0
    assert (out / student_io.INDEX_NAME).is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    report = json.loads((out / "conversion_report.json").read_text())
    assert {"k_rel_err", "v_rel_err", "attn_out_rel_err", "eff_rank_wk", "eff_rank_wv", "eff_rank_wkv"} <= set(report["layers"][0])
    torch.testing.assert_close(_flow(out, tiny["inputs"]), tiny["out"], atol=1e-5, rtol=1e-5)
    assert C.load(out / "config.yaml").attention.kind == C.AttentionKind.mha
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def _corrupt_index(tiny, tmp_path):
    bad = tmp_path / "missing_shard"
    bad.mkdir()
    for f in tiny["orig"].iterdir():
        if "00002" not in f.name:
            (bad / f.name).write_bytes(f.read_bytes())
    return bad


def _unknown_layout(tiny, tmp_path):
    bad = tmp_path / "unknown"
    bad.mkdir()
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(bad / "diffusion_pytorch_model.safetensors"))
    return bad


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case, overrides, message", [
    ("nonexistent", [], "does not exist"),
    ("missing_shard", [], "00002-of-00002.safetensors"),
    ("no_weights", [], "no diffusion_pytorch_model"),
    ("unknown_layout", [], "unknown checkpoint layout"),
    ("diff", ["model.ffn_dim=64"], "'blocks.0.ffn.net.0.proj.weight' has shape (96, 48)"),
    ("orig", ["model.num_layers=3"], "blocks.2.self_attn.q"),
    ("diff", ["attention.d_c=49"], "attention.d_c"),
    ("diff", ["attention.d_r=10"], "attention.d_r"),
    ("diff", ["attention.qk_nope_head_dim=2", "attention.d_r=6"], "attention.qk_nope_head_dim"),
    ("diff", ["attention.dc=8"], "attention.d_c"),
])
def test_bad_inputs_fail_clearly_and_leave_no_out(tiny, tmp_path, capsys, case, overrides, message):
    src = {"nonexistent": lambda: tmp_path / "nope", "missing_shard": lambda: _corrupt_index(tiny, tmp_path),
           "no_weights": lambda: (tmp_path / "empty").mkdir() or tmp_path / "empty",
           "unknown_layout": lambda: _unknown_layout(tiny, tmp_path)}.get(case, lambda: tiny[case])()
    out = tmp_path / "out"
    assert V.main([str(src), str(out), *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_kv_reduction_of_the_default_config_is_0_927():
    cfg = C.load(Path(__file__).parents[1] / "configs" / "videomla-1.3b.yaml")
    assert C.kv_values_per_token(cfg) == {"mha": 3072, "mla": 224}
    assert round(C.kv_reduction(cfg), 3) == 0.927


@pytest.mark.timeout(30)
def test_report_holds_kv_accounting(tiny, tmp_path):
    report = V.convert(tiny["diff"], tmp_path / "s", **QUIET)
    cfg = C.load(tmp_path / "s" / "config.yaml")
    assert report["kv_values_per_token"] == C.kv_values_per_token(cfg) == {"mha": 96, "mla": 36}
    assert report["kv_reduction"] == pytest.approx(1 - 36 / 96)
    assert len(report["layers"]) == cfg.model.num_layers
