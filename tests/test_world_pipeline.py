"""The procedural world goes through the real pipeline end to end, in miniature, as a user runs it.

Every stage is the console command's own ``main`` on argv (what `vmla-data`, `vmla-train`, `vmla-convert` and
`vmla-generate` run), from a temporary folder that links the repository's `configs/` and `data_prep/`:

    vmla-data world -> world text encoder + codec (diffusers layout) -> vmla-data raw -> encode
    -> vmla-train fit configs/world/world-pretrain.yaml -> export -> vmla-convert --to diffusers (the teacher)
    -> vmla-convert (MLA student) -> adapt -> vmla-data ode-pairs -> ode_init
    -> self_forcing -> export --ema -> vmla-generate (a world prompt) -> decode -> world metrics

The configs are the world's real ones (configs/world/, data_prep/world.yaml) at the world's real geometry
(81 frames of 64x64 at 16 fps -> 21 latent frames of 8x8 = 7 chunks of 3); only widths and counts shrink,
through key=value overrides (MODEL, ODE, FIT, PREP): a two-layer DiT of width 24, three clips, two steps per
stage, an untrained codec and a one-layer text encoder. Nothing is trained to quality, so the metrics are
checked for being computed and in range, not for their values. About 15 s on one CPU thread. The second test
pins the configs to the geometry `vmla-data world` writes.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from vmla_train import config as C

ROOT = Path(__file__).resolve().parents[1]
NUM_CLIPS, STEPS = 3, 2  # world clips; optimizer steps per training stage
# Tiny widths of the `world` size (text_dim stays the world text encoder's width).
MODEL = ["model.dim=24", "model.num_heads=2", "model.num_layers=2", "model.ffn_dim=48", "model.freq_dim=32",
         "attention.d_c=12", "attention.d_r=12"]
CPU = ["runtime.device=cpu", "runtime.progress=false"]
ODE = ["prep.ode.num_steps=4", "prep.ode.keep_indices=[0,2,4]"]
FIT = [*MODEL, *CPU, f"train.num_steps={STEPS}", "train.global_batch_size=1",
       "data.batch_size=1", "data.num_workers=0", "strategy.precision=32-true", "logging.wandb_mode=disabled",
       f"checkpoint.every_n_steps={STEPS}", "logging.sample_every_n_steps=0", "validation.every_n_steps=0",
       "train.compile=''"]
PREP = [*MODEL, *CPU, *ODE, "prep.raw.num_workers=0", "prep.encode.decode_workers=1", "prep.ode.dtype=float32"]
PROMPT = "a small red circle drifts to the left quickly"


def _npy_shapes(shard: Path, suffix: str) -> list[tuple[int, ...]]:
    """Shapes of the ``*.<suffix>.npy`` members of a shard, in order."""
    with tarfile.open(shard) as tar:
        return [np.load(io.BytesIO(tar.extractfile(m).read())).shape
                for m in tar.getmembers() if m.name.endswith(f".{suffix}.npy")]


def _losses(run_dir: str, key: str) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def _run(main, argv: list[str], log: list[str]) -> None:
    """One console command (its ``main`` on ``argv``); exit status 0 expected."""
    t0 = time.perf_counter()
    rc = main(argv)
    log.append(f"{time.perf_counter() - t0:5.1f} s  {' '.join(argv)[:100]}")
    assert rc in (0, None), f"command failed (exit {rc}): {' '.join(argv)}"


@pytest.mark.timeout(120)
def test_world_runs_through_the_pipeline(tmp_path, monkeypatch, one_thread):
    from vmla_train.cli import main as train_main
    from vmla_train.convert import main as convert_main
    from vmla_train.dataprep.cli import main as data_main
    from vmla_train.dataprep.video import ClipSpec, decode_pyav, probe
    from vmla_train.generate import main as generate_main
    from vmla_train.world import metrics
    from vmla_train.world.captions import parse_prompt
    from vmla_train.world.codec import CodecConfig, build_codec
    from vmla_train.world.text import build_text_encoder, world_words

    for name in ("configs", "data_prep"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    log: list[str] = []
    cfg = C.load("configs/world/world-adapt.yaml", MODEL)
    v = cfg.video  # the world geometry, as the configs give it

    # 1. world clips as an OpenVid folder; the world's text encoder and codec in one diffusers-style folder
    _run(data_main, ["world", "data/world/clips", f"num_clips={NUM_CLIPS}", "num_heldout=2", f"height={v.height}",
                     f"width={v.width}", f"num_frames={v.num_frames}", f"fps={v.fps}", "workers=0", "progress=false"],
         log)
    models = tmp_path / "ckpt/world-models"
    build_text_encoder(models, world_words(), d_model=cfg.model.text_dim, num_layers=1, num_heads=2)
    build_codec(CodecConfig(base_dim=8, z_dim=cfg.model.in_channels)).save_pretrained(models / "vae")

    # 2. data: raw shards -> codec latents + text embeddings (the world data config, its paths as written)
    _run(data_main, ["raw", "data_prep/world.yaml", *PREP], log)
    _run(data_main, ["encode", "data_prep/world.yaml", *PREP], log)
    # every world clip passes the raw filters; its latents have the geometry the config derives
    latent = (v.latent_frames, cfg.model.in_channels, v.latent_height, v.latent_width)  # [F', C, h, w]
    assert _npy_shapes(Path("data/world/train/raw-000000.tar"), "latents") == [latent] * NUM_CLIPS

    # 3. the teacher: pretrain (mha, bidirectional; dropped captions see the negative prompt) -> export -> diffusers
    _run(data_main, ["negative-embedding", "data/world/negative.safetensors", "data_prep/world.yaml", *PREP], log)
    _run(train_main, ["fit", "configs/world/world-pretrain.yaml", *FIT, "runtime.run_dir=runs/world-pretrain",
                      "data.shards=data/world/train/raw-*.tar", "train.text_dropout=0.5"], log)
    _run(train_main, ["export", "runs/world-pretrain", "ckpt/world-teacher-student"], log)
    _run(convert_main, ["ckpt/world-teacher-student", "ckpt/world-teacher", "--to", "diffusers"], log)

    # 4. the MLA student: convert the teacher, adapt, ODE pairs from the teacher, ode_init
    _run(convert_main, ["ckpt/world-teacher", "ckpt/world-student-converted", "--config",
                        "configs/world/world-adapt.yaml", *MODEL, *CPU], log)
    _run(train_main, ["fit", "configs/world/world-adapt.yaml", *FIT, "runtime.run_dir=runs/world-adapt",
                      "train.student_path=ckpt/world-student-converted", "data.shards=data/world/train/raw-*.tar"], log)
    _run(train_main, ["export", "runs/world-adapt", "ckpt/world-student-adapt"], log)
    _run(data_main, ["ode-pairs", "data_prep/world.yaml", *PREP], log)
    _run(train_main, ["fit", "configs/world/world-ode_init.yaml", *FIT, *ODE, "runtime.run_dir=runs/world-ode_init",
                      "train.student_path=ckpt/world-student-adapt", "data.shards=data/world/ode/ode-*.tar"], log)
    _run(train_main, ["export", "runs/world-ode_init", "ckpt/world-student-ode"], log)
    keep = len(C.load("configs/world/world-ode_init.yaml", [*MODEL, *ODE]).prep.ode.keep_indices)
    assert _npy_shapes(Path("data/world/ode/ode-000000.tar"), "trajectory") == [(keep, *latent)] * NUM_CLIPS

    # 5. self_forcing against the teacher (critic from the teacher), then the EMA weights
    _run(train_main, ["fit", "configs/world/world-self_forcing.yaml", *FIT, "runtime.run_dir=runs/world-self_forcing",
                      "train.student_path=ckpt/world-student-ode", "train.teacher_path=ckpt/world-teacher",
                      "train.critic_path=ckpt/world-teacher", "data.shards=data/world/train/raw-*.tar",
                      "dmd.negative_embedding=data/world/negative.safetensors", "dmd.critic_steps_per_student_step=1",
                      "dmd.ema_start_step=0", "cache.dtype=float32"], log)
    _run(train_main, ["export", "runs/world-self_forcing", "ckpt/world-student-sf", "--ema"], log)

    # 6. generate one world prompt, decode it, score it against the parsed prompt
    Path("prompts.txt").write_text(PROMPT + "\n")
    seconds = v.latent_frames * v.vae_stride[0] / v.fps  # the clip's latent frames, whole chunks
    _run(generate_main, ["ckpt/world-student-sf", "prompts.txt", "generate.vae=ckpt/world-models",
                         "generate.text_encoder=ckpt/world-models", "generate.out_dir=samples",
                         f"generate.seconds={seconds}", "runtime.progress=false", "runtime.device=cpu"], log)
    print("\n".join(log))
    for run, key in (("pretrain", "loss/pretrain"), ("adapt", "loss/adapt"), ("ode_init", "loss/ode"),
                     ("self_forcing", "loss/dmd"), ("self_forcing", "loss/critic")):
        losses = _losses(f"runs/world-{run}", key)
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), (run, key, losses)
    student = C.load("ckpt/world-student-sf/config.yaml")
    assert (student.model.name, student.attention.kind) == ("world", C.AttentionKind.mla)
    videos = sorted(Path("samples").glob("*.mp4"))
    assert len(videos) == 1, videos
    data = videos[0].read_bytes()
    pr = probe(data)  # the whole clip: 1 + stride * (latent frames - 1) frames at the world's rate and size
    assert (pr.frames, pr.fps, pr.height, pr.width) == (v.num_frames, v.fps, v.height, v.width), pr
    frames = decode_pyav(data, ClipSpec(v.num_frames, float(v.fps), v.height, v.width), pr)  # uint8 [T, H, W, 3]
    assert frames.shape == (v.num_frames, v.height, v.width, 3) and frames.dtype == np.uint8
    per_chunk = v.chunk_frames * v.vae_stride[0]  # pixel frames per chunk; the first has a causal first latent
    result = metrics.evaluate(frames, parse_prompt(PROMPT), fps=v.fps, frames_per_chunk=per_chunk,
                              first_chunk_frames=1 + (v.chunk_frames - 1) * v.vae_stride[0])
    json.dumps(result)  # JSON-ready
    for key in ("adherence", "object_adherence", "identity", "motion_error", "physics_error", "drift_score"):
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    assert result["background"] >= 0 and result["chunk_jump"] >= 0 and np.isfinite(result["chunk_jump"])


@pytest.mark.timeout(120)
def test_a_codec_of_other_strides_is_named_until_the_config_derives_them(tmp_path, monkeypatch, capsys,
                                                                         one_thread):
    """A world codec 4x in space (three stages): encode refuses the default config's 8x in one line naming
    video.vae_stride and the override to pass; with it the latents have the derived geometry [F', C, H/4, W/4]."""
    from vmla_train.dataprep.cli import main as data_main
    from vmla_train.world.codec import CodecConfig, build_codec
    from vmla_train.world.text import build_text_encoder, world_words

    for name in ("configs", "data_prep"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    cfg = C.load("configs/world/world-adapt.yaml", MODEL)
    v = cfg.video
    _run(data_main, ["world", "data/world/clips", "num_clips=1", "num_heldout=1", "workers=0", "progress=false"], [])
    models = tmp_path / "ckpt/world-models"
    build_text_encoder(models, world_words(), d_model=cfg.model.text_dim, num_layers=1, num_heads=2)
    codec = CodecConfig(base_dim=8, dim_mult=[1, 2, 2], temperal_downsample=CodecConfig.wan_temporal(2),
                        z_dim=cfg.model.in_channels)
    build_codec(codec).save_pretrained(models / "vae")
    _run(data_main, ["raw", "data_prep/world.yaml", *PREP], [])
    capsys.readouterr()
    assert data_main(["encode", "data_prep/world.yaml", *PREP]) == 2
    # stderr also carries transformers' weight-loading bar
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and "video.vae_stride=[4,4,4]" in err[0] and "4x in space" in err[0], err
    assert not Path("data/world/train").exists() or not list(Path("data/world/train").glob("*.tar"))
    stride = [codec.temporal_stride, codec.spatial_stride, codec.spatial_stride]
    _run(data_main, ["encode", "data_prep/world.yaml", *PREP, f"video.vae_stride={stride}"], [])
    latent = (v.latent_frames, cfg.model.in_channels, v.height // stride[1], v.width // stride[2])
    assert _npy_shapes(Path("data/world/train/raw-000000.tar"), "latents") == [latent]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path, stage, kind", [
    ("configs/world/world-pretrain.yaml", "pretrain", "mha"), ("configs/world/world-adapt.yaml", "adapt", "mla"),
    ("configs/world/world-ode_init.yaml", "ode_init", "mla"),
    ("configs/world/world-self_forcing.yaml", "self_forcing", "mla"), ("configs/world/demo.yaml", "self_forcing", "mla"),
    ("configs/world/world-causal_cd.yaml", "causal_cd", "mla"),
    ("data_prep/world.yaml", None, "mla")])
def test_world_configs_hold_the_world_geometry(path, stage, kind):
    """Each world config is at the geometry `vmla-data world` writes by default and reads the world text encoder."""
    import inspect

    from vmla_train.world.openvid import WorldDataConfig
    from vmla_train.world.text import build_text_encoder

    cfg, world = C.load(ROOT / path), WorldDataConfig()
    v = cfg.video
    assert (v.num_frames, v.height, v.width, v.fps) == (world.num_frames, world.height, world.width, world.fps)
    assert (cfg.model.name, cfg.attention.kind.value) == ("world", kind)
    assert stage is None or cfg.train.stage.value == stage
    assert cfg.model.text_dim == inspect.signature(build_text_encoder).parameters["d_model"].default
    # Wan's strides and patch: 81 frames of 64x64 -> 21 latent frames of 8x8 -> 16 tokens each, 7 chunks of 3
    assert (v.latent_frames, v.latent_height, v.latent_width, cfg.tokens_per_frame, v.chunk_frames) == (21, 8, 8, 16, 3)
