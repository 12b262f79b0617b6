"""What one world clip costs `vmla-data world`, part by part, and what the x264 preset trades.

    python benchmarks/world_data.py [--clips 40] [--presets medium,veryfast,ultrafast]

On one process: the scene and its caption (``openvid._describe``), the frames (``render.render``), then per
preset the H.264 encode (``Mp4Writer`` at the world's ``crf``, as ``vmla-data world`` writes it), the
decode (``decode_pyav``, as ``vmla-data encode`` reads it with ``prep.encode.decoder=pyav``), the file size, the PSNR of the decoded frames
against the rendered ones, and the world's metrics of the decoded clips against their own scenes
(``metrics.evaluate_many``: a preset is usable only where these stay those of the rendered frames:
adherence 1, motion and physics error near 0). Prints a table and writes ``world_data-cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, write_result  # noqa: E402
from vmla_train.dataprep.video import ClipSpec, Mp4Writer, decode_pyav  # noqa: E402
from vmla_train.world import metrics  # noqa: E402
from vmla_train.world.codec import clip_seed  # noqa: E402
from vmla_train.world.openvid import X264_PRESETS, WorldDataConfig, _describe  # noqa: E402
from vmla_train.world.render import render  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=40)
    p.add_argument("--presets", default="medium,veryfast,ultrafast")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    presets = args.presets.split(",")
    unknown = [x for x in presets if x not in X264_PRESETS]
    if unknown:
        print(f"error: --presets: unknown x264 preset {unknown[0]!r} (one of {', '.join(X264_PRESETS)})", file=sys.stderr)
        return 2
    c = WorldDataConfig(num_clips=args.clips).settings()
    t0 = time.perf_counter()
    scenes = [_describe(clip_seed(c["seed"], c["split"], i), c)[0] for i in range(args.clips)]
    t1 = time.perf_counter()
    frames = [render(s, c["num_frames"]) for s in scenes]
    t2 = time.perf_counter()
    per_clip = {"describe_ms": 1e3 * (t1 - t0) / args.clips, "render_ms": 1e3 * (t2 - t1) / args.clips}
    print(f"{args.clips} clips {c['height']}x{c['width']} x {c['num_frames']} frames: describe "
          f"{per_clip['describe_ms']:.1f} ms, render {per_clip['render_ms']:.1f} ms per clip")
    print(f"{'preset':<10} {'encode ms':>9} {'decode ms':>9} {'KB':>6} {'PSNR dB':>7} {'adherence':>9} "
          f"{'motion err':>10} {'physics err':>11}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            paths = [Path(tmp) / f"{preset}-{i}.mp4" for i in range(args.clips)]
            t0 = time.perf_counter()
            for path, f in zip(paths, frames):
                with Mp4Writer(path, c["fps"], crf=c["crf"], preset=preset) as w:
                    w.write(f)
            t1 = time.perf_counter()
            spec = ClipSpec(c["num_frames"], float(c["fps"]), c["height"], c["width"])
            decoded = [decode_pyav(path.read_bytes(), spec) for path in paths]
            t2 = time.perf_counter()
            mse = np.mean([np.mean((d.astype(np.float64) - f) ** 2) for d, f in zip(decoded, frames)])
            scores = metrics.evaluate_many(zip(decoded, scenes), fps=c["fps"])
            rows.append({"preset": preset, "encode_ms": 1e3 * (t1 - t0) / args.clips,
                         "decode_ms": 1e3 * (t2 - t1) / args.clips,
                         "kb": np.mean([path.stat().st_size for path in paths]) / 1e3,
                         "psnr_db": float(10 * np.log10(255.0**2 / mse)),
                         **{k: scores[k] for k in ("adherence", "object_adherence", "motion_error", "physics_error")}})
            r = rows[-1]
            print(f"{preset:<10} {r['encode_ms']:>9.1f} {r['decode_ms']:>9.1f} {r['kb']:>6.1f} {r['psnr_db']:>7.2f} "
                  f"{r['adherence']:>9.3f} {r['motion_error']:>10.4f} {r['physics_error']:>11.4f}")
    write_result("world_data", "cpu", {"device": f"cpu ({os.cpu_count()} cores)", "date": datetime.date.today().isoformat(),
                                       "clips": args.clips, "crf": c["crf"], "per_clip": per_clip, "rows": rows},
                 args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
