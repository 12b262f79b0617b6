"""Video probing and clip decoding (decord, PyAV), each decode under a timeout in a child process;
``Mp4Writer``, the one mp4 encoder (generated videos, validation samples, synthetic test clips).

A clip is ``num_frames`` frames at ``fps`` taken from the middle of a source video, resized so that it
covers ``height x width`` and center-cropped: uint8 [F, H, W, 3]. Indices are clamped to the frames the
file reports; a source shorter than the clip's span is rejected ("too short"). decord 0.6 can deadlock
on files that report more frames than they hold and grows in memory after seeks, so decoding runs in
child processes that are killed on a timeout and replaced every ``restart_every`` clips. No torch here
(children start fast and are CUDA-safe under ``spawn``).
"""

from __future__ import annotations

import hashlib
import io
import math
import multiprocessing as mp
import os
import queue
import re
import socket
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np


class Reject(Exception):
    """A sample that is skipped, counted and logged; ``reason`` is a short stable label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Probe:
    frames: int  # frames the container reports (or duration x fps when it does not)
    fps: float
    width: int
    height: int
    seconds: float
    codec: str

    def as_dict(self) -> dict[str, Any]:
        return dict(frames=self.frames, fps=self.fps, width=self.width, height=self.height,
                    seconds=self.seconds, codec=self.codec)


def probe(data: bytes, decode_first: bool = True) -> Probe:
    """Container metadata of an mp4 held in memory (PyAV); optionally decodes the first frame."""
    import av

    if not data:
        raise Reject("empty file", "0 bytes")
    try:
        with av.open(io.BytesIO(data), mode="r") as c:
            if not c.streams.video:
                raise Reject("no video stream")
            s = c.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or 0)
            seconds = float(s.duration * s.time_base) if s.duration and s.time_base else (
                float(c.duration) / 1e6 if c.duration else 0.0)
            frames = int(s.frames) if s.frames else int(round(seconds * fps))
            width, height = s.codec_context.width, s.codec_context.height
            codec = s.codec_context.name
            if decode_first:
                next(c.decode(s))
    except Reject:
        raise
    except StopIteration:
        raise Reject("unreadable mp4", "no decodable frame") from None
    except Exception as e:  # av.error.* for truncated / corrupt files
        raise Reject("unreadable mp4", f"{type(e).__name__}: {e}") from None
    if fps <= 0 or frames <= 0 or width <= 0 or height <= 0:
        raise Reject("unreadable mp4", f"fps={fps} frames={frames} size={width}x{height}")
    if not seconds:
        seconds = frames / fps
    return Probe(frames=frames, fps=fps, width=width, height=height, seconds=seconds, codec=codec)


@dataclass(frozen=True)
class ClipSpec:
    num_frames: int  # F
    fps: float  # target frame rate
    height: int  # H after crop
    width: int  # W after crop
    threads: int = 0  # decoder threads (0 = default)


def clip_indices(num_src: int, src_fps: float, num_frames: int, fps: float) -> list[int]:
    """Source frame indices of a ``num_frames`` clip at ``fps``, centred in the video, clamped to
    ``[0, num_src - 1]``; raises ``Reject('too short')`` if the video cannot hold the clip's span."""
    step = src_fps / fps  # source frames per target frame
    span = (num_frames - 1) * step
    if num_src < 1 or span > num_src - 1 + 1e-6:
        need = span / src_fps if src_fps > 0 else float("inf")
        raise Reject("too short", f"{num_src} frames at {src_fps:g} fps, clip needs {need:.2f} s ({num_frames} @ {fps:g})")
    start = math.floor((num_src - 1 - span) / 2)
    return [min(num_src - 1, max(0, int(round(start + k * step)))) for k in range(num_frames)]


def cover_size(src_h: int, src_w: int, h: int, w: int) -> tuple[int, int]:
    """Resize (rh, rw) keeping the aspect ratio so that the frame covers h x w; even sizes (decord's
    scaler fails on odd ones: 'The size must exactly match')."""
    s = max(h / src_h, w / src_w)
    even = lambda n: n + (n % 2)  # noqa: E731
    return max(h, even(int(round(src_h * s)))), max(w, even(int(round(src_w * s))))


def center_crop(frames: np.ndarray, h: int, w: int) -> np.ndarray:
    """[F, rh, rw, 3] -> [F, h, w, 3] (centre)."""
    top = (frames.shape[1] - h) // 2
    left = (frames.shape[2] - w) // 2
    return np.ascontiguousarray(frames[:, top:top + h, left:left + w])


_DECORD_MIN_WIDTH = 64


