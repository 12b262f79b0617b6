"""Data preparation end to end on small real inputs: OpenVid-format CSV + mp4s (folder, zip, split zip)
-> `vmla-data raw` -> `vmla-data encode` (2 simulated ranks, resume after a kill) -> `vmla-data ode-pairs`
-> the training loader; decoders, rejects, zip-slip safety, rank environment."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vmla_train import config as C
from vmla_train.data import build_loader, decode_array, scan_tar
from vmla_train.dataprep import cli
from vmla_train.dataprep.common import dist_env
from vmla_train.dataprep.openvid import COLUMNS, SplitFile, index_clips, safe_name, sample_key
from vmla_train.dataprep.testing import make_mp4, save_tiny_models
from vmla_train.dataprep.video import ClipSpec, Reject, clip_indices, decode_decord, decode_pyav, probe

TINY = ["model.name=tiny", "video.num_frames=9", "runtime.progress=false"]  # clips of 9 frames @ 16 fps = 0.5 s


def _rejects(folder: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in (folder / "rejects.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["reason"], []).append(r)
    return out


def _tar_keys(path: Path) -> list[str]:
    return list(scan_tar(str(path)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Clips, archives, the CSV and tiny models (the clip spec is 9 frames @ 16 fps: 0.5 s)."""
    root = tmp_path_factory.mktemp("openvid")
    clips = root / "videos"
    clips.mkdir()
    good = {  # name -> (frames, h, w, fps): different sizes and rates, all >= 2 s
        "walk_0001.mp4": (40, 72, 100, 16), "city.scene_02.mp4": (52, 64, 112, 24), "ocean_3.mp4": (36, 80, 96, 16)}
    for i, (name, spec) in enumerate(good.items()):
        (clips / name).write_bytes(make_mp4(*spec, seed=i))
    (clips / "short_1.mp4").write_bytes(make_mp4(6, 64, 96, 16, seed=7))  # 0.375 s
    full = make_mp4(40, 64, 96, 16, seed=8)
    (clips / "corrupt_1.mp4").write_bytes(full[: len(full) // 2])  # truncated: moov atom at the end is gone
    (clips / "empty_1.mp4").write_bytes(b"")
    liar = make_mp4(40, 64, 96, 16, seed=13, faststart=True)  # index first: the cut copy still reports 40 frames
    (clips / "liar_1.mp4").write_bytes(liar[: int(len(liar) * 0.6)])
    with zipfile.ZipFile(root / "OpenVid_part0.zip", "w") as z:
        z.writestr("OpenVid_part0/zipped_1.mp4", make_mp4(40, 64, 96, 16, seed=9))
        z.writestr("OpenVid_part0/zipped_2.mp4", make_mp4(44, 96, 64, 20, seed=10))
        z.writestr("../evil.mp4", make_mp4(40, 64, 96, 16, seed=11))  # zip-slip name: never used
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("split_1.mp4", make_mp4(40, 64, 96, 16, seed=12))
    data = buf.getvalue()
    (root / "OpenVid_part1_partaa").write_bytes(data[: len(data) // 2])  # `split -b` halves of one zip
    (root / "OpenVid_part1_partab").write_bytes(data[len(data) // 2:])
    rows = [(n, f"a camera pans over the {n.split('_')[0]}", 5.0) for n in good] + [
        ("zipped_1.mp4", "a dog running in the forest", 5.0), ("zipped_2.mp4", "red car on a city street", 5.0),
        ("split_1.mp4", "snow on the mountain at night", 5.0), ("short_1.mp4", "too short clip", 5.0),
        ("corrupt_1.mp4", "a truncated clip", 5.0), ("empty_1.mp4", "an empty file", 5.0),
        ("liar_1.mp4", "reports more frames than it holds", 5.0),
        ("missing_1.mp4", "a clip nobody has", 5.0), ("ugly_1.mp4", "low aesthetic", 1.0),
        ("walk_0001.mp4", "duplicate row", 5.0), ("walk.0001.mp4", "same key as walk_0001", 5.0)]
    with open(root / "OpenVid-1M.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for name, cap, aes in rows:
            w.writerow([name, cap, aes, 1.5, 0.99, "pan_right", 40, 16.0, 2.5])
        w.writerow(["bad_row.mp4", "x", "not-a-number", 1, 1, "static", 1, 16, 2])
    cfg = C.load(None, TINY)
    models = save_tiny_models(root / "wan", cfg.model)
    return {"root": root, "models": models, "good": sorted([*good, "zipped_1.mp4", "zipped_2.mp4", "split_1.mp4"]),
            "raw_kept": 7}  # the good six + liar_1 (its header and first frame are fine: stage 2 finds it out)


def _raw(world, out: Path, *extra: str) -> int:
    r = world["root"]
    return cli.main(["raw", *TINY, f"prep.raw.csv=[{r}/OpenVid-1M.csv]",
                     f"prep.raw.videos=[{r}/videos,{r}/OpenVid_part0.zip,{r}/OpenVid_part1_part*]",
                     f"prep.raw.output={out}", "prep.raw.min_aesthetic=4.0", "prep.raw.min_seconds=0.5", "prep.raw.maxcount=4",
                     "prep.raw.num_workers=2", *extra])


def _encode(world, raw: Path, out: Path, *extra: str) -> int:
    m = world["models"]
    return cli.main(["encode", *TINY, f"prep.encode.input={raw}/raw-*.tar", f"prep.encode.output={out}",
                     f"prep.encode.vae={m}", f"prep.encode.text_encoder={m}", "prep.encode.decode_workers=1",
                     "prep.encode.device=cpu", "prep.encode.text_dtype=float32", *extra])


@pytest.fixture(scope="module")
def raw_dir(world):
    out = world["root"] / "raw"
    assert _raw(world, out) == 0
    return out


@pytest.mark.timeout(90)
def test_raw_shards(world, raw_dir):
    index = json.loads((raw_dir / "index.json").read_text())
    assert index["kind"] == "raw" and index["num_samples"] == world["raw_kept"] == 7
    keys, samples = [], {}
    for name, n in index["shards"].items():
        assert n <= 4 and len(_tar_keys(raw_dir / name)) == n
        with tarfile.open(raw_dir / name) as tf:
            for m in tf:
                samples[m.name] = tf.extractfile(m).read()
        keys += _tar_keys(raw_dir / name)
    assert sorted(keys) == sorted(sample_key(g) for g in [*world["good"], "liar_1.mp4"]) and all("." not in k for k in keys)
    # original bytes, caption, CSV columns + probe
    assert samples["walk_0001.mp4"] == (world["root"] / "videos" / "walk_0001.mp4").read_bytes()
    assert samples["city_scene_02.txt"].decode() == "a camera pans over the city.scene"
    meta = json.loads(samples["zipped_2.json"])
    assert meta["aesthetic score"] == 5.0 and meta["camera motion"] == "pan_right"
    assert meta["probe"]["width"] == 64 and meta["probe"]["height"] == 96 and meta["probe"]["fps"] == 20.0
    rej = _rejects(raw_dir)
    assert {r["video"] for r in rej["missing clip"]} == {"missing_1.mp4"}
    assert {r["video"] for r in rej["too short"]} == {"short_1.mp4"}
    assert {r["video"] for r in rej["unreadable mp4"]} == {"corrupt_1.mp4"}
    assert {r["video"] for r in rej["empty file"]} == {"empty_1.mp4"}
    assert len(rej["duplicate"]) == 1 and len(rej["duplicate key"]) == 1 and len(rej["bad csv row"]) == 1 and len(rej["low aesthetic score"]) == 1
    assert len(rej["unsafe zip member"]) == 1
    summary = json.loads((raw_dir / "summary.json").read_text())
    assert summary["kept"] == 7 and summary["failed"]["missing clip"] == 1 and summary["filtered"]["too short"] == 1
    # a re-run resumes: every chunk is done, nothing is rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in raw_dir.glob("*.tar")}
    assert _raw(world, raw_dir) == 0
    assert {p.name: p.stat().st_mtime_ns for p in raw_dir.glob("*.tar")} == mtimes
    assert json.loads((raw_dir / "summary.json").read_text())["shards_skipped"] == len(mtimes)
    # other settings into the same folder are refused, naming the setting
    assert _raw(world, raw_dir, "prep.raw.maxcount=2") == 1


@pytest.mark.timeout(120)
def test_encode_two_ranks_resume_and_loader(world, raw_dir):
    out = world["root"] / "train"
    for rank in (0, 1):  # two simulated ranks: shard i on rank i mod 2
        os.environ.update(RANK=str(rank), WORLD_SIZE="2")
        try:
            assert _encode(world, raw_dir, out) == 0
        finally:
            del os.environ["RANK"], os.environ["WORLD_SIZE"]
    raw_index = json.loads((raw_dir / "index.json").read_text())["shards"]
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["shards"]) == sorted(raw_index) and index["num_samples"] == 6
    assert [r["key"] for r in _rejects(out)["decode failed"]] == ["liar_1"]  # decord: frames missing
    cfg = C.load(None, TINY)
    v, m = cfg.video, cfg.model
    with tarfile.open(out / sorted(index["shards"])[0]) as tf:
        members = {x.name: tf.extractfile(x).read() for x in tf}
    key = sorted({n.split(".")[0] for n in members})[0]
    meta = json.loads(members[f"{key}.json"])
    lat = decode_array(members[f"{key}.latents.npy"], meta["dtype"])
    text = decode_array(members[f"{key}.text.npy"], meta["dtype"])
    assert lat.shape == (v.latent_frames, m.in_channels, v.latent_height, v.latent_width) and torch.isfinite(lat).all()
    assert text.shape == (meta["text_tokens"], m.text_dim) and text.abs().sum(-1).gt(0).all()
    assert np.load(io.BytesIO(members[f"{key}.latents.npy"])).dtype == np.float16
    # resume after a kill: one finished shard survives, one was mid-write (temp file, no final name)
    done, killed = sorted(index["shards"])[:2]
    keep_mtime = (out / done).stat().st_mtime_ns
    (out / killed).unlink()
    (out / f".{killed}.tmp").write_bytes(b"partial tar bytes")
    assert _encode(world, raw_dir, out) == 0
    assert (out / done).stat().st_mtime_ns == keep_mtime and not list(out.glob(".*.tmp"))
    assert len(_tar_keys(out / killed)) == json.loads((out / "index.json").read_text())["shards"][killed]
    assert json.loads((out / "index.json").read_text()) == index
    # the loader streams them: latents and prompts, one pass = every sample once
    lc = C.load(None, [*TINY, "data.source=shards", f"data.shards={out}/raw-*.tar", "data.batch_size=3", "data.num_workers=0"])
    batches = [next(build_loader(lc, "latents"))] 
    loader = build_loader(lc, "latents")
    caps = [c for _ in range(2) for c in next(loader).captions]
    assert len(set(caps)) == 6 and batches[0].latents.shape[1:] == lat.shape
    assert build_loader(lc, "prompts").__next__().captions == batches[0].captions


@pytest.mark.timeout(60)
def test_encode_rejects_timeout_and_pyav(world, raw_dir):
    out = world["root"] / "train_pyav"
    # at 3 fps a 9-frame clip spans 2.67 s: every (2.1-2.5 s) clip is too short for it
    assert _encode(world, raw_dir, out, "prep.encode.decoder=pyav", "video.fps=3") == 0
    assert len(_rejects(out)["too short"]) == 7 and json.loads((out / "index.json").read_text())["num_samples"] == 0
    out2 = world["root"] / "train_timeout"
    assert _encode(world, raw_dir, out2, "prep.encode.decode_timeout_s=0.001") == 0
    assert len(_rejects(out2)["decode timeout"]) == 7


@pytest.mark.timeout(90)
def test_ode_pairs_and_loader(world):
    m = world["models"]
    prompts = world["root"] / "prompts.txt"
    prompts.write_text("a cat walking\n\na dog on the street\nthe ocean at sunset\n")
    out = world["root"] / "ode"
    args = ["ode-pairs", *TINY, f"prep.ode.teacher={m}", f"prep.ode.text_encoder={m}", f"prep.ode.prompts_file={prompts}",
            f"prep.ode.output={out}", "prep.ode.num_steps=4", "prep.ode.keep_indices=[0,2,4]", "prep.ode.samples_per_shard=2",
            "prep.ode.device=cpu", "prep.ode.dtype=float32", "prep.ode.latent_dtype=bfloat16"]
    assert cli.main(args) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["shards"] == {"ode-000000.tar": 1, "ode-000001.tar": 2}
    assert [r["prompt_index"] for r in _rejects(out)["empty prompt"]] == [1]
    lc = C.load(None, [*TINY, "data.source=shards", f"data.shards={out}/ode-{{000000..000001}}.tar", "data.batch_size=3",
                       "data.num_workers=0", "prep.ode.num_steps=4", "prep.ode.keep_indices=[0,2,4]"])
    b = next(build_loader(lc, "ode"))
    assert sorted(b.captions) == ["a cat walking", "a dog on the street", "the ocean at sunset"]
    assert b.trajectory.shape[:2] == (3, 3) and b.timesteps.tolist() == pytest.approx([1000.0, 833.333, 0.0], abs=1e-2)
    assert torch.allclose(b.trajectory[:, 0], b.noise) and torch.allclose(b.trajectory[:, -1], b.clean)
    i = b.captions.index("a dog on the street")  # prompt 2: noise seeded with seed + 2
    cfg = C.load(None, TINY)
    shape = (cfg.video.latent_frames, cfg.model.in_channels, cfg.video.latent_height, cfg.video.latent_width)
    want = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).float()
    assert torch.equal(b.noise[i], want)
    mtimes = [p.stat().st_mtime_ns for p in sorted(out.glob("*.tar"))]
    assert cli.main(args) == 0 and [p.stat().st_mtime_ns for p in sorted(out.glob("*.tar"))] == mtimes  # resume


def test_decoders_agree_and_clamp():
    data = make_mp4(30, 72, 128, 15, seed=3)
    pr = probe(data)
    assert (pr.frames, pr.fps, pr.width, pr.height) == (30, 15.0, 128, 72)
    spec = ClipSpec(num_frames=9, fps=5.0, height=64, width=96)
    a, b = decode_decord(data, spec, pr), decode_pyav(data, spec, pr)
    assert a.shape == b.shape == (9, 64, 96, 3) and np.abs(a.astype(int) - b.astype(int)).mean() < 3
    assert clip_indices(30, 15.0, 9, 5.0) == [2, 5, 8, 11, 14, 17, 20, 23, 26]  # centred: 2 frames spare before
    assert max(clip_indices(30, 30.0, 30, 30.0)) == 29
    with pytest.raises(Reject, match="too short"):
        clip_indices(30, 15.0, 12, 5.0)
    liar = make_mp4(40, 64, 96, 16, seed=13, faststart=True)
    liar = liar[: int(len(liar) * 0.6)]
    assert probe(liar).frames == 40  # still reports every frame
    with pytest.raises(Reject, match="fewer frames than reported"):
        decode_pyav(liar, ClipSpec(9, 4.0, 64, 96))


def test_zip_slip_split_archive_and_keys(tmp_path):
    assert not safe_name("../x.mp4") and not safe_name("/abs.mp4") and not safe_name("a/../../b.mp4") and safe_name("a/b.mp4")
    assert sample_key("abc.def_1.mp4") == "abc_def_1"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("dir/a.mp4", b"A" * 5000)
        z.writestr("/etc/evil.mp4", b"x")
    data = buf.getvalue()
    for i in range(3):
        (tmp_path / f"OpenVid_part9_parta{'abc'[i]}").write_bytes(data[i * len(data) // 3: (i + 1) * len(data) // 3])
    f = SplitFile(sorted(str(p) for p in tmp_path.iterdir()))
    assert f.read() == data
    rejects: list = []
    idx = index_clips([str(tmp_path / "OpenVid_part9_part*")], rejects)
    assert list(idx) == ["a.mp4"] and idx["a.mp4"].member == "dir/a.mp4" and len(idx["a.mp4"].container) == 3
    assert [r.reason for r in rejects] == ["unsafe zip member"]
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"x")
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "link.mp4").symlink_to(outside)
    rejects = []
    assert index_clips([str(tmp_path / "clips")], rejects) == {} and rejects[0].reason == "unsafe path"


def test_rank_environment():
    assert dist_env({}) == (0, 1)
    assert dist_env({"RANK": "3", "WORLD_SIZE": "8", "SLURM_PROCID": "1"}) == (3, 8)
    assert dist_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert dist_env(env) == (1, 3)
    assert dist_env({**env, "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (3, 6)


def test_cli_errors_name_the_key(capsys):
    assert cli.main(["raw", *TINY, "prep.raw.maxcont=3"]) == 2
    assert "prep.raw.maxcount" in capsys.readouterr().err
    assert cli.main(["encode", *TINY]) == 1
    assert "prep.encode.input" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_prompts_file_loader_embeds_with_umt5(world, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat walking\n\nthe river at night\ncamera pans over the city\n")
    cfg = C.load(None, [*TINY, "data.source=prompts_file", f"data.prompts_file={prompts}",
                        f"data.text_encoder={world['models']}", "data.batch_size=3", "data.num_workers=0"])
    loader = build_loader(cfg, "prompts")
    b = next(loader)
    assert sorted(b.captions) == sorted(["a cat walking", "the river at night", "camera pans over the city"])
    assert b.text.shape == (3, cfg.model.text_len, cfg.model.text_dim) and b.text.dtype == torch.float32
    lengths = [len(c.split()) + 1 for c in b.captions]  # words + </s> with the word-level tokenizer
    assert b.text_mask.sum(1).tolist() == lengths and (b.text.abs().sum(-1) > 0).eq(b.text_mask).all()
    with pytest.raises(ValueError, match="prompts only"):
        build_loader(cfg, "latents")


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_slurm_array_encode(slurm_cluster, world, raw_dir, tmp_path):
    """slurm/data_encode.sbatch as a 2-task array on the local cluster (its GPU request removed)."""
    script = tmp_path / "data_encode.sbatch"
    src = (Path(__file__).parents[1] / "slurm" / "data_encode.sbatch").read_text()
    script.write_text("\n".join(l for l in src.splitlines() if "--gpus-per-task" not in l) + "\n")
    out = tmp_path / "train"
    m = world["models"]
    env = {**slurm_cluster.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = ["sbatch", "--wait", "--array=0-1", "--cpus-per-task=1", "--mem=1G", f"--output={tmp_path}/log-%a.txt",
           str(script), *TINY, f"prep.encode.input={raw_dir}/raw-*.tar", f"prep.encode.output={out}",
           f"prep.encode.vae={m}", f"prep.encode.text_encoder={m}", "prep.encode.device=cpu",
           "prep.encode.text_dtype=float32"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=220, cwd=tmp_path)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("log-*.txt")))
    assert r.returncode == 0, r.stdout + r.stderr + logs
    assert "encode: rank 0/2" in logs and "encode: rank 1/2" in logs, logs
    raw_index = json.loads((raw_dir / "index.json").read_text())["shards"]
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["shards"]) == sorted(raw_index) and index["num_samples"] == 6
