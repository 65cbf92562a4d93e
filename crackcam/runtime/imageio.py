"""Image and mask reading shared by every crackcam layer (torch-free: NumPy + OpenCV only).

``read_image(path)`` always returns a uint8 H×W×3 **RGB** array, whatever the file holds (gray, gray+alpha,
RGB, RGBA, 8- or 16-bit; JPEG / PNG / BMP / TIFF / WebP).  ``read_mask(path, shape=None)`` returns a bool H×W
array (pixel > 127 is crack; masks stored as 0/1 are recognised).  Any problem raises :class:`BadInputError`
whose message is one line ``"<path>: <problem>"`` — CLIs print it without a traceback.

Truncated files are detected: OpenCV silently decodes a cut-off JPEG as a partly grey picture, so the byte
stream is checked for its end marker (JPEG ``FF D9``, PNG ``IEND``) before decoding.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class BadInputError(ValueError):
    """Bad user input (file or folder).  ``str(err)`` is one line: ``"<path>: <problem>"``."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the cause said
        super().__init__(f"{self.path}: {self.problem}")


def is_image_file(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (raises for a missing folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(folder, "folder not found")
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise BadInputError(path, "file not found")
    if not path.is_file():
        raise BadInputError(path, "not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInputError(path, f"cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise BadInputError(path, "empty file (0 bytes)")
    return data


def _check_complete(path: Path, data: bytes) -> None:
    """Raise for a JPEG or PNG whose byte stream is cut off (OpenCV would decode it partly, silently)."""
    if data[:3] == b"\xff\xd8\xff":  # JPEG: must end with the EOI marker (allow a little trailing padding)
        tail = data[-64:].rstrip(b"\x00\r\n ")
        if not tail.endswith(b"\xff\xd9"):
            raise BadInputError(path, "truncated JPEG (no end-of-image marker)")
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if b"IEND" not in data[-32:]:
            raise BadInputError(path, "truncated PNG (no IEND chunk)")


def _decode(path: Path, flags: int) -> np.ndarray:
    data = _read_bytes(path)
    _check_complete(path, data)
    buf = np.frombuffer(data, np.uint8)
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error as exc:  # pragma: no cover - OpenCV returns None for most bad files
        raise BadInputError(path, f"cannot decode image ({exc.err or exc})") from None
    if img is None or img.size == 0:
        raise BadInputError(path, "unreadable image (not a supported image file, or corrupt)")
    return img


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    if img.dtype in (np.float32, np.float64):
        hi = 1.0 if float(np.nanmax(img)) <= 1.0 else 255.0
        return np.clip(np.nan_to_num(img) * (255.0 / hi), 0, 255).round().astype(np.uint8)
    info = np.iinfo(img.dtype)
    return np.clip(img.astype(np.float64) * 255.0 / info.max, 0, 255).round().astype(np.uint8)


def read_image(path: str | os.PathLike, order: str = "rgb") -> np.ndarray:
    """Read an image as uint8 H×W×3 RGB — or BGR with ``order="bgr"``, what the runtime's sources hand on,
    converted once from what the decoder gives (no RGB round trip) — gray replicated, alpha dropped, 16-bit
    scaled to 8-bit."""
    path = Path(path)
    if order not in ("rgb", "bgr"):
        raise ValueError(f"order must be rgb or bgr, not {order!r}")
    bgr = order == "bgr"
    img = _to_uint8(_decode(path, cv2.IMREAD_UNCHANGED))
    gray = cv2.COLOR_GRAY2BGR if bgr else cv2.COLOR_GRAY2RGB
    if img.ndim == 2:
        img = cv2.cvtColor(img, gray)
    elif img.ndim == 3 and img.shape[2] in (1, 2):  # gray (+ alpha)
        img = cv2.cvtColor(np.ascontiguousarray(img[..., 0]), gray)
    elif img.ndim == 3 and img.shape[2] == 3:
        img = img if bgr else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)  # the decoder's order is BGR
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR if bgr else cv2.COLOR_BGRA2RGB)
    else:
        raise BadInputError(path, f"unsupported image layout {img.shape}")
    return np.ascontiguousarray(img)


def read_mask(path: str | os.PathLike, shape=None) -> np.ndarray:
    """Read a crack mask as bool H×W: pixel > 127 is crack (a mask holding only 0 and 1 counts 1 as crack).

    Colour masks use their brightest channel.  ``shape`` (H, W[, C]) given and different → BadInputError.
    """
    path = Path(path)
    m = _decode(path, cv2.IMREAD_UNCHANGED)
    if m.ndim == 3:
        m = m[..., :3].max(axis=2) if m.shape[2] >= 3 else m[..., 0]
    m = _to_uint8(m) if m.dtype != np.bool_ else m.astype(np.uint8) * 255
    if shape is not None:
        h, w = int(shape[0]), int(shape[1])
        if m.shape[:2] != (h, w):
            raise BadInputError(path, f"mask size {m.shape[1]}x{m.shape[0]} differs from its image size {w}x{h}")
    if m.max() <= 1:
        return m > 0
    return m > 127


def write_image(path: str | os.PathLike, rgb: np.ndarray, quality: int = 95) -> Path:
    """Write a uint8 RGB (or gray) array atomically (temp file + os.replace); the suffix picks the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(rgb)
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ext = path.suffix.lower() or ".png"
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext in (".jpg", ".jpeg") else []
    ok, enc = cv2.imencode(ext, arr, params)
    if not ok:
        raise BadInputError(path, f"cannot encode image as {ext}")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(enc.tobytes())
    os.replace(tmp, path)
    return path
