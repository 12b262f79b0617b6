"""Masked (block-causal) full forwards at real geometry: the adapt / ODE-init / rank-probe path.

One student block of the 1.3B geometry over a whole clip (21 latent frames x 1560 tokens = 32 760
tokens, chunk 3), forward and forward+backward, for MHA and MLA (absorbed and reference), bf16 and
fp32, with the two mask backends: SDPA with a dense (L, L) boolean mask and flex attention with a
BlockMask (compiled), the latter under several kernel-option sets (the layer's compiled flex call,
``attention._compiled_flex``, is swapped for one with each set; the library keeps flex's autotuned defaults,
chosen from this table). Prints a table and writes ``benchmarks/results/masked_forward-<device>.json``.

Counting first (one block, B=1, L=32 760, 7 chunks): the block-causal mask keeps 4/7 of the L^2 score
matrix; MHA attention FLOPs = 4 * L^2 * dim * 4/7 = 3.8 TFLOP -> ~6 ms at 600 TF/s bf16; the block's
linears ~2 * 2 * 8.8e7 params... ~0.7 ms. A dense bf16 mask reads L^2 = 1.07 GB per layer (~0.4 ms at
3 TB/s) plus its construction.

    python benchmarks/masked_forward.py [--layers 1] [--frames 21] [key=value ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402
from vmla_train import attention as A  # noqa: E402
from vmla_train import config as C  # noqa: E402
from vmla_train.attention import FrameMask  # noqa: E402
from vmla_train.student import WanStudent  # noqa: E402

OPTION_SETS = {
    "default": None,
    "m64n32s1": {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 1},
    "m32n32s1": {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1, "BLOCK_M1": 32, "BLOCK_N1": 32,
                 "BLOCK_M2": 32, "BLOCK_N2": 32},
}


@functools.cache
def compiled_flex():
    """One compiled flex attention for every option set (as the layer compiles it); each set recompiles."""
    return torch.compile(flex_attention, dynamic=False)


def _time(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    cases = []
    for kind, impl in (("mha", "auto"), ("mla", "absorbed")):
        for dtype in (torch.bfloat16, torch.float32):
            base = ["model.name=wan-1.3b", f"model.num_layers={args.layers}", f"attention.kind={kind}",
                    f"attention.impl={impl}", *args.overrides]
            ref_out = None
            for backend, opt_name in [("sdpa", "-")] + [("flex", o) for o in OPTION_SETS]:
                cfg = C.load(overrides=base + [f"attention.mask_backend={backend}"])
                torch.manual_seed(0)
                model = WanStudent(cfg).to(dev, dtype)
                f, c = args.frames, cfg.model.in_channels
                x = torch.randn(1, f, c, cfg.video.latent_height, cfg.video.latent_width, device=dev, dtype=dtype)
                t = torch.rand(1, f, device=dev) * 1000
                text = torch.randn(1, cfg.model.text_len, cfg.model.text_dim, device=dev, dtype=dtype)
                mask = FrameMask(cfg.video.chunk_frames)
                if backend == "flex":  # force this option set (the library passes none: flex's defaults)
                    A._compiled_flex = functools.partial(compiled_flex(), kernel_options=OPTION_SETS[opt_name])
                row = {"kind": kind, "impl": impl, "dtype": str(dtype).split(".")[-1], "backend": backend,
                       "flex_options": opt_name, "tokens": f * cfg.tokens_per_frame}
                try:
                    with torch.no_grad():
                        out = model(x, t, text, mask=mask)
                        row["fwd_ms"] = _time(lambda: model(x, t, text, mask=mask))
                    if ref_out is None:
                        ref_out = out.float()
                    else:
                        row["rel_err_vs_sdpa"] = ((out.float() - ref_out).norm() / ref_out.norm()).item()

                    def fwd_bwd():
                        model.zero_grad(set_to_none=True)
                        model(x, t, text, mask=mask).float().square().mean().backward()

                    row["fwd_bwd_ms"] = _time(fwd_bwd)
                    row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
                except Exception as e:  # record, keep going: the table says which option sets run
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                A._compiled_flex = None  # the library compiles its own on next use
                cases.append(row)
                print(json.dumps(row), flush=True)
                del model
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    out = {"device": name, "date": datetime.now(timezone.utc).date().isoformat(), "layers": args.layers,
           "frames": args.frames, "cases": cases}
    write_result("masked_forward", name, out)
    print(f"\n{'kind':5} {'impl':13} {'dtype':8} {'backend':7} {'options':9} {'fwd ms':>9} {'fwd+bwd ms':>11} {'err':>9}")
    for r in cases:
        print(f"{r['kind']:5} {r['impl']:13} {r['dtype']:8} {r['backend']:7} {r['flex_options']:9} "
              f"{r.get('fwd_ms', float('nan')):9.2f} {r.get('fwd_bwd_ms', float('nan')):11.2f} "
              f"{r.get('rel_err_vs_sdpa', float('nan')):9.2e} {r.get('error', '')[:60]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
