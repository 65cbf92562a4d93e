"""Survey-frame geometry: work scale, region of interest, native-scale tiling, per-tile gating, frame decision.

NumPy + OpenCV only.  One implementation serves ``crack-run`` (:mod:`crackcam.runtime.pipeline`) and ``crack-eval``
(:mod:`crackcam.tools.frames`): a figure from the evaluation is what the runtime runs.

A frame goes through these pure steps:

1. :func:`plan_frame` — the **work scale** ``s = work_scale(H, W, scale, max_side)`` (the frame is resized by
   ``s`` so crack widths in pixels match what the model learned; ``max_side`` caps the longer side), then the
   tile grid on the work image: tiles of the model's fixed size (or ``tile`` px for a dynamic model; one tile =
   the whole work image otherwise) with at least ``overlap`` px of overlap, the last one flush with the border;
   a work image smaller than a tile is padded (reflect).
2. :func:`cut_tiles` — the uint8 tiles of one frame (BGR, as the model takes them).
3. :func:`merge_tiles` — **per-tile gating** (a tile whose crack probability is below ``gate`` contributes an
   all-zero map), a weighted blend of the tile maps (linear ramps over the overlap), crop, resize back to the
   frame, and the **ROI** (outside it the map is 0).  Maps are absolute: nothing is min–max stretched here, so an
   empty tile stays empty.  The frame probability is the largest probability of a tile that touches the ROI.
4. :func:`decide_frame` — ``cracked`` when the cleaned mask's skeleton is at least ``min_length`` px long.

The ROI is one or more polygons in frame-relative coordinates (0..1, ``[[x, y], ...]``) or a mask PNG (non-zero =
inside), optionally for one frame size only (``roi_size`` = [W, H]: a camera's hood line belongs to that
camera; frames of another size are processed whole).  :func:`parse_roi` reads the command-line forms.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

__all__ = ["PASSES", "SurveyConfig", "FramePlan", "RoiError", "work_scale", "tile_origins", "blend_window", "plan_frame",
           "cut_tiles", "work_image", "merge_tiles", "frame_map", "stitch", "roi_mask", "parse_roi", "decide_frame"]


PASSES = ("tiles", "frame", "cascade")  # SurveyConfig.model_pass


class RoiError(ValueError):
    """A region of interest that cannot be used; one line naming the problem (and the file, for a PNG)."""


def work_scale(h: int, w: int, scale: float = 1.0, max_side: int | None = None) -> float:
    """The resize factor of an ``h``×``w`` frame: ``scale``, lowered so that the longer side is at most
    ``max_side`` (never raised)."""
    s = float(scale)
    if max_side:
        s = min(s, float(max_side) / max(h, w))
    return s


@dataclass
class SurveyConfig:
    """How a frame is cut, gated and decided (see the module docstring).  Stored in the recipe and in the
    exported model's metadata (``"survey"``); crack-run options override single fields."""

    scale: float = 1.0
    max_side: int | None = None
    tile: int | None = None  # dynamic-size models: tile size in px at work scale (None = the whole frame)
    overlap: int = 32  # px at work scale
    gate: float = 0.0  # per-tile crack probability below which the tile's map is zero
    roi: list | None = None  # polygons [[x, y], ...] in frame-relative coordinates (0..1)
    roi_mask: str | None = None  # or a mask PNG (non-zero = inside)
    roi_size: list | None = None  # [W, H]: the ROI applies to frames of this size only
    min_length: float = 0.0  # px (frame scale): a frame is cracked when its crack skeleton is this long
    # How a frame-pass graph (crackcam.export.frame_pass) meets the tiles: "frame" (one pass over the work image,
    # each tile read out of it), "cascade" (that pass proposes: the tiles whose one-pass probability is at least
    # gate - recheck are run again as tiles, and their probabilities and maps replace the read-out ones),
    # "tiles" (every tile through the graph, as the tile graph).  None: "frame" for a frame-pass graph, "tiles"
    # for a tile graph (which can only run tiles).
    model_pass: str | None = None
    recheck: float = 0.0  # cascade: the margin below the gate within which a proposed tile is re-run

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not (isinstance(self.scale, (int, float)) and 0 < float(self.scale) <= 4):
            raise ValueError(f"survey scale {self.scale!r} must be a number in (0, 4]")
        if self.max_side is not None and (not isinstance(self.max_side, int) or self.max_side < 16):
            raise ValueError(f"survey max_side {self.max_side!r} must be an integer >= 16 or null")
        if self.tile is not None and (not isinstance(self.tile, int) or self.tile < 16):
            raise ValueError(f"survey tile {self.tile!r} must be an integer >= 16 or null")
        if not isinstance(self.overlap, int) or self.overlap < 0:
            raise ValueError(f"survey overlap {self.overlap!r} must be a non-negative integer (px)")
        if not float(self.gate) >= 0.0:
            raise ValueError(f"survey gate {self.gate!r} must be >= 0 (above 1 every tile is gated)")
        if float(self.min_length) < 0:
            raise ValueError(f"survey min_length {self.min_length!r} must be >= 0")
        if self.model_pass not in (None,) + PASSES:
            raise ValueError(f"survey model_pass {self.model_pass!r} must be one of {', '.join(PASSES)} (or null)")
        if isinstance(self.recheck, bool) or not (isinstance(self.recheck, (int, float))
                                                  and 0 <= float(self.recheck) <= 1):
            raise ValueError(f"survey recheck {self.recheck!r} must be a number in [0, 1]")
        if self.roi is not None:
            self.roi = _check_polygons(self.roi)
        if self.roi_size is not None:
            if (not isinstance(self.roi_size, (list, tuple)) or len(self.roi_size) != 2
                    or not all(isinstance(v, int) and v > 0 for v in self.roi_size)):
                raise ValueError(f"survey roi_size {self.roi_size!r} must be [width, height] in px")
            self.roi_size = [int(v) for v in self.roi_size]

    @property
    def has_roi(self) -> bool:
        return self.roi is not None or self.roi_mask is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "SurveyConfig":
        """From a dict (recipe / metadata ``survey`` block); unknown keys → ValueError naming them."""
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown survey keys: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **kw) -> "SurveyConfig":
        return SurveyConfig.from_dict({**self.to_dict(), **{k: v for k, v in kw.items() if v is not None}})


