"""Config loading: overrides, YAML, named sizes, and errors that name the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from vmla_train import config as C

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(30)
def test_named_sizes_and_derived_geometry():
    cfg = C.load(ROOT / "configs/videomla-1.3b.yaml")
    assert (cfg.model.dim, cfg.model.num_heads, cfg.model.num_layers, cfg.model.head_dim) == (1536, 12, 30, 128)
    assert (cfg.video.latent_frames, cfg.video.latent_height, cfg.video.latent_width) == (21, 60, 104)
    assert cfg.tokens_per_frame == 1560
    big = C.load(overrides=["model.name=wan-14b", "attention.kind=mha"])
    assert (big.model.dim, big.model.num_heads, big.model.num_layers, big.model.ffn_dim) == (5120, 40, 40, 13824)
    tiny = C.load(ROOT / "configs/tiny.yaml")
    assert tiny.model.name == "tiny" and tiny.model.dim == 48


@pytest.mark.timeout(30)
def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        C.load(path)


@pytest.mark.timeout(30)
def test_overrides_apply_in_order(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("attention:\n  d_c: 192\n  d_r: 32\n")
    cfg = C.load(y, ["attention.d_c=128"])
    assert (cfg.attention.d_c, cfg.attention.d_r) == (128, 32)


@pytest.mark.timeout(30)
def test_kv_accounting_default_videomla():
    cfg = C.load(ROOT / "configs/videomla-1.3b.yaml")
    assert C.kv_values_per_token(cfg) == {"mha": 3072, "mla": 224}
    assert round(C.kv_reduction(cfg), 3) == 0.927


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("attention.dc=3", ["unknown config key 'attention.dc'", "nearest valid key: 'attention.d_c'"]),
        ("modle.dim=3", ["unknown config key 'modle'", "'model'"]),
        ("attention.d_c=abc", ["'attention.d_c'", "expected an integer, found 'abc'"]),
        ("attention.kind=gqa", ["'attention.kind'", "expected one of mha, mla, found 'gqa'"]),
        ("cache.window_frames=2", ["'cache.window_frames'", "chunk"]),
        ("video.chunk_frames=4", ["'video.chunk_frames'", "divisor"]),
        ("attention.d_c=4096", ["'attention.d_c'", "model.dim=1536"]),
        ("attention.d_r=4", ["'attention.d_r'", "t/h/w"]),
        ("attention.d_r=63", ["'attention.d_r'"]),
        ("attention.rope_key_groups=5", ["'attention.rope_key_groups'", "divisor"]),
        ("model.name=wan-7b", ["'model.name'", "tiny"]),
        ("video.num_frames=80", ["'video.num_frames'"]),
        ("cache.dtype=int8", ["'cache.dtype'"]),
        ("cache.dtype=8bit", ["'cache.dtype'", "fused_8bit"]),  # the 8-bit cache needs the 8-bit kernel
        ("checkpoint.stop_traceback_s=-1", ["'checkpoint.stop_traceback_s'", ">= 0"]),
    ],
)
def test_errors_name_the_key(override, must_contain):
    with pytest.raises(C.ConfigError) as e:
        C.load(overrides=[override])
    for s in must_contain:
        assert s in str(e.value), str(e.value)


@pytest.mark.timeout(30)
def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(C.ConfigError, match="mapping"):
        C.load(bad)
    with pytest.raises(C.ConfigError, match="key=value"):
        C.load(overrides=["attention.d_c"])


@pytest.mark.timeout(30)
def test_save_roundtrip_is_atomic_and_loadable(tmp_path):
    cfg = C.load(overrides=["model.name=tiny", "attention.d_c=20"])
    out = tmp_path / "run" / "config.yaml"
    C.save(cfg, out)
    assert C.load(out) == cfg
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp files left


@pytest.mark.timeout(60)
def test_cli_exits_2_naming_the_key():
    r = subprocess.run([sys.executable, "-m", "vmla_train.cli", "info", str(ROOT / "configs/tiny.yaml"), "attention.dc=3"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "attention.dc" in r.stderr and "attention.d_c" in r.stderr
