"""Wrong inputs to the command-line mains end in one line on stderr naming the thing and what to do, with
exit status 2, before anything heavy loads: wrong Wan model folders, shard patterns that match nothing,
a folder or the wrong shard kind, a missing negative-prompt embedding, a training run folder given to
vmla-generate, a CUDA device on a machine without one, a folder given as a config or prompts file; and
``vmla-train info | head -1`` ends quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
import torch

from vmla_train import cli, convert, parallel, wan
from vmla_train import config as C
from vmla_train import generate as G
from vmla_train.data import INDEX_NAME, check_shards
from vmla_train.dataprep import cli as data_cli
from vmla_train.dataprep.testing import save_tiny_models
from vmla_train.student import WanStudent
from vmla_train.student_io import CheckpointError, save_student

ROOT = Path(__file__).resolve().parents[1]
ADAPT = ROOT / "configs/adapt-debug.yaml"
SELF_FORCING = ROOT / "configs/self_forcing-debug.yaml"
TINY = ["model.name=tiny", "model.num_layers=1", "runtime.device=cpu"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny diffusers Wan pipeline folder, a stand-in of Wan's original layout, a student folder, a
    prompt file and a precomputed embeddings file."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("inputs")
    cfg = C.load(None, TINY)
    save_tiny_models(root / "pipe", cfg.model)
    orig = root / "orig"  # what Wan-AI/Wan2.1-T2V-1.3B ships: config.json of 'WanModel' and .pth files beside it
    orig.mkdir()
    (orig / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", "dim": 1536}))
    (orig / "Wan2.1_VAE.pth").write_bytes(b"\0")
    torch.manual_seed(0)
    save_student(WanStudent(cfg).state_dict(), cfg, root / "student")
    (root / "prompts.txt").write_text("a cat\n")
    save_file({"prompt_embeds": torch.randn(1, 4, cfg.model.text_dim)}, str(root / "emb.safetensors"))
    return root


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def _generate_args(root: Path, *overrides: str) -> list[str]:
    return [str(root / "student"), str(root / "prompts.txt"), f"generate.embeddings={root / 'emb.safetensors'}",
            f"generate.out_dir={root / 'out'}", "generate.seconds=0.5", "runtime.progress=false", *overrides]


# ----------------------------------------------------------------------------------------------
# 1. Wrong model folders: checked before loading, CheckpointError saying what was expected and found
# ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_loaders_take_pipeline_and_component_folders(folders):
    pipe = folders / "pipe"
    assert type(wan.load_vae(pipe)).__name__ == type(wan.load_vae(pipe / "vae")).__name__ == "AutoencoderKLWan"
    assert type(wan.load_wan_transformer(pipe / "transformer", dtype=torch.float32)).__name__ == "WanTransformer3DModel"
    tok, enc = wan.load_text_encoder(pipe, dtype=torch.float32)
    assert type(enc).__name__ == "UMT5EncoderModel" and len(tok("a cat").input_ids) > 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loader, given, found", [
    (wan.load_vae, "orig", "Wan's original (non-diffusers) checkpoint layout"),
    (wan.load_vae, "pipe/transformer", "a diffusers WanTransformer3DModel folder"),
    (wan.load_wan_transformer, "pipe/vae", "a diffusers AutoencoderKLWan folder"),
    (wan.load_wan_transformer, "orig", "Wan's original"),
    (wan.load_text_encoder, "pipe/vae", "a diffusers AutoencoderKLWan folder"),
    (wan.load_text_encoder, "pipe/tokenizer", "a tokenizer folder"),
    (wan.load_text_encoder, "nowhere", "does not exist"),
])
def test_wrong_folder_names_expected_and_found(folders, loader, given, found):
    with pytest.raises(CheckpointError, match="expected") as e:
        loader(folders / given)
    assert found in str(e.value) and str(folders / given) in str(e.value)


@pytest.mark.timeout(60)
def test_text_encoder_subfolder_points_to_its_pipeline(folders):
    # The pipeline's text_encoder/ has no tokenizer: the message names the folder that has both.
    with pytest.raises(CheckpointError, match=f"the pipeline folder '{folders / 'pipe'}' holds tokenizer/"):
        wan.load_text_encoder(folders / "pipe" / "text_encoder")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overrides, needles", [
    (["generate.vae={r}/orig"], ["generate.vae", "original (non-diffusers)", "Wan2.1-T2V-1.3B-Diffusers"]),
    (["generate.vae={r}/pipe/transformer"], ["generate.vae", "AutoencoderKLWan", "WanTransformer3DModel",
                                             "holds vae/"]),
    (["generate.vae={r}/pipe", "generate.text_encoder={r}/pipe/vae"],  # text_encoder wins over embeddings
     ["generate.text_encoder", "UMT5EncoderModel", "found a diffusers AutoencoderKLWan folder"]),
])
def test_generate_wrong_model_folder_exits_2(folders, capsys, overrides, needles):
    assert G.main(_generate_args(folders, *(o.format(r=folders) for o in overrides))) == 2
    _one_line_error(capsys, *needles)
    assert not (folders / "out").exists()


@pytest.mark.timeout(60)
def test_data_prep_wrong_text_encoder_exits_2(folders, capsys, tmp_path):
    out = tmp_path / "neg.safetensors"
    assert data_cli.main(["negative-embedding", str(out), *TINY, f"prep.encode.text_encoder={folders / 'pipe' / 'vae'}"]) == 2
    _one_line_error(capsys, "UMT5EncoderModel", "AutoencoderKLWan")
    assert not out.exists()


@pytest.mark.timeout(60)
def test_convert_given_a_vae_folder_exits_2(folders, capsys, tmp_path):
    assert convert.main([str(folders / "pipe" / "vae"), str(tmp_path / "out"), *TINY]) == 2
    _one_line_error(capsys, "unknown checkpoint layout")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# 2. Runtime input errors of fit and generate: one line, exit 2, before any process group
# ----------------------------------------------------------------------------------------------
def _tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, BytesIO(data))


@pytest.fixture()
def no_workers(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a process group was about to start")

    monkeypatch.setattr(parallel, "build_fabric", refuse)


@pytest.mark.timeout(30)
def test_fit_shards_matching_nothing_or_a_folder(tmp_path, capsys, no_workers):
    base = ["fit", str(ADAPT), f"runtime.run_dir={tmp_path / 'run'}", "data.source=shards"]
    assert cli.main([*base, f"data.shards={tmp_path}/none-*.tar"]) == 2
    _one_line_error(capsys, "config key 'data.shards'", "matches no files")
    assert cli.main([*base, f"data.shards={tmp_path}"]) == 2
    _one_line_error(capsys, "is a folder", f"data.shards='{tmp_path}/*.tar'")


@pytest.mark.timeout(30)
def test_fit_adapt_on_raw_or_ode_shards(tmp_path, capsys, no_workers):
    raw = tmp_path / "raw"
    raw.mkdir()
    _tar(raw / "raw-000000.tar", {"clip0": {"mp4": b"\0" * 64, "txt": b"a cat", "json": b"{}"}})
    (raw / INDEX_NAME).write_text(json.dumps({"kind": "raw", "shards": {"raw-000000.tar": 1}}))
    base = ["fit", str(ADAPT), f"runtime.run_dir={tmp_path / 'run'}", "data.source=shards"]
    assert cli.main([*base, f"data.shards={raw}/raw-000000.tar"]) == 2
    _one_line_error(capsys, "holds raw shards", "vmla-data raw", "latents loader", "vmla-data encode")
    ode = tmp_path / "ode"  # no index.json: the first sample's members tell
    ode.mkdir()
    _tar(ode / "ode-000000.tar", {"p0": {"noise.npy": b"\0", "trajectory.npy": b"\0", "clean.npy": b"\0",
                                         "text.npy": b"\0", "txt": b"a cat", "json": b"{}"}})
    assert cli.main([*base, f"data.shards={ode}/ode-000000.tar"]) == 2
    _one_line_error(capsys, "sample 'p0' has members", "'latents.npy'")
    assert check_shards(f"{ode}/ode-000000.tar", "prompts") == [f"{ode}/ode-000000.tar"]  # ODE shards serve prompts
    assert check_shards(f"{ode}/ode-000000.tar", "ode") == [f"{ode}/ode-000000.tar"]


@pytest.mark.timeout(30)
def test_fit_wrong_teacher_folder(folders, tmp_path, capsys, no_workers):
    assert cli.main(["fit", str(SELF_FORCING), f"runtime.run_dir={tmp_path / 'run'}",
                     f"train.teacher_path={folders / 'pipe' / 'vae'}"]) == 2
    _one_line_error(capsys, "train.teacher_path", "WanTransformer3DModel", "holds transformer/")


@pytest.mark.timeout(30)
def test_fit_missing_negative_embedding_file(tmp_path, capsys, no_workers):
    """The world teacher's config reads it (train.text_dropout); a path to nothing is named before any work."""
    neg = tmp_path / "negative.safetensors"
    assert cli.main(["fit", str(ROOT / "configs/world/world-pretrain.yaml"), f"runtime.run_dir={tmp_path / 'run'}",
                     "data.source=synthetic", "runtime.device=cpu", f"dmd.negative_embedding={neg}"]) == 2
    _one_line_error(capsys, "config key 'dmd.negative_embedding'", f"no file '{neg}'", "vmla-data negative-embedding")


