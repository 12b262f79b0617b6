"""How much of each object's description a world text encoder's tokens carry: a linear readout.

    python benchmarks/world_text.py [--text checkpoints/world/text ...] [--steps 300]

For the seeded random encoder (what ``vmla-world models`` builds without ``--text-encoder``) and each
``--text`` folder (``vmla-world text-encoder``'s OUT), the encoder is frozen and only linear heads are fitted
(``text.train_encoder(frozen=True)``: ``--steps`` AdamW steps on fresh random captions) to read from every
token of an object's clause that object's colour, shape, size, direction and speed, and from every token the
caption's object count and background. Reported: held-out token accuracy per attribute (1000 captions of
another stream). The DiT's cross-attention has no positions on the text side, so what one token carries is
what it can bind. Prints a table; writes ``<--name>-cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, repo_relative, write_result  # noqa: E402
from vmla_train import wan  # noqa: E402
from vmla_train.config import MODEL_SIZES  # noqa: E402
from vmla_train.world import text  # noqa: E402


def readout(encoder, tokenizer, steps: int, lr: float, heldout: int, seed: int) -> dict:
    start = time.perf_counter()
    acc = text.train_encoder(encoder.float(), tokenizer, steps, lr=lr, heldout=heldout, seed=seed, frozen=True,
                             log=lambda _: None)["heldout_accuracy"]
    seconds = round(time.perf_counter() - start, 1)
    return {**{k: v for k, v in acc.items() if k not in ("step", "loss")}, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", nargs="*", default=[str(ROOT / "checkpoints" / "world" / "text")],
                   help="folders with tokenizer/ and text_encoder/ to read out beside the seeded random encoder")
    p.add_argument("--steps", type=int, default=300, help="AdamW steps of the linear heads")
    p.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate of the heads")
    p.add_argument("--heldout", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1,
                   help="caption stream of the readout (the shipped encoder trained on 0)")
    p.add_argument("--name", default="world_text")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    tokenizer = text.build_tokenizer(text.world_words())
    encoders = {"seeded random": text.build_encoder(len(tokenizer), MODEL_SIZES["world"]["model"]["text_dim"])}
    for folder in args.text:
        tok, enc = wan.load_text_encoder(folder, dtype=torch.float32)
        if tok.get_vocab() != tokenizer.get_vocab():
            print(f"error: --text '{folder}': its tokenizer is not the world's vocabulary", file=sys.stderr)
            return 2
        encoders[repo_relative(Path(folder).resolve())] = enc
    rows = []
    for name, enc in encoders.items():
        rows.append({"encoder": name, **readout(enc, tokenizer, args.steps, args.lr, args.heldout, args.seed)})
        print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) and k != "seconds" else f"{k} {v}"
                         for k, v in rows[-1].items()), flush=True)
    write_result(args.name, "cpu", {"device": f"cpu ({os.cpu_count()} cores)",
                                    "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                                    "steps": args.steps, "lr": args.lr, "heldout": args.heldout, "seed": args.seed,
                                    "rows": rows}, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
