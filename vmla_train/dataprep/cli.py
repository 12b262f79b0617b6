"""``vmla-data``: the three data-preparation stages (see data_prep/README.md).

    vmla-data raw       [CONFIG.yaml ...] [key=value ...]   OpenVid-1M CSV + clips -> raw shards
    vmla-data encode    [CONFIG.yaml ...] [key=value ...]   raw shards -> latents + text shards (ranks)
    vmla-data ode-pairs [CONFIG.yaml ...] [key=value ...]   prompts -> teacher trajectory shards (ranks)
    vmla-data negative-embedding OUT [CONFIG.yaml ...] [k=v ...]   Wan's negative prompt -> OUT.safetensors
    vmla-data stand-ins OUT [CONFIG.yaml ...] [k=v ...]     tiny Wan models + OpenVid-format clips (dry runs)
    vmla-data world OUT [key=value ...]                     rendered world clips as an OpenVid-format folder

Arguments with '=' are overrides (``prep.raw.min_aesthetic=4.5``), the others YAML config files;
``runtime.progress=false`` turns the progress bar off.
``world`` takes only its own keys (``num_clips=6000 split=0 height=64``: the fields of
``world.openvid.WorldDataConfig``, plus ``progress=false``), no YAML files.
Exit status: 0 done, 2 config error or a wrong model folder (for ``world`` also: OUT is not new, empty or its own folder with
the same settings), 1 input error (message names the key or file).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from .. import config as C

STAGES = {
    "raw": "OpenVid-1M CSV(s) + mp4s (folder or zip archives) -> raw WebDataset shards",
    "encode": "raw shards -> training shards (Wan VAE latents + umT5 embeddings); shard i on rank i mod world",
    "ode-pairs": "prompts -> teacher flow-matching Euler trajectories with CFG -> ODE-init shards",
}
TOOLS = {  # one output OUT from the config
    "negative-embedding": "Wan's negative prompt through prep.encode.text_encoder -> OUT (the dmd.negative_embedding file)",
    "stand-ins": "tiny random Wan pipeline folder (OUT/wan) + OpenVid-format CSV and clips (OUT/openvid) for a dry run",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmla-data", description="vmla_train data preparation")
    sub = p.add_subparsers(dest="stage", required=True)
    for name, help_ in STAGES.items():
        s = sub.add_parser(name, help=help_)
        s.add_argument("args", nargs="*", help="YAML config files and key=value overrides")
    for name, help_ in TOOLS.items():
        s = sub.add_parser(name, help=help_)
        s.add_argument("out", help="output file (negative-embedding) or new folder (stand-ins)")
        s.add_argument("args", nargs="*", help="YAML config files and key=value overrides")
    s = sub.add_parser("world", help="rendered world clips + captions + scenes -> an OpenVid-format folder OUT")
    s.add_argument("out", help="new or empty folder (or one this command wrote, to resume)")
    s.add_argument("args", nargs="*", help="key=value: num_clips, seed, split, height, width, num_frames, fps, "
                                           "num_heldout, heldout_split, crf, preset, workers, progress")
    return p


def _world(out: str, args: list[str]) -> int:
    """``vmla-data world OUT key=value ...``: validate the keys, write the folder, print the raw command."""
    from omegaconf import OmegaConf

    from ..world.openvid import CSV_NAME, VIDEOS, WorldDataConfig, write_world_dataset

    names = [f.name for f in dataclasses.fields(WorldDataConfig)]
    try:
        bad = [x for x in args if "=" not in x or x.startswith("=")]
        if bad:
            raise C.ConfigError(f"world: argument {bad[0]!r} is not key=value (world takes no YAML files; "
                                "e.g. num_clips=1000 height=64)")
        kv = OmegaConf.to_container(C.parse_overrides(args))
        progress = kv.pop("progress", True)
        strings = {f.name for f in dataclasses.fields(WorldDataConfig) if f.type in (str, "str")}
        for k, v in kv.items():
            if k not in names:
                raise C.ConfigError(f"world: unknown key {k!r}; known keys: {', '.join(names)}, progress")
            if k in strings:
                kv[k] = str(v)
            elif not isinstance(v, int) or isinstance(v, bool):
                raise C.ConfigError(f"world: key {k!r} expects an integer, found {v!r}")
        if not isinstance(progress, bool):
            raise C.ConfigError(f"world: key 'progress' expects true or false, found {progress!r}")
        wc = WorldDataConfig(**kv)
    except (C.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        write_world_dataset(out, **dataclasses.asdict(wc), progress=progress)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"world: done. Next: vmla-data raw data_prep/world.yaml prep.raw.csv=[{out}/{CSV_NAME}] "
          f"prep.raw.videos=[{out}/{VIDEOS}] prep.raw.output=RAW_FOLDER  (data_prep/world.yaml keeps every world clip)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.stage == "world":
        return _world(a.out, a.args)
    files = [x for x in a.args if "=" not in x]
    overrides = [x for x in a.args if "=" in x]
    try:
        cfg = C.load(files, overrides)
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    progress = cfg.runtime.progress  # runtime.progress=false: no bar
    from ..student_io import CheckpointError

    try:
        if a.stage == "negative-embedding":
            from .encode import write_negative_embedding

            write_negative_embedding(cfg, a.out)
            return 0
        if a.stage == "stand-ins":
            from .testing import write_stand_ins

            print(f"stand-ins: wrote {write_stand_ins(a.out, cfg, cfg.runtime.seed)} (wan/, openvid/)")
            return 0
        if a.stage == "raw":
            from .raw import run
        elif a.stage == "encode":
            from .encode import run
        else:
            from .ode import run
        run(cfg, progress=progress)
    except (C.ConfigError, CheckpointError) as e:  # a config value or model folder to fix (device, Wan folders)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
