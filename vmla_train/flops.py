"""Model FLOPs of the forwards and backwards a training iteration actually runs, for the MFU estimate.

MFU = FLOPs of one iteration / (its time x the device's dense bf16 peak, ``peak_tflops``). A forward costs
2 x (parameters applied per token) x tokens plus the attention products; a backward twice its forward;
activation-checkpoint recomputation is not counted (the usual MFU convention).
"""

from __future__ import annotations

import torch

from . import config as C

# Dense bf16 peak (TFLOP/s, no sparsity) per device for the MFU estimate.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device named in ``PEAK_BF16_TFLOPS``; None otherwise (no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in name:
            return v
    return None


def forward_flops(model_cfg: C.ModelConfig, block_params: int, text_kv_params: int, batch: int, q_tokens: int,
                  kv_tokens: int, text_tokens: int) -> float:
    """2 x (params applied per token) x tokens + attention products (QK^T and AV: 4 x q x kv x dim per
    layer for self-attention, the same with the text for cross-attention). Recomputation is not counted."""
    dense = 2.0 * q_tokens * (block_params - text_kv_params) + 2.0 * text_tokens * text_kv_params
    attn = 4.0 * q_tokens * (kv_tokens + text_tokens) * model_cfg.dim * model_cfg.num_layers
    return batch * (dense + attn)


def _param_split(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, those applied to the text tokens: cross-attention K and V), ZeRO-3 partitions whole."""
    total, text_kv = 0, 0
    for n, p in model.named_parameters():
        numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += numel
        if ".attn2.to_k." in n or ".attn2.to_v." in n:
            text_kv += numel
    return total, text_kv


class FlopCounter:
    """FLOPs of one self-forcing / adapt / ODE iteration, from the config and the exit steps."""

    def __init__(self, cfg: C.Config, student: torch.nn.Module, teacher: torch.nn.Module | None,
                 critic: torch.nn.Module | None = None):
        self.cfg = cfg
        self.student_p = _param_split(student)
        self.teacher_p = _param_split(teacher) if teacher is not None else (0, 0)
        self.critic_p = _param_split(critic) if critic is not None else self.teacher_p

    def _s(self, b, q, kv):
        return forward_flops(self.cfg.model, *self.student_p, b, q, kv, self.cfg.model.text_len)

    def _t(self, b, q):
        return forward_flops(self.cfg.teacher_model, *self.teacher_p, b, q, q, self.cfg.model.text_len)

    def _c(self, b, q):
        return forward_flops(self.cfg.model, *self.critic_p, b, q, q, self.cfg.model.text_len)

    def rollout(self, b: int, exit_steps: list[int], grad: bool) -> float:
        """The self-forcing rollout: per chunk, the denoising steps up to its exit, the clean re-run that
        writes the cache, and (``grad``) the exit step's backward."""
        c, tpf = self.cfg.cache, self.cfg.tokens_per_frame
        chunk = self.cfg.video.chunk_frames
        total, cached = 0.0, 0
        for e in exit_steps:
            q, kv = chunk * tpf, (min(cached, c.window_frames - chunk + c.sink_frames) + chunk) * tpf
            total += (e + 1) * self._s(b, q, kv) + self._s(b, q, kv)  # denoise steps + clean re-run
            if grad:
                total += 2 * self._s(b, q, kv)  # backward of the exit step
            cached += chunk
        return total

    def student(self, b: int, spec=None) -> float:
        """A student update on ``b`` samples: DMD with the rollout of ``spec`` (self_forcing: rollout with
        grad, two teacher forwards, one critic forward), else one forward and backward of the clip (twice its
        length with clean context: teacher-forcing adapt; causal_cd adds three no-grad forwards)."""
        clip = self.cfg.video.latent_frames * self.cfg.tokens_per_frame
        t = self.cfg.train
        if t.stage == C.Stage.causal_cd:  # clean + noisy copies: student fwd + bwd, frozen cond + uncond, target
            return 6 * self._s(b, 2 * clip, 2 * clip)
        if spec is None:
            seq = 2 * clip if t.stage == C.Stage.adapt and t.context == C.Context.teacher_forcing else clip
            return 3 * self._s(b, seq, seq)
        return self.rollout(b, spec.exit_steps, True) + 2 * self._t(b, clip) + self._c(b, clip)

    def critic(self, b: int, spec) -> float:
        """A critic update: the no-grad rollout of ``spec``, the critic's forward and backward."""
        clip = self.cfg.video.latent_frames * self.cfg.tokens_per_frame
        return self.rollout(b, spec.exit_steps, False) + 3 * self._c(b, clip)  # fwd + bwd
