"""Stage 1, ``vmla-data raw``: OpenVid-1M CSV(s) + clips -> raw WebDataset shards.

Rows (de-duplicated, CSV filters applied, in CSV order) are cut into chunks of ``maxcount``; chunk ``c``
becomes ``raw-{c:06d}.tar`` (plus ``raw-{c:06d}_{p}.tar`` parts when ``maxsize_mb`` is reached first).
Worker processes handle whole chunks: read each clip's bytes (folder or zip member, unchanged), probe
it (PyAV: frames, fps, size, first frame decodes), apply the probe filters and write samples

    <key>.mp4    the original bytes        <key>.txt   the caption
    <key>.json   every CSV column (a NaN one as null) + {"probe": {frames, fps, width, height, seconds, codec}, "source": ...}

Keys are the clip's file stem with dots replaced. Chunks whose first shard exists are skipped, so a
re-run resumes; the assignment of rows to chunks is a function of the CSVs and the filters only.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
from pathlib import Path

from ..config import Config, json_finite
from . import common
from .openvid import ClipReader, Location, Row, csv_filter_reason, index_clips, read_csvs, sample_key
from .video import Reject, probe

SHARD_PREFIX = "raw"
_reader: ClipReader | None = None  # one per worker process


def _settings(c) -> dict:
    """The settings that decide shard contents (a resumed run must use the same)."""
    d = dataclasses.asdict(c)
    for key in ("num_workers", "output"):  # how fast / where the folder lives does not change contents
        d.pop(key)
    return d


def _shard_name(chunk: int, part: int) -> str:
    return f"{SHARD_PREFIX}-{chunk:06d}.tar" if part == 0 else f"{SHARD_PREFIX}-{chunk:06d}_{part}.tar"


def process_chunk(args: tuple) -> dict:
    """Write one chunk's shard(s); returns its Summary as a dict (runs in a worker process)."""
    import webdataset as wds

    global _reader
    chunk, rows, c, out = args  # c: RawShardsConfig
    settings = _settings(c)
    out = Path(out)
    if _reader is None:
        _reader = ClipReader()
    summary = common.Summary("raw")
    rejects: list[dict] = []
    parts: list[tuple[Path, int]] = []  # (final path, samples)
    writer, size, count = None, 0, 0
    maxsize = int(c.maxsize_mb * 1e6)

    def close_part() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            parts[-1] = (parts[-1][0], count)
            writer = None

    for row, loc in rows:
        where = {"video": row.video, "row": row.source}
        try:
            if loc is None:
                raise Reject("missing clip", f"{row.video} is in no folder or archive of prep.raw.videos")
            data = _reader.read(Location(**loc))
            summary.bytes_in += len(data)
            pr = probe(data)
            if pr.seconds < c.min_seconds:
                summary.filtered["too short"] += 1
                rejects.append({"reason": "too short", "detail": f"probe: {pr.seconds:.2f} s < {c.min_seconds}", **where})
                continue
            if not c.min_fps <= pr.fps <= c.max_fps:
                summary.filtered["fps out of range"] += 1
                rejects.append({"reason": "fps out of range", "detail": f"probe: {pr.fps:g} fps", **where})
                continue
        except Reject as r:
            summary.failed[r.reason] += 1
            rejects.append(common.reject_record(r, **where))
            continue
        meta = dict(row.values)
        meta.update(probe=pr.as_dict(), source=row.source, location=loc)
        sample = {"__key__": sample_key(row.video), "mp4": data, "txt": row.caption.strip(),
                  "json": json.dumps(json_finite(meta), ensure_ascii=False, allow_nan=False).encode("utf-8")}
        nbytes = len(data) + len(sample["json"]) + len(sample["txt"].encode()) + 3 * 1024
        if writer is not None and size + nbytes > maxsize:
            close_part()
        if writer is None:
            final = out / _shard_name(chunk, len(parts))
            parts.append((final, 0))
            writer = wds.TarWriter(str(common.tmp_path(final)))
            size, count = 0, 0
        writer.write(sample)
        size += nbytes
        count += 1
        summary.kept += 1
        summary.bytes_out += nbytes
    close_part()
    if not parts:  # every clip of the chunk rejected: an empty first shard keeps the chunk "done"
        final = out / _shard_name(chunk, 0)
        wds.TarWriter(str(common.tmp_path(final))).close()
        parts.append((final, 0))
    extra = {"settings": settings, "chunk": chunk, "parts": [p.name for p, _ in parts]}
    for i, (final, n) in reversed(list(enumerate(parts))):  # part 0 last: it marks the chunk done
        common.finish_shard(final, n, rejects if i == 0 else [], extra)
    summary.shards_written = len(parts)
    return summary.as_dict()


