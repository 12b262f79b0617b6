"""Console entry points. Thin: parse arguments, load the config, call the library.

    vmla-train info CONFIG [key=value ...]    parameters and KV-cache accounting, MHA vs MLA
    vmla-train demo CONFIG [key=value ...]    the tiny self_forcing stage on CPU (checkpoint, mp4, W&B run); with
                                              demo.world: the world demo (configs/world/demo.yaml)
    vmla-train demo-rollout CONFIG [k=v ...]  cached chunk-by-chunk rollout of a random tiny student
                                              (a student over 100 M parameters on CPU: --allow-large-on-cpu)
    vmla-train fit CONFIG [key=value ...]     train a stage; resumes from the run folder's latest checkpoint
    vmla-train export RUN_DIR OUT [--ema]     training checkpoint (ZeRO shards too) -> plain student folder
    vmla-train config-reference               every config key, its default and doc (docs/config.md's table)
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from . import config as C


def _kv_table(cfg: C.Config) -> list[tuple[str, str, str]]:
    """Rows (quantity, MHA, MLA) of cached values and bytes for the config's geometry."""
    vals = C.kv_values_per_token(cfg)
    el = C.dtype_bytes(cfg.cache.dtype)
    el_mha = 2 if cfg.cache.dtype == "8bit" else el  # MHA has no 8-bit cache: compared at bf16
    tpf = cfg.tokens_per_frame
    layers = cfg.model.num_layers
    window = cfg.cache.window_frames + cfg.cache.sink_frames
    rows = [("values / token / layer", str(vals["mha"]), str(vals["mla"]))]
    for label, tokens, n_layers in (
        ("bytes / token / layer", 1, 1),
        (f"bytes / latent frame ({tpf} tokens, {layers} layers)", tpf, layers),
        (f"bytes / window ({window} frames incl. {cfg.cache.sink_frames} sinks)", tpf * window, layers),
        (f"bytes / clip ({cfg.video.latent_frames} frames)", tpf * cfg.video.latent_frames, layers),
    ):
        rows.append((label, C.human_bytes(vals["mha"] * el_mha * tokens * n_layers),
                     C.human_bytes(vals["mla"] * el * tokens * n_layers)))
    rows.append(("reduction (MLA vs MHA)", "", f"-{100 * (1 - vals['mla'] * el / (vals['mha'] * el_mha)):.1f} %"))
    return rows


def print_info(cfg: C.Config) -> None:
    import torch

    from .student import WanStudent, param_counts

    m, a = cfg.model, cfg.attention
    print(f"model {m.name}: dim {m.dim}, {m.num_layers} layers, {m.num_heads} heads x {m.head_dim}, ffn {m.ffn_dim}")
    print(
        f"video {cfg.video.num_frames} frames {cfg.video.height}x{cfg.video.width} -> latent "
        f"{cfg.video.latent_frames}x{cfg.video.latent_height}x{cfg.video.latent_width}, "
        f"{cfg.tokens_per_frame} tokens / latent frame, chunk {cfg.video.chunk_frames} frames"
    )
    print(f"attention {a.kind.value}: d_c {a.d_c}, d_r {a.d_r}, rope_key_groups {a.rope_key_groups}, impl {a.impl.value}, k_norm {a.k_norm.value}")
    counts = {}
    for kind in (C.AttentionKind.mha, C.AttentionKind.mla):
        cache = cfg.cache if kind == C.AttentionKind.mla else C.replace(cfg.cache, dtype="bfloat16")  # no 8-bit MHA
        variant = C.replace(cfg, attention=C.replace(cfg.attention, kind=kind), cache=cache)
        with torch.device("meta"):
            counts[kind.value] = param_counts(WanStudent(variant))
    rows = [
        ("parameters", f"{counts['mha']['total'] / 1e6:,.2f} M", f"{counts['mla']['total'] / 1e6:,.2f} M"),
        ("self-attention parameters", f"{counts['mha']['self_attention'] / 1e6:,.2f} M", f"{counts['mla']['self_attention'] / 1e6:,.2f} M"),
    ] + _kv_table(cfg)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "MHA", "")])
    print(f"\n{'':<{w0}}  {'MHA':>{w1}}  {'MLA':>12}   (cache dtype {cfg.cache.dtype})")
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>12}")


