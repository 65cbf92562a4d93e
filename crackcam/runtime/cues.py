"""Learning-free pixel-level crack cues and the CAM refinement.  NumPy + OpenCV only (no torch).

Cracks are thin (1–10 px) and darker than their surroundings.  The cues here score every pixel on [0, 1]:

* :func:`blackhat` — grey-level morphological black-hat (closing − image) with a few elliptic structuring
  elements, max over sizes, normalised by a high percentile of the frame.  The learning-free floor of crack-eval.
* :func:`ridge` — multi-scale dark-ridge (valley) response from the Hessian of the Gaussian-blurred grey image
  (largest eigenvalue, σ²-normalised, suppressed where the second eigenvalue says "blob" — a Frangi-like vesselness
  without the exp terms), max over scales.
* :func:`cue` — one entry point by name: ``"blackhat"``, ``"ridge"``, ``"bh+ridge"`` (geometric mean),
  ``"blackhat-fine"`` (small elements 7/11/15 px at full resolution: the classic setting, thin cracks only).

The refinement (:func:`refine`) turns a coarse class-activation map (1/8–1/32 of the input, blurry) into a crack
map with crack-width boundaries: the CAM is the *region prior* (where the classifier saw crack), the pixel cue is
the *boundary*.  Modes:

* ``"product"`` — ``cue^a · prior^b`` with the prior the CAM grey-dilated by ``dilate`` px (so a thin crack right
  at the edge of the blob keeps its support), then re-normalised to [0, 1] by its maximum;
* ``"component"`` — the cue's connected pieces (cue ≥ ``component_threshold``) each scaled by the mean of the
  dilated CAM prior over the piece (to the power ``prior_power``): a crack keeps its whole extent when part of it
  lies where the classifier looked, isolated texture responses far from the CAM vanish;
* ``"guided"`` — the CAM guided-filtered by the grey image (edge-aware upsampling), times the cue;
* ``"gate"`` — the cue where the prior exceeds ``prior_threshold`` (hard region mask), else 0.

The CAM itself comes from the model (``crackcam.models.cam`` or the ONNX graph); refinement is post-processing on
``(image, cam)`` and runs identically in the runtime and in the evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

__all__ = ["BLACKHAT_SIZES", "to_gray", "blackhat", "ridge", "cue", "CUES", "RefineConfig", "refine", "normalize_map"]


def to_gray(image: np.ndarray) -> np.ndarray:
    """float32 H×W on [0, 255] from uint8 RGB H×W×3 (or gray H×W)."""
    img = np.asarray(image)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.shape[2] == 3 else img[..., 0]
    return img.astype(np.float32)


def normalize_map(x: np.ndarray, percentile: float = 99.5, floor: float = 1e-6) -> np.ndarray:
    """Divide by the ``percentile``-th value (robust max) and clip to [0, 1]."""
    x = np.maximum(np.asarray(x, np.float32), 0)
    if percentile >= 100:
        s = float(x.max())
    else:
        # a percentile over a 4×-subsampled grid is as good and 10× cheaper than over every pixel
        s = float(np.percentile(x[::2, ::2], percentile))
    if s <= floor:
        s = float(x.max())
    if s <= floor:
        return np.zeros_like(x)
    return np.minimum(x * (1.0 / s), 1.0)


def _to_u16(x: np.ndarray, unit: float) -> np.ndarray:
    """``round(x · unit)`` as uint16, saturated to [0, 65535]."""
    y = np.asarray(x, np.float32) * np.float32(unit)
    y += np.float32(0.5)
    np.clip(y, 0, 65535, out=y)
    return y.astype(np.uint16)


BLACKHAT_SIZES = (61,)  # chosen on DeepCrack validation images (raw ODS F1), see docs/evaluation.md
BLACKHAT_BLUR = 2.0


def blackhat(image: np.ndarray, sizes=BLACKHAT_SIZES, blur: float = BLACKHAT_BLUR, percentile: float = 99.9,
             normalize: bool = True, scale: float = 0.5) -> np.ndarray:
    """Black-hat crack cue on [0, 1] (float32 H×W): max over ``sizes`` of closing(gray, ellipse) − gray.

    ``blur``: σ of a Gaussian applied to the grey image first (0 = off), suppresses texture and sensor noise.
    The closing fills dark structures narrower than the element, so sizes should exceed the widest crack
    (DeepCrack has cracks up to ~25 px wide).  ``scale`` < 1 computes the cue on a resized image (sizes and blur
    scaled alike) and resizes the result back — about 1/scale³ cheaper.
    """
    g = to_gray(image)
    h, w = g.shape
    if blur > 0:
        g = cv2.GaussianBlur(g, (0, 0), blur)
    if scale != 1.0:
        g = cv2.resize(g, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    # the closings run on 1/256-grey fixed point (uint16): max and min commute with that monotone rounding, so the
    # result is the float black-hat to within 1/256 grey level, and OpenCV's 16-bit morphology is about twice as fast
    q = _to_u16(g, 256.0)
    out = None
    for s in sizes:
        k = max(3, int(round(s * scale)) | 1)
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        r = cv2.morphologyEx(q, cv2.MORPH_BLACKHAT, k)
        out = r if out is None else np.maximum(out, r)
    out = out.astype(np.float32) * np.float32(1.0 / 256.0)
    if scale != 1.0:
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
    return normalize_map(out, percentile) if normalize else out


def ridge(image: np.ndarray, sigmas=(2.0, 4.0, 8.0), percentile: float = 99.9, normalize: bool = True
          ) -> np.ndarray:
    """Dark-ridge (valley) cue on [0, 1]: per scale σ, the Hessian eigenvalues λ1 ≥ λ2 of the blurred gray; a dark
    line has λ1 ≫ 0 and λ2 ≈ 0, so the response is σ²·(λ1 − |λ2|)₊; max over scales."""
    g = to_gray(image)
    out = None
    for s in sigmas:
        b = cv2.GaussianBlur(g, (0, 0), s)
        dxx = cv2.Sobel(b, cv2.CV_32F, 2, 0, ksize=3)
        dyy = cv2.Sobel(b, cv2.CV_32F, 0, 2, ksize=3)
        dxy = cv2.Sobel(b, cv2.CV_32F, 1, 1, ksize=3)
        tr = dxx + dyy
        disc = np.sqrt((dxx - dyy) ** 2 + 4.0 * dxy * dxy)
        l1 = 0.5 * (tr + disc)
        l2 = 0.5 * (tr - disc)
        r = (s * s) * np.maximum(l1 - np.abs(l2), 0)
        out = r if out is None else np.maximum(out, r)
    return normalize_map(out, percentile) if normalize else out


def _bh_ridge(image: np.ndarray) -> np.ndarray:
    return np.sqrt(blackhat(image) * ridge(image))


def _blackhat_fine(image: np.ndarray) -> np.ndarray:
    """The classic small-element black-hat (sizes 7/11/15, σ 1, full resolution) — thin cracks only."""
    return blackhat(image, sizes=(7, 11, 15), blur=1.0, percentile=99.5, scale=1.0)


CUES = {"blackhat": blackhat, "ridge": ridge, "bh+ridge": _bh_ridge, "blackhat-fine": _blackhat_fine}


def cue(image: np.ndarray, name: str = "blackhat") -> np.ndarray:
    """The pixel cue ``name`` (one of :data:`CUES`) of an RGB uint8 image, float32 H×W on [0, 1]."""
    try:
        fn = CUES[name]
    except KeyError:
        raise ValueError(f"unknown cue {name!r}; choose one of: {', '.join(CUES)}") from None
    return fn(image)


@dataclass
class RefineConfig:
    """How a CAM and a pixel cue are combined (see the module docstring)."""

    cue: str = "blackhat"
    mode: str = "product"  # product | component | guided | gate
    component_threshold: float = 0.3  # component mode: cue level that defines the components
    dilate: int = 8  # px, grey dilation of the CAM prior (product / gate)
    cue_power: float = 1.0
    prior_power: float = 1.0
    prior_threshold: float = 0.2  # gate mode
    guided_radius: int = 8  # guided mode
    guided_eps: float = 1e-3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "RefineConfig":
        """From a dict (e.g. a recipe's ``refine`` entry); keys that are not fields (``method``, ``threshold``…)
        are ignored, so a recipe or ONNX-metadata ``refine`` block can be passed whole."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (d or {}).items() if k in known})


def _prior(cam: np.ndarray, dilate: int) -> np.ndarray:
    """The CAM grey-dilated by a disk of radius ``dilate`` px: the region prior of the refinement.

    A CAM is smooth (bilinearly upsampled from stride 4–32), so radii of 16 px and more are dilated at half
    resolution: 2×2 block maximum (an upper bound of the map), a disk of half the radius, bilinear back up.
    About 5× cheaper than the full-resolution disk (which was the largest cost of a refined frame in crack-run)
    and within a few hundredths of it on CAM-like maps (tests/test_postprocess.py)."""
    p = np.clip(np.asarray(cam, np.float32), 0, 1)
    if dilate <= 0:
        return p
    h, w = p.shape
    if dilate < 16 or min(h, w) < 8:  # in 1/65535 fixed point (a max commutes with the rounding; 2× faster)
        q = cv2.dilate(_to_u16(p, 65535.0),
                       cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate + 1, 2 * dilate + 1)))
        return q.astype(np.float32) * np.float32(1.0 / 65535.0)
    H, W = h + h % 2, w + w % 2
    if (H, W) != (h, w):
        p = cv2.copyMakeBorder(p, 0, H - h, 0, W - w, cv2.BORDER_REPLICATE)
    q = cv2.dilate(p, np.ones((2, 2), np.uint8), anchor=(0, 0))[::2, ::2]  # max of each 2×2 block
    r = int(round(dilate / 2))
    q = cv2.dilate(q, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    return cv2.resize(q, (W, H), interpolation=cv2.INTER_LINEAR)[:h, :w]


def refine(image: np.ndarray, cam: np.ndarray, cfg: RefineConfig | None = None,
           cue_map: np.ndarray | None = None) -> np.ndarray:
    """Refine a CAM (float H×W on [0, 1], same size as ``image``, all zero when gated) with a pixel cue.

    Returns a float32 H×W map on [0, 1]; an all-zero CAM gives an all-zero map (gating is kept).
    ``cue_map`` may be passed when the cue is already computed.
    """
    cfg = cfg or RefineConfig()
    cam = np.asarray(cam, np.float32)
    if cam.shape != np.asarray(image).shape[:2]:
        cam = cv2.resize(cam, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    if not np.any(cam > 0):
        return np.zeros(cam.shape, np.float32)
    c = cue(image, cfg.cue) if cue_map is None else np.asarray(cue_map, np.float32)
    if cfg.mode == "product":
        p = _prior(cam, cfg.dilate)
        out = (c ** cfg.cue_power if cfg.cue_power != 1 else c) * (p ** cfg.prior_power if cfg.prior_power != 1 else p)
    elif cfg.mode == "component":
        p = _prior(cam, cfg.dilate)
        b = (c >= cfg.component_threshold).astype(np.uint8)
        n, lab = cv2.connectedComponents(b, connectivity=8)
        fg = b.ravel().view(bool)  # the component pixels only: the background's score is 0 anyway
        lf = lab.ravel()[fg]
        cnt = np.bincount(lf, minlength=n)
        score = np.bincount(lf, weights=p.ravel()[fg], minlength=n) / np.maximum(cnt, 1)
        score[0] = 0.0
        if cfg.prior_power != 1:
            score = score ** cfg.prior_power
        out = c * score.astype(np.float32)[lab]
    elif cfg.mode == "gate":
        out = c * (_prior(cam, cfg.dilate) >= cfg.prior_threshold)
    elif cfg.mode == "guided":
        g = to_gray(image) / 255.0
        p = cv2.ximgproc.guidedFilter(g, np.clip(cam, 0, 1), cfg.guided_radius, cfg.guided_eps)
        out = c * np.clip(p, 0, 1)
    else:
        raise ValueError(f"unknown refine mode {cfg.mode!r}; choose product, component, guided or gate")
    return np.clip(out, 0, 1).astype(np.float32)
