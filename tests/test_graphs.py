"""Forwards replayed from CUDA graphs (``generate.graphs``, vmla_train/graphs.py) give the eager rollout, chunk for
chunk, bit for bit: in the steady state with a wrapped ring cache (every write pattern of the cache pass), with the
8-bit cache, across prompt switches with and without re-caching, with guidance.

CPU: the runner's book-keeping with simulated replays (``ChunkGraphs(simulate=True)``: a replay re-runs the
recorded forward on what the captured graph reads: the static step and RoPE tables, the static cross-attention K/V,
inputs and per-state values, the cache's buffers), the fused paths' kernels replaced by torch functions of the same
operands (the Triton interpreter takes minutes a rollout). Also: the RoPE tables and write slots fed to the replays
equal the eager ones step for step; a replayed forward makes no tensor from host data and reads no value back (a
CUDA capture refuses both); the config key and the CPU fallback. GPU (marked gpu): real graphs, bit for bit (the
kernels are the same), and no host synchronisation between the replays of a chunk."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_cfg, tiny_generate_inputs

from vmla_train import config as C
from vmla_train import generate as G
from vmla_train import graphs, schedule
from vmla_train.graphs import ChunkGraphs, cache_pass_patterns
from vmla_train.kv_cache import KVCache
from vmla_train.rollout import PromptSwitch, sample_video
from vmla_train.student import WanBlock, WanStudent

ROOT = Path(__file__).resolve().parents[1]
ON_GPU = torch.cuda.is_available()
# 6 tokens a frame; window 8 with 1 sink: a ring of 5 frames, chunks of 3 (5 write patterns); full from chunk 2
BASE = ["model.name=tiny", "video.height=32", "video.width=48", "cache.window_frames=8"]
CHUNKS, SWITCH = 10, 5
VARIANTS = {
    "mla-absorbed": ["attention.impl=absorbed"],
    "mla-fused": ["attention.impl=fused"],  # the per-state key scale (KVCache.memo): ``first`` and ``rest`` differ
    "mla-8bit": ["attention.impl=fused_8bit", "cache.dtype=8bit"],  # scales, requantisation, absolute-position keys
    "mha": ["attention.kind=mha"],
    "absolute-split": ["cache.sink_frames=2", "cache.window_frames=7", "cache.position_scheme=absolute"],  # ring 4
}
SWITCHES = {"none": None, "recache": True, "no-recache": False}


@pytest.fixture
def torch_kernels(monkeypatch):
    """The fused paths' kernels as torch functions of the same operands (the float references): the dispatch, the
    per-state values and the 8-bit cache around them run as on a GPU."""
    from vmla_train.kernels import dispatch
    from vmla_train.kernels import latent_attention as LA
    from vmla_train.kernels import latent_attention_fp8 as LA8

    def kernel16(q_lat, q_r, c_past, c_new, rho, s, scale, config=None):
        o, lse = LA.reference(q_lat, q_r, torch.cat([c_past, c_new], 1), rho, s, scale, dtype=torch.float32)
        return o.to(q_lat.dtype), lse

    def attend8(kernel, q, past8, new8, q_r, q_r_sink, sink_tokens=0):
        width = q.w_uk.shape[2] + q.groups * q_r.shape[3]
        keys = [k.dequantize(width) for k in (past8, new8) if k is not None]
        q_lat = torch.einsum("blhn,hnc->blhc", q.q_c.float(), q.w_uk.float())
        o, _ = LA8.reference8(q_lat, q_r, q_r_sink, torch.cat([k for k, _ in keys], 1),
                              torch.cat([c for _, c in keys], 1), q.scale, q.groups, sink_tokens, dtype=torch.float32)
        return o.to(q.q_c.dtype)

    monkeypatch.setattr(LA, "latent_attention", kernel16)
    monkeypatch.setattr(dispatch, "_attend8", attend8)


def _setup(*overrides: str, guided: bool = False, device: str = "cpu", dtype=torch.float32):
    cfg = tiny_cfg(*BASE, *overrides)
    torch.manual_seed(0)
    student = WanStudent(cfg).to(device=device, dtype=dtype).eval()
    text_a, text_b, negative = torch.randn(3, 1, 8, cfg.model.text_dim).to(device).unbind(0)
    model = G.GuidedStudent(student, negative[:, :5], 3.0) if guided else student
    return cfg, model, text_a, text_b


def _rollout(cfg, model, cache, text_a, text_b, recache: bool | None, chunks: int = CHUNKS) -> torch.Tensor:
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    switches = [] if recache is None else [PromptSwitch(SWITCH, text_b)]
    gen = torch.Generator(device=text_a.device).manual_seed(1)
    return sample_video(model, text_a, chunks * cfg.video.chunk_frames, steps, generator=gen, cache=cache,
                        switches=switches, recache=bool(recache))


def _assert_same_caches(a: KVCache, b: KVCache) -> None:
    assert (a.slot_frame, a.next_frame) == (b.slot_frame, b.next_frame)
    for name in a.buffers:
        assert torch.equal(a.buffers[name].float(), b.buffers[name].float()), name
    for name in a.scales:
        assert torch.equal(a.scales[name], b.scales[name]), name


def _check_against_eager(cfg, model, text_a, text_b, recache, simulate: bool) -> ChunkGraphs:
    eager_cache = model.new_cache(1)
    eager = _rollout(cfg, model, eager_cache, text_a, text_b, recache)
    runner = ChunkGraphs(model, simulate=simulate)
    cache = runner.new_cache(1)
    ours = _rollout(cfg, runner, cache, text_a, text_b, recache)
    for i, (a, b) in enumerate(zip(ours.split(cfg.video.chunk_frames, 1), eager.split(cfg.video.chunk_frames, 1))):
        assert torch.equal(a, b), f"chunk {i}: max difference {(a.float() - b.float()).abs().max().item():.3g}"
    _assert_same_caches(cache, eager_cache)
    return runner


def _expected_counts(cfg, cache: KVCache, rest: bool) -> dict[str, int]:
    """A rollout without switches: the chunks before the window is full run eagerly, then the first full chunk
    runs its first denoising step and its cache pass eagerly (warm-ups before their captures), the rest replay.
    Captured: ``first``, ``rest`` (``rest``: a graph of its own), a cache pass per write pattern."""
    fill = -(-cache.num_slots // cache.chunk_frames)  # chunks until the window is full
    forwards = len(schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)) + 1
    return {"eager": fill * forwards + 2, "replay": (CHUNKS - fill) * forwards - 2,
            "capture": 1 + rest + cache_pass_patterns(cache)}


# ----------------------------------------------------------------------------------------------
# CPU: simulated replays
# ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("switch", list(SWITCHES), ids=list(SWITCHES))
@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_simulated_replays_equal_eager_rollout(variant, switch, torch_kernels):
    """Chunk for chunk, bit for bit, and the cache left in the same state; without a switch the counts say which
    forwards replayed: all of a full window's but the two warm-ups, every write pattern captured once."""
    cfg, model, text_a, text_b = _setup(*VARIANTS[variant])
    runner = _check_against_eager(cfg, model, text_a, text_b, SWITCHES[switch], simulate=True)
    cache = runner.new_cache(1)
    if switch == "none":
        assert runner.counts == _expected_counts(cfg, cache, rest=True)  # (simulated: always a graph of its own)
    else:
        assert runner.counts["replay"] > 0
    memo = next(iter(runner._bound.values())).memo
    if variant == "mla-fused":  # the replays of ``rest`` read what ``first`` computed
        assert sorted(memo) == [(layer, "mla_key_scale") for layer in range(cfg.model.num_layers)]
    else:
        assert not memo


