"""Benchmark: convert a random bf16 Wan2.1-T2V-1.3B checkpoint (original layout) on this machine.

    python benchmarks/convert.py [--size wan-1.3b] [--d-c 96,160,256,512] [--out benchmarks/results/convert-cpu.json]

1. Writes a random bf16 checkpoint with Wan's original key names, ``config.json`` and one
   ``diffusion_pytorch_model.safetensors`` into a temporary folder (weights drawn as Wan initialises
   linears: xavier_uniform; biases small Gaussian so the folded biases matter; norm gains around one).
2. Converts it with ``vmla-convert`` in a child process per d_c (default VideoMLA settings otherwise):
   wall time and the child's peak RSS (``getrusage(RUSAGE_CHILDREN)``, read after each child).
3. Prints and writes the per-d_c error table (mean/max over layers of the attention-output, K and V
   relative errors) from each ``conversion_report.json``.

What random weights tell: the streaming cost (time, memory) is the real one; the errors show the
machinery works and how error falls with d_c for a *flat* spectrum. What they do not tell: real Wan
K/V weights have structured spectra and correlated heads, so real errors (and the d_c they need) differ;
run ``vmla-analyze rank`` and the conversion on the real checkpoint for those numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmla_train import config as C  # noqa: E402
from vmla_train import wan_keys  # noqa: E402
from vmla_train.student import WanStudent  # noqa: E402


def write_random_checkpoint(folder: Path, cfg: C.Config, seed: int = 0) -> int:
    """Random bf16 Wan checkpoint in the original layout; returns its size in bytes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanStudent(cfg).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=gen)
        elif "norm" in name and len(shape) == 1:  # RMSNorm / LayerNorm gains
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif "scale_shift_table" in name:
            t = torch.randn(shape, generator=gen) / math.sqrt(cfg.model.dim)
        else:
            fan_out, fan_in = shape[0], math.prod(shape[1:])
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            t = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        state[wan_keys.diffusers_to_original(name)] = t.to(torch.bfloat16)
    m = cfg.model
    (folder / "config.json").write_text(json.dumps(dict(
        _class_name="WanModel", model_type="t2v", dim=m.dim, num_heads=m.num_heads, num_layers=m.num_layers,
        ffn_dim=m.ffn_dim, in_dim=m.in_channels, out_dim=m.out_channels, text_len=m.text_len, freq_dim=m.freq_dim, eps=m.eps)))
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return sum(v.numel() * v.element_size() for v in state.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="wan-1.3b")
    p.add_argument("--d-c", default="96,160,256,512")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert-cpu.json"))
    p.add_argument("--extra", nargs="*", default=[], help="extra key=value overrides for every conversion")
    args = p.parse_args()
    cfg = C.load(None, [f"model.name={args.size}", "attention.kind=mha"])
    d_cs = [int(v) for v in args.d_c.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        src = Path(tmp) / "Wan2.1-T2V-random"
        src.mkdir()
        t0 = time.perf_counter()
        nbytes = write_random_checkpoint(src, cfg)
        print(f"wrote random bf16 {args.size} ({nbytes / 2**30:.2f} GiB, original layout) in {time.perf_counter() - t0:.1f} s")
        for dc in d_cs:
            out = Path(tmp) / f"student-dc{dc}"
            cmd = [sys.executable, "-m", "vmla_train.convert", str(src), str(out), f"attention.d_c={dc}", "runtime.device=cpu", *args.extra]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode:
                raise SystemExit(f"conversion failed:\n{proc.stderr[-3000:]}")
            peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # max over children so far
            rep = json.loads((out / "conversion_report.json").read_text())
            out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            lay = rep["layers"]
            row = {"d_c": dc, "d_r": rep["target"]["d_r"], "wall_s": wall, "peak_rss_gib_max_so_far": peak_rss / 2**30,
                   "out_gib": out_bytes / 2**30, "kv_values_per_token": rep["kv_values_per_token"],
                   "kv_reduction": rep["kv_reduction"]}
            for key in ("attn_out_rel_err", "k_rel_err", "v_rel_err"):
                vals = [r[key] for r in lay]
                row[f"{key}_mean"] = sum(vals) / len(vals)
                row[f"{key}_max"] = max(vals)
            row["kv_svd_energy_kept_mean"] = sum(r["kv_svd_energy_kept"] for r in lay) / len(lay)
            row["rope_rank1_energy_mean"] = sum(r["rope_rank1_energy"] for r in lay) / len(lay)
            row["eff_rank_wkv_mean"] = rep["summary"]["eff_rank_wkv_mean"]
            rows.append(row)
            print(f"d_c={dc}: {wall:.1f} s, peak RSS (max so far) {peak_rss / 2**30:.2f} GiB, attn-out err "
                  f"{row['attn_out_rel_err_mean']:.4f}, K {row['k_rel_err_mean']:.4f}, V {row['v_rel_err_mean']:.4f}", flush=True)
            import shutil

            shutil.rmtree(out)
    head = f"{'d_c':>5} {'d_r':>4} {'values/tok':>10} {'reduction':>9} {'attn-out err':>13} {'K err':>8} {'V err':>8} {'SVD energy':>10} {'wall s':>7} {'peak RSS GiB':>12}"
    print("\n" + head)
    for r in rows:
        print(f"{r['d_c']:>5} {r['d_r']:>4} {r['kv_values_per_token']['mla']:>10} {100 * r['kv_reduction']:>8.1f}% "
              f"{r['attn_out_rel_err_mean']:>13.4f} {r['k_rel_err_mean']:>8.4f} {r['v_rel_err_mean']:>8.4f} "
              f"{r['kv_svd_energy_kept_mean']:>10.3f} {r['wall_s']:>7.1f} {r['peak_rss_gib_max_so_far']:>12.2f}")
    result = {
        "benchmark": "convert", "size": args.size, "checkpoint": "random bf16, original layout, written by the benchmark",
        "checkpoint_gib": nbytes / 2**30, "device": f"CPU ({os.cpu_count()} cores visible, {platform.processor() or platform.machine()})",
        "torch": torch.__version__, "command": " ".join(sys.argv), "calibration": C.ConvertConfig().__dict__,
        "note": "random weights have a flat spectrum: errors show the mechanics and the trend with d_c, not Wan's real errors",
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    C.atomic_write_text(out, json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