def run(cfg: Config, progress: bool = True) -> common.Summary:
    """The whole stage: CSV -> chunks -> shards (parallel) -> index, rejects, summary."""
    from tqdm import tqdm

    c = cfg.prep.raw
    if not c.csv or not c.videos or not c.output:
        raise ValueError("prep.raw.csv, prep.raw.videos and prep.raw.output must all be set "
                         f"(found csv={c.csv}, videos={c.videos}, output={c.output!r})")
    out = Path(c.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(c)
    for sidecar in out.glob(f"{SHARD_PREFIX}-*.json"):
        old = json.loads(sidecar.read_text()).get("settings")
        if old is not None and old != settings:
            changed = sorted(k for k in settings if old.get(k) != settings[k])
            raise ValueError(f"output folder '{out}' holds shards made with other prep.raw settings ({changed}); "
                             "use a new prep.raw.output or delete the folder")

    summary = common.Summary("raw")
    pre_rejects: list[dict] = []
    index_rejects: list[Reject] = []
    clips = index_clips(list(c.videos), index_rejects)
    for r in index_rejects:
        summary.failed[r.reason] += 1
        pre_rejects.append(common.reject_record(r))
    rows: list[tuple[Row, dict | None]] = []
    keys: dict[str, str] = {}
    for n, item in enumerate(read_csvs(list(c.csv))):
        if c.max_rows and n >= c.max_rows:
            break
        if isinstance(item, Reject):
            (summary.filtered if item.reason == "duplicate" else summary.failed)[item.reason] += 1
            pre_rejects.append(common.reject_record(item))
            continue
        failed = csv_filter_reason(item, c)
        if failed is not None:
            summary.filtered[failed.reason] += 1
            pre_rejects.append(common.reject_record(failed, video=item.video, row=item.source))
            continue
        key = sample_key(item.video)
        if key in keys:  # "a.b.mp4" and "a_b.mp4" share the key "a_b": WebDataset would merge them
            summary.filtered["duplicate key"] += 1
            pre_rejects.append({"reason": "duplicate key", "detail": f"key {key!r} also from {keys[key]}",
                                "video": item.video, "row": item.source})
            continue
        keys[key] = item.video
        loc = clips.get(item.video)
        rows.append((item, dataclasses.asdict(loc) if loc else None))
    chunks = [(i // c.maxcount, rows[i: i + c.maxcount]) for i in range(0, len(rows), c.maxcount)]
    todo = []
    for chunk, chunk_rows in chunks:
        if (out / _shard_name(chunk, 0)).is_file():
            summary.shards_skipped += 1
        else:
            todo.append((chunk, chunk_rows, c, str(out)))
    print(f"raw: {len(rows)} rows after CSV filters in {len(chunks)} chunks of <= {c.maxcount}; {len(clips)} clips "
          f"indexed; {len(todo)} chunks to write, {summary.shards_skipped} already done -> {out}")
    bar = tqdm(total=sum(len(t[1]) for t in todo), unit="clip", disable=not progress)
    if c.num_workers > 0 and len(todo) > 1:
        with mp.get_context("spawn").Pool(min(c.num_workers, len(todo))) as pool:
            for res, (_, chunk_rows, _, _) in zip(pool.imap(process_chunk, todo), todo):
                summary.add(res)
                bar.update(len(chunk_rows))
    else:
        for t in todo:
            summary.add(process_chunk(t))
            bar.update(len(t[1]))
    bar.close()
    common.finish_run(out, "raw", summary, extra_rejects=pre_rejects)
    return summary
