"""Prompt switching mid-video: a rollout that switches prompt at chunk k equals, chunk for chunk, one built by
hand (k chunks with prompt A; the cache emptied and the cache pass re-run over the window's clean frames with
prompt B; the rest with B), guided or not; without re-caching it equals a rollout that only swaps the text; the
clean frames kept for re-caching stay within the window; prompt scripts are read strictly and map their times
to chunk boundaries from the config; a one-segment script is plain generation."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch

from conftest import tiny_cfg, tiny_generate_inputs

from vmla_train import generate as G
from vmla_train import schedule
from vmla_train.rollout import CleanFrames, PromptSwitch, sample_video
from vmla_train.student import WanStudent

CHUNKS, SWITCH = 5, 3  # the window (6 frames) has wrapped by chunk 3: the re-cached frames are not frames 0..n


def _setup(*overrides: str, guided: bool = False):
    cfg = tiny_cfg(*overrides)  # two layers: the second layer's cache entries depend on the text
    torch.manual_seed(0)
    student = WanStudent(cfg).eval()
    text_a, text_b, negative = torch.randn(3, 1, 8, cfg.model.text_dim).unbind(0)
    model = G.GuidedStudent(student, negative[:, :5], 3.0) if guided else student
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    return cfg, model, text_a, text_b, steps


def _switched(cfg, model, text_a, text_b, steps, recache: bool, chunks: int = CHUNKS, at: int = SWITCH):
    return sample_video(model, text_a, chunks * cfg.video.chunk_frames, steps, generator=torch.Generator().manual_seed(1),
                        switches=[PromptSwitch(at, text_b)], recache=recache)


def _by_hand(cfg, model, text_a, text_b, steps, recache: bool, chunks: int = CHUNKS, at: int = SWITCH):
    """k chunks with A; then (recache) the cache emptied and the cache pass (t = 0, write_cache) re-run with B over
    the frames a window + sinks cache holds (the sinks and the window's last window - chunk frames, from the
    config), one forward per chunk they came from, or (no recache) only the cross-attention K/V dropped; then the
    remaining chunks with B on the same cache and noise generator."""
    v, c = cfg.video, cfg.cache
    gen = torch.Generator().manual_seed(1)
    cache = model.new_cache(text_a.shape[0])
    head = sample_video(model, text_a, at * v.chunk_frames, steps, generator=gen, cache=cache)
    if recache:
        n = at * v.chunk_frames  # latent frames so far (= cache frames: the tiny model's temporal patch is 1)
        ring = c.window_frames - v.chunk_frames
        kept = sorted(set(range(min(c.sink_frames, n))) | set(range(max(n - ring, c.sink_frames), n)))
        cache.reset()
        for chunk in range(at):
            frames = [f for f in kept if f // v.chunk_frames == chunk]
            if frames:
                model(head[:, frames], torch.zeros(head.shape[0], len(frames)), text_b, cache=cache, write_cache=True)
    else:
        cache.cross = [None] * cache.num_layers
    tail = sample_video(model, text_b, (chunks - at) * v.chunk_frames, steps, generator=gen, cache=cache)
    return torch.cat([head, tail], 1)


def _chunks(cfg, x: torch.Tensor) -> list[torch.Tensor]:
    return list(x.split(cfg.video.chunk_frames, 1))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overrides", [
    (),  # 1 sink, window 6: held frames {0, 6, 7, 8} at the switch
    ("cache.sink_frames=2", "cache.window_frames=7", "cache.position_scheme=absolute"),  # a chunk split by eviction
    ("attention.kind=mha",),
], ids=["mla", "mla-absolute-split", "mha"])
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_switch_equals_hand_built_recache(overrides, guided):
    cfg, model, text_a, text_b, steps = _setup(*overrides, guided=guided)
    ours = _switched(cfg, model, text_a, text_b, steps, recache=True)
    ref = _by_hand(cfg, model, text_a, text_b, steps, recache=True)
    assert len(_chunks(cfg, ours)) == CHUNKS
    for i, (a, b) in enumerate(zip(_chunks(cfg, ours), _chunks(cfg, ref))):
        assert torch.equal(a, b), f"chunk {i}"
    # the first chunks are prompt A's alone: equal to a rollout that never switches
    plain = sample_video(model, text_a, CHUNKS * cfg.video.chunk_frames, steps, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours[:, : SWITCH * cfg.video.chunk_frames], plain[:, : SWITCH * cfg.video.chunk_frames])
    assert not torch.equal(ours[:, SWITCH * cfg.video.chunk_frames :], plain[:, SWITCH * cfg.video.chunk_frames :])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_without_recache_only_the_text_changes(guided):
    cfg, model, text_a, text_b, steps = _setup(guided=guided)
    kept = _switched(cfg, model, text_a, text_b, steps, recache=False)
    ref = _by_hand(cfg, model, text_a, text_b, steps, recache=False)
    for i, (a, b) in enumerate(zip(_chunks(cfg, kept), _chunks(cfg, ref))):
        assert torch.equal(a, b), f"chunk {i}"
    recached = _switched(cfg, model, text_a, text_b, steps, recache=True)
    f = SWITCH * cfg.video.chunk_frames
    assert torch.equal(kept[:, :f], recached[:, :f])
    for i in range(SWITCH, CHUNKS):  # every chunk after the switch differs
        assert not torch.equal(_chunks(cfg, kept)[i], _chunks(cfg, recached)[i]), f"chunk {i}"


@pytest.mark.timeout(60)
def test_recache_to_the_same_prompt_before_the_window_wraps_changes_nothing():
    """Before any frame is evicted the re-cache replays exactly the cache passes that built the cache."""
    cfg, model, text_a, _, steps = _setup()
    at = 1  # 3 frames held of 1 sink + 3 ring slots: none evicted yet
    same = _switched(cfg, model, text_a, text_a, steps, recache=True, chunks=3, at=at)
    plain = sample_video(model, text_a, 3 * cfg.video.chunk_frames, steps, generator=torch.Generator().manual_seed(1))
    assert torch.equal(same, plain)


@pytest.mark.timeout(60)
def test_clean_frames_stay_within_the_window():
    cfg, model, text_a, text_b, steps = _setup()
    v, c = cfg.video, cfg.cache
    sizes = []
    for chunks in (3, 8):
        clean, cache = CleanFrames(), model.new_cache(1)
        out = sample_video(model, text_a, chunks * v.chunk_frames, steps, generator=torch.Generator().manual_seed(1),
                           cache=cache, switches=[PromptSwitch(2, text_b)], clean=clean)
        sizes.append(clean.nbytes())
        held = clean.held()
        # exactly the cache's frames (renumbered from the switch on: sinks, then the window), in time order
        assert [f for f, _ in held] == sorted(f for f in cache.slot_frame if f >= 0)
        # their latents are the video's last window - chunk frames after the sinks
        n = chunks * v.chunk_frames
        ring = out[:, n - (c.window_frames - v.chunk_frames):]
        assert torch.equal(torch.cat([lat for _, lat in held[c.sink_frames:]], 1), ring)
        assert torch.equal(torch.cat([lat for _, lat in held[: c.sink_frames]], 1), out[:, : c.sink_frames])
    per_frame = v.latent_height * v.latent_width * cfg.model.in_channels * 4  # float32
    assert sizes[0] == sizes[1] == (c.sink_frames + c.window_frames - v.chunk_frames) * per_frame


# ----------------------------------------------------------------------------------------------
# Prompt scripts
# ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_prompt_script_reads_and_maps_to_chunk_boundaries(tmp_path):
    cfg = tiny_cfg("generate.seconds=4")  # 16 fps, 4x temporal stride, chunks of 3 latent frames = 12 video frames
    v = cfg.video
    first = G.chunk_first_frame(cfg, 1)  # the first video frame of chunk 1 (9: latent frame 0 decodes to 1 frame)
    assert first == G.video_frames_for(cfg, v.chunk_frames)
    at = first / v.fps
    f = tmp_path / "walk.txt"
    f.write_text(f"# a walk\n0\ta street at dawn\n\n{at}  a market  \n{at + 1e-3} rain\n{at + 2e-3} hail\n{2 * at + 1} night\n99 never\n")
    script = G.read_prompt_script(f)
    assert [(s.start, s.prompt, s.line) for s in script.segments] == [
        (0.0, "a street at dawn", 2), (at, "a market", 4), (at + 1e-3, "rain", 5), (at + 2e-3, "hail", 6),
        (2 * at + 1, "night", 7), (99.0, "never", 8)]
    assert script.name == "walk"
    assert G.switch_chunk(cfg, 0) == 0
    assert G.switch_chunk(cfg, at) == 1  # exactly on a boundary: that chunk
    assert G.switch_chunk(cfg, at + 1e-3) == 2  # just after: the next boundary
    assert G.switch_chunk(cfg, 1e-3) == 1
    chunk_s = v.chunk_frames * v.vae_stride[0] / v.fps
    for s in (0.3, 1.0, 1.7):  # the boundary at or after s, and no earlier one is
        c = G.switch_chunk(cfg, s)
        assert G.chunk_first_frame(cfg, c) / v.fps >= s > G.chunk_first_frame(cfg, c - 1) / v.fps
        assert G.chunk_first_frame(cfg, c) / v.fps - s < chunk_s
    plan, warnings = G.switch_plan(cfg, script)
    chunks = G.latent_frames_for(cfg) // v.chunk_frames
    # 'rain' shares its boundary with 'hail' (the later wins), 'never' starts after the end
    assert plan == [(0, 0), (1, 1), (2, 3), (G.switch_chunk(cfg, 2 * at + 1), 4)] and plan[-1][0] < chunks
    assert len(warnings) == 2 and "line 5" in warnings[0] and "line 8" in warnings[1]


BAD_SCRIPTS = {
    "1 a cat\n": "line 1: the first segment must start at 0",
    "0 a cat\n2 a dog\n2 a fox\n": "line 3: start 2 s is not after",
    "0 a cat\n1.5 a dog\n1 a fox\n": "line 3: start 1 s is not after",
    "0 a cat\nsoon a dog\n": "line 2: start 'soon' is not a number",
    "0 a cat\n3\n": "line 2: expected 'START_SECONDS",
    "0 a cat\n-1 a dog\n": "line 2: start '-1' is not a time",
    "0 a cat\nnan a dog\n": "line 2: start 'nan' is not a time",
    "# only a comment\n\n": "has no segments",
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("text", list(BAD_SCRIPTS), ids=range(len(BAD_SCRIPTS)))
def test_bad_prompt_scripts_are_one_line_errors(tmp_path, capsys, text):
    f = tmp_path / "script.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=BAD_SCRIPTS[text]):
        G.read_prompt_script(f)
    _, ckpt = tiny_generate_inputs(tmp_path, "a cat\n", 1)
    assert G.main([str(ckpt), "--prompt-script", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(f) in err and BAD_SCRIPTS[text] in err


@pytest.mark.timeout(30)
def test_prompt_script_command_line_errors(tmp_path, capsys):
    _, ckpt = tiny_generate_inputs(tmp_path, "a cat\n", 1)
    (tmp_path / "s.txt").write_text("0 a cat\n")
    for argv, says in (([str(ckpt), "--prompt-script", str(tmp_path / "none.txt")], "none.txt' does not exist"),
                       ([str(ckpt), "--prompt-script", str(tmp_path)], "is a folder"),
                       ([str(ckpt), str(tmp_path / "prompts.txt"), "--prompt-script", str(tmp_path / "s.txt")],
                        "not both"),
                       ([str(ckpt)], "--prompt-script")):
        assert G.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err


def _frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.mark.timeout(120)
def test_one_segment_script_is_plain_generation_and_switches_run_end_to_end(tmp_path):
    cfg, ckpt = tiny_generate_inputs(tmp_path, "a red fox\n", 1, negative=True)
    seconds = G.chunk_first_frame(cfg, 3) / cfg.video.fps  # 3 chunks
    common = [f"generate.seconds={seconds}", f"generate.vae={tmp_path / 'vae'}", "generate.guidance_scale=2.0",
              "generate.crf=0",  # lossless: decoded frames are the frames written, whatever x264's threads decide
              f"generate.embeddings={tmp_path / 'emb.safetensors'}", "schedule.denoising_steps=[1000,500]",
              "runtime.progress=false"]
    assert G.main([str(ckpt), str(tmp_path / "prompts.txt"), *common, f"generate.out_dir={tmp_path / 'plain'}"]) == 0
    (tmp_path / "fox.txt").write_text("0\ta red fox\n")
    assert G.main([str(ckpt), "--prompt-script", str(tmp_path / "fox.txt"), *common,
                   f"generate.out_dir={tmp_path / 'script'}"]) == 0
    plain, script = _frames(tmp_path / "plain" / "a red fox-0.mp4"), _frames(tmp_path / "script" / "fox-0.mp4")
    assert len(plain) == G.video_frames_for(cfg, 3 * cfg.video.chunk_frames)
    assert len(plain) == len(script) and all(np.array_equal(a, b) for a, b in zip(plain, script))
    entry = json.loads((tmp_path / "script" / G.MANIFEST_NAME).read_text())["videos"]["fox-0.mp4"]
    assert entry["script"] == [{"start": 0.0, "prompt": "a red fox", "chunk": 0, "frame": 0}]
    assert entry["seed"] == cfg.runtime.seed and entry["recache"] is True

    # two segments, switching at chunk 2: the embeddings file has a row per segment; the video differs from chunk 2 on
    from safetensors.torch import load_file, save_file

    emb = load_file(str(tmp_path / "emb.safetensors"))
    save_file({"prompt_embeds": torch.cat([emb["prompt_embeds"], torch.randn_like(emb["prompt_embeds"])]),
               "negative_embeds": emb["negative_embeds"]}, str(tmp_path / "emb2.safetensors"))
    at = G.chunk_first_frame(cfg, 2) / cfg.video.fps
    (tmp_path / "fox.txt").write_text(f"0\ta red fox\n{at}\ta grey wolf\n")
    common = [f"generate.embeddings={tmp_path / 'emb2.safetensors'}" if c.startswith("generate.embeddings=") else c
              for c in common]
    assert G.main([str(ckpt), "--prompt-script", str(tmp_path / "fox.txt"), *common,
                   f"generate.out_dir={tmp_path / 'switch'}"]) == 0
    switched = _frames(tmp_path / "switch" / "fox-0.mp4")
    boundary = G.chunk_first_frame(cfg, 2)
    assert len(switched) == len(plain)
    assert all(np.array_equal(a, b) for a, b in zip(switched[:boundary], plain[:boundary]))  # the VAE is causal
    assert not any(np.array_equal(a, b) for a, b in zip(switched[boundary:], plain[boundary:]))
    entry = json.loads((tmp_path / "switch" / G.MANIFEST_NAME).read_text())["videos"]["fox-0.mp4"]
    assert [s["chunk"] for s in entry["script"]] == [0, 2] and [s["frame"] for s in entry["script"]] == [0, boundary]
