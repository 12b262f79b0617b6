"""End-to-end batch-1 generation: denoise a chunk, decode it with the Wan VAE, write its frames, repeat.

    python benchmarks/generate.py [--chunks 12] [--modes bf16,8bit] [--vae-dtype bfloat16] [--no-write]
                                  [--text-encoder] [--profile-chunks 2] [--config CONFIG] [--device cuda] [--graphs]
                                  [--overlap] [--switch] [--top-kernels N]

What a user of ``vmla-generate`` waits for, part by part, at the real geometry with random weights of the
real architectures: the student of ``--config`` (default ``configs/videomla-1.3b.yaml``: 480x832, chunks
of 3 latent frames, window 21 + 3 sinks, 4 denoising steps + the clean cache-writing pass), Wan2.1's VAE
(diffusers ``AutoencoderKLWan`` at its default widths) decoding each chunk with the streaming decoder
``vmla-generate`` uses, and (``--text-encoder``) umT5-XXL encoding the prompt.

Modes: ``bf16`` (``attention.impl=fused``, 16-bit cache) and ``8bit`` (``attention.impl=fused_8bit``,
``cache.dtype=8bit``); on a CPU (``--device cpu``, for checking the script) every mode runs the reference
attention. The cache starts full of random entries (the steady state of a long video, as
``benchmarks/rollout.py`` measures it), the decoder from its start; the first ``--warmup`` chunks are run
and not counted. Per counted chunk, on one stream, in order:

- ``denoise_s``: the chunk's five student forwards (CUDA events around them),
- ``decode_s``: the VAE decode of its 3 latent frames into 12 video frames,
- ``write_s``: the frames to the host and into an H.264 mp4 (``Mp4Writer``, as ``vmla-generate``),
- ``wall_s``: host time of the whole chunk, with no synchronisation inside it.

Reported: medians of each, video frames/s = frames per chunk / median wall, time to first frame (prompt
encoding if measured + first chunk's denoise + decode, from a fresh cache), the GPU's busy fraction (the
summed kernel time of ``--profile-chunks`` chunks under ``torch.profiler`` over their unprofiled wall
time), peak memory, and the decode's achieved TFLOP/s (its FLOPs per chunk counted by torch's FLOP counter
on a meta-device copy of the VAE: the distance to its floor). Prints a table row by row and writes
``benchmarks/results/generate-<device>.json`` after every row (a run cut off by a time limit keeps the rows
it measured).

``--graphs``: each mode is measured twice in one call, eagerly (row ``<mode>``) and with ``generate.graphs``
(row ``<mode>+graphs``: the full-window forwards replayed from CUDA graphs, ``vmla_train/graphs.py``), with the
same columns. Graph rows first run one video of as many chunks as the cache pass has write patterns, plus one,
so that the counted chunks replay graphs only (the captures are not counted); the first chunk, from an empty
cache, runs eagerly in both. They also report the forwards replayed / run eagerly, the static buffers' MB and
the peak reserved memory beside the eager row's (the graphs' pool is reserved memory that the allocated peak
misses between replays).

``--overlap``: every row is also measured with ``generate.overlap`` (row ``<row>+overlap``): the decode, the
frames to the host and the writes of chunk k run on ``OverlappedOutput``'s worker thread and CUDA stream while
chunk k + 1 denoises. ``decode_s`` / ``write_s`` are then times on the worker's stream, ``wall_s`` the host time
between two chunks' frames reaching the host (in the steady state the slower of the two pipelines).

``--switch``: every row also times a prompt switch in the steady state (``measure_switch``): the switch
chunk's denoising with the re-cache of the whole window under the new text (``generate.recache``) against the
chunks around it; its cost in seconds and in chunk denoise times. ``--top-kernels N``: the N GPU kernels of
the profiled chunks with the most summed time, per chunk (where the denoiser's and the decode's time goes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import gpu_kernels, repo_relative, write_result  # noqa: E402
from vmla_train import config as C  # noqa: E402
from vmla_train import schedule  # noqa: E402
from vmla_train.dataprep.video import Mp4Writer  # noqa: E402
from vmla_train.generate import OverlappedOutput, StreamingDecoder, rgb_frames  # noqa: E402
from vmla_train.graphs import ChunkGraphs, cache_pass_patterns  # noqa: E402
from vmla_train.rollout import PromptSwitch, sample_video  # noqa: E402
from vmla_train.student import WanStudent  # noqa: E402

GB = 1 << 30
MODES = {  # mode -> overrides on the config (GPU)
    "bf16": ["attention.impl=fused", "cache.dtype=bfloat16"],
    "8bit": ["attention.impl=fused_8bit", "cache.dtype=8bit"],
}
UMT5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=256384,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)  # Wan2.1's text encoder


class Clock:
    """Marks on the device's stream (CUDA events) or the host clock (CPU): ``mark()`` now, ``between``
    after a final synchronisation."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def between(self, a, b) -> float:
        return (a.elapsed_time(b) / 1e3) if self.cuda else (b - a)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def build_student(cfg: C.Config, device: torch.device, dtype: torch.dtype) -> WanStudent:
    torch.manual_seed(0)
    with torch.device(device):
        student = WanStudent(cfg)
    return student.to(dtype).eval()


