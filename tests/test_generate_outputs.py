"""What `vmla-generate` leaves in its output folder: one distinct file per prompt and sample (duplicate
prompts and prompts sharing their first 200 bytes included) and a manifest naming each file's full prompt,
index and seed; existing files refused before anything loads; killed runs' partial files removed; the
printed length is the length written. `vmla-world eval` pairs the files with prompts through the manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_generate_inputs

from vmla_train import config as C
from vmla_train import generate as G
from vmla_train.dataprep.video import Mp4Writer, _host_tag
from vmla_train.world import evaluate as E

LONG = "a very long prompt " * 20  # 380 bytes: cut at 200
PROMPTS = ["a red fox", "a red fox", "a red fox",  # repeated three times
           LONG + "ending one", LONG + "ending two",  # equal first 200 bytes
           "a dog/cat runs", "a dog cat runs", "a dog\\cat runs",  # equal once cleaned
           "waves at dusk", "snow falls", "a car drives by", "rain on a window"]
RUN = PROMPTS[1:7]  # one of each kind of clash, for the runs end to end


def _dead_pid() -> int:
    """The pid of a process that has exited (a child run to completion)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.timeout(10)
def test_video_names_are_distinct_and_stable():
    names = G.video_names(PROMPTS, 2)
    flat = [n for row in names for n in row]
    assert len(flat) == len(set(flat)) == 2 * len(PROMPTS)
    # plain VBench names where the prompt fits and is unique; repeats continue the index
    assert [names[i] for i in range(3)] == [["a red fox-0.mp4", "a red fox-1.mp4"], ["a red fox-2.mp4", "a red fox-3.mp4"],
                                            ["a red fox-4.mp4", "a red fox-5.mp4"]]
    assert names[6][0] == "a dog cat runs-0.mp4" and names[8][0] == "waves at dusk-0.mp4"
    # cut prompts and prompts changed by cleaning carry the hash of the full prompt
    for i in (3, 4, 5, 7):
        assert names[i][0] == f"{G.video_stem(PROMPTS[i], tag=True)}-0.mp4"
        assert f"~{G.prompt_hash(PROMPTS[i])}-0.mp4" in names[i][0]
    # a cut prompt's name does not depend on the other prompts of the run
    assert G.video_names([PROMPTS[3]], 1) == [[names[3][0]]]
    assert all(len(n.encode()) < 230 for n in flat)


@pytest.mark.timeout(10)
def test_length_is_rounded_up_to_whole_chunks():
    cfg = C.load(None, ["generate.seconds=0.01"])
    v = cfg.video
    assert G.latent_frames_for(cfg) == v.chunk_frames
    assert G.video_frames_for(cfg, v.chunk_frames) == 1 + v.vae_stride[0] * (v.chunk_frames - 1)
    one_more = (v.chunk_frames + 1) * v.vae_stride[0] / v.fps  # one latent frame past a chunk -> two chunks
    assert G.latent_frames_for(C.load(None, [f"generate.seconds={one_more}"])) == 2 * v.chunk_frames
    exact = 2 * v.chunk_frames * v.vae_stride[0] / v.fps
    assert G.latent_frames_for(C.load(None, [f"generate.seconds={exact}"])) == 2 * v.chunk_frames
    line = G.length_line(cfg)
    frames = G.video_frames_for(cfg, v.chunk_frames)
    assert f"{v.chunk_frames} latent frames = {frames} video frames = {frames / v.fps:.2f} s" in line
    assert "asked for 0.01 s" in line


@pytest.mark.timeout(60)
def test_the_same_frames_encode_to_the_same_bytes(tmp_path):
    """Mp4Writer is reproducible byte for byte (with x264's macroblock-tree rate control, eight encodes of this
    clip in one process gave five different files), so a rerun rewrites a lost file exactly."""
    from vmla_train.world.render import render
    from vmla_train.world.scene import sample_scene

    frames = np.asarray(render(sample_scene(5, 64, 64, 16), 81))
    encodes = set()
    for i in range(4):
        with Mp4Writer(tmp_path / f"{i}.mp4", 16, crf=10) as w:
            w.write(frames)
        encodes.add((tmp_path / f"{i}.mp4").read_bytes())
    assert len(encodes) == 1


