"""Typed configuration: OmegaConf structured dataclasses, YAML files and ``key=value`` overrides.

Resolution order (later wins)::

    schema defaults  <-  named model size (model.name)  <-  YAML file(s)  <-  key=value overrides

``load`` returns a plain ``Config`` dataclass instance; every section's ``__post_init__`` has run, so
contradictions are rejected before any model, worker or GPU is touched. Errors are ``ConfigError``
and name the key, what was expected, what was found and the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tempfile
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration problem, with the offending key named in the message."""


# ----------------------------------------------------------------------------------------------
# Named model sizes (one table). Every geometry number in the code derives
# from these fields.
# ----------------------------------------------------------------------------------------------
# A size fills `model` and may bring the defaults of other sections that only make sense with it.
MODEL_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "wan-1.3b": {"model": dict(dim=1536, num_heads=12, num_layers=30, ffn_dim=8960)},
    "wan-14b": {"model": dict(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824)},
    # Seconds on a CPU with the real structure: heads of 12 dims (RoPE pairs 2/2/2 per axis),
    # 9 latent frames of 8x12 latents (24 tokens per frame), a latent of 24 + a RoPE key of 12.
    "tiny": {
        "model": dict(dim=48, num_heads=4, num_layers=2, ffn_dim=96, text_dim=32, text_len=16, freq_dim=32),
        "attention": dict(d_c=24, d_r=12),
        "video": dict(num_frames=33, height=64, width=96),
        "cache": dict(window_frames=6, sink_frames=1, dtype="float32"),
    },
    # The procedural world (docs/world.md) at its real geometry: 81 frames of 64x64 at 16 fps -> 21 latent
    # frames of 8x8 -> 16 tokens per frame (patch 1x2x2); heads of 64 (RoPE pairs 12/10/10 per t/h/w axis).
    # text_dim = the world text encoder's width (world.text.build_text_encoder's default d_model); 64 text slots
    # hold the longest world caption (about 50 tokens with </s>). MLA: a latent of 64 + a RoPE key of 32 per
    # token, 96 cached values against MHA's 512. An FFN of 3x dim (Wan's is 5.8x) keeps the model at 8.0 M parameters,
    # 15.3 MiB in bf16: small enough to ship the trained world teacher in the repository.
    "world": {
        "model": dict(dim=256, num_heads=4, num_layers=8, ffn_dim=768, text_dim=32, text_len=64, freq_dim=256),
        "attention": dict(d_c=25, d_r=12),  # 37 of 2 dim = 512 cached values (-92.8 %): the 1.3B ratio, 224 of 3072
        "video": dict(num_frames=81, height=64, width=64, fps=16),
    },
}


# torch.compile's modes (inductor's): train.compile_mode
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class ModelConfig:
    """The Wan2.1 DiT geometry shared by the student, the teacher and the critic."""

    name: str = "wan-1.3b"  # named size from MODEL_SIZES; its values fill the fields below
    dim: int = 1536  # hidden width (num_heads * head_dim)
    num_heads: int = 12  # attention heads
    num_layers: int = 30  # transformer blocks
    ffn_dim: int = 8960  # feed-forward inner width
    in_channels: int = 16  # latent channels in
    out_channels: int = 16  # latent channels out
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # (t, h, w) patch
    text_dim: int = 4096  # umT5 embedding width
    text_len: int = 512  # text tokens after zero padding (Wan pads prompts to this length)
    freq_dim: int = 256  # sinusoidal timestep embedding width
    eps: float = 1e-6  # norm epsilon
    rope_theta: float = 10000.0  # RoPE base
    cross_attn_norm: bool = True  # affine LayerNorm before cross-attention (Wan2.1: true)

    def __post_init__(self) -> None:
        if self.name not in MODEL_SIZES:
            _fail("model.name", f"one of {sorted(MODEL_SIZES)}", self.name)
        if self.dim % self.num_heads:
            _fail("model.dim", f"a multiple of model.num_heads={self.num_heads}", self.dim)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            _fail("model.patch_size", "three positive ints (t, h, w)", self.patch_size)
        if self.head_dim // 6 < 1:
            _fail("model.num_heads", "a head_dim of at least 6 (RoPE needs a pair per t/h/w axis)", self.num_heads)
        for key in ("num_layers", "ffn_dim", "in_channels", "out_channels", "text_dim", "text_len", "freq_dim"):
            if getattr(self, key) < 1:
                _fail(f"model.{key}", "a positive int", getattr(self, key))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


class AttentionKind(str, Enum):
    mha = "mha"
    mla = "mla"


class AttentionImpl(str, Enum):
    """Which MLA attention path runs (``kernels.dispatch.resolve_impl``); all share the same weights."""

    auto = "auto"  # fused on CUDA with Triton and 16-bit activations, absorbed elsewhere (and where fused cannot run)
    reference = "reference"  # torch: decompress per-head K/V from the latent, then SDPA (Wan's attention, exactly)
    absorbed = "absorbed"  # torch: queries absorbed into latent space, MQA over [c; RoPE key] with V = c, via SDPA
    fused = "fused"  # a fused latent-attention kernel (attention.kernel) over the 16-bit cache; forward-only
    fused_8bit = "fused_8bit"  # the 8-bit fused kernel (int8 Q.K^T, e4m3 P.V): required by cache.dtype=8bit; forward-only


class FusedKernel(str, Enum):
    """Which kernel family runs the fused paths (``attention.impl`` fused / fused_8bit), for either precision."""

    auto = "auto"  # gluon where it runs (Hopper, TMA-aligned widths; 16-bit: queries and cache of one 16-bit dtype), else triton
    triton = "triton"  # the Triton kernels (kernels/latent_attention.py, latent_attention_fp8.py): any CUDA GPU, CPU interpreter
    gluon = "gluon"  # the warp-specialised Gluon kernels (kernels/latent_attention_ws16.py, latent_attention_ws.py): Hopper only


class KNorm(str, Enum):
    rms_scalar = "rms_scalar"  # docs/design.md "The key norm", option C: Wan's full-width RMSNorm as a per-token scalar s_t
    none = "none"  # docs/design.md "The key norm", option D: no key norm (fine-tune to recover)


class MaskBackend(str, Enum):
    auto = "auto"  # SDPA with a dense mask (measured faster than flex on an H100: benchmarks/masked_forward.py)
    sdpa = "sdpa"  # SDPA with a dense (L, L) boolean mask: L^2 bytes (1 GiB at 32 760 tokens)
    flex = "flex"  # torch flex attention with a BlockMask (compiled on CUDA): O(L^2 / 128^2) mask memory


@dataclass
class AttentionConfig:
    """Self-attention of the student: Wan MHA or VideoMLA latent attention."""

    kind: AttentionKind = AttentionKind.mla  # mha | mla
    d_c: int = 160  # MLA: shared content latent width per token
    d_r: int = 64  # MLA: decoupled RoPE key width per token (all groups together)
    rope_key_groups: int = 1  # MLA: 1 = one RoPE key shared by all heads; num_heads = one per head
    qk_nope_head_dim: int = -1  # MLA: per-head content q/k width; -1 means model head_dim
    impl: AttentionImpl = AttentionImpl.auto  # MLA: auto | reference | absorbed | fused | fused_8bit (what runs: AttentionImpl)
    k_norm: KNorm = KNorm.rms_scalar  # MLA: how Wan's full-width key RMSNorm is kept
    mask_backend: MaskBackend = MaskBackend.auto  # masked full forwards: auto (= sdpa) | sdpa | flex
    kernel: FusedKernel = FusedKernel.auto  # MLA impl=fused/fused_8bit: auto | triton | gluon, the kernel family that runs (FusedKernel)
    backward: AttentionImpl = AttentionImpl.absorbed  # MLA: torch path run when gradients are needed (the fused kernels are forward-only): absorbed | reference

    def __post_init__(self) -> None:
        if self.backward not in (AttentionImpl.absorbed, AttentionImpl.reference):
            _fail("attention.backward", "absorbed or reference (the fused kernels are forward-only)",
                  getattr(self.backward, "value", self.backward))


