"""World clips as an OpenVid-format folder: `vmla-data world` -> the real `vmla-data raw` (and `encode`
with tiny models) -> decoded clips equal the rendered frames within codec tolerance; CSV columns, ground
truth files, refusing foreign folders, resuming after a lost clip."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vmla_train import config as C
from vmla_train.dataprep import cli
from vmla_train.dataprep.openvid import COLUMNS, sample_key
from vmla_train.dataprep.testing import save_tiny_models
from vmla_train.dataprep.video import ClipSpec, decode_decord, decode_pyav
from vmla_train.world import metrics
from vmla_train.world.captions import parse_prompt
from vmla_train.world.codec import clip_seed
from vmla_train.world.openvid import (CSV_NAME, HELDOUT_PROMPTS, HELDOUT_SCENES, MANIFEST, PROMPTS, SCENES, VIDEOS,
                                      clip_name, read_scenes)
from vmla_train.world.render import render
from vmla_train.world.scene import sample_scene, spec_of

NUM_CLIPS, FRAMES, SIZE, FPS = 6, 17, 64, 16
WORLD = [f"num_clips={NUM_CLIPS}", f"num_frames={FRAMES}", f"height={SIZE}", f"width={SIZE}", f"fps={FPS}", "seed=3",
         "split=1", "num_heldout=4", "workers=2", "progress=false"]
# the geometry the encode stage cuts clips to: the whole world clip (17 frames = 5 latent frames)
TINY = ["model.name=tiny", f"video.num_frames={FRAMES}", f"video.height={SIZE}", f"video.width={SIZE}",
        f"video.fps={FPS}", "video.chunk_frames=1", "runtime.progress=false"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "data"
    assert cli.main(["world", str(out), *WORLD]) == 0
    return out


@pytest.fixture(scope="module")
def raw_dir(world) -> Path:
    out = world.parent / "raw"
    assert cli.main(["raw", *TINY, f"prep.raw.csv=[{world / CSV_NAME}]", f"prep.raw.videos=[{world / VIDEOS}]",
                     f"prep.raw.output={out}", "prep.raw.maxcount=4", "prep.raw.num_workers=0"]) == 0
    return out


def _flat(frames: np.ndarray, r: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood holds one colour: bool [T, H, W]."""
    t, h, w, _ = frames.shape
    p = np.pad(frames, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    flat = np.ones((t, h, w), bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            flat &= (p[:, r + dy: r + dy + h, r + dx: r + dx + w] == frames).all(-1)
    return flat


def _shard_samples(folder: Path) -> dict[str, bytes]:
    samples = {}
    for tar in sorted(folder.glob("raw-*.tar")):
        with tarfile.open(tar) as tf:
            samples.update({m.name: tf.extractfile(m).read() for m in tf})
    return samples


@pytest.mark.timeout(60)
def test_folder_csv_and_ground_truth(world):
    with open(world / CSV_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    assert tuple(header[: len(COLUMNS)]) == COLUMNS and header[len(COLUMNS):] == ["height", "width"]
    assert [r["video"] for r in rows] == [clip_name(1, i) for i in range(NUM_CLIPS)]
    for r in rows:
        assert (world / VIDEOS / r["video"]).is_file()
        assert int(r["frame"]) == FRAMES and float(r["fps"]) == FPS and float(r["seconds"]) == FRAMES / FPS
        assert (int(r["height"]), int(r["width"])) == (SIZE, SIZE) and r["camera motion"] == "static"
        assert r["aesthetic score"] == r["motion score"] == r["temporal consistency score"] == ""  # not measured
    scenes = read_scenes(world / SCENES)
    prompts = (world / PROMPTS).read_text().splitlines()
    assert [c for c, _ in scenes] == prompts == [r["caption"] for r in rows]
    for i, (caption, scene) in enumerate(scenes):  # regenerable from (seed, split, index); caption describes it
        assert scene == sample_scene(clip_seed(3, 1, i), SIZE, SIZE, FPS)
        spec, truth = parse_prompt(caption), spec_of(scene)
        assert {(o.colour, o.shape, o.direction) for o in spec.objects} == \
            {(o.colour, o.shape, o.direction) for o in truth.objects}
    heldout = read_scenes(world / HELDOUT_SCENES)
    assert [c for c, _ in heldout] == (world / HELDOUT_PROMPTS).read_text().splitlines() and len(heldout) == 4
    assert heldout[0][1] == sample_scene(clip_seed(3, 1 + 1000, 0), SIZE, SIZE, FPS) != scenes[0][1]
    manifest = json.loads((world / MANIFEST).read_text())
    assert manifest["complete"] and manifest["settings"]["num_clips"] == NUM_CLIPS


@pytest.mark.timeout(90)
def test_raw_path_decodes_to_rendered_frames(world, raw_dir):
    index = json.loads((raw_dir / "index.json").read_text())
    assert index["num_samples"] == NUM_CLIPS and len(index["shards"]) == 2
    samples = _shard_samples(raw_dir)
    spec = ClipSpec(FRAMES, float(FPS), SIZE, SIZE)
    for i, (caption, scene) in enumerate(read_scenes(world / SCENES)):
        key = sample_key(clip_name(1, i))
        assert samples[f"{key}.txt"].decode() == caption
        meta = json.loads(samples[f"{key}.json"])
        assert meta["probe"]["frames"] == FRAMES and meta["probe"]["fps"] == FPS
        assert (meta["probe"]["height"], meta["probe"]["width"]) == (SIZE, SIZE)
        truth = render(scene, FRAMES)  # uint8 [T, H, W, 3]
        for decode in (decode_pyav, decode_decord):  # the encode stage's two decoders
            frames = decode(samples[f"{key}.mp4"], spec)
            assert frames.shape == truth.shape
            # away from colour edges (5x5 neighbourhood of one colour) the codec keeps every pixel close
            err = np.abs(frames.astype(np.int16) - truth.astype(np.int16))[_flat(truth)]
            assert err.mean() < 3.0 and err.max() <= 24, \
                f"{decode.__name__}: |error| mean {err.mean():.2f}, max {err.max()}"
            # 4:2:0 chroma blurs colour edges by a pixel or two; the palette segmentation still matches
            # the rendered one almost everywhere, and the metrics reach the same verdicts
            agree = (metrics.segment(frames) == metrics.segment(truth)).mean()
            assert agree > 0.97, f"{decode.__name__}: palette labels agree on {agree:.3f} of pixels"
            got, want = metrics.evaluate(frames, scene), metrics.evaluate(truth, scene)
            for k in ("adherence", "object_adherence", "identity"):
                assert got[k] == want[k], f"{decode.__name__}: {k} {got[k]} on the decoded clip, {want[k]} rendered"


@pytest.mark.timeout(120)
def test_encode_stage_reads_world_shards(world, raw_dir):
    cfg = C.load(None, TINY)
    models = save_tiny_models(world.parent / "wan", cfg.model)
    out = world.parent / "train"
    assert cli.main(["encode", *TINY, f"prep.encode.input={raw_dir}/raw-*.tar", f"prep.encode.output={out}",
                     f"prep.encode.vae={models}", f"prep.encode.text_encoder={models}", "prep.encode.decode_workers=1",
                     "prep.encode.device=cpu", "prep.encode.text_dtype=float32"]) == 0
    assert json.loads((out / "index.json").read_text())["num_samples"] == NUM_CLIPS


@pytest.mark.timeout(60)
def test_refuses_foreign_or_changed_folder(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's")
    assert cli.main(["world", str(foreign), *WORLD]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty" in err and str(foreign) in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # untouched
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["world", str(empty), "num_clips=1", "num_frames=3", "height=16", "width=16", "workers=0",
                     "progress=false"]) == 0
    assert cli.main(["world", str(empty), "num_clips=1", "num_frames=5", "height=16", "width=16", "workers=0",
                     "progress=false"]) == 2  # other settings: refused, naming them
    assert "num_frames" in capsys.readouterr().err
    assert cli.main(["world", str(empty), "num_clips=1", "num_frames=3", "height=16", "width=16", "workers=0",
                     "preset=medium", "progress=false"]) == 2  # another x264 preset writes other clips: refused
    assert "preset" in capsys.readouterr().err
    assert cli.main(["world", str(tmp_path / "x"), "preset=warpspeed"]) == 2  # not an x264 preset
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'preset'" in err and "veryfast" in err
    assert cli.main(["world", str(tmp_path / "x"), "num_clip=3"]) == 2  # unknown key
    assert cli.main(["world", str(tmp_path / "x"), "height=33"]) == 2  # odd size
    assert not (tmp_path / "x").exists()


@pytest.mark.timeout(60)
def test_resume_after_losing_a_clip(world):
    videos = world / VIDEOS
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in videos.glob("*.mp4")}
    lost = clip_name(1, 2)
    (videos / lost).unlink()
    (videos / f".{clip_name(1, 4)}.tmp-999999999.mp4").write_bytes(b"half a clip from a killed run")
    csv_before = (world / CSV_NAME).read_text()
    assert cli.main(["world", str(world), *WORLD]) == 0
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in videos.glob("*.mp4")}
    assert sorted(after) == sorted(before) and not list(videos.glob(".*"))
    assert after[lost][0] == before[lost][0]  # regenerated bit for bit
    assert all(after[n] == before[n] for n in before if n != lost)  # the others untouched
    manifest = json.loads((world / MANIFEST).read_text())
    assert manifest["rendered_this_run"] == 1 and manifest["resumed"]
    assert (world / CSV_NAME).read_text() == csv_before