def build_vae(cfg: C.Config, device: torch.device, dtype: torch.dtype):
    """Wan2.1's VAE architecture (diffusers defaults) with seeded random weights; a small one for tiny configs."""
    from diffusers import AutoencoderKLWan

    from vmla_train import wan

    torch.manual_seed(0)
    if cfg.model.name == "tiny":
        return wan.tiny_vae(0).to(device=device, dtype=dtype).eval()
    return AutoencoderKLWan().to(device=device, dtype=dtype).eval()


def decode_flops(vae, cfg: C.Config) -> float:
    """FLOPs of one steady-state chunk's streaming decode (``video.chunk_frames`` latent frames at the config's
    latent size, after a first chunk), counted by torch's FLOP counter on a meta-device copy of ``vae``'s
    architecture: shapes only, no memory and no time."""
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        meta = AutoencoderKLWan.from_config(vae.config).eval()
    v = cfg.video
    shape = (1, v.chunk_frames, cfg.model.in_channels, v.latent_height, v.latent_width)
    decoder = StreamingDecoder(meta)
    with torch.no_grad():
        decoder(torch.zeros(shape, device="meta"))  # the first chunk (the causal first latent frame)
        with FlopCounterMode(display=False) as counter:
            decoder(torch.zeros(shape, device="meta"))
    return float(counter.get_total_flops())


def time_text_encoder(device: torch.device, dtype: torch.dtype, text_len: int, tiny_dim: int | None) -> float:
    """Seconds to embed one prompt with a random umT5 (XXL widths; ``tiny_dim``: a tiny one of that width),
    after one warm-up call."""
    from transformers import UMT5Config, UMT5EncoderModel

    from vmla_train.dataprep.testing import tiny_text_encoder, tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    if tiny_dim:
        enc = tiny_text_encoder(tiny_dim, len(tok), 0)
    else:
        with torch.device(device):
            enc = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    enc = enc.to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, len(tok), (1, text_len), device=device)
    clock = Clock(device)
    with torch.no_grad():
        enc(input_ids=ids)
        clock.sync()
        t0 = time.perf_counter()
        enc(input_ids=ids)
        clock.sync()
    seconds = time.perf_counter() - t0
    del enc
    return seconds