# --------------------------------------------------------------------------------------------- ROI
def _check_polygons(roi) -> list:
    """``[[x, y], ...]`` or a list of such polygons → a list of polygons of float pairs in [0, 1]."""
    if not isinstance(roi, (list, tuple)) or not roi:
        raise RoiError("ROI polygon is empty (give at least 3 points x,y)")
    polys = [roi] if _is_point(roi[0]) else list(roi)
    out = []
    for poly in polys:
        if not isinstance(poly, (list, tuple)) or len(poly) < 3 or not all(_is_point(p) for p in poly):
            raise RoiError(f"ROI polygon {poly!r} needs at least 3 points [x, y]")
        pts = [[float(p[0]), float(p[1])] for p in poly]
        bad = [p for p in pts if not (-1e-9 <= p[0] <= 1 + 1e-9 and -1e-9 <= p[1] <= 1 + 1e-9)]
        if bad:
            raise RoiError(f"ROI point {bad[0][0]:g},{bad[0][1]:g} lies outside the frame (frame-relative "
                           f"coordinates run from 0 to 1)")
        area = 0.5 * abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(pts, pts[1:] + pts[:1])))
        if area <= 1e-6:
            raise RoiError("ROI polygon encloses no area")
        out.append(pts)
    return out


def _is_point(p) -> bool:
    return (isinstance(p, (list, tuple)) and len(p) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p))


