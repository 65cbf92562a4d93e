"""Calibration without masks (issue 13): the tile-label objective, the seeded mask budget, the multi-budget search."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from crackcam.tools.calibration import (
    CRACK_SHARES,
    MASK_FREE,
    FrameTiles,
    _BudgetView,
    _ItemMeta,
    frame_tiles,
    mask_choice,
    tile_counts,
    tile_hits,
    tile_max,
    tile_ods,
    tile_pixels,
    tile_rcum,
)
from crackcam.train.data import TileRule, scaled_mask, tile_labels

RULE = TileRule(tile=32, min_crack_px=12, border=4, margin=8)


def _line_frame(h=128, w=160):
    gt = np.zeros((h, w), np.uint8)
    cv2.line(gt, (5, 20), (150, 30), 1, 2)
    return gt.astype(bool)


def test_frame_tiles_are_the_training_rule_in_frame_pixels():
    gt = np.zeros((256, 320), np.uint8)
    cv2.line(gt, (10, 40), (300, 60), 1, 4)
    ft = frame_tiles(gt.astype(bool), RULE, 0.5)  # work scale 0.5: 32 px tiles there are 64 px here
    origins, lab = tile_labels(scaled_mask(gt.astype(bool), 0.5), RULE)
    keep = lab >= 0
    assert ft.size == 64 and len(ft.ys) == int(keep.sum())
    assert np.array_equal(ft.labels, lab[keep])
    assert np.array_equal(ft.ys, 2 * np.array([o[0] for o, k in zip(origins, keep) if k]))
    assert set(ft.labels.tolist()) == {0, 1}
    for y, x, lb in zip(ft.ys, ft.xs, ft.labels):  # a crack tile holds crack pixels, a crack-free one none
        box = gt[y:y + 64, x:x + 64]
        assert box.any() if lb == 1 else not box.any()
    roi = np.zeros(gt.shape, bool)
    roi[:128] = True
    ftr = frame_tiles(gt.astype(bool), RULE, 0.5, roi)
    assert np.array_equal(ftr.in_roi, ftr.ys + 32 < 128) and ftr.use(False).all()


def test_tile_objective_prefers_the_thin_map_and_a_painted_map_loses():
    gt = _line_frame()
    ft = frame_tiles(gt, RULE, 1.0)
    n_pos, n_neg = int((ft.labels == 1).sum()), int((ft.labels == 0).sum())
    assert n_pos >= 3 and n_neg >= 5
    thin = cv2.dilate(gt.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    paint = np.ones_like(gt)
    half = thin.copy()
    half[:, 80:] = False
    assert tile_counts(tile_hits(thin, ft), ft, False) == (n_pos, 0, 0)
    assert tile_counts(tile_hits(paint, ft), ft, False) == (n_pos, n_neg, 0)
    tp, fp, fn = tile_counts(tile_hits(half, ft), ft, False)
    assert fp == 0 and 0 < tp < n_pos and tp + fn == n_pos
    assert tile_counts(tile_hits(np.zeros_like(gt), ft), ft, False) == (0, 0, n_pos)
    # the budget view: no masked image → the tile-decision F1 is the objective, and painting loses
    items = [_ItemMeta("s", False, gt.shape, True, "crack", "a.png")]
    view = _BudgetView(items, {0: 0}, [])
    rows = {k: {"pix": np.zeros((1, 3), np.int64), "tiles": np.array([tile_counts(tile_hits(m, ft), ft, False)])}
            for k, m in (("thin", thin), ("paint", paint), ("half", half))}
    f = {k: view.row(r)["f1"]["s"] for k, r in rows.items()}
    assert f["thin"] == 1.0 and f["paint"] < f["half"] < f["thin"]
    assert view.row(rows["thin"])["f1_kind"] == {"s": "tile"}
    # with the image's mask in the budget the same rows are scored on pixels
    pix = {k: np.array([[m.sum(), (m & gt).sum(), gt.sum()]]) for k, m in (("thin", thin), ("paint", paint))}
    mv = _BudgetView(items, {0: 0}, [("s", "a.png")])
    fp_ = {k: mv.row({**rows[k], "pix": pix[k]})["f1"]["s"] for k in pix}
    assert mv.row({**rows["thin"], "pix": pix["thin"]})["f1_kind"] == {"s": "pixel"}
    assert 0.5 < fp_["thin"] < 1.0 and fp_["paint"] < 0.1
    # the estimated pixel F1: a crack tile holds share x its area of crack; too thick and too thin both lose,
    # painting loses most, and the figure is exact when the prediction has the assumed amount in every crack tile
    from crackcam.tools.calibration import share_counts

    per_tile = gt.sum() / n_pos / 32 ** 2  # this line's actual share of a crack tile
    rho = min(CRACK_SHARES, key=lambda r: abs(r - per_tile))
    maps = {"thin": thin, "paint": paint, "line": gt, "thick": cv2.dilate(gt.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0,
            "sliver": gt & (np.arange(gt.shape[1])[None, :] % 4 == 0)}
    sv = _BudgetView(items, {0: 0}, [], rho)
    est = {k: sv.row({"pix": np.zeros((1, 3)), "tiles": np.zeros((1, 3)),
                      "share": share_counts(tile_pixels(m, ft), ft, False)[None]})["f1"]["s"] for k, m in maps.items()}
    assert est["paint"] < min(est["thick"], est["sliver"]) and max(est["thick"], est["sliver"]) < est["line"]
    assert est["line"] > 0.8 and sv.row({"pix": np.zeros((1, 3)), "tiles": np.zeros((1, 3)),
                                          "share": np.zeros((1, len(CRACK_SHARES), 3))})["f1"] == {}
    # a blob in a crack-free tile is false even when the crack tiles hold exactly the assumed share
    neg = np.argwhere(ft.labels == 0)[0][0]
    blob = gt.copy()
    blob[ft.ys[neg] + 4:ft.ys[neg] + 12, ft.xs[neg] + 4:ft.xs[neg] + 12] = True
    est_blob = sv.row({"pix": np.zeros((1, 3)), "tiles": np.zeros((1, 3)),
                       "share": share_counts(tile_pixels(blob, ft), ft, False)[None]})["f1"]["s"]
    assert est_blob < est["line"] - 0.02
    with pytest.raises(Exception, match="crack-share"):
        _BudgetView(items, {0: 0}, [], 0.3)


def test_threshold_free_tile_ods_finds_the_gap():
    gt = _line_frame()
    ft = frame_tiles(gt, RULE, 1.0)
    m = np.full(gt.shape, 0.2, np.float32)  # background 0.2, cracks 0.7
    m[cv2.dilate(gt.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0] = 0.7
    mx = tile_max(m, ft)
    assert np.allclose(mx[ft.labels == 1], 0.7) and np.allclose(mx[ft.labels == 0], 0.2)
    f1, thr = tile_ods([tile_rcum(mx, ft, False, 100)], 100)
    assert f1 == 1.0 and 0.2 < thr <= 0.7


def test_mask_choice_is_seeded_spread_and_bounded():
    maskable = [("a", f"{i}.png") for i in range(10)] + [("b", f"{i}.jpg") for i in range(4)]
    one = mask_choice(maskable, 3, seed=0)
    assert one == mask_choice(maskable, 3, seed=0) and len(one) == 3 and len(set(one)) == 3
    assert {s for s, _ in one} == {"a", "b"}  # taken from the sets in turn
    assert mask_choice(maskable, 1, 0)[0][0] == "a"
    assert any(mask_choice(maskable, 3, seed=k) != one for k in range(1, 6))
    assert mask_choice(maskable, None) == maskable and mask_choice(maskable, 99) == maskable
    assert mask_choice(maskable, 0) == []
    assert mask_choice(maskable, 6, 0)[:0] == [] and len([s for s, _ in mask_choice(maskable, 12, 0) if s == "b"]) == 4


# ------------------------------------------------------------------------------------------ end to end
def _tiny_run(tmp_path, root, name="run", rule=(32, 12, 8, 8)):
    torch = pytest.importorskip("torch")
    from crackcam.models import create_model, get_spec

    run = tmp_path / name
    run.mkdir()
    torch.manual_seed(0)
    model = create_model("simple_cnn", widths=(4, 8, 8, 8), pool="topk", topk=0.05)
    torch.save(model.state_dict(), run / "best.pt")
    spec = get_spec("simple_cnn")
    t, n, b, m = rule
    (run / "config.json").write_text(json.dumps({
        "model": "simple_cnn", "model_kwargs": {"widths": [4, 8, 8, 8], "pool": "topk", "topk": 0.05}, "tile": t,
        "mean": list(spec.mean), "std": list(spec.std), "target_layers": list(spec.target_layers),
        "data": str(root), "train_config": {"tile": t, "min_crack_px": n, "border": b, "margin": m}}))
    return run


def _fill_crack_tiles(root, rule: TileRule):
    """Rewrite every mask so each crack tile's inner area (inside the border) is crack: the tile labels stay the
    same (border >= margin), the pixel positions change completely."""
    for p in sorted((root / "masks").glob("*.png")):
        m = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 0
        origins, lab = tile_labels(m, rule)
        new = m.copy()
        b = rule.border
        for (y, x), lb in zip(origins, lab):
            if lb == 1:
                new[y + b:y + rule.tile - b, x + b:x + rule.tile - b] = True
        assert np.array_equal(tile_labels(new, rule)[1], lab), p
        cv2.imwrite(str(p), new.astype(np.uint8) * 255)


def test_mask_free_calibration_never_sees_pixel_positions_and_budgets_are_reproducible(tmp_path):
    from tests.test_survey import _paveseg

    from crackcam.tools.calibration import calibrate

    root = _paveseg(tmp_path / "pv", n_frames=20)
    run = _tiny_run(tmp_path, root)
    quiet = {"quick": True, "log": lambda m: None, "profile": False}
    free = calibrate(checkpoint=run, labels="tiles", out=tmp_path / "free.json", **quiet)
    assert free["masks_used"] == 0 and free["labels"] == "tiles" and free["mask_images"] == []
    assert set(free["val"]) >= {"estimated_pixel_f1", "clean_tiles_flagged"} and not free["val"].get("pixel_f1_t0")
    assert "estimated pixel F1" in free["objective"] and free["tile_rule"]["tile"] == 32
    assert free["mask_free_objective"] == {"estimated pixel F1, crack share": MASK_FREE}
    tiles_only = calibrate(checkpoint=run, labels="tiles", crack_share=0, out=tmp_path / "t.json", **quiet)
    assert "tile-decision F1" in tiles_only["objective"] and set(tiles_only["val"]) >= {"tile_f1"}
    # the same labels from other pixels: the mask-free recipe is unchanged, the all-masks one sees the change
    moved = tmp_path / "moved" / "pv"
    shutil.copytree(root, moved)
    _fill_crack_tiles(moved, TileRule(tile=32, min_crack_px=12, border=8, margin=8))
    run2 = _tiny_run(tmp_path, moved, "run2")
    free2 = calibrate(checkpoint=run2, labels="tiles", out=tmp_path / "free2.json", **quiet)
    keys = ("method", "threshold", "gate", "postprocess", "refine", "val")
    assert {k: free2[k] for k in keys} == {k: free[k] for k in keys}
    full = calibrate(checkpoint=run, out=tmp_path / "full.json", **quiet)
    full2 = calibrate(checkpoint=run2, out=tmp_path / "full2.json", **quiet)
    assert full["val"]["pixel_f1_t0"] != full2["val"]["pixel_f1_t0"]
    # a budget of N masks: N seeded crack frames, the same for the same seed; several budgets in one search
    two = calibrate(checkpoint=run, masks=2, seed=3, out=tmp_path / "two.json", **quiet)
    assert two["masks_used"] == 2 and len(two["mask_images"]) == 2 and two["mask_seed"] == 3
    many = calibrate(checkpoint=run, budgets=[0, 2, None], seed=3, out=tmp_path / "mb", **quiet)
    assert sorted(p.name for p in (tmp_path / "mb").iterdir()) == ["recipe_m0.json", "recipe_m2.json",
                                                                  "recipe_mall.json"]
    assert many["2"]["mask_images"] == two["mask_images"]
    # every budget also ranks the candidates by the label-only score: the mask-free budget's finalists (and their
    # label-only thresholds) are among every other budget's
    from crackcam.tools.calibration import read_search

    found = read_search(run)

    def pairs(bk):
        return {(json.dumps({k: r["cand"][k] for k in ("method", "gate", "refine", "roi")}, sort_keys=True),
                 r["threshold"]) for r in found["rows"] if bk in r["budgets"] and r["cand"].get("learned", True)}
    free_pairs = pairs("0")
    assert free_pairs and free_pairs <= pairs("2") and free_pairs <= pairs("all")
    for k in ("method", "threshold", "gate", "postprocess", "val"):  # one search for several budgets = separate ones
        assert many["2"][k] == two[k] and many["all"][k] == full[k] and many["0"][k] == free[k], k
    logs = []  # the several-budget search serves each of its budgets alone
    again = calibrate(checkpoint=run, masks=2, seed=3, out=tmp_path / "again.json", **{**quiet, "log": logs.append})
    assert any("reusing" in m for m in logs) and again["threshold"] == two["threshold"]
    logs.clear()
    calibrate(checkpoint=run, masks=2, seed=4, out=tmp_path / "other.json", **{**quiet, "log": logs.append})
    assert not any("reusing" in m for m in logs)  # other masked images: a new search
    crack_frames = sum(1 for n in full["val_images"]["pv"] if not n.startswith("pv_"))
    assert full["mask_images"] == "all" and 0 < full["masks_used"] <= crack_frames


def test_mask_budget_table_scores_each_recipe_on_the_test_split(tmp_path):
    from tests.test_survey import _paveseg

    from crackcam.tools.mask_budget import mask_budget, parse_test

    root = _paveseg(tmp_path / "pv", n_frames=20)
    run = _tiny_run(tmp_path, root)
    assert parse_test(f"{root}:val") == (root, "val") and parse_test(str(root)) == (root, "test")
    logs = []
    res = mask_budget(checkpoint=run, tests=[(root, "test")], budgets=[0, None], out=tmp_path / "mb",
                      calibrate_kw={"quick": True, "profile": False}, log=logs.append)
    names = [r["budget"] for r in res["rows"]]
    assert names == ["0", "all", "otsu"]
    assert [r["masks_used"] for r in res["rows"]][0] == 0 and res["rows"][1]["masks_used"] > 0
    for r in res["rows"]:
        v = r["sets"]["pv [test]"]
        assert 0.0 <= v["f1_t0"] <= v["f1_t2"] <= 1.0 and v["detection"] is not None
        assert v["clean_tiles_flagged"] is not None
    # each figure is crack-eval's on that recipe
    m = json.loads((tmp_path / "mb" / "eval_0" / "pv_test" / "metrics.json").read_text())
    assert m["f1"] == res["rows"][0]["sets"]["pv [test]"]["f1_t0"] and m["recipe_masks_used"] == 0
    o = json.loads((tmp_path / "mb" / "eval_otsu" / "pv_test" / "metrics.json").read_text())
    assert o["threshold"] == "otsu" and "Otsu" not in str(m.get("threshold"))
    md = (tmp_path / "mb" / "table.md").read_text()
    assert (tmp_path / "mb" / "mask_budget.png").stat().st_size > 5000
    assert "mask-free (tile labels)" in md and "Otsu, defaults" in md and "mask-free objective" in md
    assert len(res["objective_study"]) == 7 and all(r["val_pixel_f1"] for r in res["objective_study"])


def test_mask_budget_cli_bad_budgets_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from crackcam.tools.evaluate import app

    r = CliRunner().invoke(app, ["mask-budget", "--checkpoint", str(tmp_path), "--test", str(tmp_path),
                                 "--budgets", "0,five"])
    assert r.exit_code == 2 and "--budgets" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["calibrate", "--checkpoint", str(tmp_path), "--masks", "-1"])
    assert r.exit_code == 2 and "--masks must be 0 or more" in r.output and "Traceback" not in r.output


def test_stage3_in_worker_processes_gives_the_serial_rows(tmp_path, monkeypatch):
    """The forked stage-3 pool (large searches) and the in-process loop write the same search."""
    import pickle

    from tests.test_survey import _paveseg

    from crackcam.tools.calibration import calibrate

    root = _paveseg(tmp_path / "pv", n_frames=12)
    run = _tiny_run(tmp_path, root)
    got = {}
    for n in ("1", "2"):
        monkeypatch.setenv("CRACKCAM_CALIBRATE_WORKERS", n)
        (run / ".calibration_cache.pkl").unlink(missing_ok=True)
        logs = []
        r = calibrate(checkpoint=run, budgets=[0, None], quick=True, profile=False, out=tmp_path / n, log=logs.append)
        assert any(f"on {n} process(es)" in m for m in logs)
        rows = pickle.loads((run / ".calibration_cache.pkl").read_bytes())["rows"]
        got[n] = (r, [(x["cand"], x["threshold"], x["min_area"], x["max_width"], x["min_length"], x["pix"].tolist(),
                       x["tiles"].tolist(), x["detection"], x["frame_fa"]) for x in rows])
    assert got["1"][1] == got["2"][1] and len(got["1"][1]) > 50
    assert got["1"][0]["0"]["threshold"] == got["2"][0]["0"]["threshold"]
    monkeypatch.setenv("CRACKCAM_CALIBRATE_WORKERS", "many")
    with pytest.raises(Exception, match="CRACKCAM_CALIBRATE_WORKERS"):
        (run / ".calibration_cache.pkl").unlink()
        calibrate(checkpoint=run, quick=True, profile=False, out=tmp_path / "x.json", log=lambda m: None)


def test_budget_view_counts_crack_free_frames_and_gates_profiles():
    """With a masked image in a set, its crack-free frames count in the pixel F1 (their empty mask is their
    label); a set gets a camera profile only from enough masked images."""
    from crackcam.tools.calibration import PROFILE_MIN_IMAGES

    items = [_ItemMeta("s", False, (8, 8), True, "crack", "c.png"), _ItemMeta("s", False, (8, 8), True, "no_crack", "f.png"),
             _ItemMeta("t", False, (8, 8), True, "crack", "d.png")]
    gt_pos = {0: 0, 1: 1, 2: 2}
    pix = np.array([[10, 10, 10], [30, 0, 0], [5, 5, 5]])  # perfect on the crack frame, 30 false on the free one
    row = {"pix": pix, "tiles": np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]]),
           "share": np.zeros((3, len(CRACK_SHARES), 3))}
    v = _BudgetView(items, gt_pos, [("s", "c.png")])
    r = v.row(row)
    assert r["f1_kind"]["s"] == "pixel" and abs(r["f1"]["s"] - 2 * 10 / (2 * 10 + 30)) < 1e-3
    assert v.masked["s"] == [0, 1] and v.unmasked_pos["t"] == [2]
    assert v.profile_sets() == set()
    many = [_ItemMeta("s", False, (8, 8), True, "crack", f"{i}.png") for i in range(PROFILE_MIN_IMAGES)]
    vm = _BudgetView(many, {i: i for i in range(len(many))}, [("s", f"{i}.png") for i in range(len(many))])
    assert vm.profile_sets() == {"s"}
    vf = _BudgetView(many[:-1], {i: i for i in range(len(many) - 1)}, [("s", f"{i}.png") for i in range(len(many) - 1)])
    assert vf.profile_sets() == set()


def test_every_budget_also_takes_the_label_only_finalists_with_their_thresholds():
    """A candidate the few masks rank low but the tile labels rank first is thresholded for every budget, around
    its tile-decision threshold too; the learning-free floors go to the first budget only."""
    from crackcam.tools.calibration import LABELS, THR_STEPS, _shift, stage3_finalists

    def cand(name, pixel, label, thr=0.5, tile_thr=0.2):
        by = {bk: {"ods": {"a": pixel}, "ods_mean": pixel, "thr_by_set": {"a": thr}, "tile_thr_by_set":
                   {"a": tile_thr}} for bk in ("5", "all")}
        by["0"] = by[LABELS] = {"ods": {"a": label}, "ods_mean": label, "thr_by_set": {"a": tile_thr},
                                "tile_thr_by_set": {"a": tile_thr}}
        return {"name": name, "by_budget": by}
    cands = [cand("p1", 0.9, 0.1), cand("p2", 0.8, 0.2), cand("p3", 0.7, 0.3), cand("lab", 0.1, 0.9, tile_thr=0.3)]
    floor = cand("cue", 0.5, 0.5)
    fin, thr = stage3_finalists(cands, ["5", "all"], ["a"], top_k=2, floors=[floor])
    assert [c["name"] for c in fin] == ["p1", "p2", "lab", "p3", "cue"]  # lab and p3: the label rank's top 2
    lab = cands[3]
    for bk in ("5", "all"):
        assert {c["name"] for c in cands if id(c) in thr[bk]} == {"p1", "p2", "p3", "lab"}
        assert thr[bk][id(lab)] == {_shift(t, d) for t in (0.5, 0.3) for d in THR_STEPS}
    assert id(floor) in thr["5"] and id(floor) not in thr["all"]
    free, thr0 = stage3_finalists(cands, ["0"], ["a"], top_k=2)
    assert {c["name"] for c in free} == {"lab", "p3"}  # mask-free: both ranks are the label rank
    assert thr0["0"][id(lab)] == {_shift(0.3, d) for d in THR_STEPS}
