"""The world demo: the whole student pipeline on trained world models, on a CPU, in minutes.

    vmla-train demo configs/world/demo.yaml [demo.prompt="a small red circle drifts to the left"] [k=v ...]

From the world checkpoints in ``demo.world`` (``teacher/``: the world teacher, a diffusers
``WanTransformer3DModel``; ``student/``: the distilled MLA student of ``benchmarks/world_student.sh``;
``models/``: the world codec and text encoder), with the project's own commands, in the run folder:

1. ``vmla-convert`` the teacher into an MLA student (spectral init): its attention error and cache size;
2. ``vmla-data negative-embedding`` of the world text encoder;
3. ``vmla-train fit`` of the config, a short self-forcing DMD stage that continues the shipped student on the
   prompt against the teacher (progress bar, checkpoint, offline W&B run);
4. ``vmla-train export`` and ``vmla-generate`` of the prompt -> an mp4;
5. ``vmla-world eval`` of that mp4 against the prompt: adherence, motion, physics, identity, drift.

Every geometry comes from the files: the codec's strides become ``video.vae_stride``. A prompt the world
cannot stage, or a missing checkpoint, is one line naming ``demo.prompt`` / ``demo.world`` (exit 2).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from .. import config as C
from .. import wan

PARTS = {"teacher": "the world teacher (diffusers layout)", "student": "the distilled MLA student folder",
         "models": "the world codec (vae/) and text encoder (tokenizer/, text_encoder/)"}


def check_world(cfg: C.Config) -> tuple[Path, str]:
    """The checkpoint folder and the prompt, checked: ``ConfigError`` naming ``demo.world`` or ``demo.prompt``."""
    from .captions import PromptError, parse_prompt

    world = Path(cfg.demo.world)
    missing = [f"{name}/ ({what})" for name, what in PARTS.items() if not (world / name).is_dir()]
    if missing:
        raise C.ConfigError(f"demo.world='{world}' lacks {', '.join(missing)}: build them with "
                            "benchmarks/world_teacher.sh and benchmarks/world_student.sh, or point demo.world at "
                            "a folder that has them")
    prompt = " ".join(cfg.demo.prompt.split())
    try:
        parse_prompt(prompt)
    except PromptError as e:
        raise C.ConfigError(f"demo.prompt={cfg.demo.prompt!r}: {e}") from None
    return world, prompt


def _step(title: str, main: Callable[[Sequence[str]], int | None], argv: Sequence[str]) -> None:
    print(f"\n== world demo: {title}", flush=True)
    t0 = time.perf_counter()
    rc = main(list(argv))
    if rc not in (0, None):
        raise SystemExit(rc)
    print(f"== {title}: {time.perf_counter() - t0:.1f} s", flush=True)


def run_world_demo(config: str, overrides: Sequence[str], cfg: C.Config) -> dict:
    """The five steps above; returns the evaluation report (a dict) and where things were written."""
    from ..cli import main as train_main
    from ..convert import main as convert_main
    from ..dataprep.cli import main as data_main
    from ..generate import main as generate_main
    from .evaluate import main as evaluate_main

    world, prompt = check_world(cfg)
    t0 = time.perf_counter()
    run = Path(cfg.runtime.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    models = world / "models"
    t, sp = wan.vae_strides(json.loads((models / "vae" / "config.json").read_text()))  # the codec's
    args = [config, *overrides, f"video.vae_stride=[{t},{sp},{sp}]"]  # the user's keys, then the codec's geometry
    prompts = run / "prompt.txt"
    C.atomic_write_text(prompts, prompt + "\n")
    negative = run / "negative.safetensors"

    _step("convert the teacher to the MLA student", convert_main,
          [str(world / "teacher"), str(run / "converted"), *args[1:], "--config", config, "--overwrite"])
    _step("negative prompt embedding", data_main,  # kept when the run folder has it
          ["negative-embedding", str(negative), *args, f"prep.encode.text_encoder={models}"])
    _step(f"{cfg.train.num_steps} self-forcing iterations from the shipped student", train_main,
          ["fit", *args, f"train.student_path={world / 'student'}", f"train.teacher_path={world / 'teacher'}",
           f"train.critic_path={world / 'teacher'}", "data.source=prompts_file", f"data.prompts_file={prompts}",
           f"data.text_encoder={models}", f"dmd.negative_embedding={negative}"])
    _step("export", train_main, ["export", str(run), str(run / "student"), "--overwrite"])
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    samples = run / f"samples-{stamp}"
    _step("generate", generate_main,
          [str(run / "student"), str(prompts), *args[1:], f"generate.vae={models}", f"generate.text_encoder={models}",
           f"generate.out_dir={samples}"])
    report = run / f"report-{stamp}.json"
    _step("world metrics of the video against the prompt", evaluate_main,
          ["eval", str(samples), "--prompts", str(prompts), "--out", str(report),
           "--chunk-frames", str(cfg.video.chunk_frames), "--temporal-stride", str(t)])
    result = json.loads(report.read_text())
    videos = sorted(samples.glob("*.mp4"))
    print(f"\nworld demo: {time.perf_counter() - t0:.0f} s on {cfg.runtime.device}; prompt: {prompt}")
    print(f"  video        {videos[0] if videos else '(none)'}")
    print(f"  adherence    {result['adherence']:.2f}  (the prompted objects, colours, shapes and directions)")
    print(f"  checkpoint   {run / 'checkpoints'}  report {report}")
    return {"report": result, "videos": videos, "run_dir": run}
