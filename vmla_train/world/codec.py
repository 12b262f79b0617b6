"""The world's video codec: a small diffusers ``AutoencoderKLWan`` trained on rendered world clips.

Same class, strides and normalisation as Wan2.1's VAE (4x temporal with a causal first frame, 8x8
spatial; ``latents_mean`` / ``latents_std`` in its config), so ``wan.load_vae`` + ``wan.vae_encode`` /
``wan.vae_decode`` serve it unchanged; only the widths are smaller.

Training (``train_codec``): clip ``i`` of the training stream is the world scene seeded by
``(seed, split, i)`` rendered by ``scene.sample_scene`` + ``render.render`` in DataLoader workers, so
the data order is a pure function of the step and a resumed run sees exactly the clips it would have.
Loss per step, on pixels in [-1, 1] [B, 3, T, H, W]:

    L = mean|x - x^| + mean (x - x^)^2 + kl_weight * mean KL(q(z|x) || N(0, 1))

with x^ decoded from a posterior sample. Both means are per element (pixels for reconstruction,
latent elements for KL). ``kl_weight`` = 1e-5 keeps the posterior variance and the latent scale
bounded without costing measurable PSNR; values up to ~1e-4 trade some PSNR for smoother latents.
AdamW at 2e-4, linear warm-up then cosine decay to 10%, gradient clipping at 1, bf16 autocast on
CUDA. The learning rate matters more than anything else here: at 1e-3 the model stalls near the PSNR of
the mean image (~15 dB) for hundreds of steps, while 1e-4 .. 3e-4 fit (measured on CPU, 64x64 frames,
base_dim 16). ``budget_s`` fits the run to a time budget: after the first ``warmup_steps`` steps the step
rate is measured and the step count (hence the cosine schedule) is fixed so training ends in time.

The recipe that works (the shipped codec, checkpoints/world/models): train on single frames first
(``num_frames=1``: cheap steps, the spatial code), then ``init_from`` that codec with ``inflate=True``
(``inflate_temporal``) and train on clips longer than the codec's temporal receptive field (49 frames).

The final phase also measures the **metric ceiling**: the world metrics (``metrics.evaluate_many``) of
held-out clips at the world's full length (``ceiling_frames``) after the ``wan.vae_encode`` ->
``wan.vae_decode`` round trip, scored against their own scenes. A generator can score no better than its
codec lets it; these numbers are the bar every later quality number is read against.

Output folder layout:

    OUT/codec-train/state.pt   resumable state: weights, optimizer, step, RNG, loss history, settings
    OUT/vae/                   the final model (``save_pretrained``) with latents_mean / latents_std
    OUT/codec.json             steps, held-out PSNR, metric ceiling, seconds, device name, date
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import rng_state, set_rng_state
from ..config import ModelConfig, atomic_write_text, json_finite
from ..student_io import AtomicDir

TRAIN, STATS, EVAL, CEILING = 0, 1, 2, 3  # clip streams: training, latent statistics, held-out PSNR, metric ceiling
SETTINGS_ADDED = dict(inflate=False)  # settings newer than some saved states: what those runs did


@dataclass
class CodecConfig:
    """Widths and strides of the world's AutoencoderKLWan (default: Wan2.1's strides, 4x in time and 8x in
    space; ``dim_mult`` of three stages gives 4x in space)."""

    base_dim: int = 32  # channels of the first stage (Wan2.1: 96)
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])  # per-stage width multipliers (4 stages = 8x)
    num_res_blocks: int = 1  # residual blocks per stage (Wan2.1: 2)
    z_dim: int = ModelConfig.in_channels  # latent channels = the DiT's in_channels
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])  # 2x in time per True

    @staticmethod
    def wan_temporal(num_stages: int) -> list[bool]:
        """Wan2.1's time downsampling for ``num_stages`` spatial downsamplings: 2x in each of the last two
        (4x in all; Wan's own three stages: [False, True, True])."""
        return [i >= num_stages - 2 for i in range(num_stages)]

    def __post_init__(self) -> None:
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"CodecConfig: temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} "
                             f"entries, got {self.temperal_downsample}")

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)


