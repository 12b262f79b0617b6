"""Wan2.1-T2V checkpoints -> student folders (``mha`` copy or ``mla`` spectral/random), and back.

    vmla-convert SRC OUT [--config YAML ...] [key=value ...]      Wan (either layout) -> student folder
    vmla-convert STUDENT_OR_WAN OUT --to diffusers                 mha student / original layout -> diffusers

SRC is read tensor by tensor (``safetensors.safe_open``, memory-mapped) and converted block by block;
OUT is written shard by shard into a temporary folder that is renamed at the end, so the 14B model never
sits in memory twice and a failure leaves OUT as it was. OUT gets a ``manifest.json`` last (sizes, SHA-256,
kind and producer); ``--overwrite`` replaces only a folder whose manifest marks it as this command's output,
and never SRC, a folder holding SRC, one inside SRC or a training run folder (``student_io.check_output``).

Notation (one layer, docs/design.md and attention.py): D width, H heads of Dh, G RoPE-key groups of r = H/G
heads, dn content q/k width per head, dr RoPE width per group, dc latent width. Wan's key is
``k = sigma(x) * g_k * k~`` with ``k~ = W_k x + b_k`` and ``sigma = rsqrt(mean(k~^2) + eps)`` over all D
values, then RoPE on Dh/2 pairs per head. ``x~ = [x; 1]`` folds biases into the factorisations.

Spectral MLA conversion (``convert.init=spectral``), per layer:

1. RoPE pairs. The key spec (``RopeSpec.for_key(Dh, dr)``) keeps the fastest pairs of each axis ("fast");
   the others ("slow") barely rotate over a window.
2. Fast pairs -> the shared RoPE key. For each fast pair p and group, stack the heads' gained pair rows
   ``M_h = diag(g_k) [W_k b_k]_{h,p}`` (2 x (D+1)) and take the rank-1 fit ``M_h ~ u_h R`` (cross-head
   PCA, u a unit vector over the r heads). A scalar mix of heads commutes with the pair's rotation, so
   the score ``q_h,p . Rot(k_h,p)`` becomes ``(u_h q_h,p) . Rot(R x~)`` exactly for the rank-1 part; u_h
   folds into head h's q_r rows (through ``norm_q.weight``). ``to_k_rope`` holds ``R`` divided by a
   per-pair gain gamma (the heads' RMS gain) and ``g_r = gamma``.
3. Slow pairs -> content. They are treated as position-free (their rotation is dropped: the lossy step
   besides rank). Their gained rows for all heads and ``W_v`` go through one joint low-rank SVD
   ``[a_k K_slow; a_v W_v] = U S V^T`` (rank dc; the blocks weighted to equal Frobenius norm; in the
   metric of the calibration inputs' second moment when ``convert.factorization=activations``):
   ``[W_dkv b_dkv] = S^1/2 V^T``, ``W_uk = U_k S^1/2 / (a_k g_k)``, ``W_uv = U_v S^1/2 / a_v``. V's bias
   goes to ``v_up.bias`` exactly (softmax rows sum to one). K's bias rides in the latent.
4. Queries. ``to_q`` rows are Wan's, rearranged: per head the slow dims in the content slots (their
   original positions when dn >= Dh; the fast slots stay zero), the fast pairs in q_r. The pre-norm
   query holds each of Wan's D values exactly once plus zeros, so the RMS width ratio and the score
   scale ratio ``(dn+dr)^-1/2 / Dh^-1/2`` cancel: ``norm_q.weight`` = Wan's gain (times u_h on q_r).
5. Key norm (``attention.k_norm=rms_scalar``). The MLA key RMS runs over ``[W_uk c; kr]`` (H*dn + G*dr
   values) instead of Wan's D values; a single scale kappa folded into ``norm_k.weight`` makes them agree
   in expectation: ``kappa^2 = (E|[kn; kr]|^2 / W) / (E|k~|^2 / D)`` (weights metric, or least squares on
   the calibration tokens with ``factorization=activations``). Per token the two RMS differ: lossy.

Exact: the ``mha`` copy; steps 2 and 4 with one head per group (``rope_key_groups = num_heads``); step 3
at full rank. So with ``qk_nope_head_dim=0``, ``rope_key_groups=num_heads``, ``d_r=dim``, ``d_c=dim`` the
converted block equals Wan's (tested). Lossy: the rank-1 cross-head fit of each fast pair (G < H), the
truncated SVD (dc), the dropped rotation of the slow pairs, the per-token key-RMS mismatch.

``convert.init=random``: ``to_q, to_kv_a, to_k_rope, k_up, v_up`` initialised as Wan initialises linears
(xavier_uniform, zero bias), ``norm_q``/``norm_k`` weights one, ``to_out`` and everything else copied.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors import safe_open

from . import config as C
from . import schedule, student_io, wan_keys
from .cliargs import parse_with_overrides
from .rank import effective_rank, lapack_threads
from .attention import AttnInputs, MHASelfAttention, MLASelfAttention
from .rope import RopeSpec, Rotary, axis_pairs, rope_angles
from .student import WanStudent, timestep_sinusoid


class ConversionError(ValueError):
    """A source checkpoint or a conversion setting that cannot work; the message names file/key/shape."""


# ----------------------------------------------------------------------------------------------
# Reading a source checkpoint (original / diffusers / student folder), tensor by tensor
# ----------------------------------------------------------------------------------------------
_INDEXES = ("diffusion_pytorch_model.safetensors.index.json", student_io.INDEX_NAME)
_SINGLES = ("diffusion_pytorch_model.safetensors", student_io.SINGLE_NAME)


def _find_files(src: Path) -> tuple[Path, list[Path]]:
    """(folder, safetensors files) of a checkpoint folder, a diffusers pipeline folder or one file."""
    if not src.exists():
        raise ConversionError(f"source '{src}' does not exist")
    if src.is_file():
        if src.suffix != ".safetensors":
            raise ConversionError(f"source '{src}': expected a .safetensors file or a checkpoint folder")
        return src.parent, [src]
    if (src / "transformer").is_dir():  # a whole diffusers pipeline folder
        src = src / "transformer"
    for name in _INDEXES:
        index = src / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"'{index}': not a safetensors index ({e})") from None
            files = sorted({src / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ConversionError(f"'{index}' names shard file(s) missing from '{src}': {missing}")
            return src, files
    for name in _SINGLES:
        if (src / name).is_file():
            return src, [src / name]
    shards = sorted(src.glob("diffusion_pytorch_model*.safetensors"))
    if shards:
        return src, shards
    raise ConversionError(
        f"'{src}': no diffusion_pytorch_model*.safetensors (original or diffusers layout) and no "
        f"model.safetensors (student folder); Wan2.1_VAE.pth and the umT5 .pth are not the DiT"
    )


class WanSource:
    """Tensors of a checkpoint under diffusers/student names, read lazily from memory-mapped files."""

    def __init__(self, src: str | Path):
        self.src = Path(src)
        self.folder, self.files = _find_files(self.src)
        self._handles = {}
        raw: dict[str, Path] = {}
        for f in self.files:
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises several types for corrupt headers
                raise ConversionError(f"'{f}': cannot read safetensors header ({e})") from None
            self._handles[f] = h
            for k in h.keys():
                raw[k] = f
        self.layout = _detect(raw, str(self.folder))
        self._where: dict[str, tuple[Path, str]] = {}
        for k, f in raw.items():
            name = k
            if self.layout == wan_keys.ORIGINAL:
                try:
                    name = wan_keys.original_to_diffusers(k)
                except wan_keys.KeyMappingError as e:
                    raise ConversionError(f"'{f}': {e}") from None
            self._where[name] = (f, k)

    def names(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    def raw_name(self, name: str) -> str:
        return self._where[name][1]

    def get(self, name: str) -> torch.Tensor:
        f, k = self._where[name]
        return self._handles[f].get_tensor(k)

    def shape(self, name: str) -> tuple[int, ...]:
        f, k = self._where[name]
        return tuple(self._handles[f].get_slice(k).get_shape())

    def block(self, i: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors of block ``i`` keyed by their name inside the block (``attn1.to_q.weight``, ...)."""
        prefix = f"blocks.{i}."
        out = {n[len(prefix):]: self.get(n) for n in self._where if n.startswith(prefix)}
        return {k: v.to(dtype) for k, v in out.items()} if dtype is not None else out

    def top(self) -> dict[str, torch.Tensor]:
        return {n: self.get(n) for n in self._where if not n.startswith("blocks.")}

    def source_config(self) -> dict:
        """The checkpoint's own config file (``config.json``; ``{}`` when there is none)."""
        path = self.folder / "config.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"'{path}': not valid JSON ({e})") from None