class PositionScheme(str, Enum):
    relative = "relative"  # temporal RoPE positions by slot order in the cache (StreamingLLM style)
    absolute = "absolute"  # temporal RoPE position = absolute latent frame index (float64, no cap)


@dataclass
class CacheConfig:
    """The latent KV cache used by chunked rollouts (training self-forcing and generation)."""

    window_frames: int = 21  # most recent latent frames attended, the current chunk included
    sink_frames: int = 3  # first latent frames kept forever (never evicted)
    position_scheme: PositionScheme = PositionScheme.relative  # how cached keys get RoPE positions
    dtype: str = "bfloat16"  # storage dtype: float32 | bfloat16 | float16 | 8bit (MLA int8 key rows + e4m3 latents, attention.impl=fused_8bit, inference)


@dataclass
class VideoConfig:
    """Pixel and latent geometry; latent sizes derive from the VAE strides."""

    num_frames: int = 81  # pixel frames per clip
    height: int = 480  # pixels
    width: int = 832  # pixels
    fps: int = 16  # frames per second of clips and outputs
    vae_stride: list[int] = field(default_factory=lambda: [4, 8, 8])  # (t, h, w) VAE compression
    chunk_frames: int = 3  # latent frames generated per self-forcing chunk

    def __post_init__(self) -> None:
        st, sh, sw = self.vae_stride
        if (self.num_frames - 1) % st:
            _fail("video.num_frames", f"1 + a multiple of vae_stride[0]={st}", self.num_frames)
        if self.height % sh or self.width % sw:
            _fail("video.height/width", f"multiples of vae_stride {sh}x{sw}", f"{self.height}x{self.width}")
        if self.latent_frames % self.chunk_frames:
            _fail(
                "video.chunk_frames",
                f"a divisor of the latent frame count {self.latent_frames} (= 1 + (num_frames-1)/{st})",
                self.chunk_frames,
            )

    @property
    def latent_frames(self) -> int:
        return 1 + (self.num_frames - 1) // self.vae_stride[0]

    @property
    def latent_height(self) -> int:
        return self.height // self.vae_stride[1]

    @property
    def latent_width(self) -> int:
        return self.width // self.vae_stride[2]


@dataclass
class RuntimeConfig:
    """Where and how things run."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # compute dtype of the student: float32 | bfloat16 | float16
    seed: int = 0  # global seed
    run_dir: str = "runs/default"  # run folder: checkpoints, resolved config, logs
    progress: bool = True  # rank-0 progress bar


@dataclass
class ScheduleConfig:
    """The flow-matching schedule (vmla_train/schedule.py) of every stage, generation and the demo."""

    denoising_steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])  # student's few steps, before warp
    shift: float = 5.0  # flow-matching shift (student steps, training timesteps, teacher Euler in validation)

    def __post_init__(self) -> None:
        steps = list(self.denoising_steps)
        if not steps or sorted(steps, reverse=True) != steps or any(not 0 < t <= 1000 for t in steps):
            _fail("schedule.denoising_steps", "a non-empty descending list of timesteps in (0, 1000]", steps)


@dataclass
class DemoConfig:
    """`vmla-train demo-rollout` (a random student's cached rollout) and `vmla-train demo` on the world."""

    num_chunks: int = 4  # demo-rollout: chunks generated
    world: str = ""  # demo: folder with the world's teacher/, student/ and models/ (vmla_train/world/demo.py); "" = the random tiny stage
    prompt: str = ""  # demo on the world: the prompt it distils on, generates and scores (the world's vocabulary)


# ----------------------------------------------------------------------------------------------
# Training engine: stages, optimisers, DMD, strategy, logging, validation, checkpoints.
# ----------------------------------------------------------------------------------------------
class Stage(str, Enum):
    pretrain = "pretrain"  # the teacher's training: flow matching on real latents, bidirectional, per-sample timesteps
    adapt = "adapt"  # flow matching on real latents, block-causal, per-chunk timesteps
    ode_init = "ode_init"  # regression of x0 from teacher ODE trajectory points, per chunk
    self_forcing = "self_forcing"  # DMD against the teacher (real score) and the critic (fake score)
    causal_cd = "causal_cd"  # consistency distillation of the causal student from its frozen stage-1 self, clean context


class Context(str, Enum):
    """What earlier chunks look like to the chunk being denoised in a causal training forward."""

    diffusion_forcing = "diffusion_forcing"  # every chunk noisy at its own t; chunks attend to earlier noisy chunks
    teacher_forcing = "teacher_forcing"  # earlier chunks clean (t = 0), as a cached rollout's cache holds them


@dataclass
class TrainConfig:
    """What is trained, from what, for how long, in which batches."""

    stage: Stage = Stage.adapt  # pretrain (the teacher, attention.kind=mha) | adapt | ode_init | self_forcing | causal_cd
    num_steps: int = 1000  # training iterations (our counter drives every schedule; self_forcing: a critic step each)
    global_batch_size: int = 1  # samples per student step over all ranks (= data.batch_size * world * accumulation)
    context: Context = Context.diffusion_forcing  # adapt: diffusion_forcing (noisy earlier chunks) | teacher_forcing (clean earlier chunks)
    student_path: str = ""  # student folder (model.safetensors + config.yaml); "" = random init from this config
    teacher_path: str = ""  # diffusers Wan folder of the teacher (self_forcing, validation); "" there = an error, or random weights with train.allow_random_roles
    critic_path: str = ""  # diffusers Wan folder the critic starts from; "" = a copy of the teacher (needed when train.teacher_size differs from the student's)
    teacher_size: str = ""  # named size of teacher/critic (MODEL_SIZES); "" = model.name
    gradient_checkpointing: bool = False  # recompute each block in backward (student and critic)
    compile: str = ""  # torch.compile backend for each student block's cacheless forward ("inductor": fuses the float32 modulation arithmetic; the first iteration compiles); "" = eager. Cached rollouts stay eager; not with DeepSpeed ZeRO-3
    compile_mode: str = ""  # torch.compile mode with train.compile=inductor: "" (inductor's default) | default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    rollout_frames: int = 0  # self-forcing rollout length in latent frames; 0 = video.latent_frames
    text_dropout: float = 0.0  # pretrain: probability a sample's text becomes dmd.negative_embedding (learns the unconditional score CFG needs)
    ema_decay: float = 0.0  # pretrain / adapt / ode_init: EMA of the student weights, exported with `export --ema` (0 = none; self_forcing: dmd.ema_decay)
    ema_start_step: int = 0  # pretrain / adapt / ode_init: first iteration (0-based) whose student update feeds that EMA
    # Dry runs only. A file a run needs (train.teacher_path; train.critic_path when the teacher's geometry differs;
    # dmd.negative_embedding; logging.vae_path) left empty is an error (exit 2) unless this is true: then a seeded
    # random stand-in is built instead (random weights, embedding or VAE). The *-debug configs and the demo set it.
    allow_random_roles: bool = False  # dry runs (tests, benchmarks, debug configs, the demo): a needed teacher / critic / negative prompt / sample VAE with no path is built random instead of refused; never in a real run
    # Faults: non-finite steps are skipped on every rank; too many in a row stop the run.
    max_consecutive_skips: int = 3  # consecutive non-finite (NaN/Inf loss or gradient) steps before the run stops

    def __post_init__(self) -> None:
        if self.max_consecutive_skips < 1:
            _fail("train.max_consecutive_skips", ">= 1", self.max_consecutive_skips)
        if self.num_steps < 1:
            _fail("train.num_steps", ">= 1", self.num_steps)
        if self.global_batch_size < 1:
            _fail("train.global_batch_size", ">= 1", self.global_batch_size)
        if self.teacher_size and self.teacher_size not in MODEL_SIZES:
            _fail("train.teacher_size", f"'' or one of {sorted(MODEL_SIZES)}", self.teacher_size)
        if self.rollout_frames < 0:
            _fail("train.rollout_frames", ">= 0", self.rollout_frames)
        if not 0.0 <= self.text_dropout < 1.0:
            _fail("train.text_dropout", "a probability in [0, 1)", self.text_dropout)
        if not 0.0 <= self.ema_decay < 1.0:
            _fail("train.ema_decay", "in [0, 1) (0 = no EMA)", self.ema_decay)
        if self.ema_start_step < 0:
            _fail("train.ema_start_step", ">= 0", self.ema_start_step)


@dataclass
class OptimConfig:
    """AdamW for the student and the critic (Self-Forcing's numbers)."""

    student_lr: float = 2e-6  # student learning rate
    critic_lr: float = 4e-7  # critic learning rate
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])  # AdamW betas (both models)
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 10.0  # max global grad norm per model (0 = off)
    warmup_steps: int = 0  # linear lr warm-up over each model's first N optimizer steps (0 = none)

    def __post_init__(self) -> None:
        if self.student_lr <= 0 or self.critic_lr <= 0:
            _fail("optim.student_lr/critic_lr", "> 0", (self.student_lr, self.critic_lr))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail("optim.betas", "two values in [0, 1)", self.betas)
        if self.grad_clip < 0 or self.warmup_steps < 0:
            _fail("optim.grad_clip/warmup_steps", ">= 0", (self.grad_clip, self.warmup_steps))