def run_mode(cfg: C.Config, vae, device: torch.device, chunks: int, warmup: int, write: bool,
             profile_chunks: int, graphs: bool = False, overlap: bool = False, switch: bool = False,
             top_kernels: int = 0) -> dict:
    """One mode: counted chunks after ``warmup`` ones; the per-part times of each, the first chunk's latency.
    ``graphs``: the student's full-window forwards replayed from CUDA graphs (``ChunkGraphs``); ``overlap``:
    decode + frames out on ``OverlappedOutput``'s worker and stream while the next chunk denoises; ``switch``:
    the cost of a prompt switch with its re-cache (``measure_switch``); ``top_kernels``: that many GPU kernels
    of the profiled chunks by their summed time (CUDA)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student = build_student(cfg, device, dtype)
    model = ChunkGraphs(student) if graphs else student  # graphs: one cache, reset per video, its graphs kept
    v = cfg.video
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    text = torch.randn(1, cfg.model.text_len, cfg.model.text_dim, device=device, dtype=dtype)
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the reserved peak counts this mode's memory only
        torch.cuda.reset_peak_memory_stats(device)

    def one_video(n_chunks: int, full: bool, on_frames=None, switch_at: int | None = None) -> list[dict]:
        """``n_chunks`` chunks of one video: per chunk the marks and host times. ``switch_at``: a prompt
        switch (with the re-cache of the window) before that chunk, counted in its ``denoise_s``."""
        cache = model.new_cache(1, device)
        if full:
            cache.fill_random(cache.num_slots + 2 * v.chunk_frames)  # a long video's steady state
        decoder = StreamingDecoder(vae)
        rows: list[dict] = []
        denoised: list[tuple] = []  # per chunk: the marks around its denoising (the caller's stream)
        state = {"start": clock.mark(), "host": time.perf_counter()}

        def consume(i: int, x0: torch.Tensor) -> None:  # decode + frames out (overlap: the worker's stream)
            dec0 = clock.mark()
            pix = decoder(x0.to(vae.dtype))  # (1, 3, T, H, W)
            dec = clock.mark()
            frames = rgb_frames(pix[0].float())  # to the host: the chunk's frames exist
            if on_frames is not None:
                on_frames(frames)
            wrote = clock.mark()
            now = time.perf_counter()  # wall: from the previous chunk's frames to this one's
            rows.append(dict(start=denoised[i][0], den=denoised[i][1], dec0=dec0, dec=dec, wrote=wrote,
                             wall=now - state["host"], frames=int(frames.shape[0])))
            state["host"] = now

        out = OverlappedOutput(consume, device) if overlap else None

        def on_chunk(i: int, x0: torch.Tensor) -> None:
            denoised.append((state["start"], clock.mark()))
            out.submit(i, x0) if out is not None else consume(i, x0)
            state["start"] = clock.mark()

        with torch.no_grad():
            switches = [] if switch_at is None else [PromptSwitch(switch_at, torch.randn_like(text))]
            sample_video(model, text, n_chunks * v.chunk_frames, steps,
                         generator=torch.Generator(device=device).manual_seed(0), cache=cache, on_chunk=on_chunk,
                         keep=False, switches=switches, recache=True)
        if out is not None:
            out.finish()
        decoder.close()
        clock.sync()
        return rows

    def parts(rows: list[dict]) -> list[dict]:
        return [dict(denoise_s=clock.between(r["start"], r["den"]), decode_s=clock.between(r["dec0"], r["dec"]),
                     write_s=clock.between(r["dec"], r["wrote"]), wall_s=r["wall"], frames=r["frames"]) for r in rows]

    # time to first frame: a fresh cache, the first chunk (the causal first latent frame: 1 + 4 (K - 1) frames)
    one_video(1, full=False)  # warm-up: kernels compiled, autotuned
    first = parts(one_video(1, full=False))[0]
    if graphs and device.type == "cuda":  # every graph captured before the counted chunks
        one_video(cache_pass_patterns(model.new_cache(1, device)) + 1, full=True)
    counts = dict(model.counts) if graphs else {}
    with tempfile.TemporaryDirectory() as tmp:
        writer = Mp4Writer(Path(tmp) / "bench.mp4", v.fps) if write else None
        rows = parts(one_video(warmup + chunks, full=True, on_frames=writer.write if writer else None))[warmup:]
        if writer is not None:
            writer.close()
    out = {k: statistics.median(r[k] for r in rows) for k in ("denoise_s", "decode_s", "write_s", "wall_s")}
    frames_per_chunk = rows[0]["frames"]
    out |= dict(frames_per_chunk=frames_per_chunk, video_fps=frames_per_chunk / out["wall_s"],
                first_chunk=first, chunks=chunks, per_chunk=rows,
                peak_gb=torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None,
                peak_reserved_gb=torch.cuda.max_memory_reserved(device) / GB if device.type == "cuda" else None)
    if graphs:  # the counted video's forwards: replayed, run eagerly (a CPU runs them all eagerly)
        out |= dict(replayed=model.counts["replay"] - counts["replay"], eager=model.counts["eager"] - counts["eager"],
                    captures=model.counts["capture"], static_mb=model.nbytes() / 2**20)
    if switch:
        out["switch"] = measure_switch(lambda n, at: parts(one_video(n, full=False, switch_at=at)),
                                       model.new_cache(1, device))
    if profile_chunks and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            prof_rows = one_video(profile_chunks, full=True)
        events = gpu_kernels(prof)
        kernel_s = sum(e.self_device_time_total for e in events) / 1e6  # microseconds -> s
        out["gpu_busy"] = kernel_s / (out["wall_s"] * len(prof_rows))
        if top_kernels:  # where a chunk's GPU time goes: the kernels by summed time, per chunk
            out["top_kernels"] = [dict(name=e.key, ms_per_chunk=e.self_device_time_total / 1e3 / len(prof_rows),
                                       calls_per_chunk=e.count / len(prof_rows)) for e in events[:top_kernels]]
    return out


def measure_switch(video, cache) -> dict:
    """A prompt switch in the steady state: one video from an empty cache, long enough that the clean frames
    of this video fill every slot (sinks + window), then two chunks, the switch (``generate.recache``: the
    window re-run under the new text) before the next, and two more. ``video(n, at)`` -> per-chunk parts.
    Reported: the switch chunk's denoise time (re-cache included), the median of the four full-cache chunks
    around it, their difference (the switch's cost) and that cost over a chunk's median denoise time."""
    fill = -(-cache.num_slots // cache.chunk_frames)  # chunks until the clean frames fill every slot
    at = fill + 2
    rows = video(at + 3, at)
    around = [rows[i]["denoise_s"] for i in (at - 2, at - 1, at + 1, at + 2)]
    base = statistics.median(around)
    cost = rows[at]["denoise_s"] - base
    return dict(chunk=at, recached_slots=cache.num_slots, switch_chunk_denoise_s=rows[at]["denoise_s"],
                median_denoise_s=base, switch_cost_s=cost, cost_in_chunks=cost / base)


def _row_line(mode: str, r: dict, results: dict) -> str:
    """The table row of ``mode``; a graphs row adds its replay counts and memory on a second line."""
    busy = f"{r['gpu_busy']:.2f}" if r.get("gpu_busy") is not None else "-"
    peak = f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else "-"
    line = (f"{mode:<20} {r['denoise_s']:10.3f} {r['decode_s']:9.3f} {r['decode_tflops']:9.1f} {r['write_s']:8.3f} "
            f"{r['wall_s']:8.3f} {r['video_fps']:10.1f} {r['time_to_first_frame_s']:14.2f} {busy:>9} {peak:>8}")
    if "switch" in r:
        w = r["switch"]
        line += (f"\n  prompt switch (re-cache of {w['recached_slots']} cache frames) before chunk {w['chunk']}: "
                 f"{w['switch_chunk_denoise_s']:.3f} s against {w['median_denoise_s']:.3f} s, costs "
                 f"{w['switch_cost_s']:.3f} s = {w['cost_in_chunks']:.2f} chunk denoise times")
    for k in r.get("top_kernels", []):
        line += f"\n    {k['ms_per_chunk']:8.2f} ms {k['calls_per_chunk']:7.0f} calls  {k['name'][:90]}"
    if "replayed" in r:
        line += (f"\n  {r['replayed']} forwards replayed, {r['eager']} eager in the measured video (its --warmup "
                 f"chunks included); {r['captures']} graphs, static buffers {r['static_mb']:.1f} MB")
        eager = results.get(mode.replace("+graphs", ""))
        if r.get("peak_reserved_gb") is not None and eager is not None:  # a graph pool is reserved between replays
            line += f"; peak reserved {r['peak_reserved_gb']:.2f} GB against {eager['peak_reserved_gb']:.2f} GB eager"
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "videomla-1.3b.yaml"))
    p.add_argument("--chunks", type=int, default=12, help="counted chunks per mode (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", default="bf16,8bit", help=f"comma-separated, of {sorted(MODES)}")
    p.add_argument("--vae-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--no-write", action="store_true", help="skip the mp4 encoding (frames still reach the host)")
    p.add_argument("--text-encoder", action="store_true", help="also time umT5-XXL on one prompt (random weights)")
    p.add_argument("--profile-chunks", type=int, default=2, help="chunks under torch.profiler for the busy fraction")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overrides", nargs="*", default=[], help="extra key=value config overrides")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--graphs", action="store_true",
                   help="measure each mode eagerly and with generate.graphs (rows <mode> and <mode>+graphs)")
    p.add_argument("--overlap", action="store_true",
                   help="also measure each row with generate.overlap (rows <row>+overlap)")
    p.add_argument("--vae-autotune", action="store_true",
                   help="cuDNN autotuning (torch.backends.cudnn.benchmark: every convolution of the run, the VAE's "
                        "above all)")
    p.add_argument("--vae-channels-last", action="store_true", help="the VAE's weights in channels_last_3d layout")
    p.add_argument("--top-kernels", type=int, default=0,
                   help="print and record this many GPU kernels of the profiled chunks by their summed time")
    p.add_argument("--switch", action="store_true",
                   help="also time a prompt switch with its re-cache in the steady state (per row)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    modes = [m for m in a.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or a.chunks < 1 or a.warmup < 0:
        print(f"error: --modes {unknown} not in {sorted(MODES)}, or --chunks < 1 / --warmup < 0", file=sys.stderr)
        return 2
    try:
        base = C.load(a.config, a.overrides)
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    vae_dtype = a.vae_dtype if device.type == "cuda" else "float32"  # the CPU path is for checking the script
    torch.backends.cudnn.benchmark = a.vae_autotune
    vae = build_vae(base, device, getattr(torch, vae_dtype))
    if a.vae_channels_last:  # the 5-D (Conv3d) weights; cuDNN then runs the convolutions in NDHWC
        for prm in vae.parameters():
            if prm.dim() == 5:
                prm.data = prm.data.contiguous(memory_format=torch.channels_last_3d)
    text_s = (time_text_encoder(device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                base.model.text_len, base.model.text_dim if base.model.name == "tiny" else None)
              if a.text_encoder else None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    v = base.video
    results: dict[str, dict] = {}
    payload = dict(device=name, date=dt.date.today().isoformat(), config=repo_relative(a.config),
                   overrides=a.overrides,
                   vae_dtype=vae_dtype, vae_autotune=a.vae_autotune, vae_channels_last=a.vae_channels_last,
                   write=not a.no_write, graphs=a.graphs, overlap=a.overlap, switch=a.switch,
                   text_encoder_s=text_s,
                   command="python benchmarks/generate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   modes=results)
    print(f"\nend-to-end generation, batch 1, {v.height}x{v.width}, chunk {v.chunk_frames} latent frames, "
          f"window {base.cache.window_frames} + {base.cache.sink_frames} sinks, VAE {vae_dtype}"
          f"{', cuDNN autotune' if a.vae_autotune else ''}{', channels-last' if a.vae_channels_last else ''}, {name}")
    if text_s is not None:
        print(f"text encoder (umT5{'' if base.model.name == 'tiny' else '-XXL'}, one prompt): {text_s:.3f} s")
    flops = decode_flops(vae, base)
    payload["decode_tflop_per_chunk"] = flops / 1e12
    print(f"VAE decode of a chunk ({v.chunk_frames} latent frames): {flops / 1e12:.2f} TFLOP (counted)")
    print(f"{'mode':<20} {'denoise s':>10} {'decode s':>9} {'dec TF/s':>9} {'write s':>8} {'wall s':>8} {'video fps':>10} "
          f"{'first frame s':>14} {'GPU busy':>9} {'peak GB':>8}", flush=True)
    for mode in modes:
        over = MODES[mode] if device.type == "cuda" else ["attention.impl=reference", "cache.dtype=float32"]
        cfg = C.load(a.config, [*a.overrides, *over])
        for graphs in (False, True) if a.graphs else (False,):
            for overlap in (False, True) if a.overlap else (False,):
                row = mode + ("+graphs" if graphs else "") + ("+overlap" if overlap else "")
                results[row] = r = run_mode(cfg, vae, device, a.chunks, a.warmup, not a.no_write, a.profile_chunks,
                                            graphs, overlap, a.switch, a.top_kernels)
                r["time_to_first_frame_s"] = (text_s or 0.0) + r["first_chunk"]["denoise_s"] + r["first_chunk"]["decode_s"]
                r["decode_tflops"] = flops / r["decode_s"] / 1e12  # the decode's achieved rate (median chunk)
                print(_row_line(row, r, results), flush=True)
                write_result("generate", name, payload, a.results)  # after every row: a cut-off run keeps its rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
