"""Post-processing of crack maps: threshold → clean → skeleton → measures.  NumPy + OpenCV only (no torch).

This one implementation serves the runtime (``crack-run``) and the evaluation (``crack-eval``).

Conventions
-----------
* A *map* is float H×W on [0, 1] (a CAM, a pixel cue, or a fusion).  **Zero never counts as crack**: a gated map
  (classifier probability below the gate) is all zero and stays empty whatever the threshold.
* :func:`binarize` returns ``(map >= t) & (map > 0)``; the metrics in ``crackcam.tools.metrics`` use the same rule.
* Skeletons are 8-connected, one pixel wide (Zhang–Suen thinning), computed on the foreground pixels only, so cost
  scales with crack area, not frame size.  Identical to ``cv2.ximgproc.thinning`` (``THINNING_ZHANGSUEN``) for
  masks off the 1-px frame border; OpenCV never thins the border pixels themselves, this thins them as if the frame
  were padded with background, so near a border-touching crack the two differ (within 4 px of the border).

API (stable, see docs/contracts.md)::

    cfg = PostProcessConfig(threshold=0.4, open_radius=0, close_radius=1, min_area=40, skeleton=True)
    res = postprocess(crack_map, cfg, mm_per_px=None)   # -> PostResult(mask, skeleton, measures, threshold)
    res.measures  # {'length_px', 'area_px', 'mean_width_px', 'max_width_px', 'segments', 'components', ...}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

__all__ = ["PostProcessConfig", "PostResult", "resolve_threshold", "binarize", "clean", "remove_small",
           "skeletonize", "measure", "postprocess", "disk"]

SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------------------------- config
@dataclass
class PostProcessConfig:
    """How a crack map becomes a crack mask.

    threshold: a float in [0, 1], ``"otsu"`` (Otsu on the non-zero map values) or ``"pXX"`` (the XX-th percentile
        of the map, e.g. ``"p97.5"``).
    open_radius / close_radius: radius in px of the disk used for a morphological opening (removes specks thinner
        than the disk — keep 0 for 1–2 px cracks) and a closing (bridges small gaps), 0 = off.  Closing runs first.
    min_area: connected components (8-connectivity) with fewer pixels are removed, 0 = off.
    skeleton: compute the skeleton and the length/width measures.
    hysteresis: 0 = off; else a fraction f in (0, 1): pixels at or above ``f × threshold`` are kept when their
        8-connected piece of such pixels also holds a pixel at or above the threshold (as Canny's edge
        hysteresis: a thin crack whose map is strong in places keeps its weaker stretches in between).
    max_width: 0 = off; else components whose mean width (area / skeleton pixels) exceeds this many px are removed:
        cracks are thin and long, blobs (trees, vehicles, shadows, stains) are not.
    """

    threshold: float | str = 0.5
    open_radius: int = 0
    close_radius: int = 0
    min_area: int = 0
    skeleton: bool = True
    hysteresis: float = 0.0
    max_width: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "PostProcessConfig":
        d = dict(d or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown post-processing keys: {sorted(unknown)}")
        cfg = cls(**d)
        resolve_threshold(np.zeros((1, 1), np.float32), cfg.threshold)  # validates the threshold spelling
        if not 0.0 <= float(cfg.hysteresis) < 1.0:
            raise ValueError(f"hysteresis {cfg.hysteresis!r} must lie in [0, 1) (0 = off)")
        if not float(cfg.max_width) >= 0.0:
            raise ValueError(f"max_width {cfg.max_width!r} must be >= 0 (0 = off)")
        return cfg


@dataclass
class PostResult:
    mask: np.ndarray  # bool H×W, cleaned
    skeleton: np.ndarray | None  # bool H×W or None when cfg.skeleton is False
    measures: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.0  # the numeric threshold used (after resolving "otsu"/"pXX")


# --------------------------------------------------------------------------------------------- threshold
def resolve_threshold(crack_map: np.ndarray, threshold: float | str) -> float:
    """The numeric threshold for ``crack_map``: a float as is, ``"otsu"`` or ``"pXX"`` computed from the map."""
    if isinstance(threshold, (int, float, np.floating)) and not isinstance(threshold, bool):
        return float(threshold)
    if not isinstance(threshold, str):
        raise ValueError(f"threshold must be a number, 'otsu' or 'pXX', not {threshold!r}")
    s = threshold.strip().lower()
    if s == "otsu":
        vals = crack_map[crack_map > 0]
        if vals.size == 0:
            return 1.0
        u8 = np.clip(vals * 255.0 + 0.5, 0, 255).astype(np.uint8).reshape(-1, 1)
        t, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        return float(t + 1) / 255.0  # cv2 keeps values > t
    if s.startswith("p"):
        try:
            q = float(s[1:])
        except ValueError:
            raise ValueError(f"bad percentile threshold {threshold!r} (use e.g. 'p97.5')") from None
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"bad percentile threshold {threshold!r}: must be within p0..p100")
        return float(np.percentile(crack_map, q))
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"threshold must be a number, 'otsu' or 'pXX', not {threshold!r}") from None


def binarize(crack_map: np.ndarray, threshold: float | str = 0.5) -> np.ndarray:
    """``(map >= t) & (map > 0)`` as bool H×W, with ``t`` resolved by :func:`resolve_threshold`."""
    t = resolve_threshold(crack_map, threshold)
    m = crack_map >= t
    if t <= 0:
        m &= crack_map > 0
    return m


# --------------------------------------------------------------------------------------------- cleaning
_DISKS: dict[int, np.ndarray] = {}


def disk(radius: int) -> np.ndarray:
    """A uint8 disk structuring element of the given radius (offsets with dx² + dy² ≤ r²)."""
    r = int(radius)
    if r not in _DISKS:
        y, x = np.mgrid[-r:r + 1, -r:r + 1]
        _DISKS[r] = ((x * x + y * y) <= r * r).astype(np.uint8)
    return _DISKS[r]


def remove_small(mask: np.ndarray, min_area: int, return_count: bool = False):
    """Drop 8-connected components with fewer than ``min_area`` pixels (bool H×W).

    With ``return_count`` also returns the number of components kept.
    """
    m8 = mask.astype(np.uint8)
    x0, y0, bw, bh = cv2.boundingRect(m8)
    if bw == 0:
        return (m8.view(bool), 0) if return_count else m8.view(bool)
    sub = m8[y0:y0 + bh, x0:x0 + bw]  # a view: labelling runs on the foreground's bounding box only
    n, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(sub, 8, cv2.CV_32S, cv2.CCL_GRANA)
    small = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] < max(min_area, 1)) + 1
    if small.size > 24:  # many specks: one look-up over the box
        keep = np.ones(n, np.uint8)
        keep[0] = 0
        keep[small] = 0
        sub[...] = keep[labels]
    else:  # a few small components have small boxes: clear them box by box
        for i in small:
            x, y, w, h = stats[i, :4]
            box = sub[y:y + h, x:x + w]
            box[labels[y:y + h, x:x + w] == i] = 0
    out = m8.view(bool)
    return (out, int(n - 1 - small.size)) if return_count else out


def clean(mask: np.ndarray, open_radius: int = 0, close_radius: int = 0, min_area: int = 0) -> np.ndarray:
    """Closing (radius ``close_radius``), then opening (``open_radius``), then small-component removal."""
    m = mask.astype(np.uint8)
    if close_radius > 0:
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, disk(close_radius))
    if open_radius > 0:
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, disk(open_radius))
    if min_area > 1:
        return remove_small(m, min_area)
    return m.view(bool)


# --------------------------------------------------------------------------------------------- skeleton
# Neighbour bits: P2 (N)=1, P3 (NE)=2, P4 (E)=4, P5 (SE)=8, P6 (S)=16, P7 (SW)=32, P8 (W)=64, P9 (NW)=128.
_OFFS = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))


def _zs_luts() -> tuple[np.ndarray, np.ndarray]:
    lut = np.zeros((2, 256), bool)
    for code in range(256):
        p = [(code >> i) & 1 for i in range(8)]  # p[0]=P2 ... p[7]=P9
        b = sum(p)
        a = sum(1 for i in range(8) if p[i] == 0 and p[(i + 1) % 8] == 1)
        p2, p3, p4, p5, p6, p7, p8, p9 = p
        ok = a == 1 and 2 <= b <= 6
        lut[0, code] = ok and p2 * p4 * p6 == 0 and p4 * p6 * p8 == 0
        lut[1, code] = ok and p2 * p4 * p8 == 0 and p2 * p6 * p8 == 0
    return lut[0], lut[1]


_LUT0, _LUT1 = _zs_luts()


def _crop(mask8: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The bounding box of the foreground with a 1 px zero border (uint8 copy) and (x0, y0, w, h)."""
    x0, y0, bw, bh = cv2.boundingRect(mask8)
    img = np.zeros((bh + 2, bw + 2), np.uint8)
    if bw:
        img[1:-1, 1:-1] = mask8[y0:y0 + bh, x0:x0 + bw] != 0
    return img, (x0, y0, bw, bh)


