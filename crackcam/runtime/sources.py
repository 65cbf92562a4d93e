"""Frame sources: image folders and globs, video files, cameras and network streams (OpenCV decode).

``open_source(spec)`` follows Ultralytics-style ``source=`` semantics: an integer (``0``, ``"1"``) is a camera
index; ``rtsp://``/``http(s)://``/``udp://`` URLs are streams; a folder or a glob pattern lists images; a file is a
video (or a single image).  Every source yields :class:`Frame` objects in order and exposes ``kind``,
``name`` and ``stats`` (frames read, skipped, errors).  A source never raises for one bad frame: unreadable images
are skipped with one log line.  Cameras and streams retry with backoff when they fail to open or drop mid-run, then
stop cleanly (``stopped_reason`` says why).
"""

from __future__ import annotations

import glob as _glob
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from .imageio import IMAGE_SUFFIXES, BadInputError, is_image_file, read_image

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm", ".ts", ".mjpeg", ".mjpg",
                  ".h264", ".h265", ".hevc", ".flv", ".3gp")
STREAM_PREFIXES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "gst:")


@dataclass
class Frame:
    index: int  # position in the source (0-based)
    image: np.ndarray  # uint8 H×W×3 BGR
    source: str  # file path (images), video path or camera spec
    timestamp: float | None  # seconds (epoch for files/cameras; video: start_time + position, or position)
    key: str = ""  # resume key: image path, or "<video>#<index>"


@dataclass
class SourceStats:
    read: int = 0
    skipped: int = 0
    errors: list = field(default_factory=list)


class Source:
    kind = "source"
    live = False  # live sources (cameras) are never resumed

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.stats = SourceStats()
        self.stopped_reason: str | None = None
        self.name = ""

    def frames(self, skip: Callable[[str], bool] | None = None) -> Iterator[Frame]:  # pragma: no cover
        raise NotImplementedError

    def __len__(self) -> int:  # unknown → 0
        return 0

    def close(self) -> None:
        pass


class ImageListSource(Source):
    """A list of image files (folder or glob).  Timestamps are the files' modification times.

    ``decode_workers`` > 1 decodes that many files ahead in a thread pool (OpenCV releases the GIL), still
    yielding in order: decoding stops being the ceiling when inference runs on a GPU.
    """

    kind = "images"

    def __init__(self, paths: list[Path], name: str, log: Callable[[str], None] = print, decode_workers: int = 2):
        super().__init__(log)
        self.paths = list(paths)
        self.name = name
        self.decode_workers = max(1, int(decode_workers))

    def __len__(self) -> int:
        return len(self.paths)

    @staticmethod
    def _load(p: Path):
        try:
            img = read_image(p, order="bgr")
        except BadInputError as e:
            return None, e, None
        try:
            ts = p.stat().st_mtime
        except OSError:
            ts = None
        return img, None, ts

    def frames(self, skip=None) -> Iterator[Frame]:
        todo = []
        for i, p in enumerate(self.paths):
            if skip is not None and skip(str(p)):
                self.stats.skipped += 1
            else:
                todo.append((i, p))
        if self.decode_workers == 1:
            results = ((i, p, self._load(p)) for i, p in todo)
            yield from self._emit(results)
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="crackdecode") as ex:
            ahead: deque = deque()
            it = iter(todo)

            def fill():
                while len(ahead) < 2 * self.decode_workers:
                    nxt = next(it, None)
                    if nxt is None:
                        return
                    ahead.append((nxt[0], nxt[1], ex.submit(self._load, nxt[1])))

            def gen():
                fill()
                while ahead:
                    i, p, fut = ahead.popleft()
                    res = fut.result()
                    fill()
                    yield i, p, res

            try:
                yield from self._emit(gen())
            finally:
                for _, _, fut in ahead:
                    fut.cancel()

    def _emit(self, results) -> Iterator[Frame]:
        for i, p, (img, err, ts) in results:
            if err is not None:
                self.log(f"crack-run: skipped {err}")
                self.stats.errors.append(str(err))
                continue
            self.stats.read += 1
            yield Frame(i, img, str(p), ts, str(p))


