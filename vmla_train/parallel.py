"""Strategy construction and model wrapping applied from outside the models (STYLE 2).

``build_fabric(cfg)`` turns the ``strategy`` section into a Lightning ``Fabric``:

=============  ==================================================================================
single         one device (CPU by default), ``precision`` 32-true on CPU, bf16-mixed on GPU
ddp            ``DDPStrategy`` (nccl on GPU, gloo on CPU)
deepspeed      ``DeepSpeedStrategy`` ZeRO stage 2 or 3 (+ CPU offload); every ``fabric.setup`` call
               makes its own engine, so student and critic get one engine each (docs/design.md, "Engines")
fsdp           ``FSDPStrategy`` wrapping each transformer block (student and critic), sharded state
=============  ==================================================================================

DeepSpeed's CPU accelerator (with gloo) runs ZeRO-2/3 in CPU processes; Lightning's strategy refuses
anything but CUDA in ``setup_environment``, so ``_DeepSpeedAnyDevice`` drops that one check (the
engine code path is unchanged). Gradient checkpointing wraps each block's forward in non-reentrant
``torch.utils.checkpoint`` (non-reentrant: the grad hooks of DDP/ZeRO fire once per backward).

What differs under DeepSpeed lives here, so the loop never branches on the strategy: ``backward`` (the
engine divides by its accumulation and takes micro-steps), ``optimizer_step`` (the engine clips and
steps; a non-finite gradient norm skips the update on every rank, as elsewhere), ``assert_no_grads`` (the
engine keeps gradients in its own buffers), ``deferred_write_errors`` (its save is collective),
``is_sharded`` (per-engine checkpoint folders), ``check_resume_world_size`` (ZeRO shards need the same world size) and
``gatherer`` (ZeRO-3 partitions parameters).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import config as C


def resolve_precision(cfg: C.Config, accelerator: str) -> str:
    if cfg.strategy.precision != "auto":
        return cfg.strategy.precision
    return "bf16-mixed" if accelerator == "cuda" else "32-true"


def resolve_accelerator(cfg: C.Config) -> str:
    if cfg.strategy.accelerator != "auto":
        return cfg.strategy.accelerator
    if cfg.runtime.device not in ("auto",):
        return "cuda" if cfg.runtime.device.startswith("cuda") else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def deepspeed_config(cfg: C.Config, accumulation: int) -> dict:
    """The DeepSpeed config shared by both engines (same ZeRO stage, clip and accumulation)."""
    s = cfg.strategy
    zero: dict = {"stage": s.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    extra = {}
    if s.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        extra["zero_force_ds_cpu_optimizer"] = False  # keep our torch AdamW (DeepSpeedCPUAdam needs a compiled op)
        if s.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        **extra,
    }


def _deepspeed_strategy_class():
    from lightning.fabric.strategies import DeepSpeedStrategy
    from lightning.fabric.strategies.ddp import DDPStrategy

    class _DeepSpeedAnyDevice(DeepSpeedStrategy):
        """Lightning's DeepSpeed strategy minus its CUDA-only check (DeepSpeed's CPU accelerator + gloo)."""

        def setup_environment(self) -> None:
            if self.root_device.type == "cuda":
                return super().setup_environment()
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            DDPStrategy.setup_environment(self)  # ParallelStrategy setup: _setup_distributed (ours below)

        def _initialize_engine(self, model, optimizer=None, scheduler=None):
            if self.root_device.type == "cuda":
                return super()._initialize_engine(model, optimizer, scheduler)
            import argparse

            import deepspeed

            # As Lightning's, with the local rank as DeepSpeed's device rank (a CPU device has no index).
            engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
                model_parameters=filter(lambda p: p.requires_grad, model.parameters()), optimizer=optimizer,
                lr_scheduler=scheduler, dist_init_required=False)
            return engine, ds_optimizer, ds_scheduler

        def _setup_distributed(self) -> None:
            if self.root_device.type == "cuda":
                return super()._setup_distributed()
            from lightning.fabric.utilities.seed import reset_seed

            # As Lightning's, minus the check that device indices equal local ranks (CPU devices have none).
            reset_seed()
            self._set_world_ranks()
            self._init_deepspeed_distributed()
            if not self._config_initialized:
                self._format_config()
                self._config_initialized = True

    return _DeepSpeedAnyDevice


def build_fabric(cfg: C.Config, accumulation: int = 1, loggers=None):
    """A ``Fabric`` for the ``strategy`` section (not launched yet)."""
    from lightning.fabric import Fabric

    s = cfg.strategy
    acc = resolve_accelerator(cfg)
    precision = resolve_precision(cfg, acc)
    kwargs = dict(accelerator=acc, devices=s.devices, num_nodes=s.num_nodes, precision=precision, loggers=loggers)
    if s.name == "single":
        strategy = "auto"
    elif s.name == "ddp":
        from lightning.fabric.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="nccl" if acc == "cuda" else "gloo")
    elif s.name == "deepspeed":
        strategy = _deepspeed_strategy_class()(config=deepspeed_config(cfg, accumulation),
                                               process_group_backend="nccl" if acc == "cuda" else "gloo")
    else:
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock
        from lightning.fabric.strategies import FSDPStrategy

        from .student import WanBlock

        strategy = FSDPStrategy(auto_wrap_policy={WanBlock, WanTransformerBlock}, state_dict_type="sharded",
                                cpu_offload=s.offload)
    return Fabric(strategy=strategy, **kwargs)


def is_deepspeed(fabric) -> bool:
    from lightning.fabric.strategies import DeepSpeedStrategy

    return isinstance(fabric.strategy, DeepSpeedStrategy)


def is_zero3(fabric) -> bool:
    return is_deepspeed(fabric) and fabric.strategy.zero_stage_3


def apply_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute every transformer block in backward (non-reentrant). Returns the blocks wrapped.

    Works on our student (``blocks``: ``WanBlock``) and diffusers' Wan (``blocks``: ``WanTransformerBlock``)
    alike, without touching the model files. The wrapper is a method bound to its block, so a deep copy of
    the model (the causal-CD target and frozen model) recomputes its own blocks, not the original's.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no 'blocks' to checkpoint")
    for block in blocks:
        if getattr(block, "_vmla_checkpointed", False):
            continue
        block._vmla_inner = block.forward  # bound: the class's forward, or apply_compile's
        block.forward = types.MethodType(_checkpointed_forward, block)
        block._vmla_checkpointed = True
    return len(blocks)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    if not torch.is_grad_enabled():
        return self._vmla_inner(*args, **kwargs)
    return checkpoint(self._vmla_inner, *args, use_reentrant=False, **kwargs)


def apply_compile(model: nn.Module, backend: str, mode: str = "") -> int:
    """``torch.compile`` every block's forward with ``backend`` where it runs without a KV cache (training's
    full forwards); a cached forward (rollouts, generation) stays eager. Returns the blocks wrapped.

    Our student's blocks only (``WanBlock``: the cache travels in their ``inp``). One compiled function per
    block class, backend and ``mode`` (torch.compile's, inductor only; "" = its default), with the block (its
    parameters) as an input, so the blocks share one graph;
    the wrapper is bound to its block as in ``apply_gradient_checkpointing``. Apply it before that one
    (the checkpoint then recomputes the compiled block)."""
    from .student import WanBlock

    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(isinstance(b, WanBlock) for b in blocks):
        raise ValueError(f"train.compile: {type(model).__name__} has no WanBlock 'blocks' to compile")
    for block in blocks:
        if getattr(block, "_vmla_checkpointed", False):
            raise ValueError("train.compile: compile the blocks before wrapping them in gradient checkpointing")
        block._vmla_compile = (backend, mode)
        block.forward = types.MethodType(_compiled_forward, block)
    return len(blocks)


@functools.lru_cache(maxsize=None)
def _compiled(cls: type, backend: str, mode: str):
    # a cache of compiled code, per backend and mode
    return torch.compile(cls.forward, backend=backend, mode=mode or None, dynamic=False)


def _compiled_forward(self: nn.Module, x, mod, text, inp, layer, frames):
    fn = type(self).forward if inp.cache is not None else _compiled(type(self), *self._vmla_compile)
    return fn(self, x, mod, text, inp, layer, frames)


def gathered(module: nn.Module, zero3: bool):
    """Context in which every parameter of ``module`` is whole (ZeRO-3 partitions them)."""
    import contextlib

    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def gatherer(fabric):
    """``gathered`` for this strategy: a function of a module giving the context in which it is whole."""
    zero3 = is_zero3(fabric)
    return lambda module: gathered(module, zero3)


def is_sharded(fabric) -> bool:
    """Whether engines save to a folder of shards (DeepSpeed, FSDP) rather than one file."""
    from lightning.fabric.strategies import DeepSpeedStrategy, FSDPStrategy

    return isinstance(fabric.strategy, (DeepSpeedStrategy, FSDPStrategy))


def compute_dtype(cfg: C.Config, fabric) -> torch.dtype:
    """The dtype of the frozen teacher: bf16 under a bf16 precision on GPU, else float32."""
    bf16 = fabric.device.type == "cuda" and "bf16" in resolve_precision(cfg, resolve_accelerator(cfg))
    return torch.bfloat16 if bf16 else torch.float32


def any_rank(fabric, flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (a collective: every rank must call it)."""
    return float(fabric.all_reduce(torch.tensor(float(bool(flag)), device=fabric.device), reduce_op="max")) > 0