def _detect(raw: dict[str, Path], source: str) -> str:
    try:
        return wan_keys.detect_layout(raw, source)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def _geometry_overrides(source: WanSource) -> dict:
    """Model fields from the source's config.json (original or diffusers); ``{}`` without one."""
    js = source.source_config()
    if not js:
        return {}
    path = source.folder / "config.json"
    if source.layout == wan_keys.ORIGINAL:
        if js.get("model_type", "t2v") != "t2v":
            raise ConversionError(f"'{path}': model_type={js['model_type']!r}; only Wan2.1-T2V converts")
        names = dict(dim="dim", num_heads="num_heads", num_layers="num_layers", ffn_dim="ffn_dim", in_dim="in_channels",
                     out_dim="out_channels", text_dim="text_dim", text_len="text_len", freq_dim="freq_dim", eps="eps",
                     patch_size="patch_size", cross_attn_norm="cross_attn_norm")
        model = {ours: js[theirs] for theirs, ours in names.items() if theirs in js}
    else:
        if js.get("image_dim") or js.get("added_kv_proj_dim"):
            raise ConversionError(f"'{path}': image conditioning (image_dim/added_kv_proj_dim); only Wan2.1-T2V converts")
        if js.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
            raise ConversionError(f"'{path}': qk_norm={js['qk_norm']!r}; Wan2.1 uses rms_norm_across_heads")
        names = dict(num_attention_heads="num_heads", num_layers="num_layers", ffn_dim="ffn_dim", in_channels="in_channels",
                     out_channels="out_channels", text_dim="text_dim", freq_dim="freq_dim", eps="eps",
                     patch_size="patch_size", cross_attn_norm="cross_attn_norm")
        model = {ours: js[theirs] for theirs, ours in names.items() if theirs in js}
        if "num_attention_heads" in js and "attention_head_dim" in js:
            model["dim"] = js["num_attention_heads"] * js["attention_head_dim"]
    if "patch_size" in model:
        model["patch_size"] = list(model["patch_size"])
    for size, fields in C.MODEL_SIZES.items():  # the named size whose geometry this is
        m = fields["model"]
        if all(model.get(k) == m[k] for k in ("dim", "num_heads", "num_layers", "ffn_dim") if k in m):
            model = {"name": size, **model}
            break
    return {"model": model}


