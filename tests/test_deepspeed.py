"""Two DeepSpeed engines (student, critic) under ZeRO-2 and ZeRO-3 in 2 CPU processes (DeepSpeed's CPU
accelerator + gloo): a step on one model never changes the other; the real loop saves per-engine
checkpoints that `export` consolidates."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import sys, torch
from vmla_train import config as C, parallel, recipe, schedule, train, data
from vmla_train.distill import DistillationModule, RolloutSpec
from vmla_train.ema import EMA
from vmla_train.state import TrainState

stage, run_dir = int(sys.argv[1]), sys.argv[2]
cfg = C.load(sys.argv[3], [f"runtime.run_dir={run_dir}", "strategy.name=deepspeed", "strategy.devices=2",
              f"strategy.zero_stage={stage}", "strategy.accelerator=cpu", "train.global_batch_size=2",
              "optim.student_lr=1e-2", "optim.critic_lr=1e-2"])
fabric = parallel.build_fabric(cfg, 1)
fabric.launch()
zero3 = parallel.is_zero3(fabric)
assert parallel.is_deepspeed(fabric) and zero3 == (stage == 3)
student = recipe.build_student(cfg)
teacher = recipe.build_teacher(cfg)
critic = recipe.build_critic(cfg, teacher)
module = DistillationModule(cfg, student, teacher, critic)
so, co = module.configure_optimizers()
sm, so = fabric.setup(student, so)
cm, co = fabric.setup(critic, co)
assert sm._forward_module is not cm._forward_module  # two engines
module.use_engines(sm, cm, fabric.device, torch.float32)

def snap(m):
    with parallel.gathered(m.module, zero3):
        return {n: p.detach().clone() for n, p in m.module.named_parameters()}

def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)

loader = data.build_loader(cfg, "prompts", fabric.global_rank, fabric.world_size)
state = TrainState(fabric, cfg, module, so, co, EMA(0.0, 0, keep=False), loader, "", 1)
batches = [next(loader)]
steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
spec = RolloutSpec(cfg.video.latent_frames, steps, [1, 2], 0)
gen = torch.Generator().manual_seed(fabric.global_rank)
s0, c0 = snap(sm), snap(cm)
train.update_role(state, "critic", lambda b: module.critic_step(b, gen, spec), batches)
s1, c1 = snap(sm), snap(cm)
assert same(s0, s1), "critic step changed the student"
assert not same(c0, c1), "critic step did not change the critic"
train.update_role(state, "student", lambda b: module.dmd_loss(b, gen, spec), batches)
s2, c2 = snap(sm), snap(cm)
assert same(c1, c2), "student step changed the critic"
assert not same(s1, s2), "student step did not change the student"
recipe.assert_frozen(teacher)
print(f"rank {fabric.global_rank} OK", flush=True)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
import os
os._exit(0)  # as vmla_train.cli.entry does for a rank: no interpreter teardown under live comm threads
'''


def _launch(args: list[str], tmp_path: Path, timeout: int = 240) -> list[str]:
    """Run ``args`` as 2 ranks (the env torchrun / srun would give), return their outputs."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
        assert p.returncode == 0, out[-4000:]
    return outs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [2, 3])
def test_two_engines_idle_model_unchanged(tmp_path, stage):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    outs = _launch([sys.executable, str(script), str(stage), str(tmp_path / "run"),
                    str(ROOT / "configs/self_forcing-debug.yaml")], tmp_path)
    assert all(f"rank {r} OK" in o for r, o in enumerate(outs))


@pytest.mark.timeout(300)
def test_zero3_fit_checkpoint_and_export(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "vmla_train.cli", "fit", str(ROOT / "configs/self_forcing-debug.yaml"),
            f"runtime.run_dir={run}", "strategy.name=deepspeed", "strategy.devices=2", "strategy.zero_stage=3",
            "strategy.accelerator=cpu", "train.global_batch_size=2", "train.num_steps=2"]
    _launch(args, tmp_path)
    last = run / "checkpoints" / "step-00000002"
    assert (last / "manifest.json").is_file()
    assert (last / "student" / "checkpoint").is_dir() and (last / "critic" / "checkpoint").is_dir()
    assert (last / "rng-rank1.pt").is_file() and (last / "loader-rank1.json").is_file()
    # resume on the same 2 ranks to a later step (DeepSpeed loads its own shards)
    _launch(args[:-1] + ["train.num_steps=3"], tmp_path)
    assert (run / "checkpoints" / "step-00000003" / "manifest.json").is_file()
    subprocess.run([sys.executable, "-m", "vmla_train.cli", "export", str(run), str(tmp_path / "student")], cwd=ROOT,
                   check=True, capture_output=True)
    from vmla_train.student_io import load_student

    model, cfg = load_student(tmp_path / "student")
    assert cfg.train.stage.value == "self_forcing" and sum(p.numel() for p in model.parameters()) > 0
