"""``vmla-data``: the three data-preparation stages (see data_prep/README.md).

    vmla-data raw       [CONFIG.yaml ...] [key=value ...]   OpenVid-1M CSV + clips -> raw shards
    vmla-data encode    [CONFIG.yaml ...] [key=value ...]   raw shards -> latents + text shards (ranks)
    vmla-data ode-pairs [CONFIG.yaml ...] [key=value ...]   prompts -> teacher trajectory shards (ranks)

Arguments with '=' are overrides (``prep.raw.min_aesthetic=4.5``), the others YAML config files;
``runtime.progress=false`` turns the progress bar off.
Exit status: 0 done, 2 config error, 1 input error (message names the key or file).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import config as C

STAGES = {
    "raw": "OpenVid-1M CSV(s) + mp4s (folder or zip archives) -> raw WebDataset shards",
    "encode": "raw shards -> training shards (Wan VAE latents + umT5 embeddings); shard i on rank i mod world",
    "ode-pairs": "prompts -> teacher flow-matching Euler trajectories with CFG -> ODE-init shards",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmla-data", description="vmla_train data preparation")
    sub = p.add_subparsers(dest="stage", required=True)
    for name, help_ in STAGES.items():
        s = sub.add_parser(name, help=help_)
        s.add_argument("args", nargs="*", help="YAML config files and key=value overrides")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    files = [x for x in a.args if "=" not in x]
    overrides = [x for x in a.args if "=" in x]
    try:
        cfg = C.load(files, overrides)
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    progress = cfg.runtime.progress  # runtime.progress=false: no bar
    try:
        if a.stage == "raw":
            from .raw import run
        elif a.stage == "encode":
            from .encode import run
        else:
            from .ode import run
        run(cfg, progress=progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
