"""KV cache book-keeping, RoPE tables, and the foundation CLI (info, demo)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vmla_train import config as C
from vmla_train.config import PositionScheme
from vmla_train.kv_cache import KVCache
from vmla_train.rope import RopeSpec, Rotary, apply_rope, axis_pairs, rope_angles

ROOT = Path(__file__).resolve().parents[1]


def _cache(sinks=1, window=6, chunk=3, scheme=PositionScheme.absolute, tpf=2):
    return KVCache(num_layers=2, batch=1, tokens_per_frame=tpf, sink_frames=sinks, window_frames=window,
                   chunk_frames=chunk, widths={"c": (4,), "kr": (2,)}, position_scheme=scheme, dtype=torch.float32)


def _write_chunk(cache, first_value):
    step = cache.begin(cache.chunk_frames, write=True)
    n = cache.chunk_frames * cache.tokens_per_frame
    frames = torch.arange(first_value, first_value + cache.chunk_frames, dtype=torch.float32)
    c = frames.repeat_interleave(cache.tokens_per_frame)[None, :, None].expand(1, n, 4)
    for layer in range(cache.num_layers):
        cache.write(layer, step, c=c, kr=torch.zeros(1, n, 2))
    cache.commit(step)
    return step


@pytest.mark.timeout(30)
def test_memo_lives_until_the_next_write_commit_or_reset():
    """KVCache.memo (the kernel path's prefix key scale): reused by the forwards that read one cache state,
    recomputed after anything that can change the prefix, kept per layer."""
    cache = _cache()
    _write_chunk(cache, 0)
    calls = []

    def prefix_sum(layer):
        calls.append(layer)
        return cache.read(layer, cache.begin(1, write=False))["c"].sum()

    first = cache.memo(0, "s", lambda: prefix_sum(0))
    assert cache.memo(0, "s", lambda: prefix_sum(0)) is first and calls == [0]  # the denoising steps of a chunk
    cache.memo(1, "s", lambda: prefix_sum(1))
    assert calls == [0, 1]  # per layer
    step = cache.begin(cache.chunk_frames, write=True)
    n = cache.chunk_frames * cache.tokens_per_frame
    cache.write(0, step, c=torch.full((1, n, 4), 7.0), kr=torch.zeros(1, n, 2))
    assert cache.memo(0, "s", lambda: prefix_sum(0)) is not first and calls == [0, 1, 0]  # after its write
    cache.memo(1, "s", lambda: prefix_sum(1))
    assert calls == [0, 1, 0]  # layer 1 is not written yet: its prefix (read before its write) is unchanged
    cache.commit(step)
    after_commit = cache.memo(0, "s", lambda: prefix_sum(0))
    assert calls == [0, 1, 0, 0] and float(after_commit) != float(first)  # the prefix now holds the new frames
    cache.reset()
    cache.memo(0, "s", lambda: torch.zeros(()))
    assert cache.memo(0, "s", lambda: torch.ones(())) == 0  # a fresh state after the reset, then reused


@pytest.mark.timeout(30)
def test_ring_keeps_sinks_and_most_recent_frames():
    cache = _cache(sinks=1, window=6, chunk=3)  # 1 sink + ring of 3
    assert cache.num_slots == 4
    for first in (0, 3, 6, 9):
        _write_chunk(cache, first)
    # frames 0..11 written: sink 0 kept, ring holds 9, 10, 11
    assert sorted(cache.slot_frame) == [0, 9, 10, 11]
    held = cache.read(0, cache.begin(3, write=False))["c"][0, ::2, 0].tolist()
    assert sorted(held) == [0.0, 9.0, 10.0, 11.0]
    assert cache.next_frame == 12


@pytest.mark.timeout(30)
def test_denoising_steps_do_not_write_and_positions():
    cache = _cache(sinks=1, window=6, chunk=3, scheme=PositionScheme.absolute)
    _write_chunk(cache, 0)
    step = cache.begin(3, write=False)
    assert step.key_frame_pos.tolist() == [0, 1, 2, 3, 4, 5] and step.query_frame_pos.tolist() == [3, 4, 5]
    cache.commit(step)  # a non-writing step does not advance
    assert cache.next_frame == 3
    for first in (3, 6, 9):
        _write_chunk(cache, first)
    abs_step = cache.begin(3, write=False)
    assert sorted(abs_step.key_frame_pos.tolist()) == [0, 9, 10, 11, 12, 13, 14]
    cache.position_scheme = PositionScheme.relative
    rel_step = cache.begin(3, write=False)
    assert sorted(rel_step.key_frame_pos.tolist()) == list(range(7)) and rel_step.query_frame_pos.tolist() == [4, 5, 6]


@pytest.mark.timeout(30)
def test_cache_errors_and_reset():
    cache = _cache()
    with pytest.raises(ValueError, match="at most chunk_frames"):
        cache.begin(4, write=True)
    step = cache.begin(3, write=True)
    with pytest.raises(ValueError, match="expected shape"):
        cache.write(0, step, c=torch.zeros(1, 5, 4))
    with pytest.raises(ValueError, match="window_frames"):
        _cache(window=2, chunk=3)
    _write_chunk(cache, 0)
    cache.set_cross_kv(0, torch.zeros(1), torch.zeros(1))
    cache.reset(keep_cross=True)
    assert cache.next_frame == 0 and cache.cross_kv(0) is not None
    cache.reset()
    assert cache.cross_kv(0) is None


@pytest.mark.timeout(30)
def test_window_equal_to_chunk_keeps_only_sinks():
    cache = _cache(sinks=1, window=3, chunk=3)
    for first in (0, 3, 6):
        _write_chunk(cache, first)
    assert cache.slot_frame == [0] and cache.num_valid == 1


@pytest.mark.timeout(30)
def test_rope_split_matches_wan_and_rotates_pairs():
    assert axis_pairs(128) == (22, 21, 21)  # Wan's 44 / 42 / 42 values
    assert axis_pairs(64) == (12, 10, 10)
    spec = RopeSpec.for_head(128)
    ft, fh, fw = spec.frequencies()
    assert ft.dtype == torch.float64 and torch.allclose(ft[1], torch.tensor(10000 ** (-2 / 44), dtype=torch.float64))
    key = RopeSpec.for_key(128, 64)
    assert key.dim == 64 and key.frequencies()[0].tolist() == ft[:12].tolist()  # fastest pairs of each axis
    with pytest.raises(ValueError, match="pairs"):
        RopeSpec.for_key(12, 64)
    # relative property: <R(p)q, R(p')k> depends on p - p' only, also at large positions
    q, k = torch.randn(1, 1, 1, 128, dtype=torch.float64), torch.randn(1, 1, 1, 128, dtype=torch.float64)

    def dot(pq, pk):
        rq = Rotary.from_angles(rope_angles(spec, torch.tensor([pq]), 1, 1), torch.float64)
        rk = Rotary.from_angles(rope_angles(spec, torch.tensor([pk]), 1, 1), torch.float64)
        return (apply_rope(q, rq) * apply_rope(k, rk)).sum()

    assert torch.allclose(dot(5, 2), dot(5005, 5002), atol=1e-9)
    assert not torch.allclose(dot(5, 2), dot(5, 3))


@pytest.mark.timeout(60)
def test_info_prints_the_videomla_numbers():
    r = subprocess.run([sys.executable, "-m", "vmla_train.cli", "info", str(ROOT / "configs/videomla-1.3b.yaml")],
                       capture_output=True, text=True, check=True)
    line = next(l for l in r.stdout.splitlines() if l.startswith("values / token / layer"))
    assert line.split()[-2:] == ["3072", "224"]
    assert "-92.7 %" in r.stdout
    assert "1560 tokens" in r.stdout


@pytest.mark.timeout(120)
def test_demo_rollout_runs():
    from vmla_train.cli import run_demo

    cfg = C.load(ROOT / "configs/tiny.yaml", ["demo.num_chunks=3", "runtime.progress=false"])
    video, cache = run_demo(cfg)
    assert video.shape == (1, 9, 16, cfg.video.latent_height, cfg.video.latent_width)
    assert torch.isfinite(video).all() and video.std() > 0.1
    assert cache.next_frame == 9 and cache.num_valid == cache.num_slots  # the window rolled
