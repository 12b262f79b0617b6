"""The Fabric loop: the stages from their debug twins, checkpoints, export, the demo; the pretrain stage's
objective, learning and export to a diffusers teacher."""

from pathlib import Path

import pytest
import torch

from vmla_train import checkpoint as ckpt
from vmla_train import config as C
from vmla_train import convert, data, losses, recipe, schedule, train, wan
from vmla_train.distill import DistillationModule, keyed_generator
from vmla_train.student_io import load_student

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stage", ["pretrain", "adapt", "ode_init"])
def test_stage_runs_and_checkpoints(tmp_path, stage):
    cfg = C.load(ROOT / f"configs/{stage}-debug.yaml", [f"runtime.run_dir={tmp_path}", "train.num_steps=2"])
    out = train.fit(cfg)
    name = {"pretrain": "loss/pretrain", "adapt": "loss/adapt", "ode_init": "loss/ode"}[stage]
    assert [h["step"] for h in out["history"]] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h[name])) for h in out["history"])
    done = ckpt.complete_checkpoints(tmp_path)
    assert [p.name for p in done] == ["step-00000002"]
    manifest = ckpt.read_manifest(done[-1])
    assert {"student.ckpt", "rng-rank0.pt", "loader-rank0.json", "train_state.json", "config.yaml"} <= set(manifest["files"])
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    # everything but the engine files loads with weights_only / JSON
    torch.load(done[-1] / "rng-rank0.pt", weights_only=True)
    torch.load(done[-1] / "student.ckpt", weights_only=True)


@pytest.mark.timeout(60)
def test_self_forcing_export_and_keep_last(tmp_path):
    cfg = C.load(ROOT / "configs/self_forcing-debug.yaml", [f"runtime.run_dir={tmp_path}", "train.num_steps=4",
                                                           "checkpoint.every_n_steps=1", "checkpoint.keep_last=2"])
    out = train.fit(cfg)
    c = out["counters"]
    assert (c.step, c.student_steps, c.critic_steps) == (4, 2, 4)  # ratio 2: student at iterations 0 and 2
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    last = ckpt.latest_checkpoint(tmp_path)
    assert (last / "critic.ckpt").is_file() and (last / "ema.safetensors").is_file()
    state = ckpt.read_train_state(last)
    assert state["wandb_run_id"] == (tmp_path / "wandb_run_id").read_text().strip()
    # export -> a plain student folder with the trained weights
    folder = ckpt.export_student(tmp_path, tmp_path / "export")
    model, scfg = load_student(folder)
    trained = out["student"].module.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
    assert scfg.model == cfg.model and scfg.attention == cfg.attention
    ema_folder = ckpt.export_student(tmp_path, tmp_path / "export-ema", use_ema=True)
    assert (ema_folder / "model.safetensors").is_file()


@pytest.mark.timeout(60)
def test_pretrain_ema_is_the_average_of_the_step_weights(tmp_path):
    """train.ema_decay outside self_forcing: with the EMA from the first iteration on, the exported EMA after 3 is
    d (d w1 + (1 - d) w2) + (1 - d) w3 of the weights after each step; without the key there is none."""
    d = 0.5
    base = [f"runtime.run_dir={tmp_path}", "checkpoint.every_n_steps=1", "checkpoint.keep_last=3"]
    cfg = C.load(ROOT / "configs/pretrain-debug.yaml", [*base, "train.num_steps=3", f"train.ema_decay={d}",
                                                       "train.ema_start_step=0"])
    train.fit(cfg)
    weights = [ckpt.export_student(tmp_path / "checkpoints" / f"step-{i:08d}", tmp_path / f"w{i}") for i in (1, 2, 3)]
    w = [load_student(f)[0].state_dict() for f in weights]
    model, _ = load_student(ckpt.export_student(tmp_path, tmp_path / "ema", use_ema=True))
    for k, v in model.state_dict().items():  # the first update (step 1) copies, then ema = d * ema + (1 - d) * w
        want = d * (d * w[0][k].float() + (1 - d) * w[1][k].float()) + (1 - d) * w[2][k].float()
        torch.testing.assert_close(v.float(), want, rtol=1e-6, atol=1e-6)
    other = tmp_path / "no-ema"
    train.fit(C.load(ROOT / "configs/pretrain-debug.yaml", [f"runtime.run_dir={other}", "train.num_steps=1"]))
    with pytest.raises(FileNotFoundError, match="train.ema_decay"):
        ckpt.export_student(other, tmp_path / "none", use_ema=True)