@pytest.mark.timeout(120)
@pytest.mark.parametrize("switch", ["recache", "no-recache"])
def test_simulated_replays_equal_eager_guided(switch, torch_kernels):
    """Classifier-free guidance (one doubled cache, the negative prompt in its first half) across a switch."""
    cfg, model, text_a, text_b = _setup(*VARIANTS["mla-fused"], guided=True)
    runner = _check_against_eager(cfg, model, text_a, text_b, SWITCHES[switch], simulate=True)
    assert runner.counts["replay"] > 0


@pytest.mark.timeout(120)
def test_graphs_serve_every_video_of_a_cache(torch_kernels):
    """``new_cache`` gives the same cache again, reset: the second video captures nothing and replays its first
    full chunk too (no warm-ups), with the eager result."""
    cfg, model, text_a, text_b = _setup(*VARIANTS["mla-fused"])
    runner = ChunkGraphs(model, simulate=True)
    first = _rollout(cfg, runner, runner.new_cache(1), text_a, text_b, None)
    counts = dict(runner.counts)
    cache = runner.new_cache(1)
    assert cache is runner.new_cache(1) and cache.next_frame == 0 and all(kv is None for kv in cache.cross)
    second = _rollout(cfg, runner, cache, text_b, text_a, None)
    assert torch.equal(first, _rollout(cfg, model, model.new_cache(1), text_a, text_b, None))
    assert torch.equal(second, _rollout(cfg, model, model.new_cache(1), text_b, text_a, None))
    assert runner.counts["capture"] == counts["capture"]
    assert runner.counts["replay"] - counts["replay"] == counts["replay"] + 2  # no warm-ups the second time