def decode_decord(data: bytes, spec: ClipSpec, pr: Probe | None = None) -> np.ndarray:
    """decord: resize during decoding, then ``get_batch`` of the clip indices, then crop."""
    import decord

    pr = pr or probe(data, decode_first=False)
    rh, rw = cover_size(pr.height, pr.width, spec.height, spec.width)
    # decord's scaler writes padded rows for outputs narrower than 64 pixels ("The size must exactly
    # match"): such tiny clips are decoded at full size and resized with PIL instead.
    scaled = rw >= _DECORD_MIN_WIDTH
    try:
        size = dict(width=rw, height=rh) if scaled else {}
        vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=spec.threads, **size)
        idx = clip_indices(len(vr), float(vr.get_avg_fps()) or pr.fps, spec.num_frames, spec.fps)
        frames = vr.get_batch(idx).asnumpy()  # (F, rh, rw, 3) uint8
        if not scaled:
            from PIL import Image

            frames = np.stack([np.asarray(Image.fromarray(f).resize((rw, rh), Image.BILINEAR)) for f in frames])
    except Reject:
        raise
    except Exception as e:  # decord.DECORDError etc.
        raise Reject("decode failed", f"decord: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if frames.shape[1:3] != (rh, rw):
        raise Reject("decode failed", f"decord returned {frames.shape[1:3]}, expected {(rh, rw)}")
    return center_crop(frames, spec.height, spec.width)


def decode_pyav(data: bytes, spec: ClipSpec, pr: Probe | None = None) -> np.ndarray:
    """PyAV: sequential decode up to the last index, swscale resize of the kept frames, then crop."""
    import av

    pr = pr or probe(data, decode_first=False)
    rh, rw = cover_size(pr.height, pr.width, spec.height, spec.width)
    idx = clip_indices(pr.frames, pr.fps, spec.num_frames, spec.fps)
    wanted: dict[int, int] = {}
    for k, i in enumerate(idx):
        wanted.setdefault(i, k)
    out: dict[int, np.ndarray] = {}
    n = -1
    try:
        with av.open(io.BytesIO(data), mode="r") as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            if spec.threads:
                s.codec_context.thread_count = spec.threads
            for n, frame in enumerate(c.decode(s)):
                if n in wanted:
                    out[n] = frame.to_ndarray(width=rw, height=rh, format="rgb24")
                if n >= idx[-1]:
                    break
    except Exception as e:
        raise Reject("decode failed", f"pyav: {type(e).__name__}: {e}") from None
    if n < idx[-1]:
        raise Reject("fewer frames than reported", f"reports {pr.frames}, decoded {n + 1}, clip needs index {idx[-1]}")
    return center_crop(np.stack([out[i] for i in idx]), spec.height, spec.width)


DECODERS: dict[str, Callable[[bytes, ClipSpec, Probe | None], np.ndarray]] = {"decord": decode_decord, "pyav": decode_pyav}


# ----------------------------------------------------------------------------------------------
# Decoding under a timeout
# ----------------------------------------------------------------------------------------------
def _child(conn, backend: str) -> None:  # pragma: no cover - runs in the child process
    fn = DECODERS[backend]
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        data, spec, pr = msg
        try:
            conn.send(("ok", fn(data, spec, pr)))
        except Reject as r:
            conn.send(("reject", (r.reason, r.detail)))
        except Exception as e:
            conn.send(("reject", ("decode failed", f"{type(e).__name__}: {e}")))


class TimedDecoder:
    """One decoding child process; ``decode`` kills and replaces it when a clip exceeds the timeout."""

    def __init__(self, backend: str, timeout_s: float, restart_every: int = 200, context: str = "spawn"):
        if backend not in DECODERS:
            raise ValueError(f"decoder {backend!r}: expected one of {sorted(DECODERS)}")
        self.backend, self.timeout_s, self.restart_every = backend, timeout_s, restart_every
        self.ctx = mp.get_context(context)
        self.proc = None
        self.conn = None
        self.done = 0

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_child, args=(child, self.backend), daemon=True)
        self.proc.start()
        child.close()
        self.conn, self.done = parent, 0

    def _stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if not kill:
            try:
                self.conn.send(None)
                self.proc.join(5)
            except Exception:
                pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        self.proc = self.conn = None

    def decode(self, data: bytes, spec: ClipSpec, pr: Probe | None = None) -> np.ndarray:
        if self.proc is None or self.done >= self.restart_every:
            self._stop()
            self._start()
        self.done += 1
        try:
            self.conn.send((data, spec, pr))
            if not self.conn.poll(self.timeout_s):
                self._stop(kill=True)
                raise Reject("decode timeout", f"{self.backend} took more than {self.timeout_s:g} s")
            status, value = self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as e:
            self._stop(kill=True)
            raise Reject("decode failed", f"{self.backend} decoder process died ({type(e).__name__})") from None
        if status == "reject":
            raise Reject(*value)
        return value

    def close(self) -> None:
        self._stop()


