"""Outputs of ``crack-run``: per-frame images, ``results.jsonl``, ``summary.json``, ``cracks.geojson``.

* Images are written atomically (temp file + ``os.replace``) under ``DIR/masks``, ``DIR/skeletons`` as
  ``<stem>.png`` (lossless) and ``DIR/overlays`` as ``<stem>.jpg`` (quality 90: overlays are for looking at, and a
  4K PNG costs ~0.5 s to encode) (images: the file's stem, made unique by its sub-folder; videos/cameras:
  ``<name>_<frame:06d>.png``).
* ``results.jsonl``: one JSON object per frame, appended line by line, flushed after every line and fsync'ed every
  ``fsync_every`` lines / ``fsync_seconds`` s and at close.  :func:`read_keys` / :func:`iter_records` read an
  existing file for resuming and ignore a truncated last line (which :class:`JsonlWriter` cuts off before
  appending).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from pathlib import Path

import cv2
import numpy as np

SAVE_KINDS = ("masks", "overlays", "skeletons")
TEMP_MARK = ".tmp"


class OutputWriteError(OSError):
    """Writing an output failed (disk full, read-only folder, an I/O error): one line naming the file and why."""

    def __init__(self, path, exc: OSError):
        why = exc.strerror or str(exc) or type(exc).__name__
        code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
        super().__init__(exc.errno, f"{why}{f' ({code})' if code else ''}", str(path))
        self.path, self.cause = Path(path), exc

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG)

    @property
    def read_only(self) -> bool:
        return self.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def _open_for_write(path: Path, mode: str):
    """Every output file is opened here (one place to see, and for the fault-injection tests to replace)."""
    return open(path, mode)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside ``path``, fsync-free, then ``os.replace``: a reader (or a run resumed after a
    power cut) sees the old file or the whole new one, never half of it.  A failed write removes its temp file and
    raises :class:`OutputWriteError`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _open_for_write(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
            raise OutputWriteError(path, exc) from None
        raise


def remove_stale_temps(out: Path) -> int:
    """Temp files a killed run left behind (``.NAME.tmpPID`` under ``out``'s image folders and ``out``); returns
    how many were removed.  Never a finished output: those have their own names."""
    n = 0
    for d in [Path(out), *(Path(out) / k for k in SAVE_KINDS)]:
        if d.is_dir():
            for f in d.glob(f".*{TEMP_MARK}*"):
                with contextlib.suppress(OSError):
                    f.unlink()
                    n += 1
    return n


def file_sha256(*paths) -> str:
    """sha256 of the bytes of ``paths``, read in order in 1 MiB chunks (one file: its usual sha256)."""
    import hashlib

    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_png(path: Path, img: np.ndarray) -> None:
    ok, enc = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover - PNG encoding of uint8 never fails
        raise RuntimeError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, enc.tobytes())


def write_jpeg(path: Path, img: np.ndarray, quality: int = 90) -> None:
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover
        raise RuntimeError(f"{path}: JPEG encoding failed")
    atomic_write_bytes(path, enc.tobytes())


def overlay(bgr: np.ndarray, mask: np.ndarray, skeleton: np.ndarray | None = None, alpha: float = 0.5,
            roi: np.ndarray | None = None) -> np.ndarray:
    """Cracks tinted red on the frame, skeleton in yellow; outside the ROI (if any) dimmed, its border in cyan."""
    out = bgr.copy() if bgr.ndim == 3 else cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
    if roi is not None and not roi.all():
        out[~roi] = (out[~roi] * 0.45).astype(np.uint8)
        cnts, _ = cv2.findContours(roi.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, cnts, -1, (255, 255, 0), 2)
    if mask is not None and mask.any():
        red = np.array([0, 0, 255], np.float32)
        px = out[mask].astype(np.float32)
        out[mask] = (px * (1 - alpha) + red * alpha).astype(np.uint8)
    if skeleton is not None and skeleton.any():
        out[skeleton] = (0, 255, 255)
    return out


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def output_stem(frame_source: str, frame_index: int, source_kind: str, root: str | None = None) -> str:
    """A file-name stem for a frame's images, unique within the run."""
    if source_kind == "images":
        p = Path(frame_source)
        if root:
            try:
                rel = p.relative_to(root) if Path(root).is_dir() else Path(p.name)
            except ValueError:
                rel = Path(p.name)
        else:
            rel = Path(p.name)
        stem = "__".join(rel.with_suffix("").parts)
        return _SAFE.sub("_", stem)
    base = _SAFE.sub("_", Path(str(frame_source)).stem if "://" not in str(frame_source) else str(frame_source))
    return f"{base.strip('_') or 'frame'}_{frame_index:06d}"


def iter_records(path: Path):
    """Records of ``results.jsonl`` one by one (a truncated or garbled line is ignored)."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # truncated last line: the interrupted write; redone on resume
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict) and "key" in rec:
                yield rec


def read_keys(path: Path) -> set[str]:
    """Keys of the frames already in ``results.jsonl`` (for resuming)."""
    return {r["key"] for r in iter_records(path)}


class JsonlWriter:
    """Appends one JSON line per record; flush each line, fsync every ``fsync_every`` lines / ``fsync_seconds``."""

    def __init__(self, path: Path, fsync_every: int = 50, fsync_seconds: float = 2.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._cut_partial_tail()
            self.f = _open_for_write(self.path, "ab")
        except OSError as exc:
            raise OutputWriteError(self.path, exc) from None
        self.fsync_every = fsync_every
        self.fsync_seconds = fsync_seconds
        self._since = 0
        self._last = time.monotonic()

    def _cut_partial_tail(self) -> None:
        """Drop an unterminated last line so the next record starts on its own line."""
        if not self.path.is_file():
            return
        size = self.path.stat().st_size
        if size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            chunk = 1 << 16
            pos = size
            while pos > 0:
                start = max(0, pos - chunk)
                f.seek(start)
                buf = f.read(pos - start)
                k = buf.rfind(b"\n")
                if k >= 0:
                    f.truncate(start + k + 1)
                    return
                pos = start
            f.truncate(0)

    def write(self, rec: dict) -> None:
        """Append one line.  A failed write raises :class:`OutputWriteError`; whatever part of the line reached the
        disk is an unterminated tail, which readers ignore and the next writer cuts off."""
        try:
            self.f.write((json.dumps(rec, separators=(",", ":")) + "\n").encode())
            self.f.flush()
            self._since += 1
            now = time.monotonic()
            if self._since >= self.fsync_every or now - self._last >= self.fsync_seconds:
                os.fsync(self.f.fileno())
                self._since = 0
                self._last = now
        except OSError as exc:
            self.failed = True
            raise OutputWriteError(self.path, exc) from None

    failed = False

    def close(self) -> None:
        """Flush, fsync and close; after a failed write the unwritten buffer is dropped (it cannot be written)."""
        if self.f.closed:
            return
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as exc:
            self.failed = True
            with contextlib.suppress(OSError):
                self.f.close()
            raise OutputWriteError(self.path, exc) from None
        self.f.close()
