"""Loaders and thin adapters for the Wan components we depend on (no Wan model code here).

- Teacher / critic: diffusers ``WanTransformer3DModel`` (bidirectional Wan2.1, 1.3B or 14B).
- VAE: diffusers ``AutoencoderKLWan``; latents are normalised with the VAE config's
  ``latents_mean`` / ``latents_std`` exactly as diffusers' Wan pipeline does.
- Text encoder: transformers ``UMT5EncoderModel`` + tokenizer; embeddings trimmed to each prompt's
  length (the student and teacher zero-pad to ``text_len`` as Wan does).

Everything loads from local folders; nothing downloads (``local_files_only``). Each loader first checks
what its folder holds (``vae_folder``, ``transformer_folder``, ``text_encoder_folders``: config.json's
``_class_name`` / ``model_type``, the weight and tokenizer files) and raises ``CheckpointError`` saying what
was expected and what was found (``describe_folder``), so a wrong folder never half-loads. Tiny random stand-ins
with the same classes (``tiny_*``) serve tests, the demo and benchmarks.

Shape convention at this boundary: our code uses latents [B, F, C, H, W]; diffusers uses
[B, C, F, H, W]. ``wan_flow`` and the VAE helpers convert. ``euler_sample`` is the teacher's
many-step sampler (ODE pairs, validation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from . import schedule
from .config import ConfigError, ModelConfig

# Wan's negative prompt (the published default, Chinese as in Wan's own configs).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


# ----------------------------------------------------------------------------------------------
# What a folder holds: checked before anything loads, so a wrong folder is one line naming it
# ----------------------------------------------------------------------------------------------
ORIGINAL_WAN_FILES = ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth")  # files of Wan's own (non-diffusers) layout
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                     "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")  # subfolders of a diffusers Wan pipeline


def _config_json(folder: Path) -> dict | None:
    """``folder/config.json`` as a dict, or None when absent or not a JSON object."""
    try:
        js = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return js if isinstance(js, dict) else None


def describe_folder(folder: str | Path) -> str:
    """What ``folder`` holds, in words, for error messages: a diffusers component (its ``_class_name``), a
    transformers model (its architecture), Wan's original layout, a pipeline, a tokenizer, a student or
    training run folder, or its first entries."""
    p = Path(folder)
    if not p.exists():
        return "nothing (it does not exist)"
    if not p.is_dir():
        return "a file, not a folder"
    js = _config_json(p)
    if (js is not None and js.get("_class_name") == "WanModel") or any((p / f).is_file() for f in ORIGINAL_WAN_FILES):
        return ("Wan's original (non-diffusers) checkpoint layout (config.json _class_name 'WanModel', "
                f"{', '.join(f for f in ORIGINAL_WAN_FILES if (p / f).is_file()) or 'no diffusers subfolders'}); "
                "download the diffusers layout (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) and give that folder")
    if js is not None and "_class_name" in js:
        return f"a diffusers {js['_class_name']} folder (config.json _class_name {js['_class_name']!r})"
    if js is not None and js.get("architectures"):
        return f"a transformers {js['architectures'][0]} folder (config.json model_type {js.get('model_type')!r})"
    parts = [d for d in PIPELINE_PARTS if (p / d).is_dir()]
    if parts or (p / "model_index.json").is_file():
        return f"a diffusers pipeline folder with {', '.join(f'{d}/' for d in parts) or 'no Wan component subfolders'}"
    if any((p / f).is_file() for f in TOKENIZER_FILES):
        return "a tokenizer folder"
    if (p / "config.yaml").is_file() and (p / "model.safetensors").is_file():
        return "a vmla student folder (config.yaml + model.safetensors)"
    if (p / "checkpoints").is_dir():
        return "a vmla training run folder (checkpoints/)"
    names = sorted(x.name for x in p.iterdir())
    return f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}" if names else "an empty folder"


def _component(path: str | Path, sub: str, what: str, key: str, check) -> Path:
    """The folder of one Wan component: ``path/sub`` when ``path`` is a pipeline folder holding it, else
    ``path`` itself. ``check(folder)`` returns None when the folder holds the component, else what it holds
    instead; then ``CheckpointError`` names ``key``, the folder, what was expected and what was found."""
    from .student_io import CheckpointError

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{key} '{p}' does not exist: expected {what} or a diffusers Wan pipeline folder "
                              f"holding {sub}/")
    folder = p / sub if (p / sub).is_dir() else p
    found = check(folder)
    if found is not None:
        hint = ""
        if (p.parent / sub).is_dir() and p.parent / sub != p:  # a sibling of the wanted subfolder was given
            hint = f"; the pipeline folder '{p.parent}' holds {sub}/: give that folder"
        raise CheckpointError(f"{key} '{p}': expected {what} or a diffusers Wan pipeline folder holding {sub}/, "
                              f"found {found}{hint}")
    return folder


def _diffusers_check(class_name: str):
    """A ``check`` for ``_component``: config.json names ``class_name`` and a weight file is there."""

    def check(folder: Path) -> str | None:
        js = _config_json(folder)
        if js is None or js.get("_class_name") != class_name:
            return describe_folder(folder)
        if not any((folder / f).is_file() for f in DIFFUSERS_WEIGHTS):
            return f"its config.json but no weights ({' / '.join(DIFFUSERS_WEIGHTS)})"
        return None

    return check


def _text_encoder_check(folder: Path) -> str | None:
    js = _config_json(folder)
    if js is None or "_class_name" in js or js.get("model_type") != "umt5":
        return describe_folder(folder)
    if not any((folder / f).is_file() for f in TRANSFORMERS_WEIGHTS) and not any(folder.glob("model-*.safetensors")):
        return f"its config.json but no weights ({' / '.join(TRANSFORMERS_WEIGHTS)})"
    return None


def _tokenizer_check(folder: Path) -> str | None:
    js = _config_json(folder)
    if (js is not None and "_class_name" in js) or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return describe_folder(folder)
    return None


def transformer_folder(path: str | Path, key: str = "Wan transformer folder") -> Path:
    """The ``WanTransformer3DModel`` folder of ``path`` (a pipeline folder or the transformer folder);
    ``CheckpointError`` (naming ``key``, the config key it came from) when it holds something else."""
    return _component(path, "transformer", "a diffusers WanTransformer3DModel folder", key,
                      _diffusers_check("WanTransformer3DModel"))


def vae_folder(path: str | Path, key: str = "Wan VAE folder") -> Path:
    """The ``AutoencoderKLWan`` folder of ``path`` (a pipeline folder or the VAE folder); ``CheckpointError``
    (naming ``key``) when it holds something else."""
    return _component(path, "vae", "a diffusers AutoencoderKLWan folder", key, _diffusers_check("AutoencoderKLWan"))


def text_encoder_folders(path: str | Path, key: str = "umT5 text encoder folder") -> tuple[Path, Path]:
    """(tokenizer folder, ``UMT5EncoderModel`` folder) of ``path``: a pipeline folder with ``tokenizer/`` and
    ``text_encoder/``, or one folder holding both; ``CheckpointError`` (naming ``key``) otherwise."""
    enc = _component(path, "text_encoder", "a transformers UMT5EncoderModel folder (config.json model_type 'umt5')", key,
                     _text_encoder_check)
    tok = _component(path, "tokenizer", f"a tokenizer folder ({' / '.join(TOKENIZER_FILES)})",
                     key, _tokenizer_check)
    return tok, enc


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

    folder = transformer_folder(path)
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
                 keep: Sequence[int] = (), start: int = 0) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The teacher's many-step sampler: flow-matching Euler from ``noise`` [B, F, C, H, W] (sigma = 1) to
    sigma = 0 over ``schedule.euler_sigmas(num_steps, shift)``, in float32.

    With ``negative`` [1, Lt, text_dim], classifier-free guidance ``schedule.guide(cond, uncond,
    guidance_scale)``: the negative prompt runs as the second half of one doubled batch. Returns the
    final latents and ``{k: latents after k steps}`` for ``k`` in ``keep`` (0 = the noise).
    ``start`` > 0: ``noise`` is the latents at step ``start`` (sigma = ``euler_sigmas[start]``, e.g. clean
    latents noised to it) and the sampler runs the remaining steps only.
    """
    b = noise.shape[0]
    sigmas = schedule.euler_sigmas(num_steps, shift)  # (num_steps + 1,) float64, 1 -> 0
    if not 0 <= start <= num_steps:
        raise ValueError(f"euler_sample: start={start} outside 0..{num_steps}")
    if negative is not None:
        text = torch.cat([text, negative.to(text).expand(b, -1, -1)])  # (2B, Lt, D): cond, then uncond
    x = noise.float()
    kept = {start: x} if start in keep else {}
    for k in range(start, num_steps):
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

    folder = vae_folder(path)
    return AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to(device)