def failed_ranks(fabric, failed: bool) -> list[int]:
    """The ranks on which ``failed`` is set, the same list on every rank (a collective: every rank calls it)."""
    flags = torch.zeros(fabric.world_size, device=fabric.device)
    flags[fabric.global_rank] = float(bool(failed))
    return [r for r, f in enumerate(fabric.all_reduce(flags, reduce_op="sum").tolist()) if f > 0]


@contextlib.contextmanager
def deferred_write_errors(fabric, engine, errors: list[str]):
    """Around ``fabric.save`` of one engine. DeepSpeed's save is collective (barriers between the ranks'
    writes): a write error raised on one rank takes that rank out of it and leaves the others waiting in
    a barrier. Inside, a failed write of the engine's files (``OSError``, or torch.save's ``RuntimeError``)
    is appended to ``errors`` instead of raised, so every rank completes DeepSpeed's protocol and the
    caller's agreement that follows sees the error. Other strategies: nothing changes."""
    if not is_deepspeed(fabric):
        yield
        return
    writer = engine._forward_module.checkpoint_engine
    write = writer.save

    def save(state_dict, path, *args, **kwargs):
        try:
            return write(state_dict, path, *args, **kwargs)
        except (OSError, RuntimeError) as e:
            errors.append(f"{type(e).__name__}: {e}")

    writer.save = save  # the instance attribute shadows the method
    try:
        yield
    finally:
        del writer.save