def build_codec(cfg: CodecConfig, seed: int = 0):
    """A seeded random ``AutoencoderKLWan`` of ``cfg``'s geometry (unit latent statistics)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                            num_res_blocks=cfg.num_res_blocks, attn_scales=[],
                            temperal_downsample=list(cfg.temperal_downsample),
                            latents_mean=[0.0] * cfg.z_dim, latents_std=[1.0] * cfg.z_dim,
                            scale_factor_temporal=cfg.temporal_stride, scale_factor_spatial=cfg.spatial_stride)


@torch.no_grad()
def inflate_temporal(vae) -> None:
    """Turn a codec trained on single frames into a frame-by-frame clip codec, in place.

    On one frame every causal 3D convolution sees only its last temporal tap (the two before it read the
    causal zero padding), and the resamplers' time convolutions never run, so image training leaves those
    weights at their random start. Here every other tap is zeroed (each 3D convolution becomes the trained
    2D one, applied per frame) and the time convolutions become "keep the newest frame": the encoder's 2x
    temporal downsamplers pass every second frame on, the decoder's upsamplers repeat each frame twice.
    The result codes latent frame j from pixel frame 4j alone (the first frame alone for j = 0) and decodes
    it, with the image codec's weights, into the 4 frames of its group: the image codec's quality on every
    4th frame, a held copy between them, and a start for training on clips that does not throw the spatial
    code away.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    time_convs = {id(m.time_conv) for m in vae.modules() if isinstance(m, WanResample) and hasattr(m, "time_conv")}
    for m in vae.modules():
        if not isinstance(m, WanCausalConv3d) or m.kernel_size[0] == 1:
            continue
        m.weight[:, :, :-1].zero_()
        if id(m) in time_convs:  # [k * C, C, 3, 1, 1]: the newest frame, k = 1 (down) or 2 (up) copies
            c = m.in_channels
            eye = torch.eye(c, dtype=m.weight.dtype, device=m.weight.device)
            m.weight[:, :, -1, 0, 0] = eye.repeat(m.out_channels // c, 1)
            m.bias.zero_()


# ----------------------------------------------------------------------------------------------
# Data: world clips rendered on the fly
# ----------------------------------------------------------------------------------------------
def clip_seed(seed: int, split: int, index: int) -> int:
    """The scene seed of clip ``index`` of stream ``split`` (independent streams per split)."""
    return int(np.random.SeedSequence([seed, split, index]).generate_state(1, np.uint64)[0] >> 1)


class WorldClips(torch.utils.data.Dataset):
    """Clip ``i`` of one stream: a freshly sampled world scene -> float [3, T, H, W] in [-1, 1]."""

    def __init__(self, height: int, width: int, num_frames: int, fps: int, seed: int, split: int) -> None:
        self.height, self.width, self.num_frames, self.fps = height, width, num_frames, fps
        self.seed, self.split = seed, split

    def __len__(self) -> int:
        return 2**62  # an endless stream; loaders pick indices with a range sampler

    def __getitem__(self, i: int) -> torch.Tensor:
        from .render import render
        from .scene import sample_scene

        scene = sample_scene(clip_seed(self.seed, self.split, i), self.height, self.width, self.fps)
        frames = torch.as_tensor(np.asarray(render(scene, self.num_frames)))  # (T, H, W, 3) uint8
        return frames.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)  # (3, T, H, W)


