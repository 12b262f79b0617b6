"""vmla-generate on CPU: tiny student folder, tiny random Wan VAE, precomputed embeddings."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_generate_inputs

from vmla_train import config as C
from vmla_train import generate as G
from vmla_train import wan


def test_default_length_is_a_minute():
    cfg = C.load(None, [])
    assert G.latent_frames_for(cfg) == cfg.generate.seconds * cfg.video.fps // cfg.video.vae_stride[0] == 240


def test_video_name_vbench_style():
    assert G.video_name("a cat / on a mat", 3) == "a cat   on a mat-3.mp4"
    assert G.video_name("x" * 500, 0).endswith("-0.mp4") and len(G.video_name("x" * 500, 0)) < 220


@pytest.mark.timeout(60)
def test_streaming_decoder_equals_whole_decode():
    vae = wan.tiny_vae(seed=0)
    z = torch.randn(1, 7, 16, 4, 6)
    whole = wan.vae_decode(vae, z)
    dec = G.StreamingDecoder(vae)
    parts = [dec(z[:, :3]), dec(z[:, 3:6]), dec(z[:, 6:])]
    assert [p.shape[2] for p in parts] == [9, 12, 4]
    torch.testing.assert_close(torch.cat(parts, 2), whole, atol=1e-5, rtol=1e-5)


@pytest.fixture
def tiny_setup(tmp_path):
    cfg, ckpt = tiny_generate_inputs(tmp_path, "\na dog/cat runs\n", 1, negative=True)
    return cfg, ckpt, tmp_path


@pytest.mark.timeout(120)
def test_generate_cli_writes_mp4s(tiny_setup):
    import av

    cfg, ckpt, tmp = tiny_setup
    seconds = 9 * cfg.video.vae_stride[0] / cfg.video.fps  # 9 latent frames = 3 chunks: the window wraps
    args = [str(ckpt), str(tmp / "prompts.txt"), f"generate.seconds={seconds}", f"generate.vae={tmp / 'vae'}",
            f"generate.embeddings={tmp / 'emb.safetensors'}", f"generate.out_dir={tmp / 'out'}",
            "generate.samples_per_prompt=2", "generate.batch_size=2", "generate.guidance_scale=2.0",
            "schedule.denoising_steps=[1000,500]", "runtime.progress=false"]
    assert G.main(args) == 0
    files = sorted(p.name for p in (tmp / "out").glob("*.mp4"))
    assert files == ["a dog cat runs-0.mp4", "a dog cat runs-1.mp4"]
    with av.open(str(tmp / "out" / files[0])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 1 + 4 * (9 - 1)
    assert frames[0].shape == (cfg.video.height, cfg.video.width, 3)
    # Samples of one prompt differ (own noise); the same seed reproduces the video.
    with av.open(str(tmp / "out" / files[1])) as c:
        other = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert any((a != b).any() for a, b in zip(frames, other))


def test_generate_rejects_missing_inputs(tiny_setup, capsys):
    cfg, ckpt, tmp = tiny_setup
    assert G.main([str(ckpt), str(tmp / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    assert G.main([str(ckpt), str(tmp / "prompts.txt"), "generate.seconds=-1"]) == 2
    assert "generate.seconds" in capsys.readouterr().err