def _thin_sparse(mask: np.ndarray) -> np.ndarray:
    """Zhang–Suen thinning on the list of foreground pixels (bool in, bool out).

    Each sub-iteration computes the 8-neighbour code of the remaining candidate pixels only (8 gathers + ORs on
    the flat cropped image) and deletes those the sub-iteration's look-up table marks; deleted pixels leave the
    candidate list.  Stops after two quiet sub-iterations, like OpenCV's implementation.
    """
    m8 = mask.view(np.uint8) if mask.dtype == bool else (mask != 0).astype(np.uint8)
    img, (x0, y0, bw, bh) = _crop(m8)
    out = np.zeros(mask.shape, bool)
    if bw == 0:
        return out
    pw = bw + 2
    flat = img.ravel()
    active = np.flatnonzero(flat)
    nb = [dy * pw + dx for dy, dx in _OFFS]
    luts = (_LUT0, _LUT1)
    quiet = 0
    it = 0
    while quiet < 2 and active.size:
        code = flat[active + nb[0]]
        for i in range(1, 8):
            code |= flat[active + nb[i]] << i
        dele = luts[it & 1][code]
        if dele.any():
            flat[active[dele]] = 0
            active = active[~dele]
            quiet = 0
        else:
            quiet += 1
        it += 1
    out[y0:y0 + bh, x0:x0 + bw] = img[1:-1, 1:-1]
    return out


