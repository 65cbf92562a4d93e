"""A crack drawer: random-walk cracks on a noise texture, with their pixel masks.

Used for the embedded default data set of ``crack-train`` (so the command works with no data at all) and by the
tests.  NumPy + OpenCV only (no torch), so any layer may use it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def noise_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Asphalt-like grey texture (uint8 H×W×3, RGB): multi-scale noise, speckles, a slow illumination ramp."""
    base = rng.uniform(95, 150)
    img = np.full((h, w), base, np.float32)
    for scale, amp in ((32, 14.0), (8, 10.0), (2, 8.0)):
        small = rng.normal(0, 1, (max(2, h // scale), max(2, w // scale))).astype(np.float32)
        img += amp * cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 6, (h, w)).astype(np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    img += rng.uniform(0, 20) * ((np.cos(ang) * xs / w + np.sin(ang) * ys / h) - 0.5)
    tint = rng.uniform(0.93, 1.07, 3).astype(np.float32)
    rgb = np.clip(img[..., None] * tint[None, None, :], 0, 255)
    return rgb.astype(np.uint8)


def draw_crack(rng: np.random.Generator, h: int, w: int, *, width: tuple[float, float] = (1.5, 4.0),
               steps: int | None = None) -> np.ndarray:
    """One random-walk crack (with an occasional branch) as a bool H×W mask."""
    mask = np.zeros((h, w), np.uint8)
    steps = steps or int(rng.integers(max(h, w) // 3, max(h, w)))

    def walk(y, x, ang, n, thick):
        for _ in range(n):
            ang += rng.normal(0, 0.25)
            ny, nx = y + 2.0 * np.sin(ang), x + 2.0 * np.cos(ang)
            t = max(1, int(round(thick + rng.normal(0, 0.3))))
            cv2.line(mask, (int(x), int(y)), (int(nx), int(ny)), 1, t)
            y, x = ny, nx
            if not (-5 < y < h + 5 and -5 < x < w + 5):
                break
            if rng.random() < 0.004:
                walk(y, x, ang + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), n // 3, max(1.0, thick * 0.6))

    walk(rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, 2 * np.pi), steps // 2, rng.uniform(*width))
    return mask.astype(bool)


def draw_crack_image(rng: np.random.Generator, h: int = 128, w: int = 128, n_cracks: int | None = None,
                     contrast: tuple[float, float] = (45, 80)) -> tuple[np.ndarray, np.ndarray]:
    """A textured image (uint8 RGB) with ``n_cracks`` dark cracks (default 1–2) and its bool mask."""
    img = noise_texture(rng, h, w).astype(np.float32)
    n = int(rng.integers(1, 3)) if n_cracks is None else n_cracks
    mask = np.zeros((h, w), bool)
    for _ in range(n):
        mask |= draw_crack(rng, h, w)
    if mask.any():
        soft = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0.7)
        img -= rng.uniform(*contrast) * soft[..., None]
    return np.clip(img, 0, 255).astype(np.uint8), mask


def draw_paint(rng: np.random.Generator, img: np.ndarray, width: tuple[int, int] = (6, 14)) -> np.ndarray:
    """A bright painted lane line (or its edge) across an RGB image: the hard negative of road survey (its borders
    are sharp dark/bright edges that fool darkness cues)."""
    h, w = img.shape[:2]
    x0, x1 = int(rng.integers(-w // 4, w + w // 4)), int(rng.integers(-w // 4, w + w // 4))
    v = int(rng.integers(200, 245))
    cv2.line(img, (x0, 0), (x1, h), (v, v, v - 5), int(rng.integers(*width)), cv2.LINE_AA)
    return img


def write_synthetic_dataset(root: str | Path, n_crack: int = 24, n_free: int = 24, size: tuple[int, int] = (128, 128),
                            layout: str = "kaggle", seed: int = 0, test_fraction: float = 0.25,
                            paint: float = 0.0) -> Path:
    """Write a tiny crack data set.

    ``layout="kaggle"``: ``train|test/images/*.jpg`` + ``train|test/masks/*.png``, crack-free files named
    ``noncrack_*``.  ``layout="flat"``: ``images/`` + ``masks/`` (every image has cracks, like the shared sets).
    ``paint``: share of the images (of either class) that also get a painted lane line (:func:`draw_paint`).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    items = [("crack", i) for i in range(n_crack)] + ([] if layout == "flat" else [("noncrack", i) for i in range(n_free)])
    for k, (kind, i) in enumerate(items):
        if layout == "flat":
            sub = root
        else:
            sub = root / ("test" if (k % max(1, round(1 / test_fraction))) == 0 else "train")
        (sub / "images").mkdir(parents=True, exist_ok=True)
        (sub / "masks").mkdir(parents=True, exist_ok=True)
        img, mask = draw_crack_image(rng, h, w, n_cracks=0 if kind == "noncrack" else None)
        if paint and rng.random() < paint:
            img = draw_paint(rng, np.ascontiguousarray(img))
            img[mask] = np.minimum(img[mask], 90)  # a crack crossing the paint stays dark
        stem = f"{kind}_{i:04d}" if layout != "flat" else f"{i:03d}"
        cv2.imwrite(str(sub / "images" / f"{stem}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(sub / "masks" / f"{stem}.png"), mask.astype(np.uint8) * 255)
    return root
