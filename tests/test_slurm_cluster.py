"""The local Slurm cluster itself: two nodes, srun tasks, and torch gloo across them."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slurm


@pytest.mark.timeout(180)
def test_two_node_gloo_allreduce(slurm_cluster, tmp_path):
    script = tmp_path / "allreduce.sbatch"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --output={tmp_path}/out-%j.txt
        export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
        export MASTER_PORT=29533
        srun {sys.executable} -c '
        import os, torch, torch.distributed as dist
        dist.init_process_group("gloo", rank=int(os.environ["SLURM_PROCID"]), world_size=int(os.environ["SLURM_NTASKS"]))
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        print("node", os.environ["SLURM_NODEID"], "rank", dist.get_rank(), "sum", int(t.item()), flush=True)
        dist.destroy_process_group()
        '
        """))
    r = subprocess.run(["sbatch", "--wait", str(script)], env=slurm_cluster.env, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    out = "".join(p.read_text() for p in tmp_path.glob("out-*.txt"))
    assert "node 0 rank 0 sum 3" in out and "node 1 rank 1 sum 3" in out, out