@pytest.mark.timeout(30)
def test_global_batch_must_divide():
    cfg = C.load(ROOT / "configs/adapt-debug.yaml", ["train.global_batch_size=3", "data.batch_size=2"])
    with pytest.raises(C.ConfigError, match="train.global_batch_size"):
        train.accumulation_steps(cfg, 1)
    cfg = C.load(ROOT / "configs/adapt-debug.yaml", ["train.global_batch_size=8", "data.batch_size=2"])
    assert train.accumulation_steps(cfg, 2) == 2
    with pytest.raises(C.ConfigError, match="strategy.devices"):
        C.load(ROOT / "configs/adapt-debug.yaml", ["strategy.devices=2"])


@pytest.mark.timeout(90)
def test_demo_artefacts(tmp_path):
    """`make demo`, shortened: checkpoint, sample mp4, offline W&B run."""
    cfg = C.load(ROOT / "configs/demo.yaml", [f"runtime.run_dir={tmp_path}", "train.num_steps=3", "runtime.progress=false"])
    out = train.run_training_demo(cfg)
    assert out["checkpoint"] is not None and (out["checkpoint"] / "manifest.json").is_file()
    mp4 = Path(out["samples"][0])
    assert mp4.is_file() and mp4.stat().st_size > 0
    import av

    with av.open(str(mp4)) as f:
        frames = sum(1 for _ in f.decode(video=0))
    assert frames == cfg.video.num_frames
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


@pytest.mark.timeout(60)
def test_wandb_run_id_continues_on_resume_and_is_new_when_starting_over(tmp_path):
    def run(steps, resume):
        cfg = C.load(ROOT / "configs/adapt-debug.yaml", [f"runtime.run_dir={tmp_path}", f"train.num_steps={steps}",
                                                         f"checkpoint.resume={str(resume).lower()}"])
        return train.fit(cfg)["run_id"]

    first = run(1, resume=True)
    assert run(2, resume=True) == first  # resumed: the same W&B run
    again = run(1, resume=False)  # starting over in the same folder: a new run
    assert again != first
    assert (tmp_path / "wandb_run_id").read_text().strip() == again