class VideoSource(Source):
    """A video file decoded with OpenCV.  Timestamp = ``start_time`` + the frame's position (s)."""

    kind = "video"

    def __init__(self, path: Path, start_time: float | None = None, log=print, opener=None):
        super().__init__(log)
        self.path = Path(path)
        self.name = str(self.path)
        self.start_time = start_time
        self._opener = opener or (lambda p: cv2.VideoCapture(p))
        self.cap = self._opener(str(self.path))
        if self.cap is None or not self.cap.isOpened():
            raise BadInputError(self.path, "cannot open video (not a video file, or no decoder for it)")
        n = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self._n = max(n, 0)
        self.fps = float(self.cap.get(cv2.CAP_PROP_FPS) or 0.0) or 25.0

    def __len__(self) -> int:
        return self._n

    def frames(self, skip=None) -> Iterator[Frame]:
        i = 0
        fails = 0
        while True:
            key = f"{self.name}#{i}"
            if skip is not None and skip(key):
                if not self.cap.grab():  # skip without decoding
                    break
                self.stats.skipped += 1
                i += 1
                continue
            ok, img = self.cap.read()
            if not ok or img is None:
                # end of file, or a damaged frame before the end: try to step over a few
                if self._n and i < self._n - 1 and fails < 5:
                    fails += 1
                    self.log(f"crack-run: {self.name}: frame {i} unreadable, skipped")
                    self.stats.errors.append(f"{self.name}: frame {i} unreadable")
                    i += 1
                    continue
                break
            fails = 0
            pos = i / self.fps
            ts = (self.start_time + pos) if self.start_time is not None else pos
            self.stats.read += 1
            yield Frame(i, _as_bgr(img), self.name, ts, key)
            i += 1

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()