@dataclass
class DMDConfig:
    """Self-forcing DMD: timestep clamp, real-score guidance, the critic and EMA (steps and shift: ``schedule``)."""

    t_min: float = 20.0  # DMD timestep clamp, low end
    t_max: float = 980.0  # DMD timestep clamp, high end
    guidance_scale: float = 4.0  # real-score CFG weight w in uncond + w (cond - uncond); 1 = off
    critic_steps_per_student_step: int = 5  # critic:student update ratio (student steps at iterations 0, N, 2N, ...)
    ema_decay: float = 0.99  # EMA of the student weights (0 = no EMA)
    ema_start_step: int = 200  # first iteration (train step) whose student update feeds the EMA
    negative_embedding: str = ""  # safetensors with key 'text' [Lt, text_dim] of Wan's negative prompt; "" = an error when guidance_scale != 1, or fixed random with train.allow_random_roles

    def __post_init__(self) -> None:
        if not 0 <= self.t_min < self.t_max <= 1000:
            _fail("dmd.t_min/t_max", "0 <= t_min < t_max <= 1000", (self.t_min, self.t_max))
        if self.critic_steps_per_student_step < 1:
            _fail("dmd.critic_steps_per_student_step", ">= 1", self.critic_steps_per_student_step)
        if not 0 <= self.ema_decay < 1:
            _fail("dmd.ema_decay", "in [0, 1)", self.ema_decay)


@dataclass
class CDConfig:
    """Causal consistency distillation (``train.stage=causal_cd``): the student, its EMA target and the frozen
    stage-1 model all start from ``train.student_path``; each chunk draws an adjacent pair of a discrete
    shifted schedule (``schedule.shift``), the frozen model takes one guided Euler step between them, and the
    student's x0 at the earlier point learns the EMA target's x0 at the later one, both with clean context."""

    num_steps: int = 48  # points of the discrete schedule (adjacent pairs are drawn from it)
    guidance_scale: float = 3.0  # CFG weight of the frozen model's Euler step, uncond + w (cond - uncond); 1 = off
    ema_decay: float = 0.99  # the target: ema = decay * ema + (1 - decay) * student after every student step, in (0, 1)

    def __post_init__(self) -> None:
        if self.num_steps < 2:
            _fail("cd.num_steps", ">= 2", self.num_steps)
        if not 0 < self.ema_decay < 1:
            _fail("cd.ema_decay", "in (0, 1) (the target is the student's EMA)", self.ema_decay)


@dataclass
class StrategyConfig:
    """How the trainable models are distributed (vmla_train/parallel.py)."""

    name: str = "single"  # single | ddp | deepspeed | fsdp
    accelerator: str = "auto"  # auto | cpu | cuda
    devices: int = 1  # processes (GPUs) per node
    num_nodes: int = 1  # nodes
    zero_stage: int = 2  # deepspeed: 2 or 3
    offload: bool = False  # deepspeed: optimizer (and, stage 3, parameter) offload to CPU
    precision: str = "auto"  # auto (bf16-mixed on GPU, 32-true on CPU) | 32-true | bf16-mixed | bf16-true

    def __post_init__(self) -> None:
        if self.name not in ("single", "ddp", "deepspeed", "fsdp"):
            _fail("strategy.name", "single | ddp | deepspeed | fsdp", self.name)
        if self.zero_stage not in (2, 3):
            _fail("strategy.zero_stage", "2 or 3", self.zero_stage)
        if self.name == "single" and self.devices * self.num_nodes != 1:
            _fail("strategy.devices", "1 with strategy.name=single (use ddp/deepspeed/fsdp for more)", self.devices)
        if self.precision not in ("auto", "32-true", "bf16-mixed", "bf16-true"):
            _fail("strategy.precision", "auto | 32-true | bf16-mixed | bf16-true", self.precision)
        if self.accelerator not in ("auto", "cpu", "cuda"):
            _fail("strategy.accelerator", "auto | cpu | cuda", self.accelerator)


@dataclass
class LoggingConfig:
    """Progress, W&B and sample videos."""

    every_n_steps: int = 1  # log scalars every N iterations
    wandb_mode: str = "offline"  # offline | online | disabled (online needs WANDB_API_KEY in the environment)
    wandb_project: str = "vmla-train"  # W&B project
    wandb_entity: str = ""  # W&B entity ("" = default)
    sample_every_n_steps: int = 0  # decode and log a sample video every N iterations and at the end (0 = never)
    vae_path: str = ""  # diffusers Wan VAE folder for sample videos; "" with samples on = an error, or a tiny random VAE with train.allow_random_roles
    rank_every_n_steps: int = 0  # latent rank occupation every N steps (0 = off)

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            _fail("logging.wandb_mode", "offline | online | disabled", self.wandb_mode)
        if self.every_n_steps < 1:
            _fail("logging.every_n_steps", ">= 1", self.every_n_steps)


@dataclass
class ValidationConfig:
    """Student few-step vs teacher many-step on fixed prompts and fixed noise (torchmetrics)."""

    every_n_steps: int = 0  # iterations between validations, and one at the end (0 = off)
    num_prompts: int = 4  # fixed prompts (synthetic embeddings or the first prompt batches)
    teacher_steps: int = 48  # Euler steps of the teacher reference
    num_frames: int = 0  # latent frames generated; 0 = video.latent_frames


@dataclass
class CheckpointConfig:
    """Training checkpoints in RUN_DIR/checkpoints/step-NNNNNNNN/ (vmla_train/checkpoint.py)."""

    every_n_steps: int = 100  # iterations between checkpoints (also at the end and on SIGUSR1/SIGTERM)
    keep_last: int = 3  # complete checkpoints kept
    resume: bool = True  # resume from the run folder's latest complete checkpoint
    on_write_error: str = "stop"  # a failed checkpoint write (e.g. disk full): stop (raise) | continue training
    checksums: bool = True  # SHA-256 of every file in the manifest, verified at resume and when a student folder loads (sizes are always checked)
    stop_traceback_s: float = 60.0  # seconds after SIGUSR1/SIGTERM at which a run that has not stopped yet prints every thread's Python stack to stderr (where the stop hangs) and goes on; 0 = never
    save_timeout_s: float = 1800.0  # seconds every rank gets to write its part of a checkpoint and agree; past it each waiting rank stops with one line naming the folder and the failed rank (a rank that died or left a collective save); 0 = wait forever
    allow_config_change: bool = False  # resume although keys that change the run's meaning differ from the checkpoint's config (every key but train.num_steps/max_consecutive_skips/gradient_checkpointing/compile/compile_mode/allow_random_roles, runtime.progress/run_dir/device, data.num_workers/prefetch_factor/max_open_shards, strategy.offload, logging.*, checkpoint.*, validation.*, debug.*, and the sections fit does not read: demo.*, convert.*, generate.*; see docs/fault-tolerance.md)

    def __post_init__(self) -> None:
        if self.every_n_steps < 1 or self.keep_last < 1:
            _fail("checkpoint.every_n_steps/keep_last", ">= 1", (self.every_n_steps, self.keep_last))
        if self.on_write_error not in ("stop", "continue"):
            _fail("checkpoint.on_write_error", "stop | continue", self.on_write_error)
        for key in ("save_timeout_s", "stop_traceback_s"):
            if getattr(self, key) < 0:
                _fail(f"checkpoint.{key}", ">= 0 (0 = off)", getattr(self, key))