# ----------------------------------------------------------------------------------------------
# Backward and optimizer steps of one engine (what differs under DeepSpeed)
# ----------------------------------------------------------------------------------------------
def backward(fabric, loss: torch.Tensor, engine, optimizer, accumulation: int, last: bool) -> None:
    """Backward of one micro-batch's loss. DeepSpeed divides by its gradient_accumulation_steps itself and
    takes a micro-step after every micro-batch but the last (no update before its boundary; the engine's
    own ``step``, which advances its micro-step counter, not Fabric's optimizer wrapper, which steps the
    ZeRO optimizer directly); the other strategies get the loss divided here and skip the gradient sync of
    all but the last micro-batch."""
    if is_deepspeed(fabric):
        fabric.backward(loss.float(), model=engine)
        if not last:
            engine._forward_module.step()
        return
    with fabric.no_backward_sync(engine, enabled=not last):
        fabric.backward(loss.float() / accumulation, model=engine)


def optimizer_step(fabric, engine, optimizer, grad_clip: float, finite_loss: bool = True) -> tuple[float, bool]:
    """Clip and step one engine; returns the gradient norm before clipping and whether it stepped.
    A non-finite loss or gradient norm on any rank skips the update on every rank (the flag is
    all-reduced, so no rank diverges). DeepSpeed: ``_deepspeed_step`` (the same rule; the engine clips)."""
    if is_deepspeed(fabric):
        return _deepspeed_step(fabric, engine._forward_module, finite_loss)
    if grad_clip > 0:
        norm = fabric.clip_gradients(engine, optimizer, max_norm=grad_clip, error_if_nonfinite=False)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in engine.parameters() if p.grad is not None])
    finite = float(finite_loss and bool(torch.isfinite(torch.as_tensor(norm))))
    finite = float(fabric.all_reduce(torch.tensor(finite, device=fabric.device), reduce_op="min"))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm), bool(finite)


