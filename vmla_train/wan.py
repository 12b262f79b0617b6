"""Loaders and thin adapters for the Wan components we depend on (no Wan model code here).

- Teacher / critic: diffusers ``WanTransformer3DModel`` (bidirectional Wan2.1, 1.3B or 14B).
- VAE: diffusers ``AutoencoderKLWan``; latents are normalised with the VAE config's
  ``latents_mean`` / ``latents_std`` exactly as diffusers' Wan pipeline does.
- Text encoder: transformers ``UMT5EncoderModel`` + tokenizer; embeddings trimmed to each prompt's
  length (the student and teacher zero-pad to ``text_len`` as Wan does).

Everything loads from local folders; nothing downloads (``local_files_only``). Tiny random stand-ins
with the same classes (``tiny_*``) serve tests, the demo and benchmarks.

Shape convention at this boundary: our code uses latents [B, F, C, H, W]; diffusers uses
[B, C, F, H, W]. ``wan_flow`` and the VAE helpers convert. ``euler_sample`` is the teacher's
many-step sampler (ODE pairs, validation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from . import schedule
from .config import ModelConfig

# Wan's negative prompt (the published default, Chinese as in Wan's own configs).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def _subfolder(path: str | Path, name: str) -> Path:
    """``path/name`` if it exists (a whole diffusers pipeline folder), else ``path`` itself."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Wan component folder '{p}' does not exist")
    return p / name if (p / name).is_dir() else p


# ----------------------------------------------------------------------------------------------
# Transformer (teacher / critic)
# ----------------------------------------------------------------------------------------------
def wan_transformer_kwargs(m: ModelConfig) -> dict:
    """diffusers ``WanTransformer3DModel`` constructor arguments for our model geometry."""
    return dict(
        patch_size=tuple(m.patch_size),
        num_attention_heads=m.num_heads,
        attention_head_dim=m.head_dim,
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        text_dim=m.text_dim,
        freq_dim=m.freq_dim,
        ffn_dim=m.ffn_dim,
        num_layers=m.num_layers,
        cross_attn_norm=m.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=m.eps,
    )


def build_wan_transformer(m: ModelConfig, seed: int | None = None, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32):
    """A randomly initialised diffusers Wan transformer of the config's geometry (tests, benchmarks)."""
    from diffusers import WanTransformer3DModel

    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**wan_transformer_kwargs(m))
    return model.to(dtype)


def load_wan_transformer(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16):
    """Teacher / critic from a local diffusers folder (a pipeline folder with ``transformer/`` or the
    transformer folder itself)."""
    from diffusers import WanTransformer3DModel

    folder = _subfolder(path, "transformer")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"'{folder}' has no config.json: not a diffusers WanTransformer3DModel folder")
    return WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to(device)