def parse_roi(text: str) -> dict:
    """The ``--roi`` forms → ``{"roi": polygons}`` or ``{"roi_mask": path}``:

    * ``"x,y x,y x,y ..."`` — one polygon, frame-relative (``;`` separates several polygons);
    * a JSON list (``[[x, y], ...]`` or a list of polygons), inline or in a ``.json`` file;
    * a ``.png`` (or other image) mask file: non-zero = inside.
    """
    t = str(text).strip()
    if not t:
        raise RoiError("--roi is empty")
    p = Path(t)
    if p.suffix.lower() in (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg"):
        _read_roi_png(p)  # checked now: a bad file is one line before the run starts
        return {"roi_mask": str(p)}
    if p.suffix.lower() == ".json":
        if not p.is_file():
            raise RoiError(f"{p}: ROI file not found")
        try:
            t = p.read_text()
        except OSError as e:
            raise RoiError(f"{p}: cannot read ({e.strerror})") from None
    if t.lstrip().startswith("["):
        try:
            val = json.loads(t)
        except json.JSONDecodeError as e:
            raise RoiError(f"ROI is not valid JSON ({e.msg})") from None
        return {"roi": _check_polygons(val)}
    polys = []
    for part in t.split(";"):
        pts = []
        for tok in part.split():
            xy = tok.split(",")
            try:
                if len(xy) != 2:
                    raise ValueError
                pts.append([float(xy[0]), float(xy[1])])
            except ValueError:
                raise RoiError(f"ROI point {tok!r} is not x,y (frame-relative numbers, e.g. 0,0.85)") from None
        polys.append(pts)
    return {"roi": _check_polygons(polys)}


def _read_roi_png(path: Path) -> np.ndarray:
    if not path.is_file():
        raise RoiError(f"{path}: ROI mask file not found")
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise RoiError(f"{path}: not a readable image (ROI mask PNG: non-zero = inside)")
    if not m.any():
        raise RoiError(f"{path}: ROI mask is empty (no non-zero pixel)")
    return m > 0


_ROI_CACHE: dict = {}
_ROI_LOCK = threading.Lock()


def roi_mask(shape: tuple[int, int], cfg: SurveyConfig) -> np.ndarray | None:
    """The bool H×W ROI of a frame of ``shape`` (None = the whole frame); cached per shape and ROI."""
    if not cfg.has_roi:
        return None
    H, W = int(shape[0]), int(shape[1])
    if cfg.roi_size is not None and [W, H] != list(cfg.roi_size):
        return None
    key = (H, W, json.dumps(cfg.roi), cfg.roi_mask)
    with _ROI_LOCK:
        m = _ROI_CACHE.get(key)
    if m is None:
        if cfg.roi_mask is not None:
            m = _read_roi_png(Path(cfg.roi_mask))
            if m.shape != (H, W):
                m = cv2.resize(m.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST) > 0
        else:
            u8 = np.zeros((H, W), np.uint8)
            for poly in cfg.roi:
                pts = np.array([[x * W, y * H] for x, y in poly], np.float64)
                cv2.fillPoly(u8, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
            m = u8.astype(bool)
        with _ROI_LOCK:
            if len(_ROI_CACHE) > 32:
                _ROI_CACHE.clear()
            _ROI_CACHE[key] = m
    return m


# --------------------------------------------------------------------------------------------- tiling
def tile_origins(size: int, tile: int, overlap: int) -> list[int]:
    """Origins along one axis so that tiles of ``tile`` px cover ``size`` px with at least ``overlap`` px of
    overlap, spread evenly: the first at 0, the last at ``size - tile``."""
    if size <= tile:
        return [0]
    step = max(1, tile - max(0, min(overlap, tile - 1)))
    n = math.ceil((size - tile) / step) + 1
    return [int(round(i * (size - tile) / (n - 1))) for i in range(n)]


def blend_window(h: int, w: int, overlap: int) -> np.ndarray:
    """Weights for stitching: 1 in the middle, linear ramps over ``overlap`` px at each edge (never 0)."""
    def ramp(n):
        if overlap <= 0:
            return np.ones(n, np.float32)
        i = np.arange(n, dtype=np.float32)
        r = np.minimum(np.minimum((i + 0.5) / overlap, (n - i - 0.5) / overlap), 1.0)
        return np.maximum(r, 1e-3)
    return np.outer(ramp(h), ramp(w)).astype(np.float32)


@dataclass
class FramePlan:
    """Where one frame's tiles come from: frame shape, work scale and shape, padded shape, tile origins."""

    shape: tuple  # (H, W) of the frame
    scale: float
    work_shape: tuple  # (h, w) of the resized frame
    padded_shape: tuple  # (h', w') >= tile: the work image after reflect padding
    tile: tuple  # (th, tw)
    coords: list = field(default_factory=list)  # [(y, x)] tile origins in the padded work image
    overlap: int = 0
    # (frame, its work image): the tiles and the refinement of one frame share one resize (INTER_AREA at a
    # non-integer factor costs 7-11 ms per frame here)
    _work: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def n_tiles(self) -> int:
        return len(self.coords)


def plan_frame(shape: tuple, cfg: SurveyConfig, fixed_size: tuple | None = None) -> FramePlan:
    """The tile plan of a frame of ``shape`` (H, W[, C]) for a model of ``fixed_size`` (th, tw) or a dynamic one."""
    H, W = int(shape[0]), int(shape[1])
    s = work_scale(H, W, cfg.scale, cfg.max_side)
    h, w = (H, W) if s == 1.0 else (max(1, round(H * s)), max(1, round(W * s)))
    if fixed_size is not None:
        th, tw = int(fixed_size[0]), int(fixed_size[1])
    elif cfg.tile:
        th = tw = int(cfg.tile)
    else:
        th, tw = h, w
    ph, pw = max(h, th), max(w, tw)
    ov = max(0, min(int(cfg.overlap), min(th, tw) // 2))
    coords = [(y, x) for y in tile_origins(ph, th, ov) for x in tile_origins(pw, tw, ov)]
    return FramePlan((H, W), s, (h, w), (ph, pw), (th, tw), coords, ov)


def work_image(image: np.ndarray, plan: FramePlan) -> np.ndarray:
    """The frame resized to the work scale (INTER_AREA) and reflect-padded to at least one tile; made once per
    frame and plan (kept on the plan for the same ``image`` object; treat it as read-only)."""
    cached = plan._work
    if cached is not None and cached[0] is image:
        return cached[1]
    h, w = plan.work_shape
    img = image if (h, w) == tuple(image.shape[:2]) else cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    ph, pw = plan.padded_shape
    if (ph, pw) != (h, w):
        mode = cv2.BORDER_REFLECT_101 if min(h, w) > 1 else cv2.BORDER_REPLICATE
        img = cv2.copyMakeBorder(img, 0, ph - h, 0, pw - w, mode)
    plan._work = (image, img)
    return img


def cut_tiles(image: np.ndarray, plan: FramePlan) -> list[np.ndarray]:
    """The tiles of ``plan`` from the frame ``image`` (uint8, any channel order; views where possible)."""
    work = work_image(image, plan)
    th, tw = plan.tile
    return [work[y:y + th, x:x + tw] for y, x in plan.coords]


_WSUM_CACHE: dict = {}
_WSUM_LOCK = threading.Lock()


def _inv_weight_sum(coords: tuple, shape: tuple, th: int, tw: int, overlap: int) -> np.ndarray:
    key = (coords, shape, th, tw, overlap)
    with _WSUM_LOCK:
        inv = _WSUM_CACHE.get(key)
    if inv is None:
        win = blend_window(th, tw, overlap)
        wsum = np.zeros(shape, np.float32)
        for y, x in coords:
            wsum[y:y + th, x:x + tw] += win
        inv = 1.0 / np.maximum(wsum, 1e-12)
        with _WSUM_LOCK:
            if len(_WSUM_CACHE) > 16:
                _WSUM_CACHE.clear()
            _WSUM_CACHE[key] = inv
    return inv


def stitch(maps: list[np.ndarray], coords: list, shape: tuple, overlap: int, keep=None) -> np.ndarray:
    """Weighted blend of tile maps into one ``shape`` map: Σ wᵢ·mᵢ / Σ wᵢ with :func:`blend_window` weights.
    ``keep`` (bool per tile): the tiles whose maps count; the others are zero maps (gated), which add nothing to
    the sum, so they are skipped — the weights Σ wᵢ still run over every tile."""
    H, W = shape
    if keep is None:
        keep = [True] * len(maps)
    if len(maps) == 1 and tuple(coords[0]) == (0, 0) and maps[0].shape == (H, W):
        return np.asarray(maps[0], np.float32) if keep[0] else np.zeros((H, W), np.float32)
    acc = np.zeros((H, W), np.float32)
    if not any(keep):
        return acc
    th, tw = np.asarray(maps[0]).shape
    win = blend_window(th, tw, overlap)
    tmp = np.empty((th, tw), np.float32)
    for m, (y, x), k in zip(maps, coords, keep):
        if k:
            np.multiply(m, win, out=tmp)
            acc[y:y + th, x:x + tw] += tmp
    acc *= _inv_weight_sum(tuple(map(tuple, coords)), (H, W), th, tw, overlap)
    return acc


def tile_keep(plan: FramePlan, probs, cfg: SurveyConfig, roi: np.ndarray | None = None) -> np.ndarray:
    """Bool per tile: its probability reaches the gate."""
    p = np.asarray(probs, np.float32).reshape(-1)
    return p >= float(cfg.gate) if cfg.gate > 0 else np.ones(len(p), bool)


def _tiles_in_roi(plan: FramePlan, roi: np.ndarray | None) -> np.ndarray:
    """Bool per tile: the tile covers some ROI pixel (all True without an ROI)."""
    if roi is None:
        return np.ones(plan.n_tiles, bool)
    H, W = plan.shape
    th, tw = plan.tile
    s = plan.scale
    out = np.zeros(plan.n_tiles, bool)
    for i, (y, x) in enumerate(plan.coords):
        y0, x0 = int(y / s), int(x / s)
        y1, x1 = min(H, int(math.ceil((y + th) / s))), min(W, int(math.ceil((x + tw) / s)))
        out[i] = y1 > y0 and x1 > x0 and bool(roi[y0:y1, x0:x1].any())
    return out


def merge_tiles(plan: FramePlan, probs, maps, cfg: SurveyConfig) -> tuple[np.ndarray, float, np.ndarray]:
    """Gate and stitch the tile maps into the work-scale map (h×w float32).  Returns ``(work map, frame prob,
    tile probs)``; the frame probability is the largest probability of a tile touching the ROI."""
    probs = np.asarray(probs, np.float32).reshape(-1)
    if probs.size != plan.n_tiles or len(maps) != plan.n_tiles:
        raise ValueError(f"merge_tiles: {len(maps)} maps / {probs.size} probabilities for {plan.n_tiles} tiles")
    keep = tile_keep(plan, probs, cfg)
    h, w = plan.work_shape
    work = stitch([np.asarray(m, np.float32) for m in maps], plan.coords, plan.padded_shape, plan.overlap,
                  keep)[:h, :w]
    roi = roi_mask(plan.shape, cfg)
    if roi is not None:
        inside = _tiles_in_roi(plan, roi)
        prob = float(probs[inside].max()) if inside.any() else 0.0
    else:
        prob = float(probs.max()) if probs.size else 0.0
    return work, prob, probs


def frame_map(work: np.ndarray, plan: FramePlan, cfg: SurveyConfig) -> np.ndarray:
    """A work-scale map resized back to the frame (bilinear), zero outside the ROI."""
    H, W = plan.shape
    m = np.asarray(work, np.float32)
    if not m.any():  # every tile gated: the resize and the ROI of zeros are zeros
        return np.zeros((H, W), np.float32)
    if m.shape != (H, W):
        m = cv2.resize(m, (W, H), interpolation=cv2.INTER_LINEAR)
    roi = roi_mask((H, W), cfg)
    if roi is not None:
        m = m * roi
    return np.ascontiguousarray(m, np.float32)


def decide_frame(length_px: float, mask_any: bool, cfg: SurveyConfig) -> bool:
    """The frame decision: a non-empty mask whose skeleton is at least ``min_length`` px long."""
    return bool(mask_any) and float(length_px) >= float(cfg.min_length)
