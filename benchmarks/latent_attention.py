"""Per-layer attention at the 1.3B chunk geometry: MHA (cuDNN, flash) vs MLA (reference, absorbed SDPA, the
fused bf16 and 8-bit kernels). One GPU command; writes benchmarks/results/latent_attention-<device>.json.

    python benchmarks/latent_attention.py [--out DIR] [--quick] [--no-8bit] [--no-sweep] [--sweep-only]

MLA variants (``attention.impl`` in brackets): ``mla_reference`` (reference), ``mla_absorbed`` (absorbed),
``fused_bf16`` (fused, over a 16-bit cache), ``fused_8bit`` (fused_8bit over an 8-bit cache: the prefix
quantised once, as ``cache.dtype=8bit`` stores it), ``fused_8bit_bf16cache`` (fused_8bit over a 16-bit cache,
the prefix quantised per call). The fused variants run the kernel ``attention.kernel=auto`` picks (Gluon on
Hopper, Triton elsewhere); each such row names it (``kernel``). Result files up to 2026-12-04 name these
variants ``mla_absorbed_sdpa``, ``triton_bf16``, ``triton_fp8``, ``triton_fp8_bf16cache`` and the kernel
``kernel16`` / ``kernel8``.

Every MLA variant runs the real ``MLASelfAttention`` code path of a random-weight layer (bf16, CUDA):
from the projected query (q_c, roped q_r) and the cached + current latents to the per-head output
[B, L, H, Dh] — the absorption, the key pre-pass and W_uv included — so the times compare what a rollout
pays. MHA variants time SDPA on given q/k/v (their projections are not part of attention either).
``kernel_ms`` is the fused kernel alone. TF/s counts the attention core (docs/design.md):
MHA 4 d_h, absorbed 2 (2 d_c + d_r), reference 2 (d_qk + d_v) FLOPs per (query, key, head).
rel_err: ||o - o_fp64|| / ||o_fp64|| over 384 random query tokens (all heads), fresh random inputs;
``rel_err_sharp`` with the queries scaled x4 (a sharpened softmax, closer to trained attention).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402
from vmla_train import config as C  # noqa: E402
from vmla_train.attention import AttnInputs, MLASelfAttention  # noqa: E402
from vmla_train.kernels import dispatch  # noqa: E402
from vmla_train.kernels import latent_attention as LA  # noqa: E402
from vmla_train.kernels import quant8 as Q8  # noqa: E402
from vmla_train.rope import Rotary, rope_angles  # noqa: E402

ROWS = 384  # query tokens checked against float64
FUSED = {"fused_bf16": "fused", "fused_8bit": "fused_8bit", "fused_8bit_bf16cache": "fused_8bit"}  # -> attention.impl


def bench(fn) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=100, rep=400, return_mode="median"))


def gemm_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a.double() - ref).norm() / ref.norm())


# ----------------------------------------------------------------------------------------------
def mha_case(cfg: C.Config, n_q: int, n_k: int, backend: SDPBackend) -> dict:
    h, d = cfg.model.num_heads, cfg.model.head_dim
    q = torch.randn(1, h, n_q, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, h, n_k, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, h, n_k, d, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(backend):
        ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
    rows = torch.randperm(n_q, device="cuda")[:ROWS]
    ref = torch.softmax(q[:, :, rows].double() @ k.double().transpose(-1, -2) * d**-0.5, -1) @ v.double()
    flops = 4 * d * n_q * n_k * h
    return dict(ms=ms, tflops=flops / ms / 1e9, rel_err=rel(o[:, :, rows], ref))


class Prefix16:
    """The cached prefix as ``dispatch.latent_attention`` reads a 16-bit ``KVCache``: ``read`` gives c (B, Lp, dc)
    and kr (B, Lp, G*dr), and ``memo`` recomputes every call, so each timed call pays the prefix's key-norm scale
    (and, for the 8-bit kernel, its quantisation): the per-call key pre-pass these rows measure."""

    eight_bit = None  # a 16-bit cache

    def __init__(self, c: torch.Tensor, kr: torch.Tensor):
        self.past = {"c": c, "kr": kr}

    def read(self, layer: int, step) -> dict[str, torch.Tensor]:
        return self.past

    def memo(self, layer: int, name: str, compute):
        return compute()


class MLACase:
    """A random MLA layer and one cached call's inputs (current chunk of n_q tokens, n_k keys in all)."""

    def __init__(self, cfg: C.Config, n_q: int, n_k: int, q_gain: float = 1.0, seed: int = 0):
        torch.manual_seed(seed)
        self.cfg = cfg
        self.attn = MLASelfAttention(cfg).cuda().to(torch.bfloat16).eval()
        with torch.no_grad():
            self.attn.norm_k.weight.uniform_(0.5, 1.5)
        a = self.attn
        H, dn, dr = a.num_heads, a.d_n, a.d_r
        tpf = cfg.tokens_per_frame
        ps = cfg.model.patch_size
        hp, wp = cfg.video.latent_height // ps[1], cfg.video.latent_width // ps[2]
        x = torch.randn(1, n_q, cfg.model.dim, device="cuda", dtype=torch.bfloat16)
        xk = torch.randn(1, n_k - n_q, cfg.model.dim, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            q = a.norm_q(a.to_q(x)).unflatten(-1, (H, dn + dr))
            frames_k, frames_q = n_k // tpf, n_q // tpf
            kpos = torch.arange(frames_k, device="cuda")
            self.inp = AttnInputs(
                q_rot=Rotary.from_angles(rope_angles(a.rope_spec(cfg), kpos[-frames_q:], hp, wp)),
                k_rot=Rotary.from_angles(rope_angles(a.rope_spec(cfg), kpos, hp, wp)), mask=None)
            from vmla_train.rope import apply_rope

            self.q_c = (q[..., :dn] * q_gain).contiguous()
            self.q_r = (apply_rope(q[..., dn:], self.inp.q_rot) * q_gain).contiguous()
            self.c_past, self.kr_past = a.to_kv_a(xk), a.to_k_rope(xk)  # as the cache holds them
            self.c, self.kr = a.to_kv_a(x), a.to_k_rope(x)
            self.g_n, self.g_r = a._gains()
            self.c_all = torch.cat([self.c_past, self.c], 1)
            self.kr_all = torch.cat([self.kr_past, self.kr], 1)
            self.prefix = Prefix16(self.c_past, self.kr_past)

    def run(self, variant: str) -> torch.Tensor:
        a = self.attn
        with torch.no_grad():
            if variant == "mla_reference":
                return a._reference(self.q_c, self.q_r, self.c_all, self.kr_all, self.g_n, self.g_r, self.inp)
            if variant == "mla_absorbed":
                return a._absorbed(self.q_c, self.q_r, self.c_all, self.kr_all, self.g_n, self.g_r, self.inp)
            if variant == "fused_8bit":
                return self.run_8bit_cache()
            # fused_bf16, fused_8bit_bf16cache: the layer's fused call over the 16-bit prefix
            q = dispatch.Queries(self.q_c, self.q_r, a._w_uk(self.g_n), a.scale, a.groups)
            k = dispatch.Keys(self.c, self.kr, self.inp.k_rot, a._key_scale,
                              lambda kr, rot: a._rope_key(kr, 1.0, self.g_r, rot))
            return a._up_v(dispatch.latent_attention(FUSED[variant], a.kernel, q, k, self.prefix))

    def bf16_operands(self) -> tuple:
        """The 16-bit kernels' arguments (q_lat, q_r, c_past, c_new, rho, s, scale): absorbed queries, the
        key-norm scale and RoPE key of every key."""
        a = self.attn
        with torch.no_grad():
            q_lat = torch.einsum("blhn,hnc->blhc", self.q_c, a._w_uk(self.g_n).to(self.q_c.dtype)).contiguous()
            s = torch.cat([a._key_scale(self.c_past, self.kr_past), a._key_scale(self.c, self.kr)], 1).squeeze(-1)
            rho = a._rope_key(self.kr_all, 1.0, self.g_r, self.inp.k_rot).to(q_lat.dtype)
        return q_lat, self.q_r, self.c_past, self.c, rho, s.contiguous(), a.scale

    def operands8(self) -> tuple:
        """The 8-bit kernel's operands for this call: (quantised queries, prefix, chunk) — the prefix quantised
        once (as a cache write would), the queries and the current chunk per call."""
        from vmla_train.kernels import latent_attention_fp8 as LA8

        a = self.attn
        lp = self.c_past.shape[1]
        rot = self.inp.k_rot
        if not hasattr(self, "past8"):
            s_p = a._key_scale(self.c_past, self.kr_past)
            rho_p = a._rope_key(self.kr_past, 1.0, self.g_r, Rotary(rot.cos[:lp], rot.sin[:lp]))
            self.past8 = Q8.quantize_keys(dispatch.key_rows(self.c_past, rho_p.to(self.c.dtype), s_p), self.c_past)
        s = a._key_scale(self.c, self.kr)
        rho = a._rope_key(self.kr, 1.0, self.g_r, Rotary(rot.cos[lp:], rot.sin[lp:])).to(self.c.dtype)
        new8 = Q8.quantize_keys(dispatch.key_rows(self.c, rho, s), self.c)
        return LA8.quantize_queries(self.q_c, a._w_uk(self.g_n), self.q_r), self.past8, new8

    def run_8bit_cache(self) -> torch.Tensor:
        """An 8-bit cache: the prefix's key rows and values quantised once (as a cache write would, outside the
        timing); per call: the queries (absorbed + quantised in one kernel), the current chunk's key scale,
        RoPE key, key rows and quantisation, the 8-bit kernel ``attention.kernel`` picks, and W_uv."""
        a = self.attn
        (q8, qr8, qs8, sq), past8, new8 = self.operands8()
        o_lat, _ = dispatch.kernel8(a.kernel, q8, qr8)(q8, qr8, qs8, sq, past8, new8, a.scale, a.groups,
                                                       out_dtype=self.q_c.dtype)
        return a._up_v(o_lat)

    def reference(self, rows: torch.Tensor) -> torch.Tensor:
        """float64 output for query tokens ``rows`` (the absorbed math, exact up to the fp32 key scale)."""
        a = self.attn
        H, dn = a.num_heads, a.d_n
        d = torch.float64
        w_uk = a.k_up.weight.double().unflatten(0, (H, dn)) * self.g_n.double().unflatten(0, (H, dn))[..., None]
        q_lat = torch.einsum("blhn,hnc->blhc", self.q_c[:, rows].double(), w_uk)
        s = a._key_scale(self.c_all.double(), self.kr_all.double()).squeeze(-1).double()
        rot = Rotary(self.inp.k_rot.cos.double(), self.inp.k_rot.sin.double())
        rho = a._rope_key(self.kr_all.double(), 1.0, self.g_r.double(), rot)
        o_lat, _ = LA.reference(q_lat, self.q_r[:, rows].double(), self.c_all.double(), rho, s, a.scale, d)
        w_uv = a.v_up.weight.double().unflatten(0, (H, a.head_dim))
        return torch.einsum("blhc,hdc->blhd", o_lat, w_uv) + a.v_up.bias.double().unflatten(0, (H, a.head_dim))


def mla_flops(cfg: C.Config, variant: str, n_q: int, n_k: int) -> float:
    a, m = cfg.attention, cfg.model
    if variant == "mla_reference":
        per = 2 * (m.head_dim + a.d_r // a.rope_key_groups + m.head_dim)
    else:
        per = 2 * (2 * a.d_c + a.d_r // a.rope_key_groups)
    return per * n_q * n_k * m.num_heads


def kernel_only(case: MLACase, sweep_tiles: bool) -> tuple[str, float, LA.TileConfig | None, list]:
    """The 16-bit kernel the layer runs (``attention.kernel``'s pick) alone: its name, its time at its default
    tiles, and a sweep of the candidate tiles (best reported)."""
    from vmla_train.kernels import latent_attention_ws16 as W16

    args = case.bf16_operands()
    kernel = dispatch.kernel16(case.attn.kernel, args[0], args[1], args[2])
    cands = LA.CANDIDATES if kernel is LA.latent_attention else candidates_ws(case.attn.d_c, case.attn.d_r,
                                                                              W16.smem_bytes16)
    return kernel.__name__, *sweep_tiles_of(lambda cfg=None: kernel(*args, config=cfg), cands, (1, 2, 3), sweep_tiles)


def sweep_tiles_of(run, candidates: list, splits_list: tuple, sweep: bool) -> tuple[float, LA.TileConfig | None, list]:
    """``run(config)`` at its default tiles, and (``sweep``) at every candidate x key split, fastest first."""
    default = bench(run)
    times = []
    if not sweep:
        return default, None, times
    for cand in candidates:
        for splits in splits_list:
            cfg = LA.TileConfig(cand.block_m, cand.block_n, cand.num_warps, cand.num_stages, splits)
            try:
                times.append((bench(lambda: run(cfg)), cfg))
            except Exception as e:  # out of shared memory / registers for this tile: pruned
                print(f"  tile {cfg} failed: {type(e).__name__}: {str(e)[:120]}")
    times.sort(key=lambda t: t[0])
    return default, (times[0][1] if times else None), times


CANDIDATES8 = [LA.TileConfig(*t) for t in ((128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3),
                                              (64, 128, 4, 3))]


def candidates_ws(dc: int, dr: int, smem_bytes=None) -> list:
    """A Gluon kernel's tiles (128 query rows: two consumer warpgroups) x (keys per tile, stages) that fit
    shared memory (``smem_bytes``: the kernel's plan, default the 8-bit kernel's)."""
    from vmla_train.kernels import latent_attention_ws as WS

    smem_bytes = smem_bytes or WS.smem_bytes
    return [LA.TileConfig(WS.BLOCK_M, n, 4, st) for n, st in ((128, 3), (128, 2), (64, 4), (64, 3))
            if smem_bytes(dc, dr, n, st) <= WS.SMEM_BYTES]


def kernel8_only(case: MLACase, sweep_tiles: bool) -> tuple[str, float, LA.TileConfig | None, list]:
    """The 8-bit kernel the layer runs (``attention.kernel``'s pick) alone (operands quantised outside the
    timing): its name, its time at its default tiles, and a sweep."""
    from vmla_train.kernels import latent_attention_fp8 as LA8

    a = case.attn
    with torch.no_grad():
        (q8, qr8, qs8, sq), past8, new8 = case.operands8()
    kernel = dispatch.kernel8(a.kernel, q8, qr8)
    run = lambda cfg=None: kernel(q8, qr8, qs8, sq, past8, new8, a.scale, a.groups, config=cfg)  # noqa: E731
    cands = CANDIDATES8 if kernel is LA8.attention8 else candidates_ws(a.d_c, a.d_r)
    return kernel.__name__, *sweep_tiles_of(run, cands, (1, 2, 3, 4), sweep_tiles)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="only the 21-frame cases")
    p.add_argument("--no-8bit", action="store_true", help="skip the 8-bit variants")
    p.add_argument("--no-sweep", action="store_true", help="kernel at its default tiles only")
    p.add_argument("--sweep-only", action="store_true",
                   help="only the tile sweeps of both kernels at the whole-chunk 21-frame cases, d_c/d_r = 160/64 "
                        "(and cuDNN MHA for the ratio); writes latent_attention_sweep-<device>.json")
    args = p.parse_args()
    dev = torch.cuda.get_device_name()
    peak = gemm_tflops()
    print(f"device {dev}; bf16 GEMM 8192^3: {peak:.0f} TF/s", flush=True)
    base = C.load(None, [])
    tpf = base.tokens_per_frame
    chunk = base.video.chunk_frames
    variants_mla = ["mla_reference", "mla_absorbed", "fused_bf16"]
    variants_mla += [] if args.no_8bit else ["fused_8bit", "fused_8bit_bf16cache"]  # 8-bit cache / requantised per call
    cases = []
    sweeps = {}
    geoms = [(21, 3), (21, 0)] if args.quick or args.sweep_only else [(3, 3), (9, 3), (21, 3), (21, 0)]
    mha = (("mha_cudnn", SDPBackend.CUDNN_ATTENTION), ("mha_flash", SDPBackend.FLASH_ATTENTION))
    if args.sweep_only:
        variants_mla, mha = ["fused_bf16", "fused_8bit"], mha[:1]
    for n_q_frames in (chunk,) if args.sweep_only else (chunk, 1):  # a whole chunk, and one frame
        n_q = n_q_frames * tpf
        for frames, sinks in geoms:
            n_k = (frames + sinks) * tpf  # window (chunk included) + sinks
            for var, be in mha:
                r = mha_case(base, n_q, n_k, be)
                cases.append(dict(n_q=n_q, cache_frames=frames, sink_frames=sinks, d_c=0, d_r=0, variant=var, **r))
                print(f"{n_q:5d} {frames:2d}+{sinks} {var:20s} {r['ms']:7.3f} ms {r['tflops']:6.0f} TF/s "
                      f"{r['tflops'] / peak:5.1%} err {r['rel_err']:.1e}", flush=True)
            for dc, dr in ((160, 64),) if args.sweep_only else ((160, 64), (192, 32)):
                cfg = C.load(None, [f"attention.d_c={dc}", f"attention.d_r={dr}"])
                case = MLACase(cfg, n_q, n_k)
                sharp = MLACase(cfg, n_q, n_k, q_gain=4.0, seed=1)
                rows = torch.randperm(n_q, device="cuda")[:ROWS]
                ref, ref_sharp = case.reference(rows), sharp.reference(rows)
                for var in variants_mla:
                    try:
                        ms = bench(lambda: case.run(var))
                        err = rel(case.run(var)[:, rows], ref)
                        err_sharp = rel(sharp.run(var)[:, rows], ref_sharp)
                    except Exception as e:
                        print(f"  {var} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    fl = mla_flops(cfg, var, n_q, n_k)
                    row = dict(n_q=n_q, cache_frames=frames, sink_frames=sinks, d_c=dc, d_r=dr, variant=var, ms=ms,
                               tflops=fl / ms / 1e9, rel_err=err, rel_err_sharp=err_sharp)
                    if var in ("fused_bf16", "fused_8bit"):  # the kernel attention.kernel=auto ran, alone
                        only = kernel_only if var == "fused_bf16" else kernel8_only
                        name, k_ms, best, sweep = only(case, sweep_tiles=frames == 21 and not args.no_sweep)
                        row.update(kernel=name, kernel_ms=k_ms, kernel_tflops=fl / k_ms / 1e9)
                        if sweep:
                            row.update(best_tile_ms=sweep[0][0], best_tile=vars(best))
                            sweeps[f"{var}-{n_q}-{frames}+{sinks}-{dc}/{dr}"] = [(t, vars(c)) for t, c in sweep]
                    cases.append(row)
                    extra = f" kernel {row['kernel_ms']:.3f} ms ({row['kernel_tflops'] / peak:.1%} peak), best tile " \
                            f"{row.get('best_tile_ms', float('nan')):.3f} {row.get('best_tile')}" if "kernel_ms" in row else ""
                    print(f"{n_q:5d} {frames:2d}+{sinks} {var:20s} {ms:7.3f} ms {row['tflops']:6.0f} TF/s "
                          f"{row['tflops'] / peak:5.1%} err {err:.1e} sharp {err_sharp:.1e} [{dc}/{dr}]{extra}",
                          flush=True)
                del case, sharp
                torch.cuda.empty_cache()
    out = dict(device=dev, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), gemm_tflops=peak,
               cases=cases, tile_sweeps=sweeps)
    write_result("latent_attention_sweep" if args.sweep_only else "latent_attention", dev, out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