def _as_bgr(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    return img


class _WatchedReader:
    """Reads one capture in its own thread so a ``read()`` that never returns (a stream gone silent without closing)
    can be given up after ``timeout`` seconds.  A capture given up on is released by that thread if its ``read()``
    ever returns -- never under a read in progress."""

    def __init__(self, cap):
        self.cap = cap
        self._want, self._got = threading.Event(), threading.Event()
        self._result = (False, None)
        self._closed = False
        self._busy = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="crackcam-capture", daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            self._want.wait()
            self._want.clear()
            if self._closed:
                break
            try:
                res = self.cap.read()
            except Exception:  # noqa: BLE001 - a driver error is a drop
                res = (False, None)
            with self._lock:
                self._result, self._busy = res, False
                self._got.set()
                if self._closed:  # given up on while reading: release it now that nobody reads
                    break
        self.cap.release()

    def read(self, timeout: float):
        """``(ok, image)``, or ``None`` when nothing came within ``timeout`` seconds (the read goes on in the
        background; call :meth:`abandon`)."""
        self._got.clear()
        self._busy = True
        self._want.set()
        if not self._got.wait(timeout):
            return None
        return self._result

    def close(self, wait: float = 1.0) -> bool:
        """Stop the thread; the capture is released by it (right away when idle, when its read returns if busy).
        True when it is released already."""
        with self._lock:
            self._closed = True
            busy = self._busy
            self._want.set()
        if not busy:
            self._thread.join(wait)
        return not self._thread.is_alive()


class CameraSource(Source):
    """A camera index or stream URL.  Fails to open or drops → reopen up to ``retries`` times with exponential
    backoff (``backoff`` s, doubling, capped at 8 s), then stop cleanly with ``stopped_reason`` set.

    A stream that goes silent without closing (``read()`` blocks: a dead RTSP server, a stuck USB driver) is caught
    by a watchdog: no frame for ``stall_timeout`` seconds counts as a drop (one line says so), and the same
    reconnect-then-stop rule applies.  ``stall_timeout=0`` (or None) reads in the caller's thread and waits forever.

    ``opener(spec)`` returns an object with ``isOpened()``, ``read()`` and ``release()`` (default
    ``cv2.VideoCapture``); tests inject a fake one.  Timestamps are wall-clock (``time.time()``).
    """

    kind = "camera"
    live = True

    def __init__(self, spec: int | str, retries: int = 3, backoff: float = 0.5, log=print, opener=None,
                 sleep: Callable[[float], None] = time.sleep, stall_timeout: float | None = 10.0):
        super().__init__(log)
        self.spec = spec
        self.name = f"camera:{spec}" if isinstance(spec, int) else str(spec)
        self.retries = retries
        self.backoff = backoff
        self.stall_timeout = float(stall_timeout) if stall_timeout else 0.0
        self._opener = opener or (lambda s: cv2.VideoCapture(s))
        self._sleep = sleep
        self.cap = None
        self._reader: _WatchedReader | None = None
        self.reconnects = 0
        self.stalls = 0

    def _open(self) -> bool:
        _quiet_opencv()
        for attempt in range(self.retries + 1):
            try:
                cap = self._opener(self.spec)
            except Exception as e:  # noqa: BLE001 - a driver error is a failed open
                cap, err = None, f"{type(e).__name__}: {e}"
            else:
                err = "cannot open"
            if cap is not None and cap.isOpened():
                self.cap = cap
                self._reader = _WatchedReader(cap) if self.stall_timeout > 0 else None
                return True
            if cap is not None:
                cap.release()
            if attempt < self.retries:
                wait = min(self.backoff * (2 ** attempt), 8.0)
                self.log(f"crack-run: {self.name}: {err}; retry {attempt + 1}/{self.retries} in {wait:.1f} s")
                self._sleep(wait)
        return False

    def _read(self):
        """``(ok, image)``; ``None`` when the watchdog fired."""
        if self._reader is None:
            try:
                return self.cap.read()
            except Exception:  # noqa: BLE001 - a driver error is a drop
                return False, None
        return self._reader.read(self.stall_timeout)

    def _drop(self) -> None:
        """Let go of the current capture (released now, or by its reader thread once a stuck read returns)."""
        if self._reader is not None:
            self._reader.close()
        elif self.cap is not None:
            self.cap.release()
        self.cap, self._reader = None, None

    def frames(self, skip=None) -> Iterator[Frame]:
        if not self._open():
            self.stopped_reason = f"{self.name}: cannot open after {self.retries + 1} attempts"
            self.log(f"crack-run: {self.stopped_reason}")
            return
        i = 0
        while True:
            res = self._read()
            if res is not None and res[0] and res[1] is not None:
                self.stats.read += 1
                yield Frame(i, _as_bgr(res[1]), self.name, time.time(), f"{self.name}#{i}")
                i += 1
                continue
            self._drop()
            if res is None:
                self.stalls += 1
                what = f"no frame for {self.stall_timeout:g} s (stream stalled without closing)"
            else:
                what = "frame read failed (camera dropped)"
            self.log(f"crack-run: {self.name}: {what}; reconnecting")
            if not self._open():
                how = "stalled" if res is None else "lost"
                self.stopped_reason = (f"{self.name}: {how} after frame {i} and not back after "
                                       f"{self.retries + 1} attempts")
                self.log(f"crack-run: {self.stopped_reason}; stopping")
                return
            self.reconnects += 1

    def close(self) -> None:
        self._drop()


def _quiet_opencv() -> None:
    """OpenCV's own WARN lines for unopenable cameras would duplicate ours."""
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # pragma: no cover - very old OpenCV builds
        pass


LIST_SUFFIXES = (".txt", ".lst")


def read_list_file(p: Path) -> list[Path]:
    """Image paths, one per line (relative ones are relative to the list file; ``#`` comments and blank lines
    skipped).  A missing listed file is one line naming the list, the line and the path."""
    paths = []
    try:
        lines = Path(p).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(p, f"cannot read the list file ({e})")
    for k, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        q = Path(line).expanduser()
        q = q if q.is_absolute() else Path(p).parent / q
        if not q.is_file():
            raise BadInputError(p, f"line {k}: {q} is not a file")
        paths.append(q)
    if not paths:
        raise BadInputError(p, "the list file names no images")
    return paths


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def open_source(spec, log: Callable[[str], None] = print, start_time: float | None = None, retries: int = 3,
                backoff: float = 0.5, stall_timeout: float | None = 10.0) -> Source:
    """Source for ``spec`` (Ultralytics ``source=`` semantics); a bad spec → BadInputError (one line)."""
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, int):
        return CameraSource(spec, retries=retries, backoff=backoff, log=log, stall_timeout=stall_timeout)
    s = str(spec).strip()
    if s.lstrip("-").isdigit():
        return CameraSource(int(s), retries=retries, backoff=backoff, log=log, stall_timeout=stall_timeout)
    if s.lower().startswith(STREAM_PREFIXES):
        return CameraSource(s, retries=retries, backoff=backoff, log=log, stall_timeout=stall_timeout)
    if s.startswith("/dev/video"):
        return CameraSource(s, retries=retries, backoff=backoff, log=log, stall_timeout=stall_timeout)
    p = Path(s).expanduser()
    if p.is_dir():
        paths = sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q))
        if not paths:
            raise BadInputError(p, f"no images in folder (looked for {', '.join(IMAGE_SUFFIXES)})")
        return ImageListSource(paths, str(p), log=log)
    if _is_glob(s) and not p.exists():
        paths = sorted(Path(q) for q in _glob.glob(os.path.expanduser(s), recursive=True)
                       if os.path.isfile(q) and is_image_file(q))
        if not paths:
            raise BadInputError(s, "glob pattern matches no image files")
        return ImageListSource(paths, s, log=log)
    if not p.exists():
        raise BadInputError(p, "source not found (give a camera index, folder, glob, video file or stream URL)")
    if is_image_file(p):
        return ImageListSource([p], str(p), log=log)
    if p.suffix.lower() in LIST_SUFFIXES:
        return ImageListSource(read_list_file(p), str(p), log=log)
    if p.suffix.lower() in VIDEO_SUFFIXES or p.is_file():
        return VideoSource(p, start_time=start_time, log=log)
    raise BadInputError(p, "not a folder, image, video or stream")