# ----------------------------------------------------------------------------------------------
# Data: the training loader (vmla_train.data) and data preparation (vmla_train.dataprep)
# ----------------------------------------------------------------------------------------------
class DataSource(str, Enum):
    synthetic = "synthetic"  # deterministic random latents/text at the config geometry (no files)
    shards = "shards"  # training / ODE shards written by `vmla-data encode` / `vmla-data ode-pairs`
    prompts_file = "prompts_file"  # a text file, one prompt per line (prompts only; embeds with data.text_encoder)


@dataclass
class DataConfig:
    """The training loader: which samples, how many per batch, in what (seeded) order."""

    source: DataSource = DataSource.synthetic  # synthetic | shards | prompts_file
    shards: str = ""  # shard pattern(s): braces and globs, several joined by '::' (source=shards)
    prompts_file: str = ""  # one prompt per line (source=prompts_file)
    text_encoder: str = ""  # local diffusers/umT5 folder that embeds prompts_file prompts
    batch_size: int = 1  # samples per batch per rank
    batches_per_epoch: int = 1000  # batches per epoch, identical on every rank
    num_workers: int = 2  # loader worker processes per rank (0 = in the main process)
    prefetch_factor: int = 2  # batches prefetched per worker
    seed: int = 0  # order and synthetic-content seed (same on every rank)
    synthetic_samples: int = 256  # distinct samples of the synthetic source
    max_open_shards: int = 16  # open shard files per worker (the member tables of every shard read stay cached)

    def __post_init__(self) -> None:
        for key in ("batch_size", "batches_per_epoch", "prefetch_factor", "synthetic_samples", "max_open_shards"):
            if getattr(self, key) < 1:
                _fail(f"data.{key}", "a positive int", getattr(self, key))
        if self.num_workers < 0:
            _fail("data.num_workers", ">= 0", self.num_workers)
        # data.shards / prompts_file may stay empty in a shipped config (given on the command line):
        # vmla_train.data.build_loader rejects them, naming the key, when a loader is built.


@dataclass
class RawShardsConfig:
    """`vmla-data raw`: OpenVid-1M CSV(s) + mp4s (folder or zip archives) -> raw WebDataset shards."""

    csv: list[str] = field(default_factory=list)  # OpenVid-1M.csv / OpenVidHD.csv paths
    videos: list[str] = field(default_factory=list)  # folders of mp4s and/or OpenVid_partN.zip files (globs ok)
    output: str = ""  # output folder for raw-%06d.tar + index.json + rejects.jsonl
    min_aesthetic: float = 0.0  # keep rows with `aesthetic score` >= this
    min_motion: float = 0.0  # keep rows with `motion score` >= this
    min_temporal: float = 0.0  # keep rows with `temporal consistency score` >= this
    min_seconds: float = 0.0  # keep clips at least this long (CSV `seconds` and probe)
    min_fps: float = 0.0  # keep clips with fps >= this
    max_fps: float = 1000.0  # keep clips with fps <= this
    min_caption_chars: int = 1  # keep captions at least this long
    max_caption_chars: int = 100000  # keep captions at most this long
    max_rows: int = 0  # stop after this many CSV rows (0 = all)
    maxcount: int = 1000  # samples per shard at most
    maxsize_mb: float = 3000.0  # bytes per shard at most (MB)
    num_workers: int = 4  # parallel read/probe processes

    def __post_init__(self) -> None:
        if self.maxcount < 1:
            _fail("prep.raw.maxcount", "a positive int", self.maxcount)
        if self.maxsize_mb <= 0:
            _fail("prep.raw.maxsize_mb", "> 0", self.maxsize_mb)
        if self.min_fps > self.max_fps:
            _fail("prep.raw.min_fps", f"<= prep.raw.max_fps={self.max_fps}", self.min_fps)
        if self.min_caption_chars > self.max_caption_chars:
            _fail("prep.raw.min_caption_chars", f"<= prep.raw.max_caption_chars={self.max_caption_chars}",
                  self.min_caption_chars)
        if self.num_workers < 0:
            _fail("prep.raw.num_workers", ">= 0", self.num_workers)


@dataclass
class EncodeConfig:
    """`vmla-data encode`: raw shards -> training shards (VAE latents + umT5 embeddings), any number of ranks."""

    input: str = ""  # raw shard pattern (braces/globs, '::'-joined)
    output: str = ""  # output folder: one training shard per input shard (same file name) + index + rejects
    vae: str = ""  # local diffusers AutoencoderKLWan folder (or a pipeline folder with vae/)
    text_encoder: str = ""  # local folder with tokenizer/ and text_encoder/ (umT5)
    decoder: str = "decord"  # decord | pyav
    decode_timeout_s: float = 60.0  # a clip that takes longer to decode is rejected
    decode_threads: int = 0  # threads per decoder (0 = library default)
    decode_workers: int = 2  # decoder processes running ahead of the VAE
    decoder_restart_every: int = 200  # clips per decoder process before it is replaced (decord leaks after seeks)
    latent_dtype: str = "float16"  # stored latents/text: float16 | bfloat16 (bf16 bits as uint16 .npy)
    batch_size: int = 1  # clips per VAE call
    one_pass: bool = False  # encode each clip in one pass of the VAE (wan.vae_encode_whole), not diffusers' chunk loop: equal latents to rounding, memory grows with the clip (small frames only)
    device: str = "auto"  # auto | cpu | cuda
    vae_dtype: str = "float32"  # VAE compute dtype
    text_dtype: str = "bfloat16"  # umT5 compute dtype

    def __post_init__(self) -> None:
        if self.decoder not in ("decord", "pyav"):
            _fail("prep.encode.decoder", "decord | pyav", self.decoder)
        if self.latent_dtype not in ("float16", "bfloat16"):
            _fail("prep.encode.latent_dtype", "float16 | bfloat16", self.latent_dtype)
        for key in ("vae_dtype", "text_dtype"):
            if getattr(self, key) not in _DTYPES:
                _fail(f"prep.encode.{key}", f"one of {sorted(_DTYPES)}", getattr(self, key))
        if self.decode_timeout_s <= 0:
            _fail("prep.encode.decode_timeout_s", "> 0", self.decode_timeout_s)
        for key in ("batch_size", "decode_workers", "decoder_restart_every"):
            if getattr(self, key) < 1:
                _fail(f"prep.encode.{key}", "a positive int", getattr(self, key))