class DecodePool:
    """``n`` TimedDecoders driven by threads; ``imap`` decodes ahead of the consumer, in order."""

    def __init__(self, n: int, backend: str, timeout_s: float, restart_every: int = 200):
        self.decoders: "queue.Queue[TimedDecoder]" = queue.Queue()
        for _ in range(max(1, n)):
            self.decoders.put(TimedDecoder(backend, timeout_s, restart_every))
        self.n = max(1, n)
        self.pool = ThreadPoolExecutor(self.n)
        self._all = list(self.decoders.queue)

    def _one(self, data: bytes, spec: ClipSpec, pr: Probe | None) -> np.ndarray:
        d = self.decoders.get()
        try:
            return d.decode(data, spec, pr)
        finally:
            self.decoders.put(d)

    def imap(self, items: Iterable[tuple[Any, bytes, ClipSpec, Probe | None]]) -> Iterator[tuple[Any, np.ndarray | Reject]]:
        """(tag, data, spec, probe) -> (tag, frames or the Reject), in input order, ``2 n`` clips ahead."""
        pending: deque[tuple[Any, Future]] = deque()
        it = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(pending) < 2 * self.n:
                try:
                    tag, data, spec, pr = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((tag, self.pool.submit(self._one, data, spec, pr)))
            if not pending:
                return
            tag, fut = pending.popleft()
            try:
                yield tag, fut.result()
            except Reject as r:
                yield tag, r

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for d in self._all:
            d.close()

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------
def _host_tag() -> str:
    """8 hex digits naming this machine in temporary file names (folders may be shared between hosts)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Mp4Writer:
    """uint8 RGB frames [T, H, W, 3] -> an mp4 at ``path`` (PyAV), written to a temporary name beside it
    (``.<name>.tmp-<host tag>-<pid>.mp4``) and renamed by ``close`` (``abort`` removes it; as a context
    manager, whichever fits). ``remove_stale`` deletes the temporary files of writers killed before either.

    The codec is ``codec``, else libx264 (mpeg4 where PyAV lacks it), reproducible byte for byte (no
    macroblock-tree rate control); ``crf`` and ``preset`` (x264's speed preset) apply to libx264;
    ``options`` are further encoder options (``g``, ``tune``, ...); ``faststart`` puts the index (moov)
    first. The first ``write`` fixes the frame size, cropped to even sizes (yuv420p).
    """

    TMP_RE = re.compile(r"^\..+\.tmp-(?:(?P<host>[0-9a-f]{8})-)?(?P<pid>\d+)\.mp4$")  # no host: older writers

    def __init__(self, path: str | Path, fps: int, crf: int | None = None, codec: str | None = None,
                 options: dict[str, str] | None = None, faststart: bool = False, preset: str | None = None):
        import av

        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{_host_tag()}-{os.getpid()}.mp4")
        self.container = av.open(str(self.tmp), mode="w", format="mp4",
                                 options={"movflags": "faststart"} if faststart else {})
        codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
        self.stream = self.container.add_stream(codec, rate=fps)
        self.stream.pix_fmt = "yuv420p"
        opts = {}
        if codec == "libx264":
            # x264's macroblock-tree rate control encoded identical frames to different bitstreams from run to
            # run (PyAV 18.1, libavcodec 62, one thread or many); without it every encode is reproducible
            opts["x264-params"] = "mbtree=0"
            if crf is not None:
                opts["crf"] = str(crf)
            if preset is not None:
                opts["preset"] = preset
        opts.update(options or {})
        if opts:
            self.stream.options = opts
        self.frames = 0

    @classmethod
    def remove_stale(cls, folder: str | Path) -> list[Path]:
        """Delete the temporary files in ``folder`` whose writer process is gone: written on this host
        (or untagged) by a pid that no longer runs. Live writers' files, here or on other hosts, stay.
        Returns what was removed."""
        folder, host, stale = Path(folder), _host_tag(), []
        if not folder.is_dir():
            return stale
        for p in folder.iterdir():
            m = cls.TMP_RE.match(p.name)
            if m and m["host"] in (None, host) and not _pid_alive(int(m["pid"])) and p.is_file():
                p.unlink(missing_ok=True)
                stale.append(p)
        return sorted(stale)

    def write(self, rgb: np.ndarray) -> None:
        import av

        if self.frames == 0:
            self.stream.width, self.stream.height = rgb.shape[2] - rgb.shape[2] % 2, rgb.shape[1] - rgb.shape[1] % 2
        if rgb.shape[1:3] != (self.stream.height, self.stream.width):
            rgb = np.ascontiguousarray(rgb[:, : self.stream.height, : self.stream.width])
        for frame in rgb:
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self.container.mux(packet)
        self.frames += len(rgb)

    def close(self) -> Path:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.container.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