def vae_strides(config) -> tuple[int, int]:
    """(time, space) strides of an ``AutoencoderKLWan`` config (the object or its config.json as a dict); one
    without scale factors has Wan2.1's, 4x in time and 8x in space."""
    return int(config.get("scale_factor_temporal", 4)), int(config.get("scale_factor_spatial", 8))


def check_vae(vae, cfg, where: str) -> None:
    """ConfigError naming ``where`` unless the VAE's strides (``vae_strides``) are ``video.vae_stride`` and its
    latent channels ``model.in_channels``."""
    c = vae.config
    t, sp = vae_strides(c)
    strides = [t, sp, sp]
    if list(cfg.video.vae_stride) != strides:
        raise ConfigError(f"VAE '{where}' compresses {strides[0]}x in time and {strides[1]}x in space, but "
                         f"video.vae_stride={list(cfg.video.vae_stride)}: pass video.vae_stride=[{strides[0]},"
                         f"{strides[1]},{strides[2]}] (or the VAE this config was made for)")
    if c.z_dim != cfg.model.in_channels:
        raise ConfigError(f"VAE '{where}' has z_dim={c.z_dim}, expected model.in_channels={cfg.model.in_channels}")


def tiny_vae(seed: int = 0):
    """A random AutoencoderKLWan with Wan's strides (4x temporal, 8x8 spatial) and 16 channels."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[False, True, True]).eval()


# Whole-clip passes of a Wan2.1 VAE. diffusers runs the causal codec chunk by chunk (encoder: 1 + 4 + 4 ... frames,
# decoder: one latent frame at a time) with a feature cache, which keeps memory flat at 480p but makes a small
# codec launch-bound (its training step: ~13 x every kernel for a 49-frame clip). The same computation in one
# pass: every causal conv is zero-padded in time exactly as the first chunk's is, and its cache is exactly the
# frames before each chunk, so only the temporal resamplers need care —
# - downsample3d: the first frame passes; every later chunk convolves (stride 2, no padding) its frames and the
#   previous chunk's last one, i.e. windows starting at even frames: one strided conv over the whole clip;
# - upsample3d: the first latent frame passes (diffusers' "Rep" marker); the later ones go through a causal,
#   zero-padded conv that never sees the first, each giving two frames.
# Equal to diffusers' chunked encode / decode up to float rounding (tests/test_world_models.py).
def _whole_resample(m, x: torch.Tensor) -> torch.Tensor:
    """One pass of a ``WanResample`` over a whole clip [B, C, T, H, W] (the chunked semantics above)."""
    b, c, t, h, w = x.shape
    if m.mode == "upsample3d" and t > 1:
        rest = m.time_conv(x[:, :, 1:])  # (B, 2C, T - 1, H, W): two output frames per input frame
        rest = rest.reshape(b, 2, c, t - 1, h, w)
        rest = torch.stack((rest[:, 0], rest[:, 1]), 3).reshape(b, c, 2 * (t - 1), h, w)
        x = torch.cat([x[:, :, :1], rest], 2)
    t = x.shape[2]
    x = m.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # per frame, in space
    x = x.view(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)
    if m.mode == "downsample3d" and t > 1:
        x = torch.cat([x[:, :, :1], m.time_conv(x)], 2)
    return x


def _check_whole(vae) -> None:
    if getattr(vae.config, "is_residual", False) or getattr(vae.config, "patch_size", None) is not None:
        raise ValueError("whole-clip VAE passes cover Wan2.1's VAE layout (is_residual=False, no patch_size)")


def vae_encode_whole(vae, video: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, T, H, W] (T = 1 + 4k) -> the posterior's moments [B, 2 z_dim, F, h, w] in one pass
    (what ``vae.encode`` computes chunk by chunk); differentiable."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

    _check_whole(vae)
    enc = vae.encoder
    x = enc.conv_in(video)
    for layer in enc.down_blocks:
        x = _whole_resample(layer, x) if isinstance(layer, WanResample) else layer(x)
    x = enc.mid_block(x)
    x = enc.conv_out(enc.nonlinearity(enc.norm_out(x)))
    return vae.quant_conv(x)


def vae_decode_whole(vae, z: torch.Tensor) -> torch.Tensor:
    """Unnormalised latents [B, z_dim, F, h, w] -> pixels [B, 3, T, H, W] clamped to [-1, 1] in one pass (what
    ``vae.decode(z).sample`` computes one latent frame at a time); differentiable."""
    _check_whole(vae)
    dec = vae.decoder
    x = dec.mid_block(dec.conv_in(vae.post_quant_conv(z)))
    for block in dec.up_blocks:
        for resnet in block.resnets:
            x = resnet(x)
        if block.upsamplers is not None:
            x = _whole_resample(block.upsamplers[0], x)
    x = dec.conv_out(dec.nonlinearity(dec.norm_out(x)))
    return x.clamp(-1.0, 1.0)


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=like.device).view(1, 1, z, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=like.device).view(1, 1, z, 1, 1)
    return mean, std


@torch.no_grad()
def vae_encode(vae, video: torch.Tensor, one_pass: bool = False) -> torch.Tensor:
    """Pixels [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, F, C, h, w] (float32, posterior mode).
    ``one_pass``: ``vae_encode_whole`` instead of diffusers' chunk loop (equal to rounding; memory grows with
    the clip: for small frames)."""
    dtype = next(vae.parameters()).dtype
    if one_pass:
        z = vae_encode_whole(vae, video.to(dtype))[:, : vae.config.z_dim].float().transpose(1, 2)  # the mode
    else:
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

    tok_folder, enc_folder = text_encoder_folders(path)
    tok = AutoTokenizer.from_pretrained(tok_folder, local_files_only=True)
    enc = UMT5EncoderModel.from_pretrained(enc_folder, torch_dtype=dtype, local_files_only=True)
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
