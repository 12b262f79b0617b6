"""Argument parsing shared by the console entry points: ``key=value`` overrides may follow options."""

from __future__ import annotations

import argparse
from typing import Sequence


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` words anywhere (also after options) join ``args.overrides``.

    Anything else the parser does not know is an error naming it.
    """
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = list(getattr(args, "overrides", None) or []) + extra
    return args