@pytest.mark.timeout(30)
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu(folders, tmp_path, capsys, no_workers):
    want = ["config key 'runtime.device'", "no usable CUDA GPU", "runtime.device=auto"]
    assert cli.main(["fit", str(ADAPT), f"runtime.run_dir={tmp_path / 'run'}", "runtime.device=cuda"]) == 2
    _one_line_error(capsys, *want)
    assert cli.main(["demo-rollout", str(ADAPT), "runtime.device=cuda:0"]) == 2
    _one_line_error(capsys, *want)
    assert G.main(_generate_args(folders, f"generate.vae={folders / 'pipe'}", "runtime.device=cuda")) == 2
    _one_line_error(capsys, *want)
    with pytest.raises(C.ConfigError, match="config key 'runtime.device': expected auto, cpu, cuda or cuda:N, found 'gpu'"):
        C.resolve_device("gpu", "runtime.device")


@pytest.mark.timeout(30)
def test_folder_given_as_config_or_prompts_file(folders, tmp_path, capsys):
    assert cli.main(["info", str(folders / "student")]) == 2
    _one_line_error(capsys, "is a folder; expected a YAML file", f"'{folders / 'student' / 'config.yaml'}' is there")
    assert G.main([str(folders / "student"), str(tmp_path), f"generate.vae={folders / 'pipe'}"]) == 2
    _one_line_error(capsys, f"prompt file '{tmp_path}' is a folder", "one prompt per line")
    assert cli.main(["fit", str(ADAPT), f"runtime.run_dir={tmp_path / 'run'}", "train.stage=self_forcing",
                     "train.allow_random_roles=true", "data.source=prompts_file", f"data.prompts_file={tmp_path}",
                     f"data.text_encoder={folders / 'pipe'}"]) == 2
    _one_line_error(capsys, "data.prompts_file", "is a folder")


@pytest.mark.timeout(30)
def test_generate_from_a_run_folder_says_export_first(folders, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    for given in (run, run / "checkpoints" / "step-2"):
        assert G.main([str(given), str(folders / "prompts.txt"), f"generate.vae={folders / 'pipe'}"]) == 2
        _one_line_error(capsys, "is a training run folder", f"vmla-train export {run} OUT")


@pytest.mark.timeout(60)
def test_info_into_a_closed_pipe_exits_quietly():
    # The reader is gone before the first write (as `| head -1` can be): no traceback, no 'Exception ignored'.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-c", "from vmla_train.cli import entry; entry()", "info",
                               str(ROOT / "configs/tiny.yaml")], stdout=write_end, stderr=subprocess.PIPE,
                              cwd=ROOT, timeout=50)
    finally:
        os.close(write_end)
    assert proc.returncode == 1, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr and b"BrokenPipe" not in proc.stderr, proc.stderr.decode()
