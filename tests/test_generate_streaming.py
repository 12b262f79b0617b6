"""`generate.stream`: frames leave as each chunk finishes. ``mp4``: a growing fragmented '<file>.partial.mp4' that
decodes mid-run (checked from the per-chunk hook), removed at the end, with the final mp4 frame for frame the
non-streaming one; ``pipe``: raw rgb24 on stdout, byte for byte the decoded frames, every log line on stderr."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch

from conftest import tiny_generate_inputs

from vmla_train import generate as G
from vmla_train import schedule, wan
from vmla_train.rollout import sample_video
from vmla_train.student_io import load_student

CHUNKS = 3


def _frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture
def tiny(tmp_path):
    cfg, ckpt = tiny_generate_inputs(tmp_path, "a red fox\n", 1, negative=True)
    seconds = G.chunk_first_frame(cfg, CHUNKS) / cfg.video.fps
    overrides = [f"generate.seconds={seconds}", f"generate.vae={tmp_path / 'vae'}",
                 f"generate.embeddings={tmp_path / 'emb.safetensors'}", "schedule.denoising_steps=[1000,500]",
                 "runtime.progress=false", "runtime.device=cpu"]
    return ckpt, overrides, tmp_path


def _load(ckpt, overrides):
    student, cfg = load_student(ckpt, overrides, device=torch.device("cpu"), dtype=torch.float32)
    vae = wan.load_vae(cfg.generate.vae, device=torch.device("cpu"), dtype=torch.float32)
    return student.eval(), cfg, vae, G.TextSource(cfg, ["a red fox"], torch.device("cpu"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overlap", [False, True])
def test_growing_mp4_plays_mid_run_and_the_final_mp4_is_the_plain_one(tiny, overlap):
    ckpt, overrides, tmp = tiny
    # lossless x264: decoded frames are the frames written, whatever the encoder's threads decide (at crf 18 two runs
    # of one command may differ by a few levels)
    overrides = [*overrides, "generate.crf=0"]
    student, cfg, vae, text = _load(ckpt, overrides)
    plain = G.generate(student, cfg, ["a red fox"], text, vae, tmp / "plain", progress=False)
    # generate.overlap: the decode and the writes of a chunk run on the output worker while the next one denoises
    student, cfg, vae, text = _load(ckpt, [*overrides, "generate.stream=mp4", f"generate.overlap={overlap}"])
    seen: list[list[np.ndarray]] = []

    def after_chunk(i: int, paths) -> None:
        partial = G.partial_path(paths[0])
        assert partial.name == "a red fox-0.mp4.partial.mp4" and not paths[0].exists()
        seen.append(_frames(partial))
        # every frame written so far but the newest, which the muxer writes when the next one comes
        assert len(seen[-1]) == G.chunk_first_frame(cfg, i + 1) - 1, f"chunk {i}"

    streamed = G.generate(student, cfg, ["a red fox"], text, vae, tmp / "stream", progress=False,
                          after_chunk=after_chunk)
    assert len(seen) == CHUNKS and len(seen[0]) > 0
    final = _frames(streamed[0])
    assert [p.name for p in streamed] == [p.name for p in plain]
    assert sorted(p.name for p in (tmp / "stream").iterdir()) == ["a red fox-0.mp4", G.MANIFEST_NAME]
    reference = _frames(plain[0])
    assert len(final) == len(reference) == G.chunk_first_frame(cfg, CHUNKS)
    assert all(np.array_equal(a, b) for a, b in zip(final, reference))
    # what the growing copy showed mid-run is the video's beginning (its own low-latency encode, lossless here)
    for i, partial in enumerate(seen):
        assert all(np.array_equal(a, b) for a, b in zip(partial, final)), f"chunk {i}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overlap", [False, True])
def test_a_run_that_fails_mid_video_leaves_no_growing_copy(tiny, overlap):
    ckpt, overrides, tmp = tiny
    student, cfg, vae, text = _load(ckpt, [*overrides, "generate.stream=mp4", f"generate.overlap={overlap}"])
    grown = []

    def fail_after_first_chunk(i: int, paths) -> None:
        grown.append(G.partial_path(paths[0]).stat().st_size)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        G.generate(student, cfg, ["a red fox"], text, vae, tmp / "out", progress=False,
                   after_chunk=fail_after_first_chunk)
    assert grown and grown[0] > 0  # the growing copy existed mid-run ...
    leftovers = [p.name for p in (tmp / "out").iterdir()] if (tmp / "out").exists() else []
    assert not [n for n in leftovers if n.endswith(".mp4")], leftovers  # ... and neither it nor a final mp4 is left


@pytest.mark.timeout(60)
def test_a_file_at_the_growing_copys_name_is_refused(tiny, capsys):
    ckpt, overrides, tmp = tiny
    out = tmp / "out"
    out.mkdir()
    stray = G.partial_path(out / "a red fox-0.mp4")
    stray.write_bytes(b"not ours")
    args = [str(ckpt), str(tmp / "prompts.txt"), *overrides, f"generate.out_dir={out}"]
    assert G.main([*args, "generate.stream=mp4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and stray.name in err and "exists" in err
    assert stray.read_bytes() == b"not ours" and sorted(p.name for p in out.iterdir()) == [stray.name]
    assert G.main(args) == 0  # without streaming that name is not written: no conflict
    assert stray.read_bytes() == b"not ours"


@pytest.mark.timeout(120)
def test_pipe_carries_the_decoded_frames_and_logs_go_to_stderr(tiny, capsysbinary):
    ckpt, overrides, tmp = tiny
    args = [str(ckpt), str(tmp / "prompts.txt"), *overrides, f"generate.out_dir={tmp / 'out'}", "generate.stream=pipe",
            "generate.guidance_scale=2.0"]
    assert G.main(args) == 0
    captured = capsysbinary.readouterr()
    student, cfg, vae, text = _load(ckpt, args[2:])
    v = cfg.video
    # the reference: the same rollout, decoded chunk by chunk as generate does, without any writer
    model = G.GuidedStudent(student, text.negative(), cfg.generate.guidance_scale)
    decoder, frames = G.StreamingDecoder(vae), []
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    sample_video(model, text.prompt(0), G.latent_frames_for(cfg), steps,
                 generator=torch.Generator().manual_seed(cfg.runtime.seed), keep=False,
                 on_chunk=lambda i, x0: frames.append(G.rgb_frames(decoder(x0)[0])))
    expected = np.concatenate(frames)
    assert expected.shape == (G.chunk_first_frame(cfg, CHUNKS), v.height, v.width, 3)
    assert captured.out == expected.tobytes()
    err = captured.err.decode()
    assert "vmla-generate:" in err and f"-video_size {v.width}x{v.height} -framerate {v.fps}" in err
    assert str(tmp / "out" / "a red fox-0.mp4") in err  # the written paths, printed on stderr
    assert len(_frames(tmp / "out" / "a red fox-0.mp4")) == len(expected)  # the mp4 is still written


@pytest.mark.timeout(10)
def test_a_closed_pipe_stops_the_frames_not_the_run(capsys):
    class Closed(io.BytesIO):
        def write(self, b):
            raise BrokenPipeError

    raw = G.RawFrames(Closed())
    frames = np.zeros((2, 4, 6, 3), np.uint8)
    raw.write(frames)
    raw.write(frames)
    assert not raw.open and capsys.readouterr().err.count("stdout was closed") == 1
    sink = io.BytesIO()
    G.RawFrames(sink).write(frames)
    assert sink.getvalue() == frames.tobytes()


@pytest.mark.timeout(60)
def test_stream_settings_are_checked(tiny, capsys):
    ckpt, overrides, tmp = tiny
    args = [str(ckpt), str(tmp / "prompts.txt"), *overrides, f"generate.out_dir={tmp / 'out'}"]
    for extra, key in ((["generate.stream=mkv"], "generate.stream"),
                       (["generate.stream=pipe", "generate.batch_size=2", "generate.samples_per_prompt=2"],
                        "generate.batch_size")):
        assert G.main([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and key in err, err
    assert not (tmp / "out").exists()


@pytest.mark.timeout(30)
def test_overlapped_output_runs_chunks_in_order_off_the_callers_thread():
    import threading

    seen, release, started = [], threading.Event(), threading.Event()

    def consume(i: int, x: torch.Tensor) -> None:
        started.set()
        release.wait(10)
        seen.append((i, x.clone(), threading.current_thread().name))

    out = G.OverlappedOutput(consume, torch.device("cpu"), depth=2)
    x = torch.zeros(2)
    out.submit(0, x)
    assert started.wait(5)  # chunk 0 is being consumed and blocks there ...
    x += 1  # ... the caller goes on (the rollout reuses its buffers): chunk 0 keeps its snapshot
    out.submit(1, x)
    assert seen == []  # submit did not wait for consume
    release.set()
    out.finish()
    assert [i for i, _, _ in seen] == [0, 1]
    assert [x.tolist() for _, x, _ in seen] == [[0.0, 0.0], [1.0, 1.0]]
    assert {name for _, _, name in seen} == {"vmla-generate-output"}
    out.finish()  # twice is harmless


@pytest.mark.timeout(30)
def test_overlapped_output_raises_a_consumers_failure_in_the_caller():
    def consume(i: int, x: torch.Tensor) -> None:
        if i == 1:
            raise RuntimeError(f"disk full at chunk {i}")

    out = G.OverlappedOutput(consume, torch.device("cpu"))
    for i in range(2):
        out.submit(i, torch.zeros(1))
    with pytest.raises(RuntimeError, match="disk full at chunk 1"):
        for i in range(2, 50):  # a later submit or the final wait raises it
            out.submit(i, torch.zeros(1))
        out.finish()
    with pytest.raises(RuntimeError, match="disk full"):
        out.finish()