def build_config(source: WanSource, config_paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> C.Config:
    """The target student config: source geometry <- YAML files <- overrides (a student source: its config.yaml)."""
    layers = []
    if source.layout == wan_keys.STUDENT or (source.folder / "config.yaml").is_file():
        layers.append(OmegaConf.load(source.folder / "config.yaml"))
    else:
        layers.append(OmegaConf.create(_geometry_overrides(source)))
    for p in config_paths:
        if not Path(p).is_file():
            raise C.ConfigError(f"config file '{p}' does not exist")
        layers.append(OmegaConf.load(p))
    layers.append(C.parse_overrides(overrides))
    return C.from_layers(layers)


def _mha(cfg: C.Config) -> C.Config:
    return C.replace(cfg, attention=C.replace(cfg.attention, kind=C.AttentionKind.mha))


def check_source(source: WanSource, cfg: C.Config) -> None:
    """Every tensor the config's model needs exists with its shape; nothing unknown is left over."""
    src_cfg = cfg if source.layout == wan_keys.STUDENT else _mha(cfg)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in WanStudent(src_cfg).state_dict().items()}
    names = set(source.names())
    missing = [k for k in expected if k not in names]
    if missing:
        raw = [wan_keys.diffusers_to_original(k) for k in missing[:3]] if source.layout == wan_keys.ORIGINAL else missing[:3]
        raise ConversionError(
            f"'{source.folder}' ({source.layout} layout) lacks {len(missing)} tensor(s) the config's model needs, "
            f"e.g. {raw} (model.num_layers={cfg.model.num_layers}, model.cross_attn_norm={cfg.model.cross_attn_norm})"
        )
    unexpected = sorted(names - set(expected))
    if unexpected:
        raise ConversionError(
            f"'{source.folder}': {len(unexpected)} tensor(s) the config's model does not have, e.g. "
            f"{[source.raw_name(k) for k in unexpected[:3]]} (model.num_layers={cfg.model.num_layers}?)"
        )
    m = cfg.model
    for k, shape in expected.items():
        found = source.shape(k)
        if found != shape:
            raise ConversionError(
                f"'{source.file_of(k)}': tensor '{source.raw_name(k)}' has shape {found}, the config "
                f"(model.dim={m.dim}, num_heads={m.num_heads}, ffn_dim={m.ffn_dim}, text_dim={m.text_dim}, "
                f"freq_dim={m.freq_dim}, in/out_channels={m.in_channels}/{m.out_channels}, patch_size={m.patch_size}) "
                f"expects {shape}"
            )