@pytest.mark.timeout(60)
def test_pretrain_objective_and_learning_on_a_fixed_batch():
    """The pretrain loss is Wan's objective (one shifted t per sample, no mask, v = eps - x0), and 30 AdamW
    steps on one batch bring it below the start and below the zero-flow predictor's loss."""
    cfg = C.load(ROOT / "configs/pretrain-debug.yaml")
    module = DistillationModule.from_config(cfg)
    loader = data.build_loader(cfg, "latents", 0, 1)
    batch = next(loader)
    loader.close()
    cpu = torch.device("cpu")
    # the objective, drawn by hand in the same order from the same generator (a t per chunk would differ)
    g = keyed_generator(cpu, 7)
    t = schedule.sample_training_t((1,), cfg.schedule.shift, generator=g).float()  # (B,)
    noise = torch.randn(batch.latents.shape, generator=g)
    with torch.no_grad():
        flow = module.student(schedule.add_noise(batch.latents, noise, t), t, batch.text, mask=None)
        loss, metrics = module.pretrain_loss(batch, keyed_generator(cpu, 7))
    torch.testing.assert_close(loss, losses.flow_matching_loss(flow, batch.latents, noise), rtol=0, atol=0)
    assert set(metrics) == {"loss/pretrain"}

    def held_out() -> tuple[float, float]:
        """(pretrain loss, zero-flow loss mean((eps - x0)^2)) averaged over 8 fixed draws of t and noise."""
        model, zero = 0.0, 0.0
        with torch.no_grad():
            for k in range(8):
                model += float(module.pretrain_loss(batch, keyed_generator(cpu, 1000, k))[0]) / 8
                g = keyed_generator(cpu, 1000, k)
                schedule.sample_training_t((1,), cfg.schedule.shift, generator=g)
                zero += float(torch.mean((torch.randn(batch.latents.shape, generator=g) - batch.latents) ** 2)) / 8
        return model, zero

    before, zero = held_out()
    opt, = module.configure_optimizers()
    for step in range(30):
        loss, _ = module.pretrain_loss(batch, keyed_generator(cpu, 0, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = held_out()
    assert after < 0.8 * before and after < 0.9 * zero, (before, after, zero)


@pytest.mark.timeout(60)
def test_pretrain_text_dropout_feeds_the_negative_prompt(tmp_path):
    """train.text_dropout: a dropped sample's text is the negative prompt's embedding (zero-padded), the others
    keep theirs; the draw comes from the step's generator; the key needs pretrain and a negative embedding file."""
    from safetensors.torch import save_file

    base = C.load(ROOT / "configs/pretrain-debug.yaml")
    m = base.model
    neg_file = tmp_path / "negative.safetensors"
    save_file({"text": torch.randn(1, m.text_len - 2, m.text_dim)}, str(neg_file))
    cfg = C.load(ROOT / "configs/pretrain-debug.yaml", ["train.text_dropout=0.5", f"dmd.negative_embedding={neg_file}",
                                                       "data.batch_size=8", "train.global_batch_size=8"])
    module = DistillationModule.from_config(cfg)
    loader = data.build_loader(cfg, "latents", 0, 1)
    batch = next(loader)
    loader.close()
    seen = []
    forward = module.student.forward
    module.student.forward = lambda x, t, text, **kw: seen.append(text) or forward(x, t, text, **kw)
    with torch.no_grad():
        module.pretrain_loss(batch, keyed_generator(torch.device("cpu"), 3))
    g = keyed_generator(torch.device("cpu"), 3)  # the same draws in the same order: t, noise, then the drop mask
    schedule.sample_training_t((8,), cfg.schedule.shift, generator=g)
    torch.randn(batch.latents.shape, generator=g)
    drop = torch.rand(8, generator=g) < 0.5
    assert 0 < int(drop.sum()) < 8
    neg = torch.zeros_like(batch.text[:1])
    neg[:, : m.text_len - 2] = module.neg_text
    for i, text in enumerate(seen[0]):
        torch.testing.assert_close(text, neg[0] if drop[i] else batch.text[i], rtol=0, atol=0)
    for bad in (["train.text_dropout=0.1"], ["train.text_dropout=1.0", f"dmd.negative_embedding={neg_file}"]):
        with pytest.raises(C.ConfigError, match="train.text_dropout"):
            C.load(ROOT / "configs/pretrain-debug.yaml", bad)


@pytest.mark.timeout(90)
def test_pretrain_exports_to_a_diffusers_teacher(tmp_path):
    """pretrain run -> `vmla-train export` -> `vmla-convert --to diffusers` -> `wan.load_wan_transformer`:
    the same flow as the student (bidirectional, one t per sample), and usable as train.teacher_path."""
    cfg = C.load(ROOT / "configs/pretrain-debug.yaml", [f"runtime.run_dir={tmp_path / 'run'}", "train.num_steps=2"])
    train.fit(cfg)
    folder = ckpt.export_student(tmp_path / "run", tmp_path / "export")
    assert convert.main([str(folder), str(tmp_path / "teacher"), "--to", "diffusers"]) == 0
    student, _ = load_student(folder)
    teacher = wan.load_wan_transformer(tmp_path / "teacher", dtype=torch.float32)
    m, v = cfg.model, cfg.video
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, v.latent_frames, m.in_channels, v.latent_height, v.latent_width, generator=g)
    text = torch.randn(2, m.text_len - 3, m.text_dim, generator=g)
    t = torch.tensor([100.0, 800.0])  # (B,)
    with torch.no_grad():
        ours = student.eval()(x, t, text, mask=None)
        theirs = wan.wan_flow(teacher, x, t, text, m.text_len)
        x_late = x.clone()
        x_late[:, -1] += 1.0
        later = student(x_late, t, text, mask=None)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(later[:, 0], ours[:, 0])  # bidirectional: frame 0 sees the last frame
    sf = C.load(ROOT / "configs/self_forcing-debug.yaml", [f"train.teacher_path={tmp_path / 'teacher'}"])
    frozen = recipe.build_teacher(sf).state_dict()  # what a self_forcing run loads as its teacher
    assert all(torch.equal(frozen[k], w) for k, w in teacher.state_dict().items())


@pytest.mark.timeout(30)
def test_pretrain_refuses_mla():
    with pytest.raises(C.ConfigError, match="attention.kind.*mha with train.stage=pretrain"):
        C.load(ROOT / "configs/pretrain-debug.yaml", ["attention.kind=mla"])
