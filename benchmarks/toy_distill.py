"""Learning check: does the pipeline distil? teacher -> convert -> adapt -> ode_init -> self_forcing on a toy world.

    python benchmarks/toy_distill.py            # full: ~minutes on 2 CPU cores, PNG + JSON in benchmarks/results/
    python benchmarks/toy_distill.py --quick    # the shortened version run by `make test` (looser threshold)

The toy world (tiny latent geometry of configs/*-debug.yaml: 6 latent frames of 8x12, 16 channels):
one Gaussian blob moving at constant velocity; the prompt (a fixed random text embedding per class)
names the direction (right, left, down, up); start positions are random. A tiny bidirectional diffusers
Wan teacher learns it with flow matching (this script's own short loop); ``vmla-convert``'s spectral
MLA conversion makes the student; then the three stages run through ``train.fit`` from the debug-twin
configs (+ overrides) on shards this script writes (training latents, teacher ODE trajectories).

Distances (held-out prompts, fixed noise), on per-video features = the blob's centre per frame
(soft-argmax of the projection onto the blob's channel pattern) and its frame-to-frame steps (x4):

- ``mmd``: squared MMD, RBF kernel (bandwidth = median pairwise distance of the data features),
  generated vs held-out data;
- ``motion_err``: mean |fitted velocity - the prompt's velocity| (latent pixels / frame).

Rows: the data itself (a second held-out draw: the noise floor), the teacher (24 Euler steps), the
untrained (random MLA) student, the converted student and the student after each stage (4 steps,
causal, over the cache). Goal: after self_forcing the 4-step student's mmd is within 1.5x of the
teacher's and far below the untrained student's.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tarfile
import time
from pathlib import Path

import torch

from vmla_train import checkpoint as ckpt
from vmla_train import config as C
from vmla_train import schedule, train, wan
from vmla_train.data import encode_array
from vmla_train.rollout import sample_video
from vmla_train.student import WanStudent
from vmla_train.student_io import load_student

ROOT = Path(__file__).resolve().parents[1]
# The toy runs the debug twins at a slightly wider geometry: the 48-wide 2-layer `tiny` teacher does not
# learn the toy world in CPU minutes (flow loss plateaus at 0.30; this one reaches 0.02).
GEOMETRY = ["model.dim=96", "model.num_layers=4", "model.ffn_dim=192", "attention.d_c=48"]
DIRECTIONS = [(0.0, 0.6), (0.0, -0.6), (0.6, 0.0), (-0.6, 0.0)]  # (dy, dx) per class, latent pixels / frame


class Toy:
    def __init__(self, cfg: C.Config, seed: int = 0):
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        m = cfg.model
        self.pattern = torch.randn(m.in_channels, generator=g)
        self.pattern /= self.pattern.norm()
        self.codes = torch.zeros(len(DIRECTIONS), m.text_len, m.text_dim)
        self.codes[:, :4] = torch.randn(len(DIRECTIONS), 4, m.text_dim, generator=g)

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents [n, F, C, H, W], text [n, Lt, D], class [n])."""
        v = self.cfg.video
        f, h, w = v.latent_frames, v.latent_height, v.latent_width
        cls = torch.randint(0, len(DIRECTIONS), (n,), generator=g)
        vel = torch.tensor(DIRECTIONS)[cls]  # (n, 2)
        span = vel * (f - 1)  # (n, 2) displacement over the clip
        size = torch.tensor([h, w], dtype=torch.float32)
        lo = 1.0 + (-span).clamp_min(0)  # the whole path stays a pixel inside the frame
        hi = size - 2.0 - span.clamp_min(0)
        start = lo + torch.rand(n, 2, generator=g) * (hi - lo)
        fr = torch.arange(f, dtype=torch.float32)
        centre = start[:, None] + vel[:, None] * fr[None, :, None]  # (n, F, 2)
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        d2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2  # (n, F, H, W)
        blob = 3.0 * torch.exp(-d2 / (2 * 1.2**2))
        lat = blob[:, :, None] * self.pattern[None, None, :, None, None]  # (n, F, C, H, W)
        return lat, self.codes[cls], cls

    def features(self, lat: torch.Tensor) -> torch.Tensor:
        """Blob centre per frame by soft-argmax of the pattern projection: [n, F * 2]."""
        proj = torch.einsum("nfchw,c->nfhw", lat.float(), self.pattern)
        proj = proj / proj.flatten(2).amax(-1).clamp_min(1e-3)[..., None, None]  # peak 1 per frame
        wgt = torch.softmax(proj.flatten(2) * 12.0, -1).unflatten(-1, proj.shape[-2:])  # (n, F, H, W)
        h, w = proj.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        c = torch.stack([(wgt * yy).sum((-2, -1)), (wgt * xx).sum((-2, -1))], -1)  # (n, F, 2)
        return torch.cat([c.flatten(1), 4.0 * (c[:, 1:] - c[:, :-1]).flatten(1)], 1)  # positions + weighted steps

    def centres(self, lat: torch.Tensor) -> torch.Tensor:
        f = lat.shape[1]
        return self.features(lat)[:, : 2 * f].unflatten(1, (f, 2))

    def motion_error(self, lat: torch.Tensor, cls: torch.Tensor) -> float:
        c = self.centres(lat)  # (n, F, 2)
        fr = torch.arange(c.shape[1], dtype=torch.float32)
        fr = fr - fr.mean()
        vel = (c * fr[None, :, None]).sum(1) / (fr**2).sum()  # least-squares slope (n, 2)
        return float((vel - torch.tensor(DIRECTIONS)[cls]).abs().mean())


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    def k(a, b):
        return torch.exp(-torch.cdist(a, b) ** 2 / (2 * bandwidth**2))

    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def write_shard(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for name, data in s.items():
                if name == "key":
                    continue
                info = tarfile.TarInfo(f"{s['key']}.{name}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def train_teacher(cfg: C.Config, toy: Toy, steps: int, log) -> torch.nn.Module:
    teacher = wan.build_wan_transformer(cfg.model, seed=1)
    opt = torch.optim.AdamW(teacher.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(11)
    t0 = time.perf_counter()
    for i in range(steps):
        x0, text, _ = toy.sample(16, g)
        t = schedule.sample_training_t((16,), cfg.schedule.shift, generator=g).float()
        noise = torch.randn(x0.shape, generator=g)
        flow = wan.wan_flow(teacher, schedule.add_noise(x0, noise, t), t, text, cfg.model.text_len)
        loss = ((flow - (noise - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * (i + 1) / steps))
        if i % max(1, steps // 5) == 0 or i == steps - 1:
            log(f"teacher step {i}: flow loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    return teacher.eval().requires_grad_(False)


@torch.no_grad()
def teacher_samples(teacher, cfg: C.Config, noise: torch.Tensor, text: torch.Tensor, steps: int, keep: list[int] | None = None):
    """Euler sampling; with ``keep`` also the trajectory at those step indices (and their timesteps)."""
    x, kept = wan.euler_sample(teacher, noise, text, steps, cfg.schedule.shift, cfg.model.text_len, keep=keep or ())
    if keep is None:
        return x, None, []
    sigmas = schedule.euler_sigmas(steps, cfg.schedule.shift)
    return x, torch.stack([kept[i] for i in keep], 1), [schedule.NUM_TRAIN_TIMESTEPS * float(sigmas[i]) for i in keep]


@torch.no_grad()
def student_samples(student, cfg: C.Config, text: torch.Tensor, seed: int) -> torch.Tensor:
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    return sample_video(student.eval(), text, cfg.video.latent_frames, steps, generator=torch.Generator().manual_seed(seed))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the shortened version (make test)")
    p.add_argument("--work", default=str(ROOT / "runs/toy_distill"), help="scratch folder (shards, runs, models)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"), help="where the PNG and JSON go")
    args = p.parse_args(argv)
    q = args.quick
    n = dict(teacher=40 if q else 1500, adapt=8 if q else 200, ode=8 if q else 200, sf=8 if q else 200,
             train=32 if q else 512, ode_pairs=16 if q else 256, eval=32 if q else 128)
    work = Path(args.work) / ("quick" if q else "full")
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = print
    geometry = [] if q else GEOMETRY  # quick: the plain tiny geometry (a structural check, seconds)
    base = C.load(ROOT / "configs/adapt-debug.yaml", geometry)
    toy = Toy(base)
    t_start = time.perf_counter()

    # 1. Teacher: a tiny bidirectional diffusers Wan, flow matching on the toy world.
    teacher = train_teacher(base, toy, n["teacher"], log)
    teacher.save_pretrained(work / "teacher")

    # 2. Shards: training latents (adapt; also the prompts of self_forcing) and teacher ODE pairs.
    g = torch.Generator().manual_seed(21)
    lat, text, _ = toy.sample(n["train"], g)
    write_shard(work / "data/train/train-000000.tar", [
        {"key": f"s{i:06d}", "latents.npy": encode_array(lat[i], "float32"), "text.npy": encode_array(text[i, :4], "float32"),
         "txt": b"toy", "json": b'{"dtype": "float32"}'} for i in range(len(lat))])
    keep = [0, 6, 12, 18]
    noise = torch.randn((n["ode_pairs"],) + lat.shape[1:], generator=g)
    _, otext, _ = toy.sample(n["ode_pairs"], g)
    clean, traj, ts = teacher_samples(teacher, base, noise, otext, 24, keep)
    write_shard(work / "data/ode/ode-000000.tar", [
        {"key": f"o{i:06d}", "noise.npy": encode_array(noise[i], "float32"), "trajectory.npy": encode_array(traj[i], "float32"),
         "clean.npy": encode_array(clean[i], "float32"), "text.npy": encode_array(otext[i, :4], "float32"), "txt": b"toy",
         "json": json.dumps({"dtype": "float32", "timesteps": ts}).encode()} for i in range(len(noise))])

    # 3. Student: spectral MLA conversion of the teacher (vmla-convert), and an untrained (random) one.
    from vmla_train.convert import convert

    convert(work / "teacher", work / "student-converted", config_paths=[ROOT / "configs/adapt-debug.yaml"],
            overrides=geometry, log=lambda *a: None)

    # 4. The three stages from the debug twins, each starting from the previous stage's export.
    common = ["runtime.progress=false", "logging.wandb_mode=disabled", "checkpoint.every_n_steps=100000",
              "data.source=shards", "data.batch_size=8", "train.global_batch_size=8", "data.num_workers=0"]
    stages = [
        ("adapt", "configs/adapt-debug.yaml", n["adapt"], ["data.shards=" + str(work / "data/train/train-000000.tar"),
                                                           "optim.student_lr=3e-4"]),
        ("ode_init", "configs/ode_init-debug.yaml", n["ode"], ["data.shards=" + str(work / "data/ode/ode-000000.tar"),
                                                              "optim.student_lr=3e-4", "prep.ode.num_steps=24",
                                                              "prep.ode.keep_indices=[0,6,12,18]"]),
        ("self_forcing", "configs/self_forcing-debug.yaml", n["sf"], [
            "data.shards=" + str(work / "data/train/train-000000.tar"), f"train.teacher_path={work / 'teacher'}",
            "optim.student_lr=1e-4", "optim.critic_lr=2e-4", "dmd.guidance_scale=1.0", "dmd.critic_steps_per_student_step=2",
            "dmd.ema_decay=0.0", "data.batch_size=4", "train.global_batch_size=4"]),
    ]
    students = {"converted": work / "student-converted"}
    prev = work / "student-converted"
    losses = {}
    for name, config, steps, extra in stages:
        t0 = time.perf_counter()
        cfg = C.load(ROOT / config, geometry + common + extra + [f"train.num_steps={steps}", f"train.student_path={prev}",
                                                      f"runtime.run_dir={work / 'runs' / name}"])
        out = train.fit(cfg)
        losses[name] = [(h["step"], {k: v for k, v in h.items() if k.startswith("loss/")}) for h in out["history"]]
        prev = ckpt.export_student(work / "runs" / name, work / f"student-{name}")
        students[name] = prev
        log(f"{name}: {steps} iterations in {time.perf_counter() - t0:.0f} s, last losses {losses[name][-1][1]}")

    # 5. Evaluation on held-out prompts with fixed noise.
    ge = torch.Generator().manual_seed(99)
    data_lat, etext, ecls = toy.sample(n["eval"], ge)
    data2, _, cls2 = toy.sample(n["eval"], ge)
    feats_data = toy.features(data_lat)
    bw = float(torch.cdist(feats_data, feats_data).median())
    rows = {}

    def score(name, lat_, cls=ecls):
        rows[name] = {"mmd": mmd2(toy.features(lat_), feats_data, bw), "motion_err": toy.motion_error(lat_, cls)}
        log(f"  {name:<14} mmd {rows[name]['mmd']:.4f}  motion_err {rows[name]['motion_err']:.3f}")

    log("evaluation (held-out prompts):")
    score("data", data2, cls2)
    tnoise = torch.randn(data_lat.shape, generator=torch.Generator().manual_seed(7))
    score("teacher", teacher_samples(teacher, base, tnoise, etext, 24)[0])
    torch.manual_seed(5)
    score("untrained", student_samples(WanStudent(base), base, etext, 3))
    for name, folder in students.items():
        model, scfg = load_student(folder)
        score(name, student_samples(model, scfg, etext, 3))

    ratio = rows["self_forcing"]["mmd"] / max(rows["teacher"]["mmd"], 1e-8)
    goal = {"sf_over_teacher_mmd": ratio, "sf_over_untrained_mmd": rows["self_forcing"]["mmd"] / rows["untrained"]["mmd"],
            "full_goal_met": ratio <= 1.5 and rows["self_forcing"]["mmd"] < 0.25 * rows["untrained"]["mmd"]}
    result = {"quick": q, "steps": n, "seconds": time.perf_counter() - t_start, "rows": rows, "goal": goal,
              "features": "blob centre per frame (soft-argmax of the pattern projection) + 4x its frame-to-frame steps; RBF MMD^2, median bandwidth",
              "losses": losses}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "toy_distill-quick" if q else "toy_distill"
    (out_dir / f"{tag}.json").write_text(json.dumps(result, indent=1))
    _plot(rows, losses, out_dir / f"{tag}.png")
    log(f"goal: {goal}; wrote {out_dir / (tag + '.json')} and .png in {result['seconds']:.0f} s")
    return result


def _plot(rows: dict, losses: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = list(rows)
    axes[0].bar(names, [rows[k]["mmd"] for k in names])
    axes[0].set_yscale("log")
    axes[0].set_title("MMD^2 to held-out data (lower is better)")
    axes[0].tick_params(axis="x", rotation=45)
    axes[1].bar(names, [rows[k]["motion_err"] for k in names])
    axes[1].set_title("motion error (latent px / frame)")
    axes[1].tick_params(axis="x", rotation=45)
    for stage, hist in losses.items():
        for key in sorted({k for _, d in hist for k in d}):
            pts = [(s, d[key]) for s, d in hist if key in d]
            axes[2].plot([s for s, _ in pts], [v for _, v in pts], label=f"{stage} {key.split('/')[-1]}")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("iteration")
    axes[2].legend(fontsize=7)
    axes[2].set_title("training losses per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