# ----------------------------------------------------------------------------------------------
# Truncated SVD (effective ranks: vmla_train.rank)
# ----------------------------------------------------------------------------------------------
def _svd(mat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD (U, S, V^T) of ``mat`` (m >= n), float64 results, and the total energy.

    Small matrices: exact float64 SVD. Large ones: eigenvectors of the n x n Gram matrix (float32
    eigensolver), U = A V / S for the kept directions: seconds instead of minutes on a CPU.
    """
    if mat.numel() <= 1_000_000 or mat.shape[0] < mat.shape[1]:
        with lapack_threads():
            u, s, vt = torch.linalg.svd(mat, full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank], float((s**2).sum())
    gram = (mat.t() @ mat).float()
    with lapack_threads():
        evals, evecs = torch.linalg.eigh(gram)
    keep = evals.flip(0)[:rank].double().clamp_min(0)
    v = evecs.flip(1)[:, :rank].double()
    s = keep.sqrt()
    u = (mat @ v) / s.clamp_min(1e-30)
    return u, s, v.t(), float(mat.pow(2).sum())


# ----------------------------------------------------------------------------------------------
# The MLA layout of one head: which RoPE pairs go to the shared key, where the slow dims sit
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MLALayout:
    num_heads: int
    head_dim: int
    d_n: int  # content q/k slots per head
    d_r: int  # RoPE key width per group
    groups: int
    fast_dims: tuple[int, ...]  # head dims of the fast pairs, in the RoPE key's order (2 per pair)
    slow_dims: tuple[int, ...]  # the other head dims, in head order
    slot_of_slow: tuple[int, ...]  # content slot of each slow dim

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.groups

    @property
    def key_width(self) -> int:
        return self.num_heads * self.d_n + self.groups * self.d_r


def mla_layout(cfg: C.Config) -> MLALayout:
    m, a = cfg.model, cfg.attention
    dh = m.head_dim
    dr = a.d_r // a.rope_key_groups
    dn = dh if a.qk_nope_head_dim == -1 else a.qk_nope_head_dim
    try:
        key = RopeSpec.for_key(dh, dr, m.rope_theta)
    except ValueError as e:
        raise ConversionError(
            f"config key 'attention.d_r'={a.d_r}: cannot be split over t/h/w within a head of {dh} "
            f"(pairs per axis {axis_pairs(dh)}): {e}"
        ) from None
    full = axis_pairs(dh)
    starts = (0, full[0], full[0] + full[1])
    fast_pairs = [s + j for s, n in zip(starts, key.pairs) for j in range(n)]
    fast_dims = tuple(d for p in fast_pairs for d in (2 * p, 2 * p + 1))
    slow_dims = tuple(d for d in range(dh) if d not in set(fast_dims))
    if dn >= dh:
        slots = slow_dims
    elif dn >= len(slow_dims):
        slots = tuple(range(len(slow_dims)))
    else:
        raise ConversionError(
            f"config key 'attention.qk_nope_head_dim'={a.qk_nope_head_dim}: the {len(slow_dims) // 2} RoPE pairs per head "
            f"that the RoPE key (d_r={a.d_r} over {a.rope_key_groups} group(s)) does not hold need {len(slow_dims)} "
            f"content slots; use >= {len(slow_dims)}, -1, or a larger d_r"
        )
    return MLALayout(m.num_heads, dh, dn, dr, a.rope_key_groups, fast_dims, slow_dims, slots)


# ----------------------------------------------------------------------------------------------
# One layer's self-attention: Wan MHA -> MLA
# ----------------------------------------------------------------------------------------------
@dataclass
class LayerResult:
    attn: dict[str, torch.Tensor]  # attn1.* tensors of the student (float64)
    info: dict = field(default_factory=dict)  # numbers for the report
    head_mix: torch.Tensor | None = None  # u (H, fast pairs): head h's weight in pair p's shared key


def _aug(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[W b]: (out, in + 1)."""
    return torch.cat([w, b[:, None]], 1)


def _whitener(x: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """L with L L^T = E[x~ x~^T] (x~ = [x; 1]) from calibration inputs (N, D); None (identity) without them."""
    if x is None:
        return None
    xa = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    cov = xa.t() @ xa / xa.shape[0]
    ridge = 1e-6 * cov.diagonal().mean()
    return torch.linalg.cholesky(cov + ridge * torch.eye(dim + 1, dtype=torch.float64))


def _in_metric(rows: torch.Tensor, L: torch.Tensor | None) -> torch.Tensor:
    """Rows of maps x~ -> y expressed in the input metric (rows @ L); unchanged for the identity metric."""
    return rows if L is None else rows @ L


def spectral_mla(wan: dict[str, torch.Tensor], cfg: C.Config, calib_x: torch.Tensor | None = None) -> LayerResult:
    """Spectral conversion of one layer's attn1 (module docstring, steps 1-5). ``wan``: attn1.* tensors."""
    lay = mla_layout(cfg)
    H, Dh, dn, dr, G, r = lay.num_heads, lay.head_dim, lay.d_n, lay.d_r, lay.groups, lay.heads_per_group
    dc, D = cfg.attention.d_c, cfg.model.dim
    w = {k: v.double() for k, v in wan.items()}
    gk, gq = w["attn1.norm_k.weight"], w["attn1.norm_q.weight"]
    kg = gk[:, None] * _aug(w["attn1.to_k.weight"], w["attn1.to_k.bias"])  # gained key rows (D, D+1)
    qa = _aug(w["attn1.to_q.weight"], w["attn1.to_q.bias"])  # (D, D+1)
    L = _whitener(calib_x if cfg.convert.factorization == "activations" else None, D)
    fast, slow = list(lay.fast_dims), list(lay.slow_dims)
    n_pairs = len(fast) // 2

    # Step 2: fast pairs -> shared RoPE key, by cross-head PCA per pair and group.
    u = torch.zeros(H, n_pairs, dtype=torch.float64)
    kr_rows = torch.zeros(G * dr, D + 1, dtype=torch.float64)
    g_r = torch.ones(G * dr, dtype=torch.float64)
    energy_kept, energy_all = 0.0, 0.0
    pair_dims = torch.tensor(fast, dtype=torch.long).view(n_pairs, 2)  # pair p of the key <- head dims
    kg3 = kg.view(H, Dh, D + 1)
    kgl3 = _in_metric(kg, L).view(H, Dh, D + 1)  # the same rows in the input metric
    for j in range(G):
        hs = slice(j * r, (j + 1) * r)
        m = kg3[hs][:, pair_dims]  # (r, pairs, 2, D+1)
        z = kgl3[hs][:, pair_dims].transpose(0, 1).flatten(2)  # (pairs, r, 2(D+1))
        evals, evecs = torch.linalg.eigh(z @ z.transpose(1, 2))  # (pairs, r), (pairs, r, r) ascending
        top = evecs[..., -1]  # (pairs, r): u for each pair
        top = top * torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))  # deterministic sign
        energy_kept += float(evals[:, -1].sum())
        energy_all += float(evals.clamp_min(0).sum())
        rows = torch.einsum("pr,rpdi->pdi", top, m)  # R per pair (pairs, 2, D+1)
        gamma = gk.view(H, Dh)[hs][:, pair_dims].pow(2).mean(0).sqrt().clamp_min(1e-12)  # (pairs, 2)
        kr_rows[j * dr:(j + 1) * dr] = (rows / gamma[..., None]).reshape(dr, D + 1)
        g_r[j * dr:(j + 1) * dr] = gamma.reshape(-1)
        u[hs] = top.t()

    # Step 3: slow (content) key rows of every head + V through one joint SVD.
    k_slow = kg[[h * Dh + d for h in range(H) for d in slow]]  # (H*|S|, D+1)
    v_rows = _aug(w["attn1.to_v.weight"], torch.zeros_like(w["attn1.to_v.bias"]))  # V's bias goes to v_up.bias
    a_k = 1.0 / max(float(_in_metric(k_slow, L).norm()), 1e-30) if len(slow) else 0.0
    a_v = 1.0 / max(float(_in_metric(v_rows, L).norm()), 1e-30)
    target = _in_metric(torch.cat([a_k * k_slow, a_v * v_rows]), L)
    uu, ss, vt, total_energy = _svd(target, dc)
    rank = ss.numel()
    half = ss[:rank].sqrt()
    down = torch.zeros(dc, D + 1, dtype=torch.float64)
    vt_x = vt[:rank] if L is None else torch.linalg.solve_triangular(L, vt[:rank], upper=False, left=False)  # V^T L^-1
    down[:rank] = half[:, None] * vt_x  # S^1/2 V^T L^-1
    up = torch.zeros(target.shape[0], dc, dtype=torch.float64)
    up[:, :rank] = uu[:, :rank] * half
    nk = k_slow.shape[0]
    up_k = up[:nk] / a_k if len(slow) else up[:0]
    up_v = up[nk:] / a_v
    captured = float((ss**2).sum()) / max(total_energy, 1e-300)

    # Content slots: W_uk pre-gain = gained rows / g_k; g_n = g_k (zero slots: zero rows, gain one).
    s_idx, slots = torch.tensor(slow, dtype=torch.long), torch.tensor(lay.slot_of_slow, dtype=torch.long)
    f_idx = torch.tensor(fast, dtype=torch.long)
    g_slow = gk.view(H, Dh)[:, s_idx]  # (H, |S|)
    g_slow = torch.where(g_slow.abs() > 1e-12, g_slow, torch.full_like(g_slow, 1e-12))
    k_up = torch.zeros(H, dn, dc, dtype=torch.float64)
    g_n = torch.ones(H, dn, dtype=torch.float64)
    k_up[:, slots] = up_k.view(H, len(slow), dc) / g_slow[..., None]
    g_n[:, slots] = g_slow
    k_up, g_n = k_up.reshape(H * dn, dc), g_n.reshape(H * dn)

    # Step 4: queries, rearranged; u folded into the q_r gains.
    q_rows = torch.zeros(H, dn + dr, D + 1, dtype=torch.float64)
    q_gain = torch.ones(H, dn + dr, dtype=torch.float64)
    qa3, gq2 = qa.view(H, Dh, D + 1), gq.view(H, Dh)
    q_rows[:, slots] = qa3[:, s_idx]
    q_gain[:, slots] = gq2[:, s_idx]
    q_rows[:, dn:] = qa3[:, f_idx]
    q_gain[:, dn:] = gq2[:, f_idx] * u.repeat_interleave(2, dim=1)
    q_rows, q_gain = q_rows.reshape(H * (dn + dr), D + 1), q_gain.reshape(H * (dn + dr))

    # Step 5: one scale so the MLA key RMS matches Wan's in expectation.
    pre_rows = torch.cat([k_up @ down, kr_rows])  # rows of [kn; kr] as functions of x~
    wan_rows = _aug(w["attn1.to_k.weight"], w["attn1.to_k.bias"])
    if cfg.attention.k_norm == C.KNorm.rms_scalar:
        if cfg.convert.factorization == "activations" and calib_x is not None:
            xa = torch.cat([calib_x.double(), torch.ones(calib_x.shape[0], 1, dtype=torch.float64)], 1)
            eps = cfg.model.eps
            sig = torch.rsqrt((xa @ wan_rows.t()).pow(2).mean(1) + eps)
            s = torch.rsqrt((xa @ pre_rows.t()).pow(2).sum(1) / lay.key_width + eps)
            kappa = float((s * sig).sum() / s.pow(2).sum())
        else:
            beta = float(_in_metric(pre_rows, L).pow(2).sum() / _in_metric(wan_rows, L).pow(2).sum().clamp_min(1e-300))
            kappa = math.sqrt(beta * D / lay.key_width)
        norm_k = torch.cat([g_n, g_r]) * kappa
    else:  # k_norm=none: Wan's sigma is dropped (docs/design.md, option D); gains fold into the rows
        kappa = None
        k_up = k_up * g_n[:, None]
        kr_rows = kr_rows * g_r[:, None]
        norm_k = None

    attn = {
        "attn1.to_q.weight": q_rows[:, :D], "attn1.to_q.bias": q_rows[:, D], "attn1.norm_q.weight": q_gain,
        "attn1.to_kv_a.weight": down[:, :D], "attn1.to_kv_a.bias": down[:, D],
        "attn1.to_k_rope.weight": kr_rows[:, :D], "attn1.to_k_rope.bias": kr_rows[:, D],
        "attn1.k_up.weight": k_up,
        "attn1.v_up.weight": up_v, "attn1.v_up.bias": w["attn1.to_v.bias"],
        "attn1.to_out.0.weight": w["attn1.to_out.0.weight"], "attn1.to_out.0.bias": w["attn1.to_out.0.bias"],
    }
    if norm_k is not None:
        attn["attn1.norm_k.weight"] = norm_k
    info = {
        "rope_rank1_energy": energy_kept / energy_all if energy_all > 0 else 1.0,
        "kv_svd_energy_kept": captured,
        "key_norm_scale": kappa,
    }
    return LayerResult(attn, info, u)


