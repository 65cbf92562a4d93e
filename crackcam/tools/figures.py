"""Figures of crack-eval: PR curves (matplotlib, Agg) and overlay grids (image | map | binary | mask)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np


def _atomic_png(path: Path, bgr: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)
    return path


def pr_curve_png(path: str | Path, curves: dict[str, tuple], title: str = "", points: dict | None = None) -> Path:
    """``curves``: label → (recall array, precision array); ``points``: label → (recall, precision) markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=110)
    for f in np.linspace(0.1, 0.9, 9):  # iso-F1 lines
        r = np.linspace(f / (2 - f) + 1e-3, 1, 100)
        p = f * r / (2 * r - f)
        ax.plot(r, p, color="0.88", lw=0.7, zorder=0)
        ax.text(1.0, f / (2 - f), f"F1={f:.1f}", fontsize=6, color="0.6", va="bottom", ha="right")
    for label, (rec, prec) in curves.items():
        ax.plot(rec, prec, lw=1.5, label=label)
    for label, (r, p) in (points or {}).items():
        ax.plot([r], [p], "o", ms=5, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _colormap(m: np.ndarray) -> np.ndarray:
    u8 = np.clip(m * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(u8, cv2.COLORMAP_INFERNO)  # BGR


def overlay_row(image: np.ndarray, crack_map: np.ndarray, binary: np.ndarray, mask: np.ndarray,
                width: int = 256) -> np.ndarray:
    """One BGR row: image | map | binary (green TP, red FP, blue FN over the dimmed image) | mask."""
    h, w = image.shape[:2]
    s = width / w
    size = (width, max(1, int(round(h * s))))
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    dim = (bgr.astype(np.float32) * 0.45).astype(np.uint8)
    col = dim.copy()
    tp, fp, fn = binary & mask, binary & ~mask, ~binary & mask
    col[tp] = (0, 220, 0)
    col[fp] = (0, 0, 255)
    col[fn] = (255, 120, 0)
    mk = np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2)
    tiles = [cv2.resize(bgr, size, interpolation=cv2.INTER_AREA), cv2.resize(_colormap(crack_map), size),
             cv2.resize(col, size, interpolation=cv2.INTER_NEAREST), cv2.resize(mk, size, interpolation=cv2.INTER_AREA)]
    sep = np.full((size[1], 4, 3), 255, np.uint8)
    out = []
    for t in tiles:
        out += [t, sep]
    return np.concatenate(out[:-1], axis=1)


def overlay_grid_png(path: str | Path, rows: list[np.ndarray], names: list[str] | None = None,
                     header: str = "image | map | binary (green TP, red FP, blue FN) | mask") -> Path:
    """Stack rows (same width) with a caption per row."""
    if not rows:
        rows = [np.zeros((32, 256, 3), np.uint8)]
    w = max(r.shape[1] for r in rows)
    parts = [_caption(header, w)]
    for i, r in enumerate(rows):
        if r.shape[1] < w:
            r = np.pad(r, ((0, 0), (0, w - r.shape[1]), (0, 0)), constant_values=255)
        if names:
            parts.append(_caption(names[i], w))
        parts.append(r)
    return _atomic_png(Path(path), np.concatenate(parts, axis=0))


def _caption(text: str, w: int) -> np.ndarray:
    bar = np.full((20, w, 3), 255, np.uint8)
    cv2.putText(bar, text[:160], (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return bar