def run_demo(cfg: C.Config):
    """Random tiny student -> cached chunk-by-chunk rollout with a progress bar -> cache accounting."""
    import torch
    from tqdm import tqdm

    from . import schedule
    from .rollout import sample_video
    from .student import WanStudent

    torch.manual_seed(cfg.runtime.seed)
    dev = C.resolve_device(cfg.runtime.device)
    student = WanStudent(cfg).to(dev).eval()
    gen = torch.Generator(device=dev).manual_seed(cfg.runtime.seed)
    text = torch.randn(1, cfg.model.text_len, cfg.model.text_dim, generator=gen, device=dev)
    steps = schedule.warp_timesteps(cfg.schedule.denoising_steps, cfg.schedule.shift)
    frames = cfg.demo.num_chunks * cfg.video.chunk_frames
    cache = student.new_cache(1, dev)
    print(f"demo: {cfg.attention.kind.value} student ({cfg.model.name}), {frames} latent frames in "
          f"{cfg.demo.num_chunks} chunks, steps {[round(s, 1) for s in steps]}, window {cfg.cache.window_frames} + "
          f"{cfg.cache.sink_frames} sink frames on {dev}")
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.demo.num_chunks, unit="chunk", disable=not cfg.runtime.progress)

    def on_chunk(i: int, x0: torch.Tensor) -> None:
        bar.update(1)
        bar.set_postfix(frames=(i + 1) * cfg.video.chunk_frames, cached=cache.num_valid, std=f"{x0.float().std():.3f}")

    video = sample_video(student, text, frames, steps, generator=gen, cache=cache, on_chunk=on_chunk)
    bar.close()
    dt = time.perf_counter() - t0
    print(f"generated latents {tuple(video.shape)} in {dt:.2f} s ({frames / dt:.1f} latent frames/s); "
          f"finite: {bool(torch.isfinite(video).all())}")
    print(f"cache: {cache.num_valid} frames held of {cache.num_slots} slots, {C.kv_values_per_token(cfg)[cfg.attention.kind.value]} values/token/layer, "
          f"{C.human_bytes(cache.nbytes())} allocated\n")
    print_info(cfg)
    return video, cache


# demo-rollout on CPU refuses a student above this many parameters unless --allow-large-on-cpu: the tiny and world
# sizes (0.09 M, 8 M) roll out in seconds; wan-1.3b (1.34 G parameters, 5.4 GB in float32) takes minutes.
DEMO_CPU_MAX_PARAMS = 100_000_000


def student_parameters(cfg: C.Config) -> int:
    """Parameters of the config's student, counted on the meta device (nothing allocated, nothing initialised)."""
    import torch

    from .student import WanStudent, param_counts

    with torch.device("meta"):
        return param_counts(WanStudent(cfg))["total"]


def check_demo_size(cfg: C.Config, config_file: str, allow_large_on_cpu: bool) -> None:
    """``ConfigError`` when demo-rollout would build a student of more than ``DEMO_CPU_MAX_PARAMS`` parameters
    on CPU (unless ``allow_large_on_cpu``): the rollout would run for minutes."""
    if allow_large_on_cpu or C.resolve_device(cfg.runtime.device, "runtime.device").type != "cpu":
        return
    n = student_parameters(cfg)
    if n > DEMO_CPU_MAX_PARAMS:
        raise C.ConfigError(
            f"demo-rollout of '{config_file}' would build a {n / 1e6:,.0f} M-parameter student (model.name={cfg.model.name}, "
            f"{n * 4 / 1e9:.1f} GB in float32) on CPU and run for minutes (the limit on CPU is "
            f"{DEMO_CPU_MAX_PARAMS / 1e6:.0f} M): pass model.name=tiny, run on a GPU (runtime.device=cuda), or add "
            "--allow-large-on-cpu to run it anyway")


