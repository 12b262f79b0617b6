"""The causal recipe: teacher-forcing adaptation and causal consistency distillation (``causal_cd``).

The load-bearing check is the equivalence of the teacher-forcing forward (one pass over [clean; noisy] under
the teacher-forcing mask) with what inference does: denoise each chunk against a KV cache that holds the
clean frames of the earlier chunks. The CD loss is then recomputed by hand through that cached path, so the
two implementations check each other. Tolerances: float32 on CPU, the same weights; the two paths order
their attention sums differently (one masked softmax over 2F frames against a cached prefix + chunk).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_err, tiny_cfg
from vmla_train import checkpoint as ckpt
from vmla_train import config as C
from vmla_train import schedule, train
from vmla_train.attention import FrameMask
from vmla_train.distill import DistillationModule
from vmla_train.student import WanStudent

ROOT = Path(__file__).resolve().parents[1]


def _cfg(kind: str, *extra: str) -> C.Config:
    # the cache holds the whole clip (no eviction), so the cached path sees what the full mask shows
    return tiny_cfg(f"attention.kind={kind}", "video.num_frames=21", "cache.window_frames=6", "cache.sink_frames=0",
                    *extra)


def _cached_flow(model: WanStudent, clean: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                 chunk: int) -> torch.Tensor:
    """Inference's view: chunk k denoised against a cache of the clean chunks < k, then its clean frames
    written (the rollout's t = 0 pass)."""
    cache = model.new_cache(x_t.shape[0])
    out = []
    for s in range(0, x_t.shape[1], chunk):
        sl = slice(s, s + chunk)
        out.append(model(x_t[:, sl], t[:, sl], text, cache=cache))
        model(clean[:, sl], torch.zeros_like(t[:, sl]), text, cache=cache, write_cache=True)
    return torch.cat(out, 1)


def _inputs(cfg: C.Config, seed: int = 0):
    v, m = cfg.video, cfg.model
    g = torch.Generator().manual_seed(seed)
    shape = (2, v.latent_frames, m.in_channels, v.latent_height, v.latent_width)
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    per_chunk = torch.rand(2, v.latent_frames // v.chunk_frames, generator=g) * 1000
    t = per_chunk.repeat_interleave(v.chunk_frames, 1)  # (B, F)
    text = torch.randn(2, 5, m.text_dim, generator=g)
    return x0, schedule.add_noise(x0, noise, t), t, text


@pytest.mark.timeout(60)
def test_teacher_forcing_mask_shape():
    """Clean frames block-causal over clean; noisy frames: earlier clean chunks + their own noisy chunk."""
    fm = FrameMask(2, teacher_forcing=True).frame_mask(8)  # 2 chunks of 2 frames, clean + noisy
    clean_causal = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    none = torch.zeros(4, 4, dtype=torch.bool)
    noisy_on_clean = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    noisy_on_noisy = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    want = torch.cat([torch.cat([clean_causal, none], 1), torch.cat([noisy_on_clean, noisy_on_noisy], 1)], 0)
    assert torch.equal(fm, want)
    assert FrameMask(2, teacher_forcing=True).positions(8).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="two copies of whole chunks"):
        FrameMask(2, teacher_forcing=True).frame_mask(6)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_teacher_forcing_forward_equals_a_cached_rollout_of_clean_frames(kind):
    cfg = _cfg(kind)
    torch.manual_seed(0)
    student = WanStudent(cfg).eval()
    module = DistillationModule(cfg, student)
    x0, x_t, t, text = _inputs(cfg)
    with torch.no_grad():
        full = module.clean_context_flow(student, x0, x_t, t, text)
        cached = _cached_flow(student, x0, x_t, t, text, cfg.video.chunk_frames)
        noisy_context = student(x_t, t, text, mask=FrameMask(cfg.video.chunk_frames))  # diffusion forcing
    assert full.shape == x_t.shape
    assert rel_err(full, cached) < 1e-5, rel_err(full, cached)
    # the first chunk sees no context: both modes agree there and only there
    c = cfg.video.chunk_frames
    assert rel_err(full[:, :c], noisy_context[:, :c]) < 1e-5
    assert rel_err(full[:, c:], noisy_context[:, c:]) > 1e-3


@pytest.mark.timeout(120)
def test_cd_loss_matches_a_hand_computation_through_the_cache():
    """cd_loss against the same recipe written out with cached rollouts (frozen, target and student differ)."""
    cfg = _cfg("mla", "train.stage=causal_cd", "train.allow_random_roles=true", "cd.num_steps=6",
               "cd.guidance_scale=3.0")
    torch.manual_seed(0)
    student = WanStudent(cfg)
    module = DistillationModule(cfg, student)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # three different models: frozen, target and student
        for p in module.cd_frozen.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        for p in module.cd_target.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    x0, _, _, text = _inputs(cfg)
    batch = type("Batch", (), {"latents": x0, "text": text})()
    loss, metrics = module.cd_loss(batch, torch.Generator().manual_seed(7))

    # by hand: the same draws, every forward through a KV cache of clean frames
    v, cd = cfg.video, cfg.cd
    gen = torch.Generator().manual_seed(7)
    b, f = x0.shape[:2]
    n = torch.randint(0, cd.num_steps, (b, f // v.chunk_frames), generator=gen).repeat_interleave(v.chunk_frames, 1)
    noise = torch.randn(x0.shape, generator=gen)
    sig = schedule.euler_sigmas(cd.num_steps, cfg.schedule.shift)
    s, s_next = sig[n], sig[n + 1]  # (B, F) float64
    x_t = ((1 - s)[..., None, None, None] * x0.double() + s[..., None, None, None] * noise.double()).float()
    with torch.no_grad():
        cond = _cached_flow(module.cd_frozen, x0, x_t, (s * 1000).float(), text, v.chunk_frames).double()
        neg = module.neg_text.expand(b, -1, -1)
        uncond = _cached_flow(module.cd_frozen, x0, x_t, (s * 1000).float(), neg, v.chunk_frames).double()
        flow = uncond + cd.guidance_scale * (cond - uncond)
        x_next = (x_t.double() + (s_next - s)[..., None, None, None] * flow).float()
        tgt_flow = _cached_flow(module.cd_target, x0, x_next, (s_next * 1000).float(), text, v.chunk_frames).double()
        target = x_next.double() - s_next[..., None, None, None] * tgt_flow
        target = torch.where((s_next == 0)[..., None, None, None], x_next.double(), target)
    pred_flow = _cached_flow(student, x0, x_t, (s * 1000).float(), text, v.chunk_frames).double()
    pred = x_t.double() - s[..., None, None, None] * pred_flow
    want = ((pred - target) ** 2).mean()
    assert abs(loss.item() - want.item()) < 1e-5 * want.item(), (loss.item(), want.item())
    assert metrics["loss/cd"] == loss.detach()
    # the gradient reaches the student only
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for m in (module.cd_frozen, module.cd_target) for p in m.parameters())


@pytest.mark.timeout(180)
def test_causal_cd_target_is_checkpointed_and_resumes_exactly(tmp_path):
    base = ["train.num_steps=4", "checkpoint.every_n_steps=100"]
    cfg_path = ROOT / "configs/causal_cd-debug.yaml"
    full = train.fit(C.load(cfg_path, base + [f"runtime.run_dir={tmp_path / 'a'}"]))
    part1 = train.fit(C.load(cfg_path, base + [f"runtime.run_dir={tmp_path / 'b'}"]), stop_after=2)
    assert part1["counters"].step == 2
    part2 = train.fit(C.load(cfg_path, base + [f"runtime.run_dir={tmp_path / 'b'}"]))
    assert part2["counters"].step == 4
    losses = lambda s: [(h["step"], h["loss/cd"]) for h in s["history"]]  # noqa: E731
    assert losses(part1) + losses(part2) == losses(full)  # bitwise: the target resumed, not reset
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "a") / "ema.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "b") / "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the target lags the student (an EMA), so it is not the student's final weights
    student = full["student"].module.state_dict()
    assert any(not torch.equal(a[k], student[k].float()) for k in a)


@pytest.mark.timeout(60)
def test_bad_causal_combinations_are_refused(capsys):
    from vmla_train.cli import main

    run = ["runtime.run_dir=/nonexistent/never-written"]
    # causal_cd distils a stage-1 student: without one (and no dry-run opt-in) it is an error naming the key
    assert main(["fit", str(ROOT / "configs/causal_cd-debug.yaml"), "train.allow_random_roles=false", *run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.student_path" in err[0] and "causal_cd" in err[0], err
    # teacher forcing is a context of adapt only
    assert main(["fit", str(ROOT / "configs/ode_init-debug.yaml"), "train.context=teacher_forcing", *run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.context" in err[0], err
    # the target is an EMA: a decay of 0 would never move it
    with pytest.raises(C.ConfigError, match="cd.ema_decay"):
        C.load(ROOT / "configs/causal_cd-debug.yaml", ["cd.ema_decay=0"])


@pytest.mark.timeout(60)
def test_teacher_forcing_adapt_and_causal_cd_count_their_flops():
    from vmla_train.flops import FlopCounter

    df = _cfg("mla", "train.stage=adapt")
    tf = _cfg("mla", "train.stage=adapt", "train.context=teacher_forcing")
    cd = _cfg("mla", "train.stage=causal_cd", "train.allow_random_roles=true")
    s = WanStudent(df)
    per = {name: FlopCounter(c, s, None).student(1) for name, c in (("df", df), ("tf", tf), ("cd", cd))}
    assert per["df"] < per["tf"] < per["cd"]
    assert per["cd"] == pytest.approx(2 * per["tf"])  # 6 passes of the doubled clip against 3


# ----------------------------------------------------------------------------------------------
# Causal ODE: `vmla-data ode-pairs` with a student folder integrates with its cached rollouts
# ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_causal_euler_sample_is_causal_and_keeps_its_points():
    from vmla_train.dataprep.ode import causal_euler_sample

    cfg = _cfg("mla")
    torch.manual_seed(0)
    student = WanStudent(cfg).eval()
    x0, _, _, text = _inputs(cfg)
    noise = torch.randn_like(x0)
    neg = torch.randn(1, 5, cfg.model.text_dim)
    run = lambda z: causal_euler_sample(student, z, text, 4, 5.0, None, neg, 3.0, keep=(0, 2, 4))  # noqa: E731
    final, kept = run(noise)
    assert torch.equal(kept[0], noise) and torch.equal(kept[4], final) and kept[2].shape == noise.shape
    # chunk k's trajectory depends on chunks <= k only: new noise in the last chunk changes nothing before it
    c = cfg.video.chunk_frames
    other = noise.clone()
    other[:, -c:] = torch.randn_like(other[:, -c:])
    final2, kept2 = run(other)
    assert torch.equal(final2[:, :-c], final[:, :-c]) and torch.equal(kept2[2][:, :-c], kept[2][:, :-c])
    assert not torch.allclose(final2[:, -c:], final[:, -c:])
    # and it is not the bidirectional answer: changing the first chunk's noise changes every later chunk
    other = noise.clone()
    other[:, :c] = torch.randn_like(other[:, :c])
    assert not torch.allclose(run(other)[0][:, c:], final[:, c:])


@pytest.mark.timeout(120)
def test_ode_pairs_from_a_student_folder_write_causal_trajectories(tmp_path):
    import json
    import tarfile

    from vmla_train.dataprep import cli
    from vmla_train.dataprep.testing import save_tiny_models
    from vmla_train.student_io import save_student

    tiny = ["model.name=tiny", "video.num_frames=21", "runtime.progress=false"]
    cfg = C.load(None, tiny)
    torch.manual_seed(0)
    student = save_student(WanStudent(cfg).state_dict(), cfg, tmp_path / "student")
    models = save_tiny_models(tmp_path / "models", cfg.model)
    (tmp_path / "prompts.txt").write_text("a cat walking\nthe ocean at sunset\n")
    out = tmp_path / "ode"
    args = ["ode-pairs", *tiny, f"prep.ode.teacher={student}", f"prep.ode.text_encoder={models}",
            f"prep.ode.prompts_file={tmp_path / 'prompts.txt'}", f"prep.ode.output={out}", "prep.ode.num_steps=4",
            "prep.ode.keep_indices=[0,2,4]", "prep.ode.device=cpu", "prep.ode.dtype=float32",
            "prep.ode.latent_dtype=bfloat16"]
    assert cli.main(args) == 0
    def sources(folder: Path) -> list[str]:
        with tarfile.open(next(folder.glob("ode-*.tar"))) as tar:
            return [json.loads(tar.extractfile(m).read())["source"] for m in tar.getmembers() if m.name.endswith(".json")]

    assert sources(out) == ["causal", "causal"]
    # a diffusers teacher folder still gives the bidirectional teacher's trajectories
    swap = {f"prep.ode.teacher={student}": f"prep.ode.teacher={models}", f"prep.ode.output={out}":
            f"prep.ode.output={tmp_path / 'ode2'}"}
    assert cli.main([swap.get(a, a) for a in args]) == 0
    assert sources(tmp_path / "ode2") == ["teacher", "teacher"]