@pytest.mark.timeout(10)
def test_remove_stale_keeps_live_and_foreign_writers(tmp_path):
    here, dead = _host_tag(), _dead_pid()
    other = "0" * 8 if here != "0" * 8 else "1" * 8
    files = {"dead": f".a-0.mp4.tmp-{here}-{dead}.mp4", "old": f".b-0.mp4.tmp-{dead}.mp4",
             "live": f".c-0.mp4.tmp-{here}-{os.getpid()}.mp4", "foreign": f".d-0.mp4.tmp-{other}-{dead}.mp4",
             "video": "e-0.mp4"}
    for name in files.values():
        (tmp_path / name).write_bytes(b"x")
    removed = Mp4Writer.remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([files["dead"], files["old"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([files["live"], files["foreign"], files["video"]])
    # the writer's own temporary name is one that remove_stale recognises (and keeps while it runs)
    w = Mp4Writer(tmp_path / "f-0.mp4", fps=16)
    assert Mp4Writer.TMP_RE.match(w.tmp.name) and Mp4Writer.remove_stale(tmp_path) == []
    w.abort()


@pytest.fixture
def tiny(tmp_path):
    cfg, ckpt = tiny_generate_inputs(tmp_path, "\n".join(RUN) + "\n", len(RUN))
    args = [str(ckpt), str(tmp_path / "prompts.txt"), "generate.seconds=0.01", f"generate.vae={tmp_path / 'vae'}",
            f"generate.embeddings={tmp_path / 'emb.safetensors'}", f"generate.out_dir={tmp_path / 'out'}",
            "schedule.denoising_steps=[1000]", "runtime.progress=false"]
    return cfg, args, tmp_path / "out"


@pytest.mark.timeout(120)
def test_every_prompt_gets_its_file_and_manifest_entry(tiny, capsys):
    import av

    cfg, args, out = tiny
    out.mkdir()
    stale = out / f".{G.video_name(RUN[0], 0)}.tmp-{_host_tag()}-{_dead_pid()}.mp4"
    stale.write_bytes(b"half a video from a killed run")
    assert G.main(args) == 0
    printed = capsys.readouterr()
    assert stale.name in printed.err and not stale.exists()
    names = [row[0] for row in G.video_names(RUN, 1)]
    assert len(set(names)) == len(RUN)
    assert sorted(p.name for p in out.iterdir()) == sorted(names + [G.MANIFEST_NAME])
    manifest = json.loads((out / G.MANIFEST_NAME).read_text())["videos"]
    assert set(manifest) == set(names)
    for i, (prompt, name) in enumerate(zip(RUN, names)):
        assert manifest[name]["prompt"] == prompt
        assert manifest[name]["index"] == RUN[:i].count(prompt)
        assert manifest[name]["seed"] == cfg.runtime.seed + 1_000_003 * i
    # the length printed before starting is the length written
    frames = G.video_frames_for(cfg, cfg.video.chunk_frames)
    assert f"{frames} video frames" in printed.out
    with av.open(str(out / names[0])) as c:
        assert sum(1 for _ in c.decode(video=0)) == frames
    # run again: refused up front, one line naming the first file, nothing touched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert G.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names[0] in err and "exists" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.timeout(60)
def test_unreadable_manifest_is_refused(tiny, capsys):
    _, args, out = tiny
    out.mkdir()
    (out / G.MANIFEST_NAME).write_text("{not json")
    assert G.main(args) == 2
    err = capsys.readouterr().err
    assert G.MANIFEST_NAME in err and len(err.strip().splitlines()) == 1


@pytest.mark.timeout(10)
def test_world_eval_pairs_through_the_manifest(tmp_path):
    """Names that do not spell the prompt (cut, tagged) pair by the manifest's full prompt, in any order."""
    prompts = [LONG + "ending one", LONG + "ending two", "a dog/cat runs", "a dog cat runs"]
    rows = [(p, f"spec of {p[-10:]}") for p in prompts]  # pair_prompts only moves the targets
    names = [row[0] for row in G.video_names(prompts, 1)]
    videos = [tmp_path / n for n in names][::-1]
    for v in videos:
        v.write_bytes(b"")
    G.write_manifest(tmp_path / G.MANIFEST_NAME,
                     {n: {"prompt": p, "index": 0, "seed": 0, "batch_row": 0, "batch_size": 1} for n, p in zip(names, prompts)})
    assert E.pair_prompts(videos, rows, "p") == [spec for _, spec in rows][::-1]
    # without a manifest the plain names still pair; the tagged ones fall back to order
    (tmp_path / G.MANIFEST_NAME).unlink()
    assert E.pair_prompts([tmp_path / "a dog cat runs-0.mp4"], rows, "p") == [rows[3][1]]
    (tmp_path / G.MANIFEST_NAME).write_text("[]")
    with pytest.raises(E.InputError, match=G.MANIFEST_NAME):
        E.pair_prompts(videos, rows, "p")
