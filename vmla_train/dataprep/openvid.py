"""OpenVid-1M inputs: the CSVs and the clips (an extracted folder or the ``OpenVid_partN.zip`` archives).

CSV columns (with spaces): ``video, caption, aesthetic score, motion score, temporal consistency score,
camera motion, frame, fps, seconds``; ``video`` is the bare mp4 file name. Rows are de-duplicated on
``video`` (first wins). Which archive holds a clip is not in the CSV, so every input is indexed once
(folder walk, zip central directories) into ``name -> location``.

Archives over 50 GB ship split as ``OpenVid_partN_partaa``, ``..._partab`` (byte ranges of one zip,
made by ``split``). They are read in place as one virtual file (``SplitFile``), the same as
``cat OpenVid_partN_part* > OpenVid_partN.zip`` without the copy. Nothing is extracted.

Safety: clips are only ever read (never extracted); a CSV name or zip member name that is absolute or
contains ``..`` is rejected, and a folder entry whose real path leaves the input root (symlinks) is
skipped: nothing outside the inputs is ever opened.
"""

from __future__ import annotations

import csv
import glob
import io
import math
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from ..config import RawShardsConfig
from .video import Reject

COLUMNS = ("video", "caption", "aesthetic score", "motion score", "temporal consistency score", "camera motion",
           "frame", "fps", "seconds")
REQUIRED = ("video", "caption")
NUMERIC = ("aesthetic score", "motion score", "temporal consistency score", "frame", "fps", "seconds")
_SPLIT_RE = re.compile(r"^(?P<stem>.+?)(?:\.zip)?_part(?P<suffix>[a-z]{2})$")


def safe_name(name: str) -> bool:
    """A relative path without '..' components (zip-slip / path traversal guard)."""
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return False
    return ".." not in PurePosixPath(name.replace("\\", "/")).parts


def sample_key(video: str) -> str:
    """WebDataset key of a clip: its file stem with dots (and path separators) made underscores."""
    stem = PurePosixPath(video).name
    stem = stem[:-4] if stem.lower().endswith(".mp4") else stem
    return re.sub(r"[./\\\s]", "_", stem)


# ----------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    video: str
    caption: str
    values: dict  # every CSV column, numbers parsed
    source: str  # "file.csv:line"


def read_csvs(paths: list[str]) -> Iterator[Row | Reject]:
    """Rows of the OpenVid CSVs in order, de-duplicated on ``video``; bad rows come out as Rejects
    (with ``detail`` naming file and line)."""
    seen: set[str] = set()
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prep.raw.csv: '{path}' does not exist")
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                raise ValueError(f"CSV '{path}' lacks column(s) {missing}; found {header} "
                                 f"(expected the OpenVid-1M columns {list(COLUMNS)})")
            reader.fieldnames = header
            for line, raw in enumerate(reader, start=2):
                where = f"{path}:{line}"
                if None in raw or any(v is None for v in raw.values()):
                    yield Reject("bad csv row", f"{where}: wrong number of fields")
                    continue
                video = (raw.get("video") or "").strip()
                if not video or not safe_name(video) or "/" in video or "\\" in video:
                    yield Reject("bad csv row", f"{where}: video name {video!r} is not a bare file name")
                    continue
                if video in seen:
                    yield Reject("duplicate", f"{where}: {video} already listed")
                    continue
                seen.add(video)
                values: dict = {}
                try:
                    for k, v in raw.items():
                        v = v.strip()
                        values[k] = float(v) if k in NUMERIC and v != "" else v
                except ValueError:
                    yield Reject("bad csv row", f"{where}: column '{k}' = {v!r} is not a number")
                    continue
                yield Row(video=video, caption=values.get("caption", ""), values=values, source=where)


def csv_filter_reason(row: Row, c) -> Reject | None:
    """The first filter (RawShardsConfig ``c``) the row's CSV values fail, as a Reject (reason, detail), or None.

    A filter is on when its threshold is set: ``min_*`` > 0, or for fps also ``max_fps`` below its default (which
    keeps any rate). A filter that is on needs a finite number in its column: an empty, NaN or infinite value is
    rejected as ``missing <column>`` (``NaN < lo`` is false, so it would otherwise pass). A filter that is off lets
    an empty or NaN value through (the world CSVs leave OpenVid's scores empty; ``json_finite`` writes NaN as null)
    and still rejects a number below its threshold (a negative score at ``min_* = 0``), as before."""
    v = row.values
    fps_on = c.min_fps > 0 or c.max_fps < RawShardsConfig.max_fps  # the default keeps any rate
    checks = (
        ("aesthetic score", "min_aesthetic", c.min_aesthetic, c.min_aesthetic > 0, "low aesthetic score"),
        ("motion score", "min_motion", c.min_motion, c.min_motion > 0, "low motion score"),
        ("temporal consistency score", "min_temporal", c.min_temporal, c.min_temporal > 0, "low temporal consistency"),
        ("seconds", "min_seconds", c.min_seconds, c.min_seconds > 0, "too short"),
        ("fps", "min_fps", c.min_fps, fps_on, "fps out of range"),
    )
    for col, key, lo, on, reason in checks:
        x = v.get(col, "")
        if on and not (isinstance(x, float) and math.isfinite(x)):
            shown = "no column" if col not in v else repr(x if isinstance(x, float) else str(x))
            return Reject(f"missing {col}", f"csv {row.source}: '{col}' is {shown}; the filter prep.raw.{key} "
                                            "needs a finite number")
        if isinstance(x, float) and x < lo:
            return Reject(reason, f"csv {row.source}: '{col}' = {x:g} < prep.raw.{key} = {lo:g}")
    fps = v.get("fps", "")
    if isinstance(fps, float) and fps > c.max_fps:
        return Reject("fps out of range", f"csv {row.source}: 'fps' = {fps:g} > prep.raw.max_fps = {c.max_fps:g}")
    n = len(row.caption.strip())
    if n < c.min_caption_chars or n > c.max_caption_chars:
        return Reject("caption length", f"csv {row.source}: caption of {n} characters, outside prep.raw."
                                        f"min/max_caption_chars = {c.min_caption_chars}..{c.max_caption_chars}")
    return None


