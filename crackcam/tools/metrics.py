"""Crack-map scores: precision, recall, F1, IoU of the crack class over all pixels of a split; ODS / OIS; tolerance.

Rules (the same as ``crackcam.runtime.postprocess.binarize``): at threshold ``t`` a pixel is predicted crack when
``map >= t`` and ``map > 0``.  Counts are summed over every pixel of the split, then turned into figures.

Tolerance ``t`` px: a predicted pixel is a true positive when a mask pixel lies within Euclidean distance ``t``
(precision side), and a mask pixel is recalled when a predicted pixel lies within ``t`` (recall side).  At ``t = 0``
both are the plain pixel match.  IoU at tolerance uses ``TP_r / (G + FP)`` with ``FP = P − TP_p`` (= the plain
IoU at ``t = 0``).

Sweeps are one pass: for each image we keep histograms (``n_bins`` + 1 bins of the map value) of (a) every pixel,
(b) the pixels within ``t`` of the mask and (c) over mask pixels, the map grey-dilated by a disk of radius ``t``;
reverse cumulative sums give the counts at every threshold ``k / n_bins`` exactly (up to the binning).

``valid`` (bool H×W, optional everywhere): pixels outside it are skipped — neither hit nor false alarm nor missed
(PaveSeg's ``ignore/`` alligator areas, pixels outside the region of interest).

Conventions for empty sets: precision = 1 when nothing is predicted, recall = 1 when the mask is empty,
F1 = 0 when precision + recall = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from crackcam.runtime.postprocess import disk

__all__ = ["Counts", "prf", "binary_counts", "MapScorer", "BinaryScorer"]


@dataclass
class Counts:
    """Pixel counts: ``pred`` predicted crack, ``tp_p`` predicted pixels that hit the mask (within tolerance),
    ``gt`` mask pixels, ``tp_r`` mask pixels recalled (within tolerance)."""

    pred: float = 0
    tp_p: float = 0
    gt: float = 0
    tp_r: float = 0

    def __add__(self, o: "Counts") -> "Counts":
        return Counts(self.pred + o.pred, self.tp_p + o.tp_p, self.gt + o.gt, self.tp_r + o.tp_r)

    def figures(self) -> dict:
        return prf(self.pred, self.tp_p, self.gt, self.tp_r)


def prf(pred, tp_p, gt, tp_r):
    """precision, recall, F1, IoU from counts (scalars or arrays; see the module docstring for empty sets)."""
    pred, tp_p, gt, tp_r = (np.asarray(v, np.float64) for v in (pred, tp_p, gt, tp_r))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(pred > 0, tp_p / np.maximum(pred, 1e-12), 1.0)
        r = np.where(gt > 0, tp_r / np.maximum(gt, 1e-12), 1.0)
        f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
        denom = gt + pred - tp_p
        iou = np.where(denom > 0, tp_r / np.maximum(denom, 1e-12), 1.0)
    out = {"precision": p, "recall": r, "f1": f, "iou": iou}
    if p.ndim == 0:
        out = {k: float(v) for k, v in out.items()}
    return out


def _near_and_dilate(gt: np.ndarray, tol: int):
    """(pixels within ``tol`` of the mask, disk element) for a bool mask."""
    if tol <= 0:
        return gt, None
    if not gt.any():
        return np.zeros_like(gt), disk(tol)
    dist = cv2.distanceTransform((~gt).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist <= tol + 1e-4, disk(tol)


def _apply_valid(pred, gt, valid):
    if valid is None:
        return pred, gt
    valid = np.asarray(valid, bool)
    if valid.shape != gt.shape:
        raise ValueError(f"valid mask {valid.shape} and mask {gt.shape} differ in size")
    return pred & valid, gt & valid


def binary_counts(pred: np.ndarray, gt: np.ndarray, tol: int = 0, valid: np.ndarray | None = None) -> Counts:
    """Counts for one binary prediction against one mask at tolerance ``tol`` px (``valid``: pixels to score)."""
    pred = np.asarray(pred, bool)
    gt = np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and mask {gt.shape} differ in size")
    pred, gt = _apply_valid(pred, gt, valid)
    near, k = _near_and_dilate(gt, tol)
    if k is None:
        tp = int(np.count_nonzero(pred & gt))
        return Counts(int(np.count_nonzero(pred)), tp, int(np.count_nonzero(gt)), tp)
    pd = cv2.dilate(pred.astype(np.uint8), k).astype(bool)
    return Counts(int(np.count_nonzero(pred)), int(np.count_nonzero(pred & near)), int(np.count_nonzero(gt)),
                  int(np.count_nonzero(pd & gt)))


class BinaryScorer:
    """Sums :func:`binary_counts` over images, per tolerance; keeps per-image figures."""

    def __init__(self, tolerances=(0, 2)):
        self.tolerances = tuple(int(t) for t in tolerances)
        self.total = {t: Counts() for t in self.tolerances}
        self.per_image: list[dict] = []

    def add(self, pred: np.ndarray, gt: np.ndarray, name: str = "", valid: np.ndarray | None = None) -> dict:
        row = {"name": name}
        for t in self.tolerances:
            c = binary_counts(pred, gt, t, valid)
            self.total[t] = self.total[t] + c
            for k, v in c.figures().items():
                row[f"{k}_t{t}"] = v
        self.per_image.append(row)
        return row

    def figures(self, tol: int) -> dict:
        return self.total[tol].figures()


class MapScorer:
    """Threshold sweeps over a split of crack maps (float H×W on [0, 1]) against bool masks.

    ``thresholds[k-1] = k / n_bins`` for ``k = 1..n_bins``.  After :meth:`add` on every image, :meth:`curve`,
    :meth:`ods`, :meth:`ois` and :meth:`at` give the figures.
    """

    def __init__(self, n_bins: int = 100, tolerances=(0, 2)):
        self.n_bins = int(n_bins)
        self.tolerances = tuple(int(t) for t in tolerances)
        self.thresholds = np.arange(1, self.n_bins + 1) / self.n_bins
        self._pred: list[np.ndarray] = []  # per image: counts of pixels predicted at each threshold
        self._tp_p: dict[int, list[np.ndarray]] = {t: [] for t in self.tolerances}
        self._tp_r: dict[int, list[np.ndarray]] = {t: [] for t in self.tolerances}
        self._gt: list[int] = []
        self.names: list[str] = []

    def _rcum(self, values: np.ndarray) -> np.ndarray:
        """Counts of ``values >= k/n_bins`` (and > 0) for k = 1..n_bins."""
        if values.size == 0:
            return np.zeros(self.n_bins, np.int64)
        b = np.floor(np.clip(values, 0, 1) * self.n_bins + 1e-6).astype(np.int64)
        h = np.bincount(b.ravel(), minlength=self.n_bins + 1)
        return np.cumsum(h[::-1])[::-1][1:]

    def add(self, crack_map: np.ndarray, gt: np.ndarray, name: str = "", valid: np.ndarray | None = None) -> None:
        m = np.asarray(crack_map, np.float32)
        gt = np.asarray(gt, bool)
        if m.shape != gt.shape:
            raise ValueError(f"{name}: map {m.shape} and mask {gt.shape} differ in size")
        if valid is not None:
            valid = np.asarray(valid, bool)
            if valid.shape != gt.shape:
                raise ValueError(f"{name}: valid mask {valid.shape} and mask {gt.shape} differ in size")
            m = np.where(valid, m, np.float32(0))
            gt = gt & valid
        self._pred.append(self._rcum(m))
        self._gt.append(int(np.count_nonzero(gt)))
        for t in self.tolerances:
            near, k = _near_and_dilate(gt, t)
            self._tp_p[t].append(self._rcum(m[near]))
            md = m if k is None else cv2.dilate(m, k)
            self._tp_r[t].append(self._rcum(md[gt]))
        self.names.append(name)

    def __len__(self) -> int:
        return len(self._gt)

    def curve(self, tol: int = 0, subset=None) -> dict:
        """Split-level precision/recall/F1/IoU arrays over :attr:`thresholds` (``subset``: indices of the images
        added, in :meth:`add` order, to count; None = all)."""
        if subset is None:
            pred, tp_p, gt, tp_r = self._pred, self._tp_p[tol], self._gt, self._tp_r[tol]
        else:
            idx = [int(i) for i in subset]
            if not idx:
                raise ValueError("no image to score")
            pred, tp_p = [self._pred[i] for i in idx], [self._tp_p[tol][i] for i in idx]
            gt, tp_r = [self._gt[i] for i in idx], [self._tp_r[tol][i] for i in idx]
        return prf(np.sum(pred, axis=0), np.sum(tp_p, axis=0), float(np.sum(gt)), np.sum(tp_r, axis=0))

    def index_of(self, threshold: float) -> int:
        """Index into :attr:`thresholds` of the grid value closest to ``threshold``."""
        return int(np.clip(round(float(threshold) * self.n_bins) - 1, 0, self.n_bins - 1))

    def at(self, threshold: float, tol: int = 0) -> dict:
        c = self.curve(tol)
        i = self.index_of(threshold)
        return {"threshold": float(self.thresholds[i]), **{k: float(v[i]) for k, v in c.items()}}

    def ods(self, tol: int = 0, subset=None) -> dict:
        """Optimal dataset scale: the best split-level F1 over the sweep and its threshold (``subset``: as in
        :meth:`curve`)."""
        c = self.curve(tol, subset)
        i = int(np.argmax(c["f1"]))
        return {"threshold": float(self.thresholds[i]), **{k: float(v[i]) for k, v in c.items()}}

    def per_image_f1(self, tol: int = 0) -> np.ndarray:
        """n_images × n_bins F1 of each image at each threshold."""
        return prf(np.asarray(self._pred), np.asarray(self._tp_p[tol]), np.asarray(self._gt)[:, None],
                   np.asarray(self._tp_r[tol]))["f1"]

    def ois(self, tol: int = 0) -> dict:
        """Optimal image scale: the best F1 of each image (its own threshold), averaged over images."""
        f = self.per_image_f1(tol)
        best = f.max(axis=1)
        return {"f1": float(best.mean()), "thresholds": self.thresholds[f.argmax(axis=1)].tolist()}
