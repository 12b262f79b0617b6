"""The rank study (VideoMLA's central finding, reproducible on any checkpoint) and its training monitor.

    vmla-analyze rank CKPT [--out DIR] [--config YAML] [key=value ...]

CKPT is a Wan2.1-T2V checkpoint (original or diffusers layout) or a student folder (mha or mla). Per layer:

- the ``convert.energy`` (99 %) effective rank of the self-attention K and V projections and of
  ``[W_k; W_v]`` (for an MLA student: of the effective ``W_uk W_dkv`` and ``W_uv W_dkv``);
- the effective rank of the K and V activations, and of both together (``act_kv``: what one shared latent
  per token must hold), on calibration latents (``convert.calib_*``: seeded
  latents, or with ``convert.calib_data`` encoded clips and their captions, noised to each timestep bucket,
  run through the checkpoint's own blocks);
- for an MLA student, the rank occupation of ``c_kv``: effective rank of the latent activations / d_c.

Writes ``rank.csv``, ``rank.json`` and ``rank.png`` (matplotlib, Agg) into DIR. An activation rank cannot
exceed the calibration token count per bucket (``tokens_per_bucket`` in the JSON): raise
``convert.calib_latent_shape`` until that is well above the width for a meaningful activation rank.

The same ``c_kv`` occupation is logged during training by ``rank.RankOccupationMonitor``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch

from . import config as C
from . import student_io, wan_keys
from .cliargs import parse_with_overrides
from .convert import Calibration, ConversionError, WanSource, build_config, check_source
from .rank import activation_rank, effective_rank


def layer_projections(block: Mapping[str, torch.Tensor], kind: C.AttentionKind) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of the K and V maps x -> k, x -> v (MLA: through the latent), float64."""
    b = {k: v.double() for k, v in block.items()}
    if kind == C.AttentionKind.mha:
        return {"k": (b["attn1.to_k.weight"], b["attn1.to_k.bias"]), "v": (b["attn1.to_v.weight"], b["attn1.to_v.bias"])}
    wd, bd = b["attn1.to_kv_a.weight"], b["attn1.to_kv_a.bias"]
    return {"k": (b["attn1.k_up.weight"] @ wd, b["attn1.k_up.weight"] @ bd),
            "v": (b["attn1.v_up.weight"] @ wd, b["attn1.v_up.weight"] @ bd + b["attn1.v_up.bias"]),
            "c": (wd, bd)}


