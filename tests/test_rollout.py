"""Self-forcing training rollout: exit steps synced across ranks, grads only where they belong."""

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vmla_train import config as C
from vmla_train import parallel, recipe, schedule
from vmla_train.distill import DistillationModule, RolloutSpec
from vmla_train.rollout import draw_exit_steps, sample_video, self_forcing_rollout
from vmla_train.student import WanStudent

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides):
    return C.load(ROOT / "configs/self_forcing-debug.yaml", list(overrides))


def _rollout(student, cfg, text, frames, exits, seed=0, snapshot=False):
    v, m = cfg.video, cfg.model
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    return self_forcing_rollout(student, student.new_cache(text.shape[0]), text, frames, v.chunk_frames,
                                (m.in_channels, v.latent_height, v.latent_width), steps, exits,
                                torch.Generator().manual_seed(seed), snapshot_cache=snapshot)


def _exit_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(1000 + 17 * rank)  # deliberately different per rank
        exits = [draw_exit_steps(7, 4, g) for _ in range(3)]
        torch.save(exits, os.path.join(out_dir, f"exits{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_exit_steps_identical_on_two_gloo_ranks(tmp_path):
    init = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_exit_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    e0, e1 = (torch.load(tmp_path / f"exits{r}.pt") for r in (0, 1))
    assert e0 == e1
    # rank 0's draw wins: equal to what rank 0's generator alone gives
    g = torch.Generator().manual_seed(1000)
    assert e0[0] == torch.randint(0, 4, (7,), generator=g).tolist()
    assert len({tuple(e) for e in e0}) > 1  # successive iterations draw anew


@pytest.mark.timeout(30)
def test_rollout_with_last_exit_equals_inference_rollout():
    cfg = _cfg()
    torch.manual_seed(0)
    student = WanStudent(cfg).eval()
    text = torch.randn(1, cfg.model.text_len, cfg.model.text_dim)
    frames = 4 * cfg.video.chunk_frames  # past the 6-frame window: ring slots are overwritten
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    with torch.no_grad():
        ours = _rollout(student, cfg, text, frames, [len(steps) - 1] * 4)
    ref = sample_video(student, text, frames, steps, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.timeout(60)
def test_no_gradient_reaches_cache_or_teacher_and_checkpointing_is_exact():
    cfg = _cfg()
    torch.manual_seed(0)
    student = WanStudent(cfg)
    text = torch.randn(1, cfg.model.text_len, cfg.model.text_dim)
    frames, exits = 4 * cfg.video.chunk_frames, [1, 3, 0, 2]
    cache = student.new_cache(1)
    v, m = cfg.video, cfg.model
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    x0 = self_forcing_rollout(student, cache, text, frames, v.chunk_frames, (m.in_channels, v.latent_height, v.latent_width),
                              steps, exits, torch.Generator().manual_seed(0))
    assert x0.requires_grad
    for name, buf in cache.buffers.items():
        assert not buf.requires_grad and buf.grad_fn is None, name
    assert all(k.grad_fn is None for kv in cache.cross if kv is not None for k in kv)
    (x0.double() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    # every parameter learns, the text path included (cross-attention K/V are recomputed with grad)
    assert set(grads) == {n for n, _ in student.named_parameters()}
    assert grads["blocks.0.attn2.to_k.weight"].abs().sum() > 0
    assert grads["condition_embedder.text_embedder.linear_1.weight"].abs().sum() > 0

    # activation checkpointing (with the cache snapshot) gives the same gradients
    student.zero_grad(set_to_none=True)
    parallel.apply_gradient_checkpointing(student)
    x0c = _rollout(student, cfg, text, frames, exits, snapshot=True)
    torch.testing.assert_close(x0c, x0.detach(), rtol=0, atol=0)
    (x0c.double() ** 2).mean().backward()
    for n, p in student.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7)

    # the DMD loss: only the student gets gradients; the teacher (frozen) and the critic (scoring) none
    student.zero_grad(set_to_none=True)
    teacher = recipe.build_teacher(cfg)
    critic = recipe.build_critic(cfg, teacher)
    spec = RolloutSpec(v.latent_frames, steps, [2, 1], 0)
    batch = type("B", (), {"text": text})()
    module = DistillationModule(cfg, student, teacher, critic)
    module.snapshot_cache = True  # the student's blocks are checkpointed above
    loss, _ = module.dmd_loss(batch, torch.Generator().manual_seed(1), spec)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in critic.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters()) > 0
    recipe.assert_frozen(teacher)
