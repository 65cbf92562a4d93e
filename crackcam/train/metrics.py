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
