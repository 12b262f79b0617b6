"""The README's pipeline runs as written, in order, each command on what the commands before it wrote.

The bash block after the `<!-- pipeline` marker in README.md is run command by command by bash, from a
temporary folder that links the repository's `configs/` and `data_prep/`, on the README's own dry run:

- `vmla-data stand-ins standins configs/tiny.yaml` first; the block's WAN and OPENVID point at it;
- every `configs/<stage>.yaml` becomes its tiny twin (TWINS);
- each tool gets the few overrides in TINY (tiny clips, few Euler steps, shard data for the debug twins,
  one second of video) appended.

Nothing else in a command is changed."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- pipeline"
INPUTS = ("WAN", "OPENVID")  # the block's variables: your Wan2.1 folder and your OpenVid-1M folder
TWINS = {
    "configs/videomla-1.3b.yaml": "configs/tiny.yaml",
    "configs/adapt.yaml": "configs/adapt-debug.yaml",
    "configs/ode_init.yaml": "configs/ode_init-debug.yaml",
    "configs/self_forcing.yaml": "configs/self_forcing-debug.yaml",
    "configs/causal_cd.yaml": "configs/causal_cd-debug.yaml",
}
TINY = {  # command prefix -> overrides appended
    "vmla-data": ["model.name=tiny", "video.num_frames=21", "video.height=64", "video.width=96", "runtime.progress=false",
                  "prep.raw.num_workers=1", "prep.encode.decode_workers=1", "prep.ode.num_steps=8",
                  "prep.ode.keep_indices=[0,2,4,6]"],
    "vmla-train fit": ["data.source=shards"],  # the debug twins default to synthetic data
    "vmla-generate": ["generate.seconds=1", "runtime.progress=false"],
}
# The stages the block must hold, in this order (a command starting with each prefix).
STAGES = ["vmla-convert", "vmla-data raw", "vmla-data encode", "vmla-data ode-pairs", "vmla-data negative-embedding",
          "vmla-train fit configs/adapt.yaml", "vmla-train export", "vmla-train fit configs/ode_init.yaml",
          "vmla-train export", "vmla-train fit configs/causal_cd.yaml", "vmla-train export",
          "vmla-train fit configs/self_forcing.yaml", "vmla-train export", "vmla-generate"]


def pipeline_block(readme: str) -> tuple[dict[str, str], list[str]]:
    """(variables, commands) of the marked block: continuation lines joined, comments and blanks dropped."""
    assert MARK in readme, "README.md lost its pipeline block marker"
    block = readme.split(MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    variables, commands = {}, []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+", " ", line).strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z_]+)=(\S+)", line)
        if m:
            variables[m.group(1)] = m.group(2)
        else:
            commands.append(line)
    return variables, commands


def dry_run(command: str) -> str:
    for full, twin in TWINS.items():
        command = re.sub(rf"(?<![\w/.-]){re.escape(full)}(?![\w.-])", twin, command)
    extra = next((v for prefix, v in TINY.items() if command.startswith(prefix + " ")), [])
    return " ".join([command, *(f"'{x}'" for x in extra)])


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_pipeline_runs_in_order_on_stand_ins(tmp_path):
    variables, commands = pipeline_block((ROOT / "README.md").read_text())
    assert sorted(variables) == sorted(INPUTS), f"the block's variables are {sorted(variables)}, expected {INPUTS}"
    vmla = [c for c in commands if c.startswith("vmla-")]
    it = iter(vmla)
    missing = [s for s in STAGES if not any(c.startswith(s) for c in it)]
    assert not missing, f"the README pipeline lacks, or has out of order, {missing}"

    for name in ("configs", "data_prep"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "WAN": "standins/wan", "OPENVID": "standins/openvid"}
    times = []
    for command in ["vmla-data stand-ins standins configs/tiny.yaml", *map(dry_run, commands)]:
        t0, cpu0 = time.perf_counter(), _children_cpu()
        r = subprocess.run(["bash", "-c", f"set -euo pipefail; {command}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
        times.append(f"{time.perf_counter() - t0:5.1f} s ({_children_cpu() - cpu0:5.1f} s CPU)  {command[:90]}")
        assert r.returncode == 0, f"README pipeline command failed (exit {r.returncode}):\n{command}\n" \
                                  f"{(r.stdout + r.stderr)[-3000:]}"
    print("\n".join(times))

    for folder in ("ckpt/student-converted", "ckpt/student-adapt", "ckpt/student-ode", "ckpt/student-adapt-tf",
                   "ckpt/student-cd", "ckpt/student-sf"):
        assert (tmp_path / folder / "config.yaml").is_file(), f"{folder} was not written"
    videos = sorted((tmp_path / "samples").glob("*.mp4"))
    prompts = [p for p in (tmp_path / "prompts.txt").read_text().splitlines() if p.strip()]
    assert len(videos) == len(prompts) and all(v.stat().st_size > 0 for v in videos), videos