@pytest.mark.timeout(60)
def test_cache_pass_without_a_denoising_forward_in_its_state(torch_kernels):
    """A cache pass in a state no denoising forward has seen would read the previous state's per-state values
    (``first`` computes them): it runs eagerly, with the eager result."""
    cfg, model, text_a, text_b = _setup(*VARIANTS["mla-fused"])
    eager_cache, runner = model.new_cache(1), ChunkGraphs(model, simulate=True)
    cache = runner.new_cache(1)
    _rollout(cfg, model, eager_cache, text_a, text_b, None)
    _rollout(cfg, runner, cache, text_a, text_b, None)
    x0 = torch.randn(1, cfg.video.chunk_frames, cfg.model.in_channels, cfg.video.latent_height, cfg.video.latent_width)
    zeros = torch.zeros(1, cfg.video.chunk_frames)
    eager = runner.counts["eager"]
    with torch.no_grad():
        for _ in range(2):  # two passes in a row: the second's state is new too
            assert torch.equal(runner(x0, zeros, text_a, cache=cache, write_cache=True),
                               model(x0, zeros, text_a, cache=eager_cache, write_cache=True))
    assert runner.counts["eager"] == eager + 2
    _assert_same_caches(cache, eager_cache)


class _Spy:
    """What the first layer of every forward is given: RoPE tables, positions read, write slots, and whether
    the forward ran on a graph's view of the cache."""

    def __init__(self, monkeypatch):
        self.seen: list[tuple] = []
        block_forward = WanBlock.forward

        def spy(block, x, mod, text, inp, layer, frames):
            if layer == 0:
                s = inp.step
                rot = [t.clone() for r in (inp.q_rot, inp.k_rot, inp.rot_abs) if r is not None for t in (r.cos, r.sin)]
                self.seen.append((rot, s.read_tokens, s.write, s.write_src, s.write_slots,
                                  isinstance(inp.cache, graphs._GraphView)))
            return block_forward(block, x, mod, text, inp, layer, frames)

        monkeypatch.setattr(WanBlock, "forward", spy)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", ["mla-absorbed", "mla-8bit", "absolute-split"])
def test_fed_tables_equal_eager_step_for_step(variant, monkeypatch, torch_kernels):
    """Over a long rollout that wraps the ring three times, the positions' RoPE tables (queries, every key, the
    chunk at absolute positions for the 8-bit cache), the keys read and the slots written that the replayed
    forwards are given equal what the eager forwards compute, forward for forward."""
    cfg, model, text_a, text_b = _setup(*VARIANTS[variant])
    spy = _Spy(monkeypatch)
    chunks = 3 * (cfg.cache.window_frames + cfg.cache.sink_frames) // cfg.video.chunk_frames + 2
    _rollout(cfg, model, model.new_cache(1), text_a, text_b, None, chunks=chunks)
    eager, spy.seen = spy.seen, []
    runner = ChunkGraphs(model, simulate=True)
    _rollout(cfg, runner, runner.new_cache(1), text_a, text_b, None, chunks=chunks)
    fed = spy.seen
    assert len(fed) == len(eager) and sum(f[-1] for f in fed) == runner.counts["replay"] > len(fed) // 2
    for i, (a, b) in enumerate(zip(fed, eager)):
        assert len(a[0]) == len(b[0]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0])), f"forward {i}: tables"
        assert a[1:5] == b[1:5], f"forward {i}: read {a[1]} written {a[3:5]}, eager {b[1]} {b[3:5]}"
    patterns = {(f[3], f[4]) for f in fed if f[2] and f[-1]}
    assert len(patterns) == cache_pass_patterns(runner.new_cache(1))