def config_reference_markdown() -> str:
    """The config table of docs/config.md, generated from the schema (defaults of the `wan-1.3b` size)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, doc in C.schema_reference():
        lines.append(f"| `{key}` | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmla-train", description="VideoMLA training framework")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("info", "parameter counts and KV-cache values/bytes, MHA vs MLA"),
        ("demo", "the tiny self_forcing stage on CPU: checkpoint, sample mp4, offline W&B run"),
        ("demo-rollout", "cached chunk-by-chunk rollout of a random tiny student"),
        ("fit", "train the config's stage; resumes from the run folder's latest complete checkpoint"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. attention.d_c=192")
        if name == "demo-rollout":
            s.add_argument("--allow-large-on-cpu", action="store_true",
                           help=f"run a student of more than {DEMO_CPU_MAX_PARAMS // 10**6} M parameters on CPU anyway (minutes)")
    sub.add_parser("config-reference", help="every config key with its default and doc, as a Markdown table")
    e = sub.add_parser("export", help="latest training checkpoint of RUN_DIR -> plain student folder OUT")
    e.add_argument("run_dir", help="run folder (or one checkpoints/step-N folder)")
    e.add_argument("out", help="output student folder (model.safetensors + config.yaml)")
    e.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw student")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier export (its manifest says so); never a run or source folder")
    return p


def check_fit_inputs(cfg: C.Config) -> None:
    """What ``fit`` reads, checked before any process group or model exists: the device, the data source
    (shard files and their kind, the prompts file) and the Wan folders the stage loads (teacher, critic,
    sample VAE, text encoder). Raises ``ConfigError`` / ``CheckpointError`` / ``FileNotFoundError`` naming
    the config key, what was expected and what was found."""
    from . import data, recipe, wan

    C.resolve_device(cfg.runtime.device, "runtime.device")
    kind = data.STAGE_KINDS[cfg.train.stage.value]
    d = cfg.data
    if d.source == C.DataSource.shards and d.shards:
        data.check_shards(d.shards, kind)
    elif d.source == C.DataSource.prompts_file and d.prompts_file:
        data.build_loader(cfg, kind).close()  # reads the prompt file, checks data.text_encoder's folder
    sf = cfg.train.stage == C.Stage.self_forcing
    if cfg.train.teacher_path and (sf or cfg.validation.every_n_steps > 0):
        wan.transformer_folder(cfg.train.teacher_path, key="train.teacher_path")
    if cfg.train.critic_path and sf:
        wan.transformer_folder(cfg.train.critic_path, key="train.critic_path")
    if cfg.logging.vae_path:
        wan.vae_folder(cfg.logging.vae_path, key="logging.vae_path")
    neg = cfg.dmd.negative_embedding
    if neg and recipe.reads_negative(cfg) and not Path(neg).is_file():
        raise C.ConfigError(f"config key 'dmd.negative_embedding': no file '{neg}'; make it with `vmla-data "
                            f"negative-embedding {neg} PREP_CONFIG` (the text encoder the training data used)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 done, 2 bad input: one line on stderr). A reader that
    closes the output early (``vmla-train info ... | head -1``) ends the command quietly with status 1."""
    try:
        rc = _run(_parser().parse_args(argv))
        sys.stdout.flush()  # buffered output meets a closed pipe here, not in interpreter teardown
        return rc
    except BrokenPipeError:
        _quiet_stdout()
        return 1


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of what is still buffered for a closed
    pipe neither fails nor prints 'Exception ignored'."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured, replaced)
        pass