def wan_flow(model, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_len: int | None = None) -> torch.Tensor:
    """Flow prediction of a diffusers Wan transformer in our layout.

    ``x`` [B, F, C, H, W]; ``t`` [B] (one timestep per sample) or [B, F] (per frame: expanded to the
    per-token timesteps diffusers accepts); ``text`` [B, Lt, text_dim], zero-padded to ``text_len``.
    """
    b, f, _, h, w = x.shape
    if text_len is not None and text.shape[1] < text_len:
        text = torch.nn.functional.pad(text, (0, 0, 0, text_len - text.shape[1]))
    if t.ndim == 2:
        p = model.config.patch_size
        per_frame = t[:, :: p[0]]
        t = per_frame.repeat_interleave((h // p[1]) * (w // p[2]), dim=1)  # (B, L)
    dtype = model.patch_embedding.weight.dtype  # compute dtype: diffusers keeps some modules (rope, norms) in float32
    out = model(x.transpose(1, 2).to(dtype), t, text.to(dtype), return_dict=False)[0]
    return out.transpose(1, 2)  # (B, F, C, H, W)


@torch.no_grad()
def euler_sample(model, noise: torch.Tensor, text: torch.Tensor, num_steps: int, shift: float,
                 text_len: int | None = None, negative: torch.Tensor | None = None, guidance_scale: float = 1.0,
                 keep: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The teacher's many-step sampler: flow-matching Euler from ``noise`` [B, F, C, H, W] (sigma = 1) to
    sigma = 0 over ``schedule.euler_sigmas(num_steps, shift)``, in float32.

    With ``negative`` [1, Lt, text_dim], classifier-free guidance ``schedule.guide(cond, uncond,
    guidance_scale)``: the negative prompt runs as the second half of one doubled batch. Returns the
    final latents and ``{k: latents after k steps}`` for ``k`` in ``keep`` (0 = the noise).
    """
    b = noise.shape[0]
    sigmas = schedule.euler_sigmas(num_steps, shift)  # (num_steps + 1,) float64, 1 -> 0
    if negative is not None:
        text = torch.cat([text, negative.to(text).expand(b, -1, -1)])  # (2B, Lt, D): cond, then uncond
    x = noise.float()
    kept = {0: x} if 0 in keep else {}
    for k in range(num_steps):
        xin = x if negative is None else torch.cat([x, x])
        t = torch.full((xin.shape[0],), schedule.NUM_TRAIN_TIMESTEPS * float(sigmas[k]), device=x.device)
        flow = wan_flow(model, xin, t, text, text_len).float()
        if negative is not None:
            flow = schedule.guide(flow[:b], flow[b:], guidance_scale)
        x = schedule.euler_step(x, flow, float(sigmas[k]), float(sigmas[k + 1]))
        if k + 1 in keep:
            kept[k + 1] = x
    return x, kept


# ----------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------
def load_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKLWan

    folder = _subfolder(path, "vae")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"'{folder}' has no config.json: not a diffusers AutoencoderKLWan folder")
    return AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to(device)


def tiny_vae(seed: int = 0):
    """A random AutoencoderKLWan with Wan's strides (4x temporal, 8x8 spatial) and 16 channels."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[False, True, True]).eval()


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=like.device).view(1, 1, z, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=like.device).view(1, 1, z, 1, 1)
    return mean, std


@torch.no_grad()
def vae_encode(vae, video: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, F, C, h, w] (float32, posterior mode)."""
    dtype = next(vae.parameters()).dtype
    z = vae.encode(video.to(dtype)).latent_dist.mode().float().transpose(1, 2)  # (B, F, C, h, w)
    mean, std = _latent_stats(vae, z)
    return (z - mean) / std


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, F, C, h, w] -> pixels [B, 3, T, H, W] in [-1, 1] (float32)."""
    mean, std = _latent_stats(vae, latents)
    z = (latents.float() * std + mean).transpose(1, 2)  # (B, C, F, h, w)
    dtype = next(vae.parameters()).dtype
    return vae.decode(z.to(dtype)).sample.float().clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------
def load_text_encoder(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16):
    """(tokenizer, UMT5EncoderModel) from a local diffusers pipeline folder (``tokenizer/`` and
    ``text_encoder/``) or a folder holding both."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(_subfolder(path, "tokenizer"), local_files_only=True)
    enc = UMT5EncoderModel.from_pretrained(_subfolder(path, "text_encoder"), torch_dtype=dtype, local_files_only=True)
    return tok, enc.to(device).eval()


@torch.no_grad()
def encode_prompts(tokenizer, encoder, prompts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (embeddings [B, max_len, D] zero past each prompt's length, mask [B, max_len] bool).

    Wan zeroes the embedding rows past the real tokens; callers may trim to ``mask.sum(1).max()``.
    """
    batch = tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True,
                      add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    dev = next(encoder.parameters()).device
    ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
    emb = encoder(ids, attention_mask=mask).last_hidden_state.float()
    emb = emb * mask[..., None]
    return emb, mask.bool()