def clip_loader(clips: WorldClips, start: int, stop: int, batch_size: int, num_workers: int, pin: bool = False):
    """Batches [B, 3, T, H, W] of clips ``start .. stop - 1`` in order (``num_workers`` render processes)."""
    return torch.utils.data.DataLoader(clips, batch_size=batch_size, sampler=range(start, stop), drop_last=False,
                                       num_workers=num_workers, pin_memory=pin,
                                       prefetch_factor=4 if num_workers else None,
                                       generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone


# ----------------------------------------------------------------------------------------------
# Loss, metrics
# ----------------------------------------------------------------------------------------------
def codec_loss(vae, video: torch.Tensor, kl_weight: float, one_pass: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction (L1 + MSE) of a posterior sample + ``kl_weight`` * KL, all per-element means.

    ``video`` [B, 3, T, H, W] in [-1, 1]; returns (loss, {"rec", "kl", "psnr"}). ``one_pass``: the codec runs
    over each clip in one pass (``wan.vae_encode_whole`` / ``vae_decode_whole``) instead of diffusers' chunk
    loop; the same function of the weights up to float rounding.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from .. import wan

    if one_pass:
        post = DiagonalGaussianDistribution(wan.vae_encode_whole(vae, video))
        recon = wan.vae_decode_whole(vae, post.sample()).float()
    else:
        post = vae.encode(video).latent_dist  # mean / logvar [B, C, F, h, w]
        recon = vae.decode(post.sample()).sample.float()  # (B, 3, T, H, W)
    err = recon - video
    mse = err.square().mean()
    rec = err.abs().mean() + mse
    mean, logvar = post.mean.float(), post.logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    return rec + kl_weight * kl, {"rec": rec.item(), "kl": kl.item(), "psnr": psnr(mse.item())}


def psnr(mse: float) -> float:
    """PSNR in dB of pixels in [-1, 1] (peak-to-peak 2, the same as [0, 1] pixels with peak 1)."""
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` down to ``lr / 10`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def latent_stats(vae, loader, device: torch.device) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior mode over every clip of ``loader``."""
    total = sq = count = 0
    for video in loader:
        z = vae.encode(video.to(device)).latent_dist.mode().double()  # (B, C, F, h, w)
        total = total + z.sum((0, 2, 3, 4))
        sq = sq + z.square().sum((0, 2, 3, 4))
        count += z.numel() // z.shape[1]
    mean = total / count
    std = (sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


@torch.no_grad()
def heldout_psnr(folder: Path, loader, device: torch.device) -> float:
    """PSNR of ``wan.vae_decode(wan.vae_encode(x))`` over ``loader``'s clips, the model loaded from
    ``folder`` through ``wan.load_vae`` (the path every consumer takes)."""
    from .. import wan

    vae = wan.load_vae(folder, device=device, dtype=torch.float32).eval()
    se = n = 0.0
    for video in loader:
        video = video.to(device)
        recon = wan.vae_decode(vae, wan.vae_encode(vae, video))  # (B, 3, T, H, W)
        se += (recon - video).square().sum().item()
        n += video.numel()
    return psnr(se / n)


@torch.no_grad()
def metric_ceiling(folder: Path, height: int, width: int, num_frames: int, fps: int, seed: int, num_clips: int,
                   device: torch.device, batch_size: int = 8) -> dict:
    """World metrics of ``num_clips`` held-out clips (stream ``CEILING``) after the codec round trip in
    ``folder``, each scored against its own scene: what a perfect generator decoded by this codec scores."""
    from .. import wan
    from .metrics import SCORES, ERRORS, evaluate_many
    from .render import render
    from .scene import sample_scene

    vae = wan.load_vae(folder, device=device, dtype=torch.float32).eval()
    scenes = [sample_scene(clip_seed(seed, CEILING, i), height, width, fps) for i in range(num_clips)]
    items, se = [], torch.zeros(num_frames, dtype=torch.float64)  # squared error per frame index
    for k in range(0, num_clips, batch_size):
        clips = np.stack([render(sc, num_frames) for sc in scenes[k:k + batch_size]])  # (B, T, H, W, 3) uint8
        video = torch.as_tensor(clips).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0).to(device)
        recon = wan.vae_decode(vae, wan.vae_encode(vae, video))  # (B, 3, T, H, W) in [-1, 1]
        se += (recon - video).double().square().mean((1, 3, 4)).sum(0).cpu()
        pixels = recon.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
        items += list(zip(pixels, scenes[k:k + batch_size]))
    result = evaluate_many(items, fps=fps)
    per_frame = [psnr(x) for x in (se / num_clips).tolist()]
    return ({k: result[k] for k in (*SCORES, *ERRORS, "drift_score")}
            | dict(psnr_db=psnr(float(se.mean()) / num_clips), psnr_per_frame_db=per_frame, clips=num_clips,
                   frames=num_frames))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_weights(vae, folder: Path) -> None:
    """The weights of the codec in ``folder`` into ``vae`` (same widths), or one ValueError naming the folder."""
    from .. import wan
    from ..student_io import CheckpointError

    try:
        src = wan.load_vae(folder, dtype=torch.float32)
    except (OSError, ValueError, CheckpointError) as e:
        raise ValueError(f"train_codec: init_from '{folder}' is not a codec folder ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    mine = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in src.state_dict().items()}
    if mine != theirs:
        raise ValueError(f"train_codec: init_from '{folder}' has other widths ({len(theirs)} tensors, z_dim "
                         f"{src.config.z_dim}, base_dim {src.config.base_dim}) than this codec ({len(mine)} tensors, "
                         f"z_dim {vae.config.z_dim}, base_dim {vae.config.base_dim})")
    vae.load_state_dict(src.state_dict())


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def train_codec(out_dir: str | Path, height: int = 64, width: int = 64, num_frames: int = 17, steps: int = 3000,
                batch_size: int = 16, lr: float = 2e-4, device: str | torch.device = "cuda", seed: int = 0,
                resume: bool = True, time_limit_s: float | None = None, *, codec: CodecConfig | None = None,
                kl_weight: float = 1e-5, fps: int = 16, warmup_steps: int = 100, save_every: int = 500,
                log_every: int = 50, num_workers: int | None = None, stats_clips: int = 256, eval_clips: int = 64,
                budget_s: float | None = None, ceiling_clips: int = 32, ceiling_frames: int = 81,
                init_from: str | Path | None = None, inflate: bool = False, one_pass: bool = False,
                log: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict:
    """Train (or resume) the world codec in ``out_dir``; returns the report (``done`` False if stopped
    by ``time_limit_s``: run the same call again to continue).

    ``time_limit_s`` bounds the training loop (a checkpoint is written when it is reached); the final
    phase (latent statistics over ``stats_clips`` clips, held-out PSNR over ``eval_clips``, the metric
    ceiling over ``ceiling_clips`` clips of ``ceiling_frames`` frames; 0 clips skips it) comes after.
    ``budget_s`` (fresh runs only): seconds of training; ``steps`` becomes the number that fits, at most
    ``steps``, fixed after the warm-up and saved with the state, so a resumed run keeps it; if training then
    runs past the budget anyway (later steps slower than the timed ones), it ends at that step.
    ``init_from`` (fresh runs): start from the weights of another codec of the same widths (a folder
    ``wan.load_vae`` reads: a run's OUT or OUT/vae), e.g. to continue a short-clip run on longer clips.
    ``inflate`` (with ``init_from``, a codec trained on single frames): ``inflate_temporal`` after loading, so
    clip training starts from the image codec applied frame by frame.
    ``one_pass``: training steps run the codec over each clip in one pass (``codec_loss``), not chunk by chunk
    (equal up to rounding, so a run may change it on resume); the evaluations always use ``wan.vae_encode`` /
    ``wan.vae_decode``, the path every consumer takes.
    """
    t_start = time.time()
    out = Path(out_dir)
    codec = codec or CodecConfig()
    device = torch.device(device)
    state_path, vae_dir, report_path = out / "codec-train" / "state.pt", out / "vae", out / "codec.json"
    if (num_frames < 1 or (num_frames - 1) % codec.temporal_stride or height < 1 or width < 1
            or height % codec.spatial_stride or width % codec.spatial_stride):
        raise ValueError(f"train_codec: clips need num_frames = 1 + {codec.temporal_stride}k and height/width "
                         f"multiples of {codec.spatial_stride}; got {num_frames}x{height}x{width}")
    if inflate and not init_from:
        raise ValueError("train_codec: inflate needs init_from (the codec trained on single frames to inflate)")
    if steps < 0 or batch_size < 1 or stats_clips < 1 or eval_clips < 1 or ceiling_clips < 0:
        raise ValueError(f"train_codec: needs steps >= 0 and batch_size, stats_clips, eval_clips >= 1; got "
                         f"steps={steps}, batch_size={batch_size}, stats_clips={stats_clips}, eval_clips={eval_clips}")
    if vae_dir.exists() and not state_path.exists():
        raise FileExistsError(f"train_codec: '{vae_dir}' exists and was not made by train_codec; "
                              "choose another out_dir")
    settings = dict(height=height, width=width, num_frames=num_frames, batch_size=batch_size, lr=lr, seed=seed,
                    steps=steps, kl_weight=kl_weight, fps=fps, warmup_steps=warmup_steps, codec=asdict(codec),
                    init_from=str(init_from) if init_from else None, inflate=inflate)
    if num_workers is None:
        num_workers = 0 if device.type == "cpu" else max(1, min(14, (os.cpu_count() or 2) - 2))

    vae = build_codec(codec, seed).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    step, history, trained_s, fitted = 0, [], 0.0, None  # fitted: the step count a budget fixed
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        saved = {**SETTINGS_ADDED, **state["settings"]}
        changed = {k: (saved.get(k), v) for k, v in settings.items() if k != "steps" and saved.get(k) != v}
        if changed:
            raise ValueError(f"train_codec: '{state_path}' was trained with other settings {changed} "
                             "(saved, requested); pass resume=False or another out_dir")
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history, trained_s = state["step"], state["history"], state["trained_s"]
        fitted = state.get("fitted_steps")
        steps, budget_s = fitted or steps, None  # a budget fixed the step count when the run started
        set_rng_state(state["rng"])
        log(f"resumed from {state_path} at step {step}")
        if step >= steps and report_path.exists() and vae_dir.exists():
            report = json.loads(report_path.read_text())
            if report.get("steps") == step:
                log(f"already trained to step {step}: {report_path}")
                return report
    elif init_from:
        _load_weights(vae, Path(init_from))
        if inflate:
            inflate_temporal(vae)
        log(f"initialised from {init_from}" + (", inflated to a frame-by-frame clip codec" if inflate else ""))

    def save() -> None:
        _save_atomic(dict(model=vae.state_dict(), optimizer=opt.state_dict(), step=step, history=history,
                          trained_s=trained_s + time.time() - t_loop, rng=rng_state(), settings=settings,
                          fitted_steps=fitted), state_path)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    clips = WorldClips(height, width, num_frames, fps, seed, TRAIN)
    loader = clip_loader(clips, step * batch_size, steps * batch_size, batch_size, num_workers, device.type == "cuda")
    t_loop, stopped, t_rate = time.time(), False, None
    for video in (loader if step < steps else []):  # (B, 3, T, H, W)
        if budget_s is not None and step == min(warmup_steps, steps // 2):
            t_rate = time.time()  # time steps after the warm-up (first steps include start-up and autotuning)
        if budget_s is not None and t_rate is not None and step == min(warmup_steps, steps // 2) + 20:
            per_step = (time.time() - t_rate) / 20
            fitted = steps = max(step + 1, min(steps, int((budget_s - (time.time() - t_loop)) / per_step) + step))
            log(f"budget {budget_s:.0f} s at {per_step * 1e3:.0f} ms/step: training {steps} steps")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup_steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, parts = codec_loss(vae, video.to(device, non_blocking=True), kl_weight, one_pass)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % log_every == 0 or step == steps:
            history.append(dict(step=step, loss=loss.item(), **parts, s=round(trained_s + time.time() - t_loop, 1)))
            log(f"step {step:6d}  loss {loss.item():.4f}  psnr {parts['psnr']:.2f} dB  "
                f"kl {parts['kl']:.3f}  {history[-1]['s']:.0f} s")
        if time_limit_s is not None and time.time() - t_start > time_limit_s and step < steps:
            stopped = True
            break
        if step % save_every == 0:
            save()
        if budget_s is not None and fitted is not None and time.time() - t_loop > budget_s and step < steps:
            fitted = steps = step  # over budget (the fitted rate was optimistic, e.g. a full prefetch queue)
            log(f"budget {budget_s:.0f} s spent at step {step}: training ends here")
        if step >= steps:  # a budget may have shortened the run
            break
    save()
    trained_s += time.time() - t_loop
    if stopped:
        log(f"time limit {time_limit_s} s reached at step {step}/{steps}; state in {state_path}; run again to continue")
        return dict(done=False, steps=step, target_steps=steps, state=str(state_path))

    # Final: latent statistics (posterior mode) into the config, save_pretrained, held-out PSNR via wan.*
    vae.eval()
    mean, std = latent_stats(vae, clip_loader(WorldClips(height, width, num_frames, fps, seed, STATS), 0, stats_clips,
                                              batch_size, num_workers), device)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    with AtomicDir(vae_dir, overwrite=True) as tmp:  # ours (state_path exists): a re-run replaces it whole
        vae.save_pretrained(tmp)
    value = heldout_psnr(out, clip_loader(WorldClips(height, width, num_frames, fps, seed, EVAL), 0, eval_clips,
                                          batch_size, num_workers), device)
    ceiling = (metric_ceiling(out, height, width, ceiling_frames, fps, seed, ceiling_clips, device)
               if ceiling_clips else None)
    report = dict(done=True, steps=step, psnr_heldout_db=round(value, 3), eval_clips=eval_clips, ceiling=ceiling,
                  stats_clips=stats_clips, train_s=round(trained_s, 1), total_s=round(time.time() - t_start, 1),
                  device=_device_name(device), date=datetime.date.today().isoformat(),
                  params=sum(p.numel() for p in vae.parameters()), latents_mean=mean, latents_std=std,
                  settings=settings, one_pass=one_pass, history=history)
    atomic_write_text(report_path, json.dumps(json_finite(report), indent=1, allow_nan=False))  # a perfect PSNR: null
    log(f"held-out PSNR {value:.2f} dB over {eval_clips} clips; model in {vae_dir}; report {report_path}")
    if ceiling:
        log("metric ceiling (codec round trip of " f"{ceiling_clips} clips of {ceiling_frames} frames): "
            + ", ".join(f"{k} {v:.3f}" for k, v in ceiling.items() if isinstance(v, float)))
    return report