def _error(e: BaseException) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "config-reference":
        print(config_reference_markdown())
        return 0
    if args.command == "export":
        from .checkpoint import export_student
        from .student_io import CheckpointError

        try:
            out = export_student(args.run_dir, args.out, use_ema=args.ema, overwrite=args.overwrite)
        except (FileNotFoundError, CheckpointError) as e:
            return _error(e)
        print(f"exported student folder {out}")
        return 0
    config = Path(args.config)
    if config.is_dir():
        inside = " ('" + str(config / "config.yaml") + "' is there)" if (config / "config.yaml").is_file() else ""
        return _error(C.ConfigError(f"config file '{config}' is a folder; expected a YAML file such as "
                                    f"configs/adapt.yaml{inside}"))
    try:
        cfg = C.load(args.config, args.overrides)
        if args.command in ("demo", "demo-rollout"):
            C.resolve_device(cfg.runtime.device, "runtime.device")
        if args.command == "demo" and cfg.demo.world:
            from .world.demo import check_world

            check_world(cfg)  # the shipped world models are the roles
        elif args.command == "demo":
            C.check_role_files(cfg)  # the demo's random roles are opted in (train.allow_random_roles)
    except C.ConfigError as e:
        return _error(e)
    if args.command == "info":
        print_info(cfg)
    elif args.command == "demo-rollout":
        try:
            check_demo_size(cfg, args.config, args.allow_large_on_cpu)
        except C.ConfigError as e:
            return _error(e)
        run_demo(cfg)
    elif args.command == "demo" and cfg.demo.world:
        from .world.demo import run_world_demo

        try:
            run_world_demo(args.config, args.overrides, cfg)
        except SystemExit as e:  # a step's command failed: it printed why
            return int(e.code or 1)
    elif args.command == "demo":
        from .train import run_training_demo

        try:
            run_training_demo(cfg)
        finally:
            _destroy_process_group()
    elif args.command == "fit":
        from .student_io import CheckpointError
        from .train import fit, print_summary

        try:
            check_fit_inputs(cfg)
        except (C.ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:  # ValueError: build_loader's input checks
            return _error(e)
        try:
            t0 = time.perf_counter()
            out = fit(cfg)  # checks the batch geometry against the world size before any process group starts
            print_summary(cfg, out, time.perf_counter() - t0, "fit")
        except C.ConfigError as e:
            return _error(e)
        finally:
            _destroy_process_group()
    return 0


EXIT_GRACE_S = 60.0  # a finished rank's teardown (process group, exit hooks) gets this long, then it leaves anyway


def _destroy_process_group(grace_s: float = EXIT_GRACE_S) -> None:
    """Tear down the process group a distributed run made, so no communication thread (gloo, NCCL,
    DeepSpeed) outlives the interpreter and aborts the process at exit. The teardown runs on a daemon
    thread for at most ``grace_s``: a rank whose run finished is not held by a peer that already left."""
    import threading

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = threading.Thread(target=dist.destroy_process_group, name="destroy_process_group", daemon=True)
        t.start()
        t.join(grace_s)
        if t.is_alive():
            print(f"warning: the process group's teardown did not finish in {grace_s:g} s; leaving it",
                  file=sys.stderr, flush=True)


def _leave(rc: int, grace_s: float = EXIT_GRACE_S) -> None:
    """Leave a rank of a multi-process job with status ``rc``: the Python exit hooks (W&B's among them),
    then ``os._exit``. A hook that hangs (a W&B service a Slurm requeue killed under an earlier process)
    cannot keep a finished rank, and with it its Slurm job, alive: after ``grace_s`` one line on stderr and
    the same exit."""
    import threading

    def cut_short() -> None:
        print(f"warning: exit hooks still running after {grace_s:g} s; exiting with status {rc}",
              file=sys.stderr, flush=True)
        os._exit(rc)

    timer = threading.Timer(grace_s, cut_short)
    timer.daemon = True
    timer.start()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _multi_process_rank() -> bool:
    """Whether this process is one rank of a multi-process job (torchrun, srun, the tests' launcher)."""
    return max(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("SLURM_NTASKS", "1"))) > 1


def entry() -> None:
    """The console entry (``vmla-train``): ``main``, then exit. A rank of a multi-process job runs the
    Python exit hooks (W&B's among them) and leaves with ``os._exit``: communication threads of gloo /
    DeepSpeed's shared-memory op that survive ``destroy_process_group`` otherwise abort the process in
    interpreter teardown ("terminate called without an active exception", exit -6) after a run that
    finished and wrote everything. Both the teardown and the hooks are bounded (``EXIT_GRACE_S``)."""
    rc = main()
    if _multi_process_rank():
        _leave(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
