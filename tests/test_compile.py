"""``train.compile`` (``parallel.apply_compile``) and the block wrappers' independence under deep copies.

The compiled blocks must give the eager blocks' forward and gradients (CPU: torch's ``aot_eager`` backend,
which runs dynamo's capture and AOT autograd without code generation; CUDA: ``inductor``, the setting the
speed comes from), leave cached forwards eager, and survive the deep copies causal CD makes of the student.
The deep-copy check guards a bug class: a wrapper that closes over the original block makes every copy run
the original's weights (a CD target that is secretly the live student)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import rel_err, tiny_cfg
from vmla_train import config as C
from vmla_train import parallel
from vmla_train.distill import DistillationModule
from vmla_train.student import WanStudent


def _inputs(cfg: C.Config, batch: int = 2, device: str = "cpu"):
    v, gen = cfg.video, torch.Generator().manual_seed(1)
    x = torch.randn(batch, v.latent_frames, cfg.model.in_channels, v.latent_height, v.latent_width, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    text = torch.randn(batch, 8, cfg.model.text_dim, generator=gen)
    return x.to(device), t.to(device), text.to(device)


def _forward_backward(model: WanStudent, x, t, text):
    model.zero_grad(set_to_none=True)
    out = model(x, t, text)
    out.float().square().mean().backward()
    return out.detach(), [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("wrap", ["checkpoint", "compile", "compile+checkpoint"])
def test_a_deep_copy_of_a_wrapped_student_runs_its_own_blocks(wrap):
    cfg = tiny_cfg("attention.kind=mha")
    torch.manual_seed(0)
    student = WanStudent(cfg)
    if "compile" in wrap:
        parallel.apply_compile(student, "aot_eager")
    if "checkpoint" in wrap:
        parallel.apply_gradient_checkpointing(student)
    twin = copy.deepcopy(student)
    x, t, text = _inputs(cfg, 1)
    with torch.no_grad():
        before = twin(x, t, text)
        for p in student.parameters():
            p.add_(0.1)
        assert (twin(x, t, text) - before).abs().max() == 0  # the copy's own weights
        assert (student(x, t, text) - before).abs().max() > 0.01  # the original's changed


@pytest.mark.timeout(120)
def test_compiled_blocks_equal_the_eager_blocks_and_cached_forwards_stay_eager():
    cfg = tiny_cfg("attention.kind=mha")
    torch.manual_seed(0)
    student = WanStudent(cfg)
    x, t, text = _inputs(cfg)
    out0, grads0 = _forward_backward(student, x, t, text)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert parallel.apply_compile(student, "aot_eager") == cfg.model.num_layers
    out1, grads1 = _forward_backward(student, x, t, text)
    assert rel_err(out1, out0) < 1e-6
    assert max(rel_err(a, b) for a, b in zip(grads1, grads0)) < 1e-5
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 1, f"{cfg.model.num_layers} identical blocks should share one graph, got {graphs}"
    # a cached rollout chunk goes through the eager blocks: nothing new is captured
    cache = student.new_cache(1)
    with torch.no_grad():
        student(x[:1, : cfg.video.chunk_frames], t[:1], text[:1], cache=cache, write_cache=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    with pytest.raises(C.ConfigError, match="config key 'train.compile'.*ZeRO-3"):
        C.load(None, ["model.name=tiny", "train.compile=inductor", "strategy.name=deepspeed", "strategy.zero_stage=3"])
    with pytest.raises(ValueError, match="before wrapping them in gradient checkpointing"):
        fresh = WanStudent(cfg)
        parallel.apply_gradient_checkpointing(fresh)
        parallel.apply_compile(fresh, "aot_eager")


@pytest.mark.timeout(120)
def test_train_compile_wraps_the_student_and_keeps_the_loss():
    """``train.compile`` through ``DistillationModule.from_config`` (the fit's path): the pretrain and adapt
    losses of one batch equal the eager module's, and a causal-CD module's target and frozen copies keep their own
    weights when the student trains (gradient checkpointing on, as configs/causal_cd.yaml has it)."""
    from vmla_train import data

    for config in ("pretrain-debug", "adapt-debug"):  # bidirectional; block-causal (a masked forward)
        losses = {}
        for backend in ("", "aot_eager"):
            cfg = C.load(f"configs/{config}.yaml", [f"train.compile={backend}"] if backend else [])
            torch.manual_seed(0)
            module = DistillationModule.from_config(cfg)
            assert all(getattr(b, "_vmla_compile", ("", ""))[0] == backend for b in module.student.blocks)
            batch = next(data.build_loader(cfg, "latents", 0, 1))
            losses[backend] = float(module.training_step(batch, torch.Generator().manual_seed(3))[0].detach())
        assert abs(losses["aot_eager"] - losses[""]) < 1e-5 * abs(losses[""]), (config, losses)

    cfg = C.load("configs/causal_cd-debug.yaml", ["train.gradient_checkpointing=true", "train.compile=aot_eager"])
    torch.manual_seed(0)
    module = DistillationModule.from_config(cfg)
    x, t, text = _inputs(cfg, 1)
    with torch.no_grad():
        before = module.cd_target(x, t, text)
        for p in module.student.parameters():
            p.add_(0.1)
        assert (module.cd_target(x, t, text) - before).abs().max() == 0


@pytest.mark.timeout(600)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["", "reduce-overhead"])
def test_inductor_blocks_equal_the_eager_blocks_on_cuda(mode):
    cfg = tiny_cfg("attention.kind=mha", "runtime.device=cuda")
    torch.manual_seed(0)
    student = WanStudent(cfg).cuda()
    x, t, text = _inputs(cfg, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out0, grads0 = _forward_backward(student, x, t, text)
        parallel.apply_compile(student, "inductor", mode)
        for _ in range(3):  # reduce-overhead records its CUDA graphs on the first calls, then replays them
            out1, grads1 = _forward_backward(student, x, t, text)
    print(f"inductor {mode or 'default'} vs eager (bf16 autocast): output", rel_err(out1, out0),
          "gradients", max(rel_err(a, b) for a, b in zip(grads1, grads0)))
    assert rel_err(out1, out0) < 2e-2
    assert max(rel_err(a, b) for a, b in zip(grads1, grads0)) < 5e-2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("compile_, mode", [("aot_eager", "reduce-overhead"), ("inductor", "fast"), ("", "default")])
def test_compile_mode_needs_inductor_and_a_known_mode(compile_, mode):
    with pytest.raises(C.ConfigError, match="config key 'train.compile_mode'"):
        C.load("configs/pretrain-debug.yaml", [f"train.compile='{compile_}'", f"train.compile_mode={mode}"])
    assert C.load("configs/pretrain-debug.yaml", ["train.compile=inductor", "train.compile_mode=max-autotune"])


@pytest.mark.timeout(180)
def test_pretrain_step_benchmark_tiny_cpu_run(tmp_path, capsys, monkeypatch):
    """benchmarks/pretrain_step.py end to end on CPU at the tiny geometry (numbers mean nothing here): one row
    per variant, rates derived from the measured step time, the config recorded relative to the repository."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("pretrain_bench", root / "benchmarks" / "pretrain_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.delenv("OUT", raising=False)  # write_result also copies into $OUT when it is set
    out = tmp_path / "pretrain_step-cpu.json"
    assert bench.main(["--config", str(root / "configs/pretrain-debug.yaml"), "--batch", "2", "--compile",
                       ",aot_eager,no_such_backend", "--device", "cpu", "--warmup", "1", "--steps", "2",
                       "--results", str(tmp_path)]) == 0
    assert "compile aot_eager" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["config"] == "configs/pretrain-debug.yaml"
    assert [r["compile"] for r in result["rows"]] == ["eager", "aot_eager", "no_such_backend"]
    assert "no_such_backend" in result["rows"][2]["error"] and "s_per_step" not in result["rows"][2]
    for r in result["rows"][:2]:
        assert r["s_per_step"] > 0 and r["tflop_per_step"] >= 0
        assert r["samples_per_s"] == pytest.approx(2 / r["s_per_step"], rel=1e-2)