def _deepspeed_step(fabric, ds, finite_loss: bool) -> tuple[float, bool]:
    """The step of DeepSpeed engine ``ds`` at its accumulation boundary, skipped on every rank as above:
    1. the global gradient norm before clipping (``zero_grad_norm``: each rank's ZeRO partition, reduced over
    the ranks by DeepSpeed), 2. the finite flag (this rank's losses and that norm) all-reduced, 3. the engine's
    step either way, so its boundary bookkeeping runs (micro / global step counters, gradient buffers
    cleared, the next micro-step starts a fresh accumulation), with the update of the wrapped AdamW
    suppressed when some rank is non-finite (weights and moments unchanged, counted in DeepSpeed's
    ``skipped_steps`` too). DeepSpeed clips (``gradient_clipping``) inside its step."""
    norm = zero_grad_norm(ds.optimizer)  # 1.
    finite = float(finite_loss and math.isfinite(norm))
    finite = bool(float(fabric.all_reduce(torch.tensor(finite, device=fabric.device), reduce_op="min")))  # 2.
    if finite:
        ds.step()  # 3.
        return norm, True
    skipped_before = ds.skipped_steps
    with _update_suppressed(ds.optimizer.optimizer):
        ds.step()
    if ds.skipped_steps == skipped_before:  # DeepSpeed's own overflow check did not see it (a non-finite loss only)
        ds.skipped_steps += 1
        ds._step_applied = False
    return norm, False


def zero_grad_norm(zero_optimizer) -> float:
    """The L2 norm of the gradients a ZeRO optimizer is about to step on, the same on every rank (DeepSpeed
    reduces the partitions' norms over the data-parallel group; a non-finite one comes back as inf), divided
    by the loss scale (1 but under fp16). Call it after the backward of the accumulation boundary."""
    from deepspeed.runtime.utils import combine_grad_norm_groups

    if hasattr(zero_optimizer, "scaled_global_norm"):  # ZeRO-1/2
        norm = zero_optimizer.scaled_global_norm()
    else:  # ZeRO-3
        norm = combine_grad_norm_groups(zero_optimizer._get_norm_groups())
    return float(norm) / float(zero_optimizer.loss_scale)


@contextlib.contextmanager
def _update_suppressed(base_optimizer):
    """Inside: ``base_optimizer.step()`` (the torch optimizer a ZeRO optimizer wraps) changes nothing."""
    base_optimizer.step = lambda *args, **kwargs: None  # the instance attribute shadows the method
    try:
        yield
    finally:
        del base_optimizer.step


def assert_no_grads(fabric, model: nn.Module | None, what: str) -> None:
    """``model`` holds no gradient (it only scored under no_grad). Not checkable under DeepSpeed, whose
    engines keep gradients in their own buffers."""
    if model is None or is_deepspeed(fabric):
        return
    for p in model.parameters():
        assert p.grad is None, what


def check_resume_world_size(fabric, saved_world_size: int | None, folder) -> None:
    """DeepSpeed's ZeRO shards load only at the world size that wrote them."""
    if saved_world_size not in (None, fabric.world_size) and is_deepspeed(fabric):
        raise RuntimeError(f"checkpoint '{folder}' was written by {saved_world_size} ranks; DeepSpeed shards need the "
                           f"same world size ({fabric.world_size} now)")