# ----------------------------------------------------------------------------------------------
# Clip locations
# ----------------------------------------------------------------------------------------------
class SplitFile(io.RawIOBase):
    """Read-only seekable view of several files concatenated (split zip archives)."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        self.sizes = [os.path.getsize(p) for p in self.paths]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.size = sum(self.sizes)
        self.pos = 0
        self.files = [open(p, "rb") for p in self.paths]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b) -> int:
        view = memoryview(b)
        done = 0
        while done < len(view) and self.pos < self.size:
            i = max(j for j, s in enumerate(self.starts) if s <= self.pos)
            f = self.files[i]
            f.seek(self.pos - self.starts[i])
            n = f.readinto(view[done: done + min(len(view) - done, self.starts[i] + self.sizes[i] - self.pos)])
            if not n:
                break
            done += n
            self.pos += n
        return done

    def close(self) -> None:
        for f in self.files:
            f.close()
        super().close()


@dataclass(frozen=True)
class Location:
    kind: str  # "file" | "zip"
    container: tuple[str, ...]  # the file; or the zip (one path, or its split parts in order)
    member: str = ""  # name inside the zip


def _archives(paths: list[str]) -> list[tuple[str, ...]]:
    """Zip archives among ``paths``; split parts grouped in suffix order (aa, ab, ...)."""
    whole, split = [], {}
    for p in paths:
        m = _SPLIT_RE.match(os.path.basename(p))
        if m:
            split.setdefault(os.path.join(os.path.dirname(p), m.group("stem")), []).append(p)
        elif p.lower().endswith(".zip"):
            whole.append((p,))
    for stem, parts in sorted(split.items()):
        whole.append(tuple(sorted(parts)))
    return whole


def index_clips(inputs: list[str], rejects: list[Reject] | None = None) -> dict[str, Location]:
    """``mp4 name -> Location`` over folders (recursive) and zip archives (split or whole); globs allowed.
    Unsafe or unreadable entries are skipped and reported in ``rejects``."""
    rejects = rejects if rejects is not None else []
    found: dict[str, Location] = {}
    files: list[str] = []
    for pattern in inputs:
        hits = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not hits or not all(os.path.exists(h) for h in hits):
            raise FileNotFoundError(f"prep.raw.videos: '{pattern}' does not exist")
        for h in hits:
            if os.path.isdir(h):
                root = os.path.realpath(h)
                for dirpath, _, names in os.walk(h):
                    for n in sorted(names):
                        p = os.path.join(dirpath, n)
                        if n.lower().endswith(".mp4"):
                            if os.path.commonpath([root, os.path.realpath(p)]) != root:
                                rejects.append(Reject("unsafe path", f"{p} resolves outside {h}"))
                                continue
                            found.setdefault(n, Location("file", (p,)))
                        elif n.lower().endswith(".zip") or _SPLIT_RE.match(n):
                            files.append(p)
            else:
                files.append(h)
    for parts in _archives(files):
        try:
            with open_archive(parts) as z:
                for info in z.infolist():
                    if info.is_dir() or not info.filename.lower().endswith(".mp4"):
                        continue
                    if not safe_name(info.filename):
                        rejects.append(Reject("unsafe zip member", f"{parts[0]}: {info.filename!r}"))
                        continue
                    found.setdefault(PurePosixPath(info.filename).name, Location("zip", parts, info.filename))
        except (zipfile.BadZipFile, OSError) as e:
            rejects.append(Reject("broken zip", f"{parts[0]}: {e}"))
    return found


def open_archive(parts: tuple[str, ...]) -> zipfile.ZipFile:
    return zipfile.ZipFile(parts[0] if len(parts) == 1 else SplitFile(list(parts)))


class ClipReader:
    """Reads clip bytes unchanged; keeps archives open (one per process)."""

    def __init__(self, max_open: int = 8):
        self.max_open = max_open
        self.open: dict[tuple[str, ...], zipfile.ZipFile] = {}

    def read(self, loc: Location) -> bytes:
        if loc.kind == "file":
            try:
                return Path(loc.container[0]).read_bytes()
            except OSError as e:
                raise Reject("unreadable file", f"{loc.container[0]}: {e}") from None
        try:
            z = self.open.get(loc.container)
            if z is None:
                if len(self.open) >= self.max_open:
                    self.open.pop(next(iter(self.open))).close()
                z = self.open[loc.container] = open_archive(loc.container)
            return z.read(loc.member)  # checks the member's CRC
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, KeyError, ValueError) as e:
            raise Reject("broken zip member", f"{loc.container[0]}:{loc.member}: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        for z in self.open.values():
            z.close()
        self.open.clear()