class _HostData(TorchDispatchMode):
    """Ops that make a tensor from host data (torch.tensor: a host-to-device copy on a GPU) or read a value
    back (.item(): a sync): neither may run in a CUDA capture."""

    OPS = (torch.ops.aten.lift_fresh.default, torch.ops.aten._local_scalar_dense.default)

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", ["mla-fused", "mla-8bit", "mha"])
def test_replayed_forward_makes_no_tensor_from_host_data(variant, monkeypatch, torch_kernels):
    cfg, model, text_a, text_b = _setup(*VARIANTS[variant])
    mode = _HostData()
    replay = graphs._Graph.replay

    def watched(graph):
        with mode:
            return replay(graph)

    monkeypatch.setattr(graphs._Graph, "replay", watched)
    runner = ChunkGraphs(model, simulate=True)
    _rollout(cfg, runner, runner.new_cache(1), text_a, text_b, True)
    assert runner.counts["replay"] > 0 and mode.seen == []
    with mode:  # the check can fail: an eager cached forward plans its step from host-side positions
        _rollout(cfg, model, model.new_cache(1), text_a, text_b, None, chunks=1)
    assert "aten.lift_fresh.default" in mode.seen


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sinks,window,chunk", [(1, 8, 3), (2, 7, 3), (3, 21, 3), (1, 4, 3), (1, 5, 3), (0, 3, 3),
                                                (0, 10, 2), (2, 11, 4)])
def test_cache_pass_patterns_are_the_write_patterns_of_a_full_window(sinks, window, chunk):
    cache = KVCache(num_layers=1, batch=1, tokens_per_frame=1, sink_frames=sinks, window_frames=window,
                    chunk_frames=chunk, widths={"c": (1,)})
    seen = set()
    for _ in range(4 * (window + sinks)):
        step = cache.begin(chunk, write=True)
        if cache.num_valid == cache.num_slots:
            seen.add((step.write_src, step.write_slots))
        cache.commit(step)
    assert len(seen) == cache_pass_patterns(cache)


@pytest.mark.timeout(60)
def test_graphs_off_cuda_run_eagerly():
    """Without ``simulate``, a runner on the CPU runs every forward eagerly: the eager rollout, nothing captured."""
    cfg, model, text_a, text_b = _setup()
    runner = _check_against_eager(cfg, model, text_a, text_b, True, simulate=False)
    assert runner.counts["replay"] == runner.counts["capture"] == 0 and runner.counts["eager"] > 0


# ----------------------------------------------------------------------------------------------
# CPU: the config key, vmla-generate's fallback, the benchmark
# ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_config_key():
    assert C.load(None, []).generate.graphs is True
    assert C.load(None, ["generate.graphs=false"]).generate.graphs is False
    assert C.load(None, ["generate.graphs=true"]).generate.graphs is True
    with pytest.raises(C.ConfigError) as e:
        C.load(None, ["generate.graphs=maybe"])
    assert str(e.value) == "config key 'generate.graphs': expected true or false, found 'maybe'"


@pytest.mark.timeout(120)
def test_generate_on_cpu_falls_back_with_a_line(tmp_path, capsys):
    """generate.graphs=true on a CPU: one line says the forwards run eagerly; the video is the one without it."""
    import av

    cfg, ckpt = tiny_generate_inputs(tmp_path, "a dog runs\n", 1)
    seconds = 6 * cfg.video.vae_stride[0] / cfg.video.fps
    args = [str(ckpt), str(tmp_path / "prompts.txt"), f"generate.seconds={seconds}", f"generate.vae={tmp_path / 'vae'}",
            f"generate.embeddings={tmp_path / 'emb.safetensors'}", "schedule.denoising_steps=[1000,500]",
            "runtime.progress=false", "runtime.device=cpu"]
    frames = {}
    for graphs_on in (True, False):
        out = tmp_path / f"out-{graphs_on}"
        assert G.main([*args, f"generate.out_dir={out}", f"generate.graphs={str(graphs_on).lower()}"]) == 0
        with av.open(str(out / "a dog runs-0.mp4")) as c:
            frames[graphs_on] = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        lines = [ln for ln in capsys.readouterr().err.splitlines() if "generate.graphs" in ln]
        assert lines == (["vmla-generate: generate.graphs=true replays CUDA graphs, which need a CUDA device: on cpu "
                          "every forward runs eagerly"] if graphs_on else [])
    assert len(frames[True]) == len(frames[False]) and all((a == b).all() for a, b in zip(frames[True], frames[False]))