@dataclass
class OdePairsConfig:
    """`vmla-data ode-pairs`: teacher Euler trajectories (flow matching, CFG) -> ODE-init shards."""

    teacher: str = ""  # local diffusers WanTransformer3DModel folder (or pipeline folder with transformer/); a student folder: causal ODE (its cached rollouts)
    text_encoder: str = ""  # local folder with tokenizer/ and text_encoder/ (umT5)
    prompts_file: str = ""  # prompts, one per line (else captions of data.shards-style `input`)
    input: str = ""  # shard pattern whose captions (.txt) are the prompts when prompts_file is empty
    output: str = ""  # output folder for ode-%06d.tar + index + rejects
    num_steps: int = 48  # teacher Euler steps
    shift: float = 5.0  # flow-matching shift of the Euler sigmas
    guidance_scale: float = 5.0  # CFG weight w in uncond + w (cond - uncond), against Wan's negative prompt
    keep_indices: list[int] = field(default_factory=lambda: [0, 12, 24, 36, 48])  # trajectory indices kept (0 = noise)
    samples_per_shard: int = 64  # trajectories per output shard
    max_samples: int = 0  # stop after this many prompts (0 = all)
    batch_size: int = 1  # prompts per teacher call
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "bfloat16"  # teacher compute dtype
    seed: int = 0  # noise seed (per prompt: seed + prompt index)
    latent_dtype: str = "float16"  # stored arrays: float16 | bfloat16 (bf16 bits as uint16 .npy)

    def __post_init__(self) -> None:
        if self.latent_dtype not in ("float16", "bfloat16"):
            _fail("prep.ode.latent_dtype", "float16 | bfloat16", self.latent_dtype)
        if self.num_steps < 1:
            _fail("prep.ode.num_steps", "a positive int", self.num_steps)
        if not self.keep_indices or any(not 0 <= i <= self.num_steps for i in self.keep_indices):
            _fail("prep.ode.keep_indices", f"indices in 0..prep.ode.num_steps={self.num_steps}", self.keep_indices)
        if sorted(set(self.keep_indices)) != list(self.keep_indices):
            _fail("prep.ode.keep_indices", "strictly increasing indices", self.keep_indices)
        if self.dtype not in _DTYPES:
            _fail("prep.ode.dtype", f"one of {sorted(_DTYPES)}", self.dtype)
        if self.samples_per_shard < 1 or self.batch_size < 1:
            _fail("prep.ode.samples_per_shard/batch_size", "positive ints", (self.samples_per_shard, self.batch_size))