def random_mla(wan: dict[str, torch.Tensor], cfg: C.Config, generator: torch.Generator) -> LayerResult:
    """New projections as Wan initialises linears (xavier_uniform, zero bias); to_out copied."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MLASelfAttention(cfg).state_dict().items()}
    attn = {}
    for k, shape in shapes.items():
        name = f"attn1.{k}"
        if k.startswith("to_out."):
            attn[name] = wan[name].double()
        elif k.endswith(".bias"):
            attn[name] = torch.zeros(shape, dtype=torch.float64)
        elif k.startswith("norm_"):
            attn[name] = torch.ones(shape, dtype=torch.float64)
        else:
            bound = math.sqrt(6.0 / (shape[0] + shape[1]))  # nn.init.xavier_uniform_
            attn[name] = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return LayerResult(attn, {})


# ----------------------------------------------------------------------------------------------
# Calibration: seeded latents and text through the source's own blocks, streamed layer by layer
# ----------------------------------------------------------------------------------------------
def calibration_clips(cfg: C.Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``convert.calib_samples`` clips of the shards ``convert.calib_data`` (``vmla-data encode``'s
    latents shards, in shard order): latents [n, F, C, H, W] and text embeddings [n, Lt, text_dim], float32.
    One line naming the key when the pattern matches nothing, holds other shards or too few clips."""
    from . import data

    cc = cfg.convert
    try:  # the shard reader checks the pattern (files, their kind) as the data.shards loader does
        source = data._ShardSource(C.replace(cfg, data=C.replace(cfg.data, shards=cc.calib_data)), "latents")
    except (OSError, ValueError) as e:
        raise ConversionError(str(e).replace("data.shards", "convert.calib_data")) from None
    if len(source) < cc.calib_samples:
        raise ConversionError(f"config key 'convert.calib_samples'={cc.calib_samples}: convert.calib_data "
                              f"({len(source.paths)} shards) holds {len(source)} clips")
    samples = [source.sample(i) for i in range(cc.calib_samples)]
    m = cfg.model
    shapes = {tuple(s["latents"].shape) for s in samples}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4 or next(iter(shapes))[1] != m.in_channels:
        raise ConversionError(f"config key 'convert.calib_data': latents of shapes {sorted(shapes)}; expected one "
                              f"[F, {m.in_channels}, H, W] shape (the model's model.in_channels)")
    texts = [torch.as_tensor(s["text"]).float() for s in samples]
    if any(t.shape[-1] != m.text_dim for t in texts):
        raise ConversionError(f"config key 'convert.calib_data': text embeddings of width {texts[0].shape[-1]}, "
                              f"the model reads model.text_dim={m.text_dim}")
    lt = min(max(t.shape[0] for t in texts), m.text_len)
    text = torch.zeros(len(texts), lt, m.text_dim)
    for i, t in enumerate(texts):
        text[i, : min(len(t), lt)] = t[:lt]
    latents = torch.stack([torch.as_tensor(s["latents"]).float() for s in samples])
    return latents, text


