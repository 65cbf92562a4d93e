"""Binary classification metrics in NumPy (no sklearn): accuracy, precision, recall, F1, ROC-AUC, confusion."""

from __future__ import annotations

import numpy as np


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), np.float64)
    n = len(x)
    # group runs of equal values
    boundaries = np.flatnonzero(np.diff(xs) != 0) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [n]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of ranks s+1..e
    return ranks


def roc_auc(y_true, score) -> float | None:
    """Area under the ROC curve (Mann–Whitney U / (n_pos·n_neg)); None when only one class is present."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    r = average_ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(y_true, prob, threshold: float = 0.5) -> dict:
    """Metrics of the decision ``prob >= threshold`` against ``y_true`` (1 = crack)."""
    y = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(prob, np.float64).ravel()
    pred = p >= threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int((~pred & ~y).sum())
    n = tp + fp + fn + tn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auc": roc_auc(y, p),
        "confusion": [[tn, fp], [fn, tp]],  # rows: true 0/1, columns: predicted 0/1
        "threshold": threshold,
    }


def pixel_ods(maps, gts, valids=None, n_bins: int = 100) -> dict:
    """Threshold-free pixel F1 at t=0 over a set of maps (float H×W on [0, 1]) and bool masks: the best F1 of one
    threshold ``k / n_bins`` for the whole set (ODS), skipping pixels where ``valids`` is False.  Used to pick
    epochs and rounds while training; the reported figures come from ``crack-eval``."""
    tp = np.zeros(n_bins, np.int64)
    pp = np.zeros(n_bins, np.int64)
    n_gt = 0
    valids = valids if valids is not None else [None] * len(maps)
    for m, g, v in zip(maps, gts, valids):
        m = np.asarray(m, np.float32)
        g = np.asarray(g, bool)
        if v is not None:
            m, g = m[v], g[v]
        b = np.floor(np.clip(m, 0, 1) * n_bins + 1e-6).astype(np.int64).ravel()
        h_all = np.bincount(b, minlength=n_bins + 1)
        h_pos = np.bincount(b[g.ravel()], minlength=n_bins + 1)
        pp += np.cumsum(h_all[::-1])[::-1][1:]
        tp += np.cumsum(h_pos[::-1])[::-1][1:]
        n_gt += int(g.sum())
    prec = tp / np.maximum(pp, 1)
    rec = tp / max(n_gt, 1)
    f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-12)
    k = int(np.argmax(f1))
    return {"f1": float(f1[k]), "threshold": (k + 1) / n_bins, "precision": float(prec[k]), "recall": float(rec[k])}