@pytest.mark.timeout(180)
def test_generate_benchmark_measures_both(tmp_path, monkeypatch, capsys):
    """``--graphs``: per mode an eager row and a graphs row with the same columns (on a CPU both run eagerly)."""
    monkeypatch.delenv("OUT", raising=False)
    spec = importlib.util.spec_from_file_location("generate_bench", ROOT / "benchmarks" / "generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--device", "cpu", "--chunks", "1", "--warmup", "1",
            "--modes", "bf16", "--no-write", "--profile-chunks", "0", "--graphs", "--results", str(tmp_path)]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "bf16+graphs" in out and "forwards replayed" in out
    result = json.loads((tmp_path / "generate-cpu.json").read_text())
    assert result["graphs"] is True and list(result["modes"]) == ["bf16", "bf16+graphs"]
    eager, graphed = result["modes"]["bf16"], result["modes"]["bf16+graphs"]
    assert set(eager) <= set(graphed) and graphed["replayed"] == 0 and graphed["eager"] > 0
    for row in graphed["per_chunk"]:
        assert all(row[k] > 0 for k in ("denoise_s", "decode_s", "wall_s"))


# ----------------------------------------------------------------------------------------------
# GPU: real graphs
# ----------------------------------------------------------------------------------------------
# the 8-bit kernels' TMA rows need latent widths of multiples of 16 (tiny: 24 / 12); bf16 students
GPU_WIDTHS = ["model.dim=64", "attention.d_c=32", "attention.d_r=16"]
GPU_VARIANTS = {
    "mla-bf16": ["attention.impl=fused", "cache.dtype=bfloat16"],  # the fused kernel attention.kernel=auto picks
    "mla-8bit": ["attention.impl=fused_8bit", "cache.dtype=8bit"],
    "mha": ["attention.kind=mha", "cache.dtype=bfloat16"],
    "absolute-split": ["attention.impl=fused", "cache.dtype=bfloat16", "cache.sink_frames=2",
                       "cache.window_frames=7", "cache.position_scheme=absolute"],
}


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("switch", list(SWITCHES), ids=list(SWITCHES))
@pytest.mark.parametrize("variant", list(GPU_VARIANTS), ids=list(GPU_VARIANTS))
def test_graph_replays_equal_eager_rollout_gpu(variant, switch):
    cfg, model, text_a, text_b = _setup(*GPU_WIDTHS, *GPU_VARIANTS[variant], device="cuda", dtype=torch.bfloat16)
    runner = _check_against_eager(cfg, model, text_a, text_b, SWITCHES[switch], simulate=False)
    memo = next(iter(runner._bound.values())).memo  # the fused bf16 path keeps the prefix's key scale per state
    assert bool(memo) == (GPU_VARIANTS[variant][0] == "attention.impl=fused")
    if switch == "none":
        assert runner.counts == _expected_counts(cfg, runner.new_cache(1), rest=bool(memo))
    else:
        assert runner.counts["replay"] > 0


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("switch", ["recache", "no-recache"])
def test_graph_replays_equal_eager_guided_gpu(switch):
    cfg, model, text_a, text_b = _setup(*GPU_WIDTHS, *GPU_VARIANTS["mla-bf16"], guided=True, device="cuda",
                                        dtype=torch.bfloat16)
    runner = _check_against_eager(cfg, model, text_a, text_b, SWITCHES[switch], simulate=False)
    assert runner.counts["replay"] > 0


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", ["mla-bf16", "mla-8bit"])
def test_no_host_sync_between_replays_of_a_chunk_gpu(variant):
    """Once captured, a chunk's forwards after its first (which makes the state's RoPE tables with the eager
    code's small host-to-device copies) run with no synchronising call: CUDA's sync debug mode set to error."""
    cfg, model, text_a, text_b = _setup(*GPU_WIDTHS, *GPU_VARIANTS[variant], device="cuda", dtype=torch.bfloat16)
    runner = ChunkGraphs(model)
    cache = runner.new_cache(1)
    _rollout(cfg, runner, cache, text_a, text_b, None)  # every write pattern captured
    v = cfg.video
    x = torch.randn(1, v.chunk_frames, cfg.model.in_channels, v.latent_height, v.latent_width, device="cuda",
                    dtype=torch.bfloat16)
    t = torch.full((1, v.chunk_frames), 500.0, device="cuda")
    with torch.no_grad():
        runner(x, t, text_a, cache=cache)
        replays = runner.counts["replay"]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                runner(x, t, text_a, cache=cache)
            runner(x, torch.zeros_like(t), text_a, cache=cache, write_cache=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert runner.counts["replay"] == replays + 4