def rank_study(ckpt: str | Path, out: str | Path, config_paths: Sequence[str | Path] = (), overrides: Sequence[str] = (),
               log=print) -> dict:
    """Run the rank study on ``ckpt`` and write rank.csv / rank.json / rank.png into ``out``."""
    source = WanSource(ckpt)
    cfg = build_config(source, config_paths, overrides)
    if source.layout != wan_keys.STUDENT:
        # a Wan checkpoint or an mha student: analyse the Wan attention it holds
        cfg = C.replace(cfg, attention=C.replace(cfg.attention, kind=C.AttentionKind.mha))
    check_source(source, cfg)
    kind, cc = cfg.attention.kind, cfg.convert
    calib = Calibration(source, cfg, C.resolve_device(cfg.runtime.device))
    buckets = list(cc.calib_timesteps)
    n_samples = cc.calib_samples
    log(f"rank study of {source.folder} ({source.layout} layout, attention {kind.value}), {len(buckets)} timestep "
        f"bucket(s) x {calib.tokens.shape[1] * n_samples} tokens, energy {cc.energy}")
    rows = []
    for i in range(cfg.model.num_layers):
        block = source.block(i)
        x = calib.step(i, block).double().cpu()  # (B, L, D), B = samples x buckets (sample-major)
        x = x.unflatten(0, (n_samples, len(buckets)))  # (S, T, L, D)
        proj = layer_projections(block, kind)
        wk, wv = proj["k"][0], proj["v"][0]
        row = {"layer": i, "w_k": effective_rank(wk, cc.energy), "w_v": effective_rank(wv, cc.energy),
               "w_kv": effective_rank(torch.cat([wk, wv]), cc.energy)}
        for j, t in enumerate(buckets):
            xt = x[:, j].reshape(-1, x.shape[-1])  # (S*L, D)
            acts = {}
            for name in ("k", "v") + (("c",) if kind == C.AttentionKind.mla else ()):
                w, b = proj[name]
                acts[name] = xt @ w.t() + b
                row[f"act_{name}_t{t:g}"] = activation_rank(acts[name], cc.energy)
            # K and V together: what one shared latent per token has to hold (MLA's d_c)
            row[f"act_kv_t{t:g}"] = activation_rank(torch.cat([acts["k"], acts["v"]], -1), cc.energy)
            if kind == C.AttentionKind.mla:
                row[f"c_occupation_t{t:g}"] = row[f"act_c_t{t:g}"] / cfg.attention.d_c
        if kind == C.AttentionKind.mla:
            w, b = proj["c"]
            row["c_occupation"] = activation_rank(x.reshape(-1, x.shape[-1]) @ w.t() + b, cc.energy) / cfg.attention.d_c
        rows.append(row)
        log(f"  layer {i:3d}: " + "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "layer"))
    result = {
        "checkpoint": str(source.folder), "layout": source.layout, "kind": kind.value, "energy": cc.energy,
        "dim": cfg.model.dim, "d_c": cfg.attention.d_c if kind == C.AttentionKind.mla else None,
        "timestep_buckets": buckets, "tokens_per_bucket": int(x.shape[0] * x.shape[2]),
        "calibration": {"samples": n_samples, "latent_shape": cc.calib_latent_shape,
                        "data": cc.calib_data or "gaussian", "seed": cc.seed},
        "layers": rows,
    }
    with student_io.AtomicDir(out, overwrite=True) as tmp:
        (tmp / "rank.json").write_text(json.dumps(result, indent=1, allow_nan=False))
        (tmp / "rank.csv").write_text(_csv(rows))
        plot_rank_study(result, tmp / "rank.png")
    log(f"wrote {out}/rank.csv, rank.json, rank.png")
    return result


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def plot_rank_study(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layers"]
    layers = [r["layer"] for r in rows]
    mla = result["kind"] == "mla"
    fig, axes = plt.subplots(1, 3 if mla else 2, figsize=(15 if mla else 10, 4))
    ax = axes[0]
    for key, label in (("w_k", "W_k"), ("w_v", "W_v"), ("w_kv", "[W_k; W_v]")):
        ax.plot(layers, [r[key] for r in rows], marker="o", label=label)
    ax.axhline(result["dim"], color="gray", ls=":", label=f"dim {result['dim']}")
    if result["d_c"]:
        ax.axhline(result["d_c"], color="red", ls="--", label=f"d_c {result['d_c']}")
    ax.set(title=f"weights: {100 * result['energy']:.0f}%-energy effective rank", xlabel="layer", ylabel="rank")
    ax.legend(fontsize=7)
    ax = axes[1]
    for t in result["timestep_buckets"]:
        ax.plot(layers, [r[f"act_k_t{t:g}"] for r in rows], marker=".", label=f"K, t={t:g}")
        ax.plot(layers, [r[f"act_v_t{t:g}"] for r in rows], ls="--", label=f"V, t={t:g}")
    ax.axhline(min(result["dim"], result["tokens_per_bucket"]), color="gray", ls=":", label="max possible")
    ax.set(title=f"activations ({result['tokens_per_bucket']} tokens / bucket)", xlabel="layer", ylabel="rank")
    ax.legend(fontsize=6)
    if mla:
        ax = axes[2]
        for t in result["timestep_buckets"]:
            ax.plot(layers, [r[f"c_occupation_t{t:g}"] for r in rows], marker=".", label=f"t={t:g}")
        ax.plot(layers, [r["c_occupation"] for r in rows], color="k", lw=2, label="all buckets")
        ax.set(title="c_kv rank occupation (eff. rank / d_c)", xlabel="layer", ylim=(0, 1.05))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmla-analyze", description="Analyses of Wan / student checkpoints")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rank", help="effective rank of K/V weights and activations; c_kv occupation of MLA students")
    r.add_argument("ckpt", help="Wan2.1-T2V checkpoint (original or diffusers layout) or student folder")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. convert.calib_latent_shape=[3,60,104]")
    r.add_argument("--out", default=None, help="output folder (default: runs/rank/<checkpoint folder name>)")
    r.add_argument("--config", action="append", default=[], help="config YAML (repeatable)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parse_with_overrides(parser, argv)  # key=value overrides may follow the options too
    out = Path(args.out) if args.out else Path("runs") / "rank" / Path(args.ckpt).resolve().name
    try:
        rank_study(args.ckpt, out, args.config, args.overrides)
    except (ConversionError, C.ConfigError, student_io.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