class Calibration:
    """Runs calibration latents through a checkpoint block by block, exposing each block's attn1 input.

    The batch holds ``calib_samples`` seeded Gaussian latents x0 (shape ``calib_latent_shape``) noised to
    every timestep of ``calib_timesteps`` (x_t = (1 - sigma) x0 + sigma eps), with seeded Gaussian text
    embeddings of ``calib_text_tokens`` tokens; with ``calib_data``, the first ``calib_samples`` clips of
    those encoded shards (their latents and text embeddings) instead, for a trained checkpoint's own input
    distribution. Only the non-block weights and one block are materialised.
    """

    def __init__(self, source: WanSource, src_cfg: C.Config, device: torch.device | str = "cpu"):
        cc = src_cfg.convert
        self.cfg = src_cfg
        self.device = torch.device(device)
        with torch.device("meta"):
            self.shell = WanStudent(src_cfg)
        top = {k: v.float().to(self.device) for k, v in source.top().items()}
        for name in ("patch_embedding", "condition_embedder", "proj_out"):
            mod = getattr(self.shell, name).to_empty(device=self.device)
            setattr(self.shell, name, mod)
            mod.load_state_dict({k[len(name) + 1:]: v for k, v in top.items() if k.startswith(name + ".")})
        gen = torch.Generator().manual_seed(cc.seed)
        m = src_cfg.model
        n, ts = cc.calib_samples, torch.tensor(cc.calib_timesteps, dtype=torch.float64)
        clips = calibration_clips(src_cfg) if cc.calib_data else None  # (latents, text) of encoded clips
        if clips is not None:
            nf, _, hh, ww = clips[0].shape[1:]
            key = f"the clips of convert.calib_data={cc.calib_data!r} ([F, C, H, W] = {list(clips[0].shape[1:])})"
        else:
            nf, hh, ww = cc.calib_latent_shape
            key = f"config key 'convert.calib_latent_shape'={cc.calib_latent_shape}"
        pt, ph, pw = m.patch_size
        if nf % pt or hh % ph or ww % pw:
            raise ConversionError(f"{key}: not divisible by the patch {m.patch_size}")
        # the same draws either way (clips only replace x0 and text): the noise is the Gaussian path's
        x0 = torch.randn(n, nf, m.in_channels, hh, ww, generator=gen)
        eps = torch.randn(n, len(ts), nf, m.in_channels, hh, ww, generator=gen)
        text = torch.randn(n, min(cc.calib_text_tokens, m.text_len), m.text_dim, generator=gen)
        if clips is not None:
            x0, text = clips
        x0 = x0[:, None].expand(-1, len(ts), -1, -1, -1, -1)
        t = ts[None].expand(n, -1)
        self.t = t.reshape(-1)  # (B,) with B = samples * timesteps, sample-major
        x = schedule.add_noise(x0.reshape(-1, *x0.shape[2:]), eps.reshape(-1, *eps.shape[2:]), self.t).float()
        text = text[:, None].expand(-1, len(ts), -1, -1).reshape(-1, *text.shape[1:])
        with torch.no_grad():
            self.tokens, self.mod, self.text_emb, self.frames, self.inp = self._prologue(
                x.to(self.device), self.t.float().to(self.device), text.to(self.device))

    def _prologue(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor):
        """WanStudent.forward up to the blocks (bidirectional, no cache)."""
        s = self.shell
        b, nf, _, hh, ww = x.shape  # (B, F, C, H, W)
        pt, ph, pw = s.patch_size
        fp, hp, wp = nf // pt, hh // ph, ww // pw
        tokens = s.patch_embedding(x.transpose(1, 2)).flatten(2).transpose(1, 2).contiguous()  # (B, L, D)
        ce = s.condition_embedder
        tt = t[:, None].expand(b, nf)[:, ::pt]  # (B, F')
        temb = ce.time_embedder(timestep_sinusoid(tt, ce.freq_dim))  # (B, F', D)
        mod = ce.time_proj(F.silu(temb)).unflatten(-1, (6, -1)).float()  # (B, F', 6, D)
        text_emb = ce.text_embedder(s._pad_text(text))
        inp = s._attn_inputs(fp, hp, wp, tokens.device, None, None, False)
        self.grid = (fp, hp, wp)
        return tokens, mod, text_emb, fp, inp

    @torch.no_grad()
    def step(self, i: int, block_state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run block ``i`` (its state dict) on the current hidden states; return its attn1 input (B, L, D)."""
        block = self.shell.blocks[i].to_empty(device=self.device)
        block.load_state_dict({k: v.float().to(self.device) for k, v in block_state.items()})
        seen = {}
        hook = block.attn1.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0]))
        self.tokens = block(self.tokens, self.mod, self.text_emb, self.inp, i, self.frames)
        hook.remove()
        self.shell.blocks[i] = block.to("meta")  # free it: one block at a time
        return seen["x"]

    def rope_inputs(self, cfg: C.Config) -> AttnInputs:
        """Bidirectional attention inputs with the RoPE spec of ``cfg``'s self-attention kind."""
        cls = MHASelfAttention if cfg.attention.kind == C.AttentionKind.mha else MLASelfAttention
        fp, hp, wp = self.grid
        rot = Rotary.from_angles(rope_angles(cls.rope_spec(cfg), torch.arange(fp, device=self.device), hp, wp))
        return AttnInputs(q_rot=rot, k_rot=rot, mask=None)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@torch.no_grad()
def layer_errors(wan: dict[str, torch.Tensor], res: LayerResult, cfg: C.Config, x: torch.Tensor, calib: Calibration) -> dict:
    """Relative Frobenius errors of K and V reconstruction and of the attention output on ``x`` (B, L, D)."""
    mha_cfg = _mha(cfg)
    mha = MHASelfAttention(mha_cfg).float().to(x.device)
    mha.load_state_dict({k[len("attn1."):]: v.float().to(x.device) for k, v in wan.items() if k.startswith("attn1.")})
    ref = mha(x, calib.rope_inputs(mha_cfg), 0)
    if cfg.attention.kind == C.AttentionKind.mha:
        return {"k_rel_err": 0.0, "v_rel_err": 0.0, "attn_out_rel_err": _rel(ref, ref)}
    mla = MLASelfAttention(cfg).float().to(x.device)
    mla.load_state_dict({k[len("attn1."):]: v.float().to(x.device) for k, v in res.attn.items()})
    out = mla(x, calib.rope_inputs(cfg), 0)
    errs = {"attn_out_rel_err": _rel(out, ref)}
    xs = x.reshape(-1, x.shape[-1]).double().cpu()  # (N, D)
    w = {k: v.double() for k, v in wan.items()}
    a = {k: v.double() for k, v in res.attn.items()}
    v_ref = xs @ w["attn1.to_v.weight"].t() + w["attn1.to_v.bias"]
    c = xs @ a["attn1.to_kv_a.weight"].t() + a["attn1.to_kv_a.bias"]  # (N, dc)
    errs["v_rel_err"] = _rel(c @ a["attn1.v_up.weight"].t() + a["attn1.v_up.bias"], v_ref)
    if res.head_mix is None:  # random init: no correspondence between MLA and Wan key coordinates
        errs["k_rel_err"] = None
        return errs
    lay = mla_layout(cfg)
    H, Dh, dn, dr, r = lay.num_heads, lay.head_dim, lay.d_n, lay.d_r, lay.heads_per_group
    k_raw = xs @ w["attn1.to_k.weight"].t() + w["attn1.to_k.bias"]
    k_ref = torch.rsqrt(k_raw.pow(2).mean(1, keepdim=True) + cfg.model.eps) * w["attn1.norm_k.weight"] * k_raw
    kn = c @ a["attn1.k_up.weight"].t()  # (N, H*dn)
    kr = xs @ a["attn1.to_k_rope.weight"].t() + a["attn1.to_k_rope.bias"]  # (N, G*dr)
    if "attn1.norm_k.weight" in a:
        s = torch.rsqrt((kn.pow(2).sum(1, keepdim=True) + kr.pow(2).sum(1, keepdim=True)) / lay.key_width + cfg.model.eps)
        g = a["attn1.norm_k.weight"]
        kn, kr = s * g[: H * dn] * kn, s * g[H * dn:] * kr
    k_hat = torch.zeros_like(k_ref)  # MLA's key in Wan's head coordinates (pre-RoPE)
    for h in range(H):
        for d, slot in zip(lay.slow_dims, lay.slot_of_slow):
            k_hat[:, h * Dh + d] = kn[:, h * dn + slot]
        j = h // r
        for e, d in enumerate(lay.fast_dims):
            k_hat[:, h * Dh + d] = res.head_mix[h, e // 2] * kr[:, j * dr + e]
    errs["k_rel_err"] = _rel(k_hat, k_ref)
    return errs


# ----------------------------------------------------------------------------------------------
# The conversion driver
# ----------------------------------------------------------------------------------------------
CONVERT_PRODUCER = "vmla-convert"  # the manifest's producer of a student folder written here
DIFFUSERS = "diffusers"  # the manifest's kind of a diffusers transformer folder
DIFFUSERS_PRODUCER = "vmla-convert --to diffusers"


def convert(src: str | Path, out: str | Path, config_paths: Sequence[str | Path] = (), overrides: Sequence[str] = (),
            overwrite: bool = False, log=print) -> dict:
    """Convert a Wan2.1-T2V checkpoint (or an ``mha`` student) into a student folder; returns the report."""
    t0 = time.perf_counter()
    source = WanSource(src)
    if source.layout == wan_keys.STUDENT:
        raise ConversionError(f"'{source.folder}' is already an MLA student; convert from a Wan checkpoint or an mha student")
    cfg = build_config(source, config_paths, overrides)
    check_source(source, cfg)
    kind, a, cc = cfg.attention.kind, cfg.attention, cfg.convert
    if kind == C.AttentionKind.mla:
        mla_layout(cfg)  # fail early on an impossible RoPE split
    out = Path(out)
    student_io.check_output(out, overwrite, student_io.STUDENT, CONVERT_PRODUCER, [src])  # before the slow part
    calib = Calibration(source, _mha(cfg), C.resolve_device(cfg.runtime.device))
    gen = torch.Generator().manual_seed(cc.seed)
    like = source.get("blocks.0.attn1.to_q.weight").dtype
    out_dtype = (lambda t: t.dtype) if cc.dtype == "source" else (lambda t: C.torch_dtype(cc.dtype))
    new_dtype = like if cc.dtype == "source" else C.torch_dtype(cc.dtype)
    layers = []
    desc = f"{kind.value}" + (f" d_c={a.d_c} d_r={a.d_r} groups={a.rope_key_groups} init={cc.init}" if kind == C.AttentionKind.mla else "")
    log(f"converting {source.folder} ({source.layout} layout, {len(source.files)} file(s)) -> {out}: {desc}")
    with student_io.AtomicDir(out, overwrite, student_io.STUDENT, CONVERT_PRODUCER, [src], cfg.checkpoint.checksums) as tmp:
        writer = student_io.ShardWriter(tmp, int(cc.max_shard_gb * (1 << 30)))
        for name, tensor in source.top().items():
            writer.add(name, tensor.to(out_dtype(tensor)))
        for i in range(cfg.model.num_layers):
            block = source.block(i)
            x = calib.step(i, block)  # (B, L, D) attn1 input of Wan's block i
            wan_attn = {k: v for k, v in block.items() if k.startswith("attn1.")}
            if kind == C.AttentionKind.mha:
                res = LayerResult(dict(wan_attn))
            elif cc.init == "spectral":
                res = spectral_mla(wan_attn, cfg, x.reshape(-1, x.shape[-1]).cpu())
            else:
                res = random_mla(wan_attn, cfg, gen)
            row = {"layer": i, **layer_errors(wan_attn, res, cfg, x, calib), **_weight_ranks(wan_attn, cc.energy), **res.info}
            layers.append(row)
            for k, v in block.items():
                if not k.startswith("attn1."):
                    writer.add(f"blocks.{i}.{k}", v.to(out_dtype(v)))
            for k, v in res.attn.items():  # mha: Wan's own tensors; mla: new tensors in the attention dtype
                writer.add(f"blocks.{i}.{k}", v.to(out_dtype(wan_attn[k]) if kind == C.AttentionKind.mha else new_dtype))
            log(f"  layer {i:3d}: attn out err {row['attn_out_rel_err']:.4f}  K err {_fmt(row['k_rel_err'])}  "
                f"V err {row['v_rel_err']:.4f}  eff. rank W_k/W_v/[W_k;W_v] {row['eff_rank_wk']}/{row['eff_rank_wv']}/{row['eff_rank_wkv']}")
        files = writer.close()
        report = _report(source, cfg, layers, files, time.perf_counter() - t0)
        (tmp / "config.yaml").write_text(C.to_yaml(cfg))
        (tmp / "conversion_report.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    log(f"wrote {out} ({len(files)} weight file(s), {report['seconds']:.1f} s); mean attention-output error "
        f"{report['summary']['attn_out_rel_err_mean']:.4f}; KV values/token/layer {report['kv_values_per_token']}")
    return report


def _fmt(v) -> str:
    return "  n/a " if v is None else f"{v:.4f}"


def _weight_ranks(wan_attn: dict[str, torch.Tensor], fraction: float) -> dict:
    wk, wv = wan_attn["attn1.to_k.weight"].double(), wan_attn["attn1.to_v.weight"].double()
    return {"eff_rank_wk": effective_rank(wk, fraction), "eff_rank_wv": effective_rank(wv, fraction),
            "eff_rank_wkv": effective_rank(torch.cat([wk, wv]), fraction)}


def _report(source: WanSource, cfg: C.Config, layers: list[dict], files: list[str], seconds: float) -> dict:
    a, cc = cfg.attention, cfg.convert
    mla = a.kind == C.AttentionKind.mla

    def mean(key):
        vals = [r[key] for r in layers if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "source": str(source.folder), "layout": source.layout, "files": files, "seconds": seconds,
        "target": {"kind": a.kind.value, "d_c": a.d_c if mla else None, "d_r": a.d_r if mla else None,
                   "rope_key_groups": a.rope_key_groups if mla else None, "qk_nope_head_dim": a.qk_nope_head_dim if mla else None,
                   "k_norm": a.k_norm.value if mla else None, "init": cc.init if mla else "copy",
                   "factorization": cc.factorization if mla and cc.init == "spectral" else None},
        "kv_values_per_token": C.kv_values_per_token(cfg), "kv_reduction": C.kv_reduction(cfg),
        "calibration": {"samples": cc.calib_samples, "timesteps": cc.calib_timesteps, "latent_shape": cc.calib_latent_shape,
                        "text_tokens": cc.calib_text_tokens, "data": cc.calib_data or "gaussian", "seed": cc.seed,
                        "energy": cc.energy},
        "errors": "relative Frobenius norms on the calibration batch: K = the per-head key Wan's attention sees "
                  "(after its RMSNorm, before RoPE) vs MLA's key mapped back to Wan's head coordinates; V = per-head "
                  "values; attention output = self-attention block output (to_out applied), bidirectional",
        "summary": {f"{k}_mean": mean(k) for k in ("k_rel_err", "v_rel_err", "attn_out_rel_err", "eff_rank_wk", "eff_rank_wv", "eff_rank_wkv")},
        "layers": layers,
    }


# ----------------------------------------------------------------------------------------------
# Export: an mha student (or an original-layout checkpoint) -> a diffusers folder
# ----------------------------------------------------------------------------------------------
def export_diffusers(src: str | Path, out: str | Path, config_paths: Sequence[str | Path] = (), overrides: Sequence[str] = (),
                     overwrite: bool = False, log=print) -> Path:
    """Write a diffusers ``WanTransformer3DModel`` folder (config.json + safetensors), streamed, in
    ``convert.dtype`` (``source`` keeps each tensor's dtype)."""
    from . import wan

    student_io.check_output(out, overwrite, DIFFUSERS, DIFFUSERS_PRODUCER, [src])
    source = WanSource(src)
    if source.layout == wan_keys.STUDENT:
        raise ConversionError(f"'{source.folder}' is an MLA student: only mha students (Wan attention) export to diffusers layout")
    cfg = build_config(source, config_paths, overrides)
    check_source(source, cfg)
    js = {"_class_name": "WanTransformer3DModel", **wan.wan_transformer_kwargs(cfg.model)}
    js["patch_size"] = list(js["patch_size"])
    with student_io.AtomicDir(out, overwrite, DIFFUSERS, DIFFUSERS_PRODUCER, [src], cfg.checkpoint.checksums) as tmp:
        writer = student_io.ShardWriter(tmp, int(cfg.convert.max_shard_gb * (1 << 30)))
        cast = (lambda t: t) if cfg.convert.dtype == "source" else (lambda t: t.to(C.torch_dtype(cfg.convert.dtype)))
        for name in source.names():
            writer.add(name, cast(source.get(name)))
        files = writer.close()
        rename = {student_io.SINGLE_NAME: "diffusion_pytorch_model.safetensors"}
        for f in files:  # diffusers' file names
            new = rename.get(f, f.replace("model-", "diffusion_pytorch_model-"))
            (tmp / f).rename(tmp / new)
        index = tmp / student_io.INDEX_NAME
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {k: v.replace("model-", "diffusion_pytorch_model-") for k, v in data["weight_map"].items()}
            (tmp / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(data, indent=1, allow_nan=False))
            index.unlink()
        (tmp / "config.json").write_text(json.dumps(js, indent=1, allow_nan=False))
    log(f"wrote diffusers folder {out} from {source.folder} ({source.layout} layout)")
    return Path(out)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmla-convert",
        description="Convert a Wan2.1-T2V checkpoint (original or diffusers layout) into a student folder "
                    "(attention.kind=mha|mla, convert.init=spectral|random), or export to diffusers layout.")
    p.add_argument("src", help="Wan2.1-T2V checkpoint folder / pipeline folder / .safetensors file, or a student folder")
    p.add_argument("out", help="output folder (written atomically, with a manifest.json; must not exist unless --overwrite)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. attention.d_c=160 convert.init=random")
    p.add_argument("--config", action="append", default=[], help="student config YAML (repeatable; e.g. configs/videomla-1.3b.yaml)")
    p.add_argument("--to", choices=("student", "diffusers"), default="student", help="output format (default: student)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT atomically if it is a previous output of this command (its manifest.json says "
                        "so); never SRC, a folder holding SRC, one inside SRC or a training run folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parse_with_overrides(parser, argv)  # key=value overrides may follow the options too
    try:
        if args.to == "diffusers":
            export_diffusers(args.src, args.out, args.config, args.overrides, args.overwrite)
        else:
            convert(args.src, args.out, args.config, args.overrides, args.overwrite)
    except (ConversionError, C.ConfigError, student_io.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
