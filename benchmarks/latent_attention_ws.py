"""The warp-specialised Gluon kernels against the Triton kernels and cuDNN MHA, per layer at the 1.3B chunk
geometry. One GPU command (Hopper); writes benchmarks/results/latent_attention_ws-<device>.json.

    python benchmarks/latent_attention_ws.py [--out DIR] [--sweep all|bf16|none]

8-bit: both kernels on the same quantised operands of a random-weight ``MLASelfAttention`` layer
(``MLACase.operands8``: the prefix quantised once, as an 8-bit cache holds it), kernel alone. ``agree_o`` /
``agree_lse``: relative difference of the Gluon kernel's output from the Triton kernel's (bit-identical since
both walk tiles in one order; their shared error against float64 is ``benchmarks/latent_attention.py``'s
``fused_8bit`` row). bf16: the Triton kernel and ``latent_attention_ws16`` on ``MLACase.bf16_operands``, with
their share of the bf16 GEMM peak measured in the same run (``agree16_*``: relative difference, bf16 output).
Row keys name the kernels: ``triton_bf16_*`` / ``triton_fp8_*`` the Triton ones (16-bit, 8-bit), ``ws16_*`` /
``ws_*`` the Gluon ones. The sweeps walk key tiles, stages and key splits (each kernel's shared-memory plan
prunes what does not fit).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402
from benchmarks.latent_attention import (MLACase, bench, candidates_ws, gemm_tflops, mha_case,  # noqa: E402
                                         mla_flops, rel, sweep_tiles_of)
from vmla_train import config as C  # noqa: E402
from vmla_train.kernels import latent_attention_fp8 as LA8  # noqa: E402
from vmla_train.kernels import latent_attention as LA  # noqa: E402
from vmla_train.kernels import latent_attention_ws as WS  # noqa: E402
from vmla_train.kernels import latent_attention_ws16 as W16  # noqa: E402

SPLITS = (1, 2, 3, 4)


def bf16_kernels(case: MLACase, fl16: float, peak: float, sweep: bool) -> dict:
    """The Triton bf16 kernel and the Gluon one alone on the same operands: ms, share of the GEMM peak,
    agreement, and (``sweep``) the Gluon kernel's tiles x splits."""
    args = case.bf16_operands()
    o_ref, lse_ref = LA.latent_attention(*args)
    ms_tr = bench(lambda: LA.latent_attention(*args))
    row = dict(triton_bf16_ms=ms_tr, triton_bf16_peak=fl16 / ms_tr / 1e9 / peak)
    a = case.attn
    try:  # the default tiles' time comes with the sweep
        o, lse = W16.latent_attention_ws16(*args)
        ms, _, times = sweep_tiles_of(lambda tile=None: W16.latent_attention_ws16(*args, config=tile),
                                      candidates_ws(a.d_c, a.d_r, W16.smem_bytes16), SPLITS, sweep)
    except Exception as e:  # a kernel that fails to compile or launch here: recorded
        row.update(ws16_error=f"{type(e).__name__}: {str(e)[:300]}")
        return row
    row.update(ws16_ms=ms, ws16_tflops=fl16 / ms / 1e9, ws16_peak=fl16 / ms / 1e9 / peak,
               agree16_o=rel(o, o_ref.double()), agree16_lse=rel(lse, lse_ref.double()))
    if times:
        row.update(best16_ms=times[0][0], best16_tile=vars(times[0][1]), sweep16=[(t, vars(c)) for t, c in times])
    return row


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--sweep", choices=("all", "bf16", "none"), default="all",
                   help="tile x split sweeps of both kernels, of the bf16 one only, or none (default tiles)")
    args = p.parse_args()
    dev = torch.cuda.get_device_name()
    peak = gemm_tflops()
    print(f"device {dev}; bf16 GEMM 8192^3: {peak:.0f} TF/s", flush=True)
    cfg = C.load(None, [])
    tpf, chunk = cfg.tokens_per_frame, cfg.video.chunk_frames
    cases = []
    for n_q, frames, sinks in ((chunk * tpf, 21, 3), (chunk * tpf, 21, 0), (tpf, 21, 3)):
        n_k = (frames + sinks) * tpf
        mha = mha_case(cfg, n_q, n_k, SDPBackend.CUDNN_ATTENTION)["ms"]
        case = MLACase(cfg, n_q, n_k)
        a = case.attn
        with torch.no_grad():
            (q8, qr8, qs8, sq), past8, new8 = case.operands8()
        sink_tokens = sinks * tpf

        def run(kernel, config=None):
            return kernel(q8, qr8, qs8, sq, past8, new8, a.scale, a.groups, sink_tokens, config=config)

        o8, lse8 = run(LA8.attention8)
        ms8 = bench(lambda: run(LA8.attention8))
        fl = mla_flops(cfg, "fused_8bit", n_q, n_k)
        row = dict(n_q=n_q, cache_frames=frames, sink_frames=sinks, d_c=a.d_c, d_r=cfg.attention.d_r, mha_cudnn_ms=mha,
                   triton_fp8_ms=ms8)
        sweep = []
        try:  # the default tiles' time comes with the sweep
            o, lse = run(WS.attention8_ws)
            ms, _, sweep = sweep_tiles_of(lambda tile=None: run(WS.attention8_ws, tile),
                                          candidates_ws(a.d_c, a.d_r), SPLITS, args.sweep == "all")
            row.update(ws_ms=ms, ws_tflops=fl / ms / 1e9, agree_o=rel(o, o8.double()),
                       agree_lse=rel(lse, lse8.double()))
        except Exception as e:  # a kernel that fails to compile or launch here: recorded
            row.update(ws_error=f"{type(e).__name__}: {str(e)[:300]}")
        if sweep:
            row.update(best_ms=sweep[0][0], best_tile=vars(sweep[0][1]), sweep=[(t, vars(c)) for t, c in sweep])
        cases.append(row)
        ws = f"ws {row['ws_ms']:.3f} ms ({mha / row['ws_ms']:.2f}x cuDNN, {ms8 / row['ws_ms']:.2f}x Triton 8-bit), " \
             f"agree {row['agree_o']:.1e} / {row['agree_lse']:.1e}" if "ws_ms" in row else row.get("ws_error")
        best = f"; best {row['best_ms']:.3f} ms {row['best_tile']}" if sweep else ""
        print(f"{n_q:5d} {frames:2d}+{sinks} cuDNN MHA {mha:.3f} ms, Triton 8-bit {ms8:.3f} ms, {ws}{best}", flush=True)
        row.update(bf16_kernels(case, fl16=mla_flops(cfg, "fused_bf16", n_q, n_k), peak=peak,
                                sweep=args.sweep != "none"))
        print(f"{n_q:5d} {frames:2d}+{sinks} bf16: triton {row['triton_bf16_ms']:.3f} ms "
              f"({row['triton_bf16_peak']:.1%} of GEMM peak), "
              + (f"ws16 {row['ws16_ms']:.3f} ms ({row['ws16_peak']:.1%}, {row['triton_bf16_ms'] / row['ws16_ms']:.2f}x "
                 f"triton), agree {row['agree16_o']:.1e} / {row['agree16_lse']:.1e}" if "ws16_ms" in row
                 else row["ws16_error"])
              + (f"; best {row['best16_ms']:.3f} ms {row['best16_tile']}" if "best16_ms" in row else ""), flush=True)
        del case
        torch.cuda.empty_cache()
    out = dict(device=dev, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), gemm_tflops=peak,
               cases=cases)
    write_result("latent_attention_ws", dev, out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