@dataclass
class DataPrepConfig:
    """The three data-preparation stages (`vmla-data raw | encode | ode-pairs`)."""

    raw: RawShardsConfig = field(default_factory=RawShardsConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    ode: OdePairsConfig = field(default_factory=OdePairsConfig)


# ----------------------------------------------------------------------------------------------
# Conversion and rank study: vmla-convert, vmla-analyze rank.
# ----------------------------------------------------------------------------------------------
@dataclass
class ConvertConfig:
    """Wan -> student conversion (vmla-convert) and the calibration shared with the rank study."""

    init: str = "spectral"  # MLA only: spectral (factorise Wan's K/V) | random (Wan's linear init for new projections)
    factorization: str = "weights"  # spectral: weights (SVD of the weights) | activations (PCA of calibration inputs)
    calib_samples: int = 1  # calibration latent samples (seeded Gaussian latents and text)
    calib_timesteps: list[float] = field(default_factory=lambda: [999.0, 750.0, 500.0, 250.0])  # timestep buckets
    calib_latent_shape: list[int] = field(default_factory=lambda: [3, 16, 16])  # calibration latent [frames, height, width]
    calib_text_tokens: int = 16  # non-zero text tokens per calibration prompt (the rest zero-padded)
    calib_data: str = ""  # shard pattern of encoded clips (`vmla-data encode`): calibrate on the first calib_samples clips' latents and text instead of seeded Gaussian ones (calib_latent_shape / calib_text_tokens then come from the data); "" = Gaussian
    energy: float = 0.99  # energy fraction of the effective rank
    dtype: str = "source"  # output weights: source (keep the checkpoint's dtype) | float32 | bfloat16 | float16
    max_shard_gb: float = 4.0  # shard the output safetensors past this size
    seed: int = 0  # calibration data and random init

    def __post_init__(self) -> None:
        if self.init not in ("spectral", "random"):
            _fail("convert.init", "spectral | random", self.init)
        if self.factorization not in ("weights", "activations"):
            _fail("convert.factorization", "weights | activations", self.factorization)
        if self.calib_samples < 1:
            _fail("convert.calib_samples", ">= 1", self.calib_samples)
        if not self.calib_timesteps or not all(0 <= t <= 1000 for t in self.calib_timesteps):
            _fail("convert.calib_timesteps", "a non-empty list of timesteps in [0, 1000]", self.calib_timesteps)
        if len(self.calib_latent_shape) != 3 or min(self.calib_latent_shape) < 1:
            _fail("convert.calib_latent_shape", "three positive ints [frames, height, width]", self.calib_latent_shape)
        if self.calib_text_tokens < 1:
            _fail("convert.calib_text_tokens", ">= 1", self.calib_text_tokens)
        if not 0 < self.energy <= 1:
            _fail("convert.energy", "a fraction in (0, 1]", self.energy)
        if self.dtype not in ("source", "float32", "bfloat16", "float16"):
            _fail("convert.dtype", "source | float32 | bfloat16 | float16", self.dtype)
        if self.max_shard_gb <= 0:
            _fail("convert.max_shard_gb", "> 0", self.max_shard_gb)


# ----------------------------------------------------------------------------------------------
# Generation: vmla-generate, minute-scale text-to-video with the latent cache.
# ----------------------------------------------------------------------------------------------
STREAM_OUTPUTS = ("none", "mp4", "pipe")  # generate.stream


@dataclass
class GenerateConfig:
    """vmla-generate: long rollouts with sliding window + sinks, streamed VAE decoding, mp4 out."""

    seconds: float = 60.0  # video length; latent frames = seconds * video.fps / vae_stride[0], whole chunks
    samples_per_prompt: int = 1  # videos per prompt (file index 0..n-1; each file's seed is in manifest.json)
    batch_size: int = 1  # videos generated together (one prompt's samples are batched)
    guidance_scale: float = 1.0  # CFG weight w in uncond + w (cond - uncond); 1 = off (DMD students have it distilled in)
    negative_prompt: str = ""  # CFG negative prompt; empty = Wan's default negative prompt
    text_encoder: str = ""  # local folder with tokenizer/ and text_encoder/ (umT5), or empty with embeddings
    embeddings: str = ""  # safetensors with 'prompt_embeds' [N, Lt, text_dim] (+ 'negative_embeds') instead
    vae: str = ""  # local AutoencoderKLWan folder (or a pipeline folder with vae/)
    out_dir: str = "samples"  # where the mp4 files go ('<prompt>-<index>.mp4' as VBench; manifest.json maps files to prompts)
    crf: int = 18  # x264 quality (lower = better)
    stream: str = "none"  # frames out per chunk: none | mp4 (growing '<file>.partial.mp4', removed at the end) | pipe (raw rgb24 on stdout)
    recache: bool = True  # at a prompt switch, re-run the cache pass over the cached clean frames with the new text; false: only the text changes
    overlap: bool = True  # decode + write chunk k on a worker thread (its own CUDA stream) while chunk k + 1 denoises; frames identical; false: one after the other
    graphs: bool = True  # replay each chunk's student forwards from CUDA graphs once the cache window is full (vmla_train/graphs.py); CUDA only: on a CPU the forwards run eagerly, with a logged line

    def __post_init__(self) -> None:
        if self.stream not in STREAM_OUTPUTS:
            _fail("generate.stream", f"one of {' | '.join(STREAM_OUTPUTS)}", self.stream)
        if self.stream == "pipe" and self.batch_size != 1:
            _fail("generate.batch_size", "1 with generate.stream=pipe (stdout carries one video at a time)",
                  self.batch_size)
        if self.seconds <= 0:
            _fail("generate.seconds", "> 0", self.seconds)
        for key in ("samples_per_prompt", "batch_size"):
            if getattr(self, key) < 1:
                _fail(f"generate.{key}", "a positive int", getattr(self, key))
        if self.guidance_scale < 1.0:
            _fail("generate.guidance_scale", ">= 1 (1 = no guidance)", self.guidance_scale)
        if not 0 <= self.crf <= 51:
            _fail("generate.crf", "0..51", self.crf)


@dataclass
class DebugConfig:
    """TEST HOOKS of the training loop's fault handling; never set them in a real run."""

    inject_nan_steps: list[int] = field(default_factory=list)  # TEST HOOK: iterations whose loss is made NaN
    inject_nan_ranks: list[int] = field(default_factory=list)  # TEST HOOK: ranks that inject ([] = every rank)


@dataclass
class Config:
    """Root config; sections mirror the packages they configure."""

    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prep: DataPrepConfig = field(default_factory=DataPrepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    cd: CDConfig = field(default_factory=CDConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        m, a, c, v = self.model, self.attention, self.cache, self.video
        if v.chunk_frames % m.patch_size[0]:
            _fail("video.chunk_frames", f"a multiple of model.patch_size[0]={m.patch_size[0]}", v.chunk_frames)
        if (v.latent_height % m.patch_size[1]) or (v.latent_width % m.patch_size[2]):
            _fail(
                "video.height/width",
                f"latent sizes divisible by the patch {m.patch_size[1]}x{m.patch_size[2]}",
                f"{v.latent_height}x{v.latent_width}",
            )
        if c.window_frames < v.chunk_frames:
            _fail("cache.window_frames", f">= video.chunk_frames={v.chunk_frames} (a window holds a chunk)", c.window_frames)
        if c.sink_frames < 0:
            _fail("cache.sink_frames", ">= 0", c.sink_frames)
        if c.dtype not in _DTYPES | {"8bit"}:
            _fail("cache.dtype", f"one of {sorted(_DTYPES | {'8bit'})}", c.dtype)
        if c.dtype == "8bit" and (a.kind != AttentionKind.mla or a.impl != AttentionImpl.fused_8bit):
            _fail("cache.dtype", "8bit only with attention.kind=mla and attention.impl=fused_8bit (the 8-bit kernel "
                  "reads it)", f"8bit with kind={a.kind.value}, impl={a.impl.value}")
        if self.runtime.dtype not in _DTYPES:
            _fail("runtime.dtype", f"one of {sorted(_DTYPES)}", self.runtime.dtype)
        if a.kind == AttentionKind.mla:
            _check_mla(m, a)
        if self.train.stage == Stage.pretrain and a.kind != AttentionKind.mha:
            _fail("attention.kind", "mha with train.stage=pretrain (the teacher exports to diffusers layout, Wan's "
                  "attention)", a.kind.value)
        if self.train.context == Context.teacher_forcing and self.train.stage != Stage.adapt:
            _fail("train.context", "diffusion_forcing unless train.stage=adapt (causal_cd always uses clean context; "
                  "the other stages have no noisy context)", f"teacher_forcing with stage={self.train.stage.value}")
        s = self.strategy
        if self.train.compile and s.name == "deepspeed" and s.zero_stage == 3:
            # ZeRO-3's per-module parameter hooks make dynamo recompile at every block until it gives up (eager)
            _fail("train.compile", "'' (eager) with DeepSpeed ZeRO-3 (its parameter hooks defeat the compiled "
                  "blocks); ZeRO-2 compiles", f"{self.train.compile!r} with strategy.zero_stage=3")
        mode = self.train.compile_mode
        if mode and (self.train.compile != "inductor" or mode not in COMPILE_MODES):
            _fail("train.compile_mode", f"one of {', '.join(COMPILE_MODES)} with train.compile=inductor (the modes "
                  "are inductor's), or ''", f"{self.train.compile_mode!r} with train.compile={self.train.compile!r}")
        if self.train.text_dropout > 0 and (self.train.stage != Stage.pretrain or not self.dmd.negative_embedding):
            _fail("train.text_dropout", "0 unless train.stage=pretrain with a dmd.negative_embedding file (the text "
                  "a dropped sample sees; `vmla-data negative-embedding` writes it)",
                  f"{self.train.text_dropout} with stage={self.train.stage.value}, "
                  f"negative_embedding={self.dmd.negative_embedding!r}")

    # Derived geometry -------------------------------------------------------------------------
    @property
    def tokens_per_frame(self) -> int:
        """Tokens per latent frame after patching (1560 for 480x832 with patch 1x2x2)."""
        p = self.model.patch_size
        return (self.video.latent_height // p[1]) * (self.video.latent_width // p[2])

    @property
    def teacher_model(self) -> ModelConfig:
        """Geometry of the teacher and the critic: the named size ``train.teacher_size`` (e.g. wan-14b) with
        the student's other model fields, or the student's own (``model``) when it is empty or the same."""
        name = self.train.teacher_size or self.model.name
        if name == self.model.name:
            return self.model
        return ModelConfig(**{**{f.name: getattr(self.model, f.name) for f in dataclasses.fields(self.model)},
                              "name": name, **MODEL_SIZES[name]["model"]})


_DTYPES = {"float32", "bfloat16", "float16"}


def _check_mla(m: ModelConfig, a: AttentionConfig) -> None:
    if not 1 <= a.d_c <= m.dim:
        _fail("attention.d_c", f"1..model.dim={m.dim} (the joint K/V factorisation has rank <= dim)", a.d_c)
    if a.rope_key_groups < 1 or m.num_heads % a.rope_key_groups:
        _fail("attention.rope_key_groups", f"a divisor of model.num_heads={m.num_heads}", a.rope_key_groups)
    if a.d_r % a.rope_key_groups:
        _fail("attention.d_r", f"a multiple of attention.rope_key_groups={a.rope_key_groups}", a.d_r)
    per_group = a.d_r // a.rope_key_groups
    if per_group % 2 or per_group // 6 < 1:
        _fail(
            "attention.d_r",
            "an even width per RoPE key group of at least 6 (2 values x 3 axes t/h/w); "
            f"got {per_group} per group with rope_key_groups={a.rope_key_groups}",
            a.d_r,
        )
    if per_group > m.head_dim:
        _fail("attention.d_r", f"at most head_dim={m.head_dim} per group (RoPE pairs come from a head)", a.d_r)
    if a.qk_nope_head_dim < -1:
        _fail("attention.qk_nope_head_dim", ">= 0, or -1 for model head_dim", a.qk_nope_head_dim)


def _fail(key: str, expected: str, found: Any) -> None:
    raise ConfigError(f"config key '{key}': expected {expected}, found {found!r}")


# Files a training run needs: without them a role would be random weights, a random embedding or a random VAE.
RANDOM_ROLES_KEY = "train.allow_random_roles"


def missing_role_files(cfg: Config) -> list[tuple[str, str]]:
    """(key, what to give) for every file `vmla-train fit` of ``cfg`` needs and has no path for; empty when
    ``train.allow_random_roles`` permits random stand-ins (dry runs).

    - ``train.teacher_path``: self_forcing (the real score) and validation (the reference) read the teacher;
    - ``train.critic_path``: self_forcing, only when the teacher's geometry (``train.teacher_size``) is not the
      student's; otherwise the critic starts as a copy of the teacher;
    - ``dmd.negative_embedding``: self_forcing with guidance (``dmd.guidance_scale`` != 1: the unconditional
      score; at 1 its weight is 0), causal_cd with guidance (``cd.guidance_scale`` != 1);
    - ``train.student_path``: causal_cd (the stage-1 weights every role starts from);
    - ``logging.vae_path``: sample videos (``logging.sample_every_n_steps`` > 0) are decoded by it.
    """
    if cfg.train.allow_random_roles:
        return []
    t, sf = cfg.train, cfg.train.stage == Stage.self_forcing
    missing = []
    if not t.teacher_path and (sf or cfg.validation.every_n_steps > 0):
        who = "train.stage=self_forcing" if sf else f"validation.every_n_steps={cfg.validation.every_n_steps}"
        missing.append(("train.teacher_path", f"{who} needs the teacher: give its diffusers Wan folder"))
    if sf and not t.critic_path and cfg.teacher_model != cfg.model:
        missing.append(("train.critic_path", f"the critic has the student's geometry ({cfg.model.name}), not the "
                        f"teacher's ({cfg.teacher_model.name}): give a diffusers Wan folder of {cfg.model.name}"))
    if sf and not cfg.dmd.negative_embedding and cfg.dmd.guidance_scale != 1.0:
        missing.append(("dmd.negative_embedding", f"dmd.guidance_scale={cfg.dmd.guidance_scale} needs Wan's negative "
                        "prompt embedded: give the file `vmla-data negative-embedding` writes"))
    if t.stage == Stage.causal_cd:
        if not t.student_path:
            missing.append(("train.student_path", "train.stage=causal_cd distils the stage-1 causal student (student, "
                            "target and frozen model start from it): give the student folder `adapt` exported"))
        if not cfg.dmd.negative_embedding and cfg.cd.guidance_scale != 1.0:
            missing.append(("dmd.negative_embedding", f"cd.guidance_scale={cfg.cd.guidance_scale} needs Wan's negative "
                            "prompt embedded: give the file `vmla-data negative-embedding` writes"))
    if cfg.logging.sample_every_n_steps > 0 and not cfg.logging.vae_path:
        missing.append(("logging.vae_path", f"logging.sample_every_n_steps={cfg.logging.sample_every_n_steps} decodes "
                        "sample videos: give a diffusers Wan VAE folder (or logging.sample_every_n_steps=0)"))
    return missing


def random_roles_error(missing: list[tuple[str, str]]) -> ConfigError:
    """One line naming each missing key, what to give, and the dry-run opt-in."""
    return ConfigError("; ".join(f"config key '{key}' is empty: {what}" for key, what in missing)
                       + f" (or {RANDOM_ROLES_KEY}=true for a dry run on random stand-ins)")


def check_role_files(cfg: Config) -> None:
    """Refuse a training config whose roles would silently be random (``missing_role_files``), before any work."""
    missing = missing_role_files(cfg)
    if missing:
        raise random_roles_error(missing)


# Renamed keys and values: an old spelling fails with one line naming the new one (the CLIs exit 2).
RENAMED_KEYS = {"attention.kernel16": "attention.kernel", "attention.kernel8": "attention.kernel"}
RENAMED_VALUES = {
    "attention.impl": {"absorbed_sdpa": "absorbed", "triton": "fused", "triton_fp8": "fused_8bit"},
    "attention.backward": {"absorbed_sdpa": "absorbed"},
    "attention.kernel": {"gluon_ws": "gluon"},
    "cache.dtype": {"fp8": "8bit"},
}


def _check_renamed(user: DictConfig) -> None:
    """Reject the old spellings in the user's merged YAML files and overrides."""
    absent = object()
    for old, new in RENAMED_KEYS.items():
        if OmegaConf.select(user, old, default=absent) is not absent:
            raise ConfigError(f"{old} was renamed to {new} (one field for both precisions: auto | triton | gluon)")
    for key, renames in RENAMED_VALUES.items():
        value = OmegaConf.select(user, key, default=absent)
        if isinstance(value, str) and value in renames:
            raise ConfigError(f"{key}: {value!r} was renamed to {renames[value]!r}")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_valid_keys(node._get_node(k), full + "."))
    return keys


def _nearest(key: str, schema: DictConfig) -> str:
    valid = _valid_keys(schema)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not near:  # compare the last component too ("attention.dc" -> "attention.d_c")
        leaf = key.split(".")[-1]
        near = [k for k in valid if difflib.get_close_matches(leaf, [k.split(".")[-1]], n=1, cutoff=0.6)]
    return f" (nearest valid key: '{near[0]}')" if near else ""


def _key_of(err: OmegaConfBaseException) -> str:
    full = getattr(err, "full_key", None) or ""
    return str(full)


def _quoted(msg: str) -> str:
    parts = msg.split("'")
    return parts[1] if len(parts) > 2 else msg


# Lists of a fixed length, named in the message a wrong value gets (their __post_init__ checks the length).
_LIST_LENGTHS = {"model.patch_size": 3, "video.vae_stride": 3, "optim.betas": 2, "convert.calib_latent_shape": 3}
_SCALAR_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
                 str: ("a string", "strings")}


def _expected(hint: Any, key: str) -> str:
    """What a schema field of type ``hint`` at ``key`` takes, in words: 'a section (model.name=..., ...)',
    'one of mha, mla', 'a list of 3 integers', 'an integer'."""
    if dataclasses.is_dataclass(hint):
        shown = ", ".join(f"{key}.{f.name}=..." for f in dataclasses.fields(hint)[:2])
        return f"a section ({shown}, ...)"
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of " + ", ".join(m.name for m in hint)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        n = _LIST_LENGTHS.get(key)
        return f"a list of {f'{n} ' if n else ''}{_SCALAR_WORDS[item][1]}"
    return _SCALAR_WORDS[hint][0]


def _found(value: Any, container_expected: bool) -> str:
    """A user value in words for an error line: an empty value, a list or mapping, a scalar ('the scalar 3'
    where a section or list was expected)."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None:
        return "an empty value"
    if isinstance(value, Enum):
        value = value.value
    return f"the scalar {value!r}" if container_expected and not isinstance(value, (dict, list)) else repr(value)


def _hint_at(key: str) -> Any:
    """The schema type at a dotted key ('model.patch_size[1]' -> int), or None where the key is not in it."""
    hint: Any = Config
    for part in key.replace("[", ".[").split("."):
        if part.startswith("["):
            args = typing.get_args(hint) if typing.get_origin(hint) is list else ()
            hint = args[0] if args else None
        elif dataclasses.is_dataclass(hint):
            hint = typing.get_type_hints(hint).get(part)
        else:
            return None
        if hint is None:
            return None
    return hint


def _type_error(key: str, value: Any) -> ConfigError:
    """'config key K: expected <the schema type of K in words>, found <value>' for a value of the wrong type."""
    hint = _hint_at(key)
    if hint is None:  # not a schema key (not expected: unknown keys are reported before any merge)
        return ConfigError(f"config key '{key}': the schema has no such key, found {_found(value, False)}")
    container = dataclasses.is_dataclass(hint) or typing.get_origin(hint) is list
    return ConfigError(f"config key '{key}': expected {_expected(hint, key)}, found {_found(value, container)}")


def _check_shapes(node: Any, cls: type, prefix: str, schema: DictConfig) -> None:
    """Check one user layer (plain dicts and lists) against the schema dataclass ``cls`` before any merge:
    unknown keys, a scalar or list where a section goes (and the reverse), a scalar where a list goes, an
    empty value, an enum value outside its names. OmegaConf's merge raises nothing readable for these
    (no message, or a TypeError without the key). Scalar conversions ('abc' for an int) are left to the merge.
    Renamed keys and values are left to ``_check_renamed``, which names the new spelling."""
    hints = typing.get_type_hints(cls)
    for k, value in node.items():
        key = f"{prefix}{k}"
        if key in RENAMED_KEYS:
            continue
        if k not in hints:
            raise ConfigError(f"unknown config key '{key}'{_nearest(key, schema)}")
        hint = hints[k]
        if isinstance(value, str) and value.startswith("${"):  # an interpolation, resolved by the merge
            continue
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise _type_error(key, value)
            _check_shapes(value, hint, key + ".", schema)
        elif typing.get_origin(hint) is list:
            if not isinstance(value, list):
                raise _type_error(key, value)
            for i, item in enumerate(value):
                if item is None or isinstance(item, (dict, list)):
                    raise _type_error(f"{key}[{i}]", item)
        elif value is None or isinstance(value, (dict, list)):
            raise _type_error(key, value)
        elif isinstance(hint, type) and issubclass(hint, Enum) and not isinstance(value, hint):
            if value not in hint.__members__ and value not in {m.value for m in hint} \
                    and value not in RENAMED_VALUES.get(key, {}):
                raise _type_error(key, value)


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``["a.b=1", "c=[1,2]"]`` -> DictConfig; values are parsed as YAML scalars/lists."""
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r}: expected key=value (e.g. attention.d_c=192)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:  # pragma: no cover - malformed YAML value
        raise ConfigError(f"override could not be parsed: {e}") from None


def load(paths: str | Path | Sequence[str | Path] | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load and validate a config: schema <- model size <- YAML files <- overrides."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    layers: list[DictConfig] = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            layer = OmegaConf.load(p)
        except Exception as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"config file '{p}': expected a mapping at the top level")
        layers.append(layer)
    layers.append(parse_overrides(overrides))
    return from_layers(layers)


def from_layers(layers: Sequence[DictConfig | dict]) -> Config:
    """Merge user layers (YAML files, overrides; later wins) over the schema and the named size, then validate."""
    schema = OmegaConf.structured(Config)
    layers = [OmegaConf.create(l) if isinstance(l, dict) else l for l in layers]
    for layer in layers:
        _check_shapes(OmegaConf.to_container(layer, resolve=False), Config, "", schema)
    merged_user = OmegaConf.merge(*layers) if layers else OmegaConf.create()
    _check_renamed(merged_user)
    name = OmegaConf.select(merged_user, "model.name", default="wan-1.3b")
    if name not in MODEL_SIZES:
        raise ConfigError(f"config key 'model.name': expected one of {sorted(MODEL_SIZES)}, found {name!r}")
    cfg = schema
    try:
        cfg = OmegaConf.merge(cfg, MODEL_SIZES[name], merged_user)  # the layers' last word on each key
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = _key_of(e) or _quoted(str(e))
        raise ConfigError(f"unknown config key '{key}'{_nearest(key, schema)}") from None
    except ValidationError as e:  # a scalar that does not convert ('abc' for an int)
        raise _type_error(_key_of(e), getattr(e, "value", None)) from None
    try:
        return OmegaConf.to_object(cfg)  # runs every __post_init__
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(f"config key '{_key_of(e)}': {(e.msg or type(e).__name__).splitlines()[0]}") from None


def _field_docs(cls: type) -> dict[str, str]:
    """The one-line doc of each field: its inline ``# comment`` in the dataclass source."""
    import inspect
    import re

    docs = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def schema_reference(cfg: Config | None = None) -> list[tuple[str, str, str]]:
    """(key, default, doc) for every leaf key of the schema, in declaration order."""
    cfg = cfg if cfg is not None else Config()
    rows: list[tuple[str, str, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        docs = _field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                shown = value.value if isinstance(value, Enum) else value
                rows.append((key, json.dumps(shown), docs.get(f.name, "")))

    walk(cfg, "")
    return rows


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    atomic_write_text(Path(path), to_yaml(cfg))


def current_umask() -> int:
    """This process's umask, read without changing it (Linux ``/proc``; elsewhere set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the permissions a plain ``open`` / ``mkdir``
    would have: 0o666 for files (plus any execute bits they had) and 0o777 for folders, minus the umask.
    ``tempfile.mkstemp`` / ``mkdtemp`` and safetensors' ``save_file`` create 0600 / 0700, which teammates on a
    shared cluster cannot read; every atomic write calls this on its temporary before the rename."""
    mask = current_umask()
    path = Path(path)
    todo = [path]
    while todo:
        p = todo.pop()
        if p.is_symlink():
            continue
        if p.is_dir():
            os.chmod(p, 0o777 & ~mask)
            todo.extend(p.iterdir())
        else:
            os.chmod(p, (0o666 | (p.stat().st_mode & 0o111)) & ~mask)


def json_finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) made ``None``, through dicts, lists and tuples: for values
    that may legitimately be missing (an empty CSV score, a skipped step's NaN loss) before ``json.dumps(...,
    allow_nan=False)`` (bare ``NaN`` / ``Infinity`` are not JSON; strict readers reject the whole file)."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_finite(v) for v in obj]
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder + rename: readers see the old
    file or the new one, never a part. The file gets the permissions of any file the user creates (umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace(cfg: Config, **sections: Any) -> Config:
    """Copy of ``cfg`` with whole sections or fields replaced, re-validated (``__post_init__`` runs)."""
    return dataclasses.replace(cfg, **sections)


# ----------------------------------------------------------------------------------------------
# KV accounting (used by `vmla-train info`, benchmarks and the conversion report)
# ----------------------------------------------------------------------------------------------
def kv_values_per_token(cfg: Config) -> dict[str, int]:
    """Cached self-attention values per token per layer, MHA (K and V of every head) vs MLA: the one place the
    cache is counted (bytes: times ``dtype_bytes(cache.dtype)``; the 8-bit cache's per-layer scales aside)."""
    mha = 2 * cfg.model.dim
    a = cfg.attention
    # MLA caches c (d_c) and the raw RoPE key (d_r); the k-norm scale is recomputed from them. The 8-bit
    # format stores the key rows [s c ; s rho] (d_c + d_r, padded to 16 bytes: the kernels' TMA rows, as
    # kernels/quant8.key_width) and c again as the value.
    if cfg.cache.dtype == "8bit":
        return {"mha": mha, "mla": -(-(a.d_c + a.d_r) // 16) * 16 + a.d_c}
    return {"mha": mha, "mla": a.d_c + a.d_r}


def kv_reduction(cfg: Config) -> float:
    """Fraction of cached self-attention values saved by MLA (d_c + d_r) against MHA (2 * dim)."""
    v = kv_values_per_token(cfg)
    return 1.0 - v["mla"] / v["mha"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def torch_dtype(name: str):
    """A dtype name of the config (float32 | bfloat16 | float16) -> torch.dtype."""
    import torch

    if name not in _DTYPES:
        raise ConfigError(f"dtype {name!r}: expected one of {sorted(_DTYPES)}")
    return getattr(torch, name)


def resolve_device(name: str, key: str | None = None):
    """A ``device`` config value -> torch.device: ``auto`` = this process's GPU when CUDA is available
    (``cuda:LOCAL_RANK`` under a launcher that sets it, else ``cuda``), otherwise the CPU. ``ConfigError``
    naming ``key`` (the config key the name came from, when given) for a name torch does not know or a CUDA
    device this process cannot see."""
    import torch

    if name != "auto":
        what, fix = (f"config key '{key}'", f"set {key}=auto or {key}=cpu") if key else (f"device {name!r}", "set it to auto or cpu")
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise ConfigError(f"{what}: expected auto, cpu, cuda or cuda:N, found {name!r}") from None
        if dev.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ConfigError(f"{what}: {name!r} but this machine has no usable CUDA GPU "
                                  f"(torch.cuda.is_available() is False): {fix}")
            if dev.index is not None and dev.index >= count:
                raise ConfigError(f"{what}: {name!r} but only {count} CUDA device(s) are visible "
                                  f"(cuda:0..cuda:{count - 1})")
        return dev
    if not torch.cuda.is_available():
        return torch.device("cpu")
    rank = os.environ.get("LOCAL_RANK")
    return torch.device("cuda", int(rank) % torch.cuda.device_count()) if rank is not None else torch.device("cuda")


def dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "8bit": 1}[name]


__all__ = [
    "AttentionConfig",
    "AttentionImpl",
    "AttentionKind",
    "CacheConfig",
    "Config",
    "ConfigError",
    "DemoConfig",
    "DataConfig",
    "DataPrepConfig",
    "DataSource",
    "EncodeConfig",
    "OdePairsConfig",
    "RawShardsConfig",
    "KNorm",
    "MaskBackend",
    "MODEL_SIZES",
    "ModelConfig",
    "PositionScheme",
    "RuntimeConfig",
    "ScheduleConfig",
    "VideoConfig",
    "kv_reduction",
    "kv_values_per_token",
    "load",
    "resolve_device",
    "save",
    "to_yaml",
    "torch_dtype",
]
