"""crackcam.tools.metrics on hand-made masks with known answers."""

import numpy as np
import pytest

from crackcam.tools.metrics import BinaryScorer, MapScorer, binary_counts, prf


def _line_mask():
    gt = np.zeros((40, 40), bool)
    gt[20, 5:35] = True  # 30 px
    return gt


def test_perfect_and_empty_prediction():
    gt = _line_mask()
    f = binary_counts(gt, gt).figures()
    assert f == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "iou": 1.0}
    e = binary_counts(np.zeros_like(gt), gt).figures()
    assert e["f1"] == 0.0 and e["recall"] == 0.0 and e["precision"] == 1.0 and e["iou"] == 0.0
    assert prf(0, 0, 0, 0)["f1"] == 1.0  # nothing to find, nothing found


def test_known_counts_and_one_pixel_shift_with_tolerance():
    gt = _line_mask()
    pred = np.zeros_like(gt)
    pred[20, 5:20] = True  # half the line
    pred[5, 5:15] = True  # 10 false positives far away
    f = binary_counts(pred, gt).figures()
    assert f["precision"] == pytest.approx(15 / 25) and f["recall"] == pytest.approx(15 / 30)
    assert f["iou"] == pytest.approx(15 / 40)
    shifted = np.roll(gt, 1, axis=0)  # one pixel down
    assert binary_counts(shifted, gt, 0).figures()["f1"] == 0.0
    assert binary_counts(shifted, gt, 2).figures()["f1"] == 1.0
    far = np.roll(gt, 3, axis=0)
    assert binary_counts(far, gt, 2).figures()["f1"] == 0.0
    diag = np.roll(np.roll(gt, 1, axis=0), 1, axis=1)  # √2 away: within 2, not within 1
    assert binary_counts(diag, gt, 2).figures()["precision"] == 1.0
    assert binary_counts(diag, gt, 1).figures()["precision"] < 1.0


def test_map_scorer_matches_binary_counts_and_ods_ois():
    rng = np.random.default_rng(0)
    gt1 = _line_mask()
    gt2 = np.zeros((40, 40), bool)
    gt2[5:35, 10] = True
    # image 1: crack at 0.8, clutter at 0.5 → best threshold in (0.5, 0.8]
    m1 = np.where(gt1, 0.8, 0.0).astype(np.float32)
    m1[2:8, 2:30] = 0.5
    # image 2: crack at 0.3, clutter at 0.1 → best threshold in (0.1, 0.3]
    m2 = np.where(gt2, 0.3, 0.0).astype(np.float32)
    m2[30:38, 20:38] = 0.1
    s = MapScorer(n_bins=100, tolerances=(0, 2))
    s.add(m1, gt1, "a")
    s.add(m2, gt2, "b")
    # every threshold agrees with the direct binary count
    for t in (0.05, 0.1, 0.25, 0.3, 0.5, 0.6, 0.8, 0.9):
        for tol in (0, 2):
            c = binary_counts(m1 >= t, gt1, tol) + binary_counts(m2 >= t, gt2, tol)
            a = s.at(t, tol)
            for k in ("precision", "recall", "f1", "iou"):
                assert a[k] == pytest.approx(c.figures()[k]), (t, tol, k)
    ois = s.ois(0)
    assert ois["f1"] == pytest.approx(1.0)
    assert 0.5 < ois["thresholds"][0] <= 0.8 and 0.1 < ois["thresholds"][1] <= 0.3
    ods = s.ods(0)
    # one threshold for both: ≤ 0.3 keeps image 1's clutter (168 px), > 0.3 loses image 2's crack (30 px)
    assert ods["f1"] < 1.0
    assert ods["f1"] == pytest.approx(max(2 * 60 / (60 + 168 + 60), 2 * 30 / (30 + 60)))
    # the curve is monotone in recall
    c = s.curve(0)
    assert np.all(np.diff(c["recall"]) <= 1e-12)
    # random maps: sweep == direct counts at grid thresholds
    s2 = MapScorer(n_bins=50, tolerances=(0, 2))
    maps, gts = [], []
    for i in range(3):
        g = rng.random((30, 30)) < 0.05
        m = np.clip(rng.random((30, 30)) * 0.6 + 0.4 * g, 0, 1).astype(np.float32)
        maps.append(m)
        gts.append(g)
        s2.add(m, g)
    for k in (5, 20, 37):
        t = k / 50
        tot = None
        for m, g in zip(maps, gts):
            c = binary_counts(m >= t, g, 2)
            tot = c if tot is None else tot + c
        assert s2.at(t, 2)["f1"] == pytest.approx(tot.figures()["f1"])


def test_binary_scorer_sums_over_images():
    gt = _line_mask()
    b = BinaryScorer((0, 2))
    b.add(gt, gt, "x")
    b.add(np.zeros_like(gt), gt, "y")
    assert b.figures(0)["recall"] == pytest.approx(0.5) and b.figures(0)["precision"] == 1.0
    assert [r["name"] for r in b.per_image] == ["x", "y"] and b.per_image[1]["f1_t0"] == 0.0