def skeletonize(mask: np.ndarray, method: str = "fast") -> np.ndarray:
    """One-pixel-wide 8-connected skeleton (bool H×W).

    ``method``: ``"fast"`` (Zhang–Suen on the foreground pixel list, NumPy), ``"opencv"``
    (``cv2.ximgproc.thinning``, Zhang–Suen, whole frame) or ``"skimage"`` (``skimage.morphology.skeletonize``).
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    if method == "fast":
        return _thin_sparse(mask)
    if method == "opencv":
        return cv2.ximgproc.thinning(mask.astype(np.uint8) * 255).astype(bool)
    if method == "skimage":
        from skimage.morphology import skeletonize as sk_skel

        return sk_skel(mask)
    raise ValueError(f"unknown skeleton method {method!r}")


# --------------------------------------------------------------------------------------------- measures
def _neighbour_count(sk8: np.ndarray) -> np.ndarray:
    k = np.ones((3, 3), np.float32)
    k[1, 1] = 0
    return cv2.filter2D(sk8, cv2.CV_16S, k, borderType=cv2.BORDER_CONSTANT)


def skeleton_length(skeleton: np.ndarray) -> float:
    """Length of an 8-connected skeleton in px: 1 per horizontal/vertical step, √2 per diagonal step (a diagonal
    step is not counted where the two pixels are also joined through a shared 4-neighbour)."""
    s = np.asarray(skeleton).astype(bool)
    if not s.any():
        return 0.0
    p = np.pad(s, 1)
    c = p[1:-1, 1:-1]
    right = p[1:-1, 2:]
    down = p[2:, 1:-1]
    dr = p[2:, 2:]
    dl = p[2:, :-2]
    left = p[1:-1, :-2]
    n_orth = np.count_nonzero(c & right) + np.count_nonzero(c & down)
    n_dr = np.count_nonzero(c & dr & ~right & ~down)
    n_dl = np.count_nonzero(c & dl & ~left & ~down)
    return float(n_orth + SQRT2 * (n_dr + n_dl))


def measure(mask: np.ndarray, skeleton: np.ndarray | None = None, mm_per_px: float | None = None,
            components: int | None = None) -> dict[str, Any]:
    """Crack measures of a binary mask and its skeleton.

    Returns ``length_px`` (skeleton length, diagonal steps √2), ``area_px``, ``mean_width_px`` (area / length),
    ``max_width_px`` (2 × the largest distance-to-background on the skeleton − 1, i.e. the width of the widest
    cross-section in whole pixels), ``components`` (8-connected pieces of the mask; pass ``components`` when
    already known), ``segments`` (skeleton pieces between branch points and end points), ``branch_points`` and
    ``end_points``; with ``mm_per_px`` also ``length_mm``, ``area_mm2``, ``mean_width_mm``, ``max_width_mm``.
    All the work runs on the bounding box of the mask.
    """
    m8 = np.asarray(mask)
    m8 = m8.view(np.uint8) if m8.dtype == bool else (m8 != 0).astype(np.uint8)
    out: dict[str, Any] = {"length_px": 0.0, "area_px": 0, "mean_width_px": 0.0, "max_width_px": 0.0,
                           "components": 0, "segments": 0, "branch_points": 0, "end_points": 0}
    mc, (x0, y0, bw, bh) = _crop(m8)
    if bw == 0:
        return _with_mm(out, mm_per_px)
    area = int(cv2.countNonZero(mc))
    out["area_px"] = area
    if skeleton is None:
        skc = _thin_sparse(mc.view(bool))
    else:
        skc = np.zeros_like(mc, bool)
        skc[1:-1, 1:-1] = np.asarray(skeleton)[y0:y0 + bh, x0:x0 + bw]
    if components is None:
        components = cv2.connectedComponents(mc, connectivity=8)[0] - 1
    out["components"] = int(components)
    if not skc.any():
        return _with_mm(out, mm_per_px)
    length = skeleton_length(skc)
    dt = cv2.distanceTransform(mc, cv2.DIST_L2, 5)
    dmax = float(dt[skc].max())
    sk8 = skc.view(np.uint8)
    nbc = _neighbour_count(sk8)
    branch = skc & (nbc >= 3)
    ends = skc & (nbc <= 1)
    rest = (skc & ~branch).view(np.uint8)
    nseg = cv2.connectedComponents(rest, connectivity=8)[0] - 1
    out.update(length_px=length, mean_width_px=(area / length) if length > 0 else float(area),
               max_width_px=max(1.0, 2.0 * dmax - 1.0), segments=int(max(nseg, 0)),
               branch_points=int(_count_blobs(branch)), end_points=int(np.count_nonzero(ends)))
    return _with_mm(out, mm_per_px)


def _count_blobs(b: np.ndarray) -> int:
    if not b.any():
        return 0
    return cv2.connectedComponents(b.astype(np.uint8), connectivity=8)[0] - 1


def _with_mm(out: dict[str, Any], mm_per_px: float | None) -> dict[str, Any]:
    if mm_per_px:
        out["length_mm"] = out["length_px"] * mm_per_px
        out["area_mm2"] = out["area_px"] * mm_per_px * mm_per_px
        out["mean_width_mm"] = out["mean_width_px"] * mm_per_px
        out["max_width_mm"] = out["max_width_px"] * mm_per_px
    return out


# --------------------------------------------------------------------------------------------- pipeline
def hysteresis(crack_map: np.ndarray, strong: np.ndarray, low: float) -> np.ndarray:
    """The 8-connected pieces of ``map >= low`` (and > 0) that contain a ``strong`` pixel (bool H×W)."""
    weak = (crack_map >= low) & (crack_map > 0)
    x0, y0, bw, bh = cv2.boundingRect(weak.view(np.uint8))
    if bw == 0:
        return strong
    sub = weak[y0:y0 + bh, x0:x0 + bw].view(np.uint8)
    n, lab = cv2.connectedComponents(sub, connectivity=8)
    keep = np.zeros(n, bool)
    keep[lab[strong[y0:y0 + bh, x0:x0 + bw]]] = True
    keep[0] = False
    out = np.zeros_like(strong)
    out[y0:y0 + bh, x0:x0 + bw] = keep[lab]
    return out | strong


def postprocess(crack_map: np.ndarray, cfg: PostProcessConfig | None = None, mm_per_px: float | None = None
                ) -> PostResult:
    """Threshold, clean and (if ``cfg.skeleton``) skeletonise and measure one crack map (float H×W on [0, 1])."""
    cfg = cfg or PostProcessConfig()
    cmap = np.asarray(crack_map, np.float32)
    if cmap.ndim != 2:
        raise ValueError(f"crack map must be H×W, got shape {cmap.shape}")
    t = resolve_threshold(cmap, cfg.threshold)
    if not cmap.any():  # a gated frame: nothing reaches any threshold (binarize keeps map > 0 only)
        mask = np.zeros(cmap.shape, bool)
        if not cfg.skeleton:
            return PostResult(mask, None, {"area_px": 0, "components": 0}, t)
        return PostResult(mask, mask.copy(), measure(mask, None, mm_per_px, components=0), t)
    mask = binarize(cmap, t)
    if cfg.hysteresis > 0 and mask.any():
        mask = hysteresis(cmap, mask, cfg.hysteresis * t)
    m = mask.view(np.uint8)
    if cfg.close_radius > 0:
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, disk(cfg.close_radius))
    if cfg.open_radius > 0:
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, disk(cfg.open_radius))
    mask, ncomp = remove_small(m, cfg.min_area, return_count=True)
    sk = None
    if cfg.max_width > 0 and ncomp:
        mask, sk, ncomp = remove_wide(mask, cfg.max_width)
    if not cfg.skeleton:
        return PostResult(mask, None, {"area_px": int(cv2.countNonZero(mask.view(np.uint8))), "components": ncomp}, t)
    if sk is None:
        sk = skeletonize(mask)
    return PostResult(mask, sk, measure(mask, sk, mm_per_px, components=ncomp), t)


def remove_wide(mask: np.ndarray, max_width: float, skeleton: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop the 8-connected components whose mean width (pixels / skeleton pixels) exceeds ``max_width``.
    Returns (mask, its skeleton, components kept); ``skeleton``: the mask's, when already known."""
    m8 = mask.view(np.uint8) if mask.dtype == bool else (mask != 0).astype(np.uint8)
    sk = skeletonize(m8.view(bool)) if skeleton is None else np.asarray(skeleton, bool)
    x0, y0, bw, bh = cv2.boundingRect(m8)
    if bw == 0:
        return m8.view(bool), sk, 0
    sub = m8[y0:y0 + bh, x0:x0 + bw]
    n, lab = cv2.connectedComponents(sub, connectivity=8)
    area = np.bincount(lab.ravel(), minlength=n)
    skl = np.bincount(lab[sk[y0:y0 + bh, x0:x0 + bw]], minlength=n)
    wide = area > max_width * np.maximum(skl, 1)
    wide[0] = False
    if not wide.any():
        return m8.view(bool), sk, n - 1
    out = m8.copy()
    o = out[y0:y0 + bh, x0:x0 + bw]
    o[wide[lab]] = 0
    sko = sk.copy()
    sko[y0:y0 + bh, x0:x0 + bw][wide[lab]] = False
    return out.view(bool), sko, int(n - 1 - wide[1:].sum())
