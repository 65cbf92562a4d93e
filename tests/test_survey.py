"""Survey frames: ROI, native-scale tiling, per-tile gating, frame decision, the readers with true negatives,
ignore-aware scoring, frame-level figures, and crack-eval == crack-run on the same model and frame."""

import csv
import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from crackcam.runtime import survey as S
from crackcam.runtime.postprocess import PostProcessConfig
from crackcam.runtime.steps import FrameSteps
from crackcam.tools.metrics import BinaryScorer, MapScorer, binary_counts


# ------------------------------------------------------------------------------------------------ ROI
def test_parse_roi_forms_and_errors(tmp_path):
    d = S.parse_roi("0,0 1,0 1,0.8 0,0.8")
    assert d == {"roi": [[[0.0, 0.0], [1.0, 0.0], [1.0, 0.8], [0.0, 0.8]]]}
    two = S.parse_roi("0,0 0.5,0 0.5,0.5; 0.5,0.5 1,0.5 1,1")
    assert len(two["roi"]) == 2
    js = tmp_path / "roi.json"
    js.write_text(json.dumps([[0, 0], [1, 0], [0, 1]]))
    assert S.parse_roi(str(js))["roi"] == [[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]
    png = tmp_path / "roi.png"
    m = np.zeros((20, 30), np.uint8)
    m[:10] = 255
    cv2.imwrite(str(png), m)
    assert S.parse_roi(str(png)) == {"roi_mask": str(png)}
    for bad, needle in (("0,0 1,0", "at least 3"), ("0,0 1.5,0 1,1", "outside the frame"), ("0,0 a,b 1,1", "x,y"),
                        ("0,0 1,0 2,0", "outside"), ("0,0 0.5,0 1,0", "no area"), ("[[0,0],[1", "JSON"),
                        (str(tmp_path / "none.png"), "not found"), ("", "empty")):
        with pytest.raises(S.RoiError, match=needle):
            S.parse_roi(bad)
    cv2.imwrite(str(tmp_path / "black.png"), np.zeros((4, 4), np.uint8))
    with pytest.raises(S.RoiError, match="empty"):
        S.parse_roi(str(tmp_path / "black.png"))


def test_roi_mask_polygon_png_and_frame_size(tmp_path):
    cfg = S.SurveyConfig(**S.parse_roi("0,0 1,0 1,0.5 0,0.5"))
    m = S.roi_mask((40, 60), cfg)
    assert m.shape == (40, 60) and m[:19].all() and not m[21:].any()
    png = tmp_path / "r.png"
    mm = np.zeros((20, 30), np.uint8)
    mm[:, :15] = 255
    cv2.imwrite(str(png), mm)
    m2 = S.roi_mask((40, 60), S.SurveyConfig(roi_mask=str(png)))  # resized to the frame
    assert m2[:, :29].all() and not m2[:, 31:].any()
    sized = S.SurveyConfig(roi=cfg.roi, roi_size=[60, 40])
    assert S.roi_mask((40, 60), sized) is not None and S.roi_mask((41, 60), sized) is None
    assert S.roi_mask((40, 60), S.SurveyConfig()) is None


# ------------------------------------------------------------------------------------------------ tiling
@pytest.mark.parametrize("shape,cfg,fixed", [
    ((300, 420), S.SurveyConfig(tile=64, overlap=16), None),
    ((300, 420), S.SurveyConfig(max_side=210, overlap=8), (48, 48)),
    ((50, 40), S.SurveyConfig(tile=64), None),  # smaller than a tile: padded
    ((301, 433), S.SurveyConfig(scale=0.5, overlap=20), (64, 80)),
])
def test_tiling_and_scale_round_trip(shape, cfg, fixed):
    """Tiles whose 'map' is their own grey level stitch back (gate 0) to the work image, and map back to the frame:
    the round trip loses only the interpolation of the work scale."""
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, shape + (3,), dtype=np.uint8), (0, 0), 3)
    plan = S.plan_frame(img.shape, cfg, fixed)
    th, tw = plan.tile
    assert plan.coords[0] == (0, 0)
    ys = sorted({y for y, _ in plan.coords})
    xs = sorted({x for _, x in plan.coords})
    assert ys[-1] + th == plan.padded_shape[0] and xs[-1] + tw == plan.padded_shape[1]  # last tile flush
    assert all(b - a <= th - plan.overlap for a, b in zip(ys, ys[1:]))  # overlap kept
    tiles = S.cut_tiles(img, plan)
    assert all(t.shape[:2] == (th, tw) for t in tiles)
    maps = [cv2.cvtColor(np.ascontiguousarray(t), cv2.COLOR_BGR2GRAY).astype(np.float32) / 255 for t in tiles]
    work, prob, probs = S.merge_tiles(plan, np.ones(len(tiles)), maps, cfg)
    want = cv2.cvtColor(S.work_image(img, plan), cv2.COLOR_BGR2GRAY).astype(np.float32)[:plan.work_shape[0],
                                                                                         :plan.work_shape[1]] / 255
    assert work.shape == tuple(plan.work_shape) and np.abs(work - want).max() < 1e-5
    full = S.frame_map(work, plan, cfg)
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255
    assert full.shape == shape
    tol = 1e-5 if plan.scale == 1.0 else 0.03
    assert np.abs(full - gray)[4:-4, 4:-4].mean() < tol


def test_work_scale_rule():
    assert S.work_scale(1080, 1280, 1.0, 640) == 0.5
    assert S.work_scale(384, 544, 1.0, 640) == 1.0
    assert S.work_scale(384, 544, 0.5, None) == 0.5
    assert S.work_scale(2000, 1000, 1.0, 500) == 0.25


# ------------------------------------------------------------------------------------------------ gating
class _FakeSession:
    """A model whose map is 0.01 everywhere with a cracked patch in one corner; prob high only there."""

    class meta:  # noqa: N801 - attribute bag
        fixed_size = (32, 32)
        batch = None
        raw = {}

    def run(self, batch):
        maps = np.full(batch.shape[:3], 0.01, np.float32)
        dark = batch.mean(axis=3) < 60
        maps[dark] = 0.9
        probs = dark.reshape(len(batch), -1).mean(1) > 0.01
        return probs.astype(np.float32) * 0.98 + 0.01, maps


def test_empty_tile_stays_empty_and_maps_are_absolute():
    img = np.full((96, 128, 3), 180, np.uint8)
    img[10:14, 5:30] = 20  # a short dark line in the top-left tile only
    steps = FrameSteps(S.SurveyConfig(overlap=8, gate=0.5), None, PostProcessConfig(threshold=0.5, skeleton=True))
    r = steps.process(_FakeSession(), img)
    gated = r.tile_probs < 0.5
    assert gated.any() and (~gated).any()
    plan = r.plan
    far = np.zeros(img.shape[:2], bool)
    for (y, x), g in zip(plan.coords, gated):
        if g and y >= 40:  # tiles away from the line (no overlap with cracked tiles)
            far[y + 8:y + 24, x + 8:x + 24] = True
    assert far.any() and not r.map[far].any()  # gated tiles: exactly zero
    # an un-gated tile keeps its absolute values: the background 0.01 is not stretched to 1
    assert 0.005 < r.map[19, 10] < 0.02 and r.map[12, 15] > 0.85
    assert r.cracked and r.prob > 0.9
    # a frame without the line: every tile gated, empty map, not cracked
    r2 = steps.process(_FakeSession(), np.full((96, 128, 3), 180, np.uint8))
    assert not r2.map.any() and not r2.cracked and r2.prob < 0.5


def test_frame_decision_min_length_and_roi():
    img = np.full((96, 128, 3), 180, np.uint8)
    img[80:83, 10:40] = 20  # a 30-px line in the bottom part
    sv = S.SurveyConfig(overlap=8, gate=0.5)
    pp = PostProcessConfig(threshold=0.5, skeleton=True)
    r = FrameSteps(sv, None, pp).process(_FakeSession(), img)
    assert r.cracked and 20 < r.post.measures["length_px"] < 40
    assert not FrameSteps(sv.replace(min_length=60), None, pp).process(_FakeSession(), img).cracked
    top = FrameSteps(sv.replace(**S.parse_roi("0,0 1,0 1,0.6 0,0.6")), None, pp).process(_FakeSession(), img)
    assert not top.map[58:].any() and not top.cracked  # the line lies outside the ROI: nothing counted
    assert top.prob < 0.5  # the frame probability only looks at tiles inside the ROI


def test_one_resize_per_frame_serves_tiles_and_refinement(monkeypatch):
    """At a non-integer work scale the frame is resized once (INTER_AREA is the slow path there) for the tiles and
    the refinement alike, and the map is the one a fresh resize gives; another frame is not served the cache."""
    from crackcam.runtime.cues import RefineConfig

    img = np.full((150, 190, 3), 180, np.uint8)
    img[40:43, 10:150] = 20
    sv = S.SurveyConfig(overlap=8, gate=0.5, max_side=120)  # scale 120/190
    steps = FrameSteps(sv, RefineConfig(cue="blackhat", mode="product", dilate=4), PostProcessConfig(threshold=0.3))
    calls = []
    real = S.cv2.resize

    def counting(src, dsize, *a, **k):
        if src is img:  # the frame to its work size
            calls.append(src.shape)
        return real(src, dsize, *a, **k)

    monkeypatch.setattr(S.cv2, "resize", counting)
    r = steps.process(_FakeSession(), img)
    assert calls == [img.shape], calls
    plan, probs, maps = steps.run_model(_FakeSession(), img)
    plan._work = None
    fresh, _, _ = steps.frame_map(img, plan, probs, maps)
    assert np.array_equal(fresh, r.map) and r.map.max() > 0.3
    other = img.copy()
    other[40:43] = 180
    assert not np.array_equal(S.work_image(other, r.plan), S.work_image(img, r.plan))


# ------------------------------------------------------------------------------------------------ scoring
def test_ignore_pixels_are_neither_hit_nor_false_alarm():
    gt = np.zeros((20, 20), bool)
    gt[5, 2:18] = True
    pred = np.zeros_like(gt)
    pred[5, 2:10] = True  # half the crack
    pred[15, 2:18] = True  # a false alarm inside the ignore area
    valid = np.ones_like(gt)
    valid[12:, :] = False
    c = binary_counts(pred, gt, 0, valid)
    assert (c.pred, c.tp_p, c.gt, c.tp_r) == (8, 8, 16, 8)
    c_all = binary_counts(pred, gt, 0)
    assert c_all.pred == 24
    ms = MapScorer(10, (0, 2))
    ms.add(pred.astype(np.float32), gt, "x", valid)
    assert ms.at(0.5, 0)["precision"] == pytest.approx(1.0) and ms.at(0.5, 0)["recall"] == pytest.approx(0.5)
    bs = BinaryScorer((0,))
    bs.add(pred, gt, "x", valid)
    assert bs.figures(0)["precision"] == pytest.approx(1.0)


def test_frame_figures_on_known_records():
    from crackcam.tools.evaluate import frame_figures

    recs = ([{"label": "crack", "cracked": c, "tile": False} for c in (True, True, True, False)]
            + [{"label": "sealed_crack_only", "cracked": c, "tile": False} for c in (True, False, False)]
            + [{"label": "no_crack", "cracked": False, "tile": False}]
            + [{"label": "clean_tile", "cracked": c, "tile": True} for c in (True,) + (False,) * 9])
    f = frame_figures(recs)
    assert f["detection_rate"] == 0.75 and f["false_alarm_rate"] == 0.25
    assert f["sealed_crack_only"] == {"frames": 3, "flagged": 1, "rate": 0.3333}
    assert f["clean_tiles"] == {"tiles": 10, "flagged": 1, "rate": 0.1}


# ------------------------------------------------------------------------------------------------ readers
def _folders(root, split_dirs=False, n=6):
    rng = np.random.default_rng(1)
    subs = ["train", "test"] if split_dirs else [""]
    for sub in subs:
        for cls, val in (("crack", 40), ("no_crack", 200)):
            d = root / sub / cls
            d.mkdir(parents=True)
            for i in range(n):
                im = rng.integers(150, 220, (40, 48, 3), dtype=np.uint8)
                if val < 100:
                    im[18:21, :] = val
                cv2.imwrite(str(d / f"{cls}_{i}.jpg"), im)
    return root


def test_crack_no_crack_folder_reader(tmp_path):
    from crackcam.train import data as D

    root = _folders(tmp_path / "a")
    assert D.detect_layout(root) == "folders"
    items = D.list_items(root, "all")
    assert {it.split for it in items} == {"train", "val", "test"}
    for it in items:
        assert it.name_label == (1 if it.image.parent.name == "crack" else 0)
        assert it.mask is None
    assert sum(it.split == "test" for it in items) == round(0.2 * 12)
    ts = D.load_split(items, "train", "folder", D.TileRule(tile=32))
    assert ts.images.shape[1:] == (32, 32, 3)
    assert sorted(ts.labels.tolist()) == sorted(it.name_label for it in items if it.split == "train")
    # with train/ and test/ folders the split comes from the folders
    root2 = _folders(tmp_path / "b", split_dirs=True)
    items2 = D.list_items(root2, "all")
    assert all((it.split == "test") == (it.image.parent.parent.name == "test") for it in items2)
    with pytest.raises(Exception, match="tiles"):
        from crackcam.train.loop import _rule_for

        _rule_for("folders", "tiles", root)


def _paveseg(root, n_frames=10, seed=0):
    """A drawn PaveSeg-like folder: frames with a crack, sealed-only frames (a dark wide band: class 90) and a
    crack-free one; alligator area in one frame; clean tiles with their source frames."""
    rng = np.random.default_rng(seed)
    for d in ("images", "masks", "masks_multiclass", "ignore", "clean_tiles"):
        (root / d).mkdir(parents=True)
    rows, tiles = [], []
    labels = ["crack", "crack", "crack", "crack", "sealed_crack_only", "sealed_crack_only", "crack", "no_crack",
              "sealed_crack_only", "crack"]
    for i in range(n_frames):
        stem = f"{i + 1:06d}"
        img = rng.integers(110, 150, (160, 200, 3), dtype=np.uint8)
        mc = np.zeros((160, 200), np.uint8)
        lab = labels[i % len(labels)]
        if lab == "crack":
            cv2.line(img, (10, 20 + 5 * i), (150, 40 + 5 * i), (40, 40, 40), 2)
            cv2.line(mc, (10, 20 + 5 * i), (150, 40 + 5 * i), 30, 4)
        if lab == "sealed_crack_only":
            cv2.line(img, (20, 120), (180, 100), (60, 60, 60), 9)
            cv2.line(mc, (20, 120), (180, 100), 90, 11)
        ign = np.zeros_like(mc)
        if i == 2:
            mc[120:150, 150:190] = 150
            ign[120:150, 150:190] = 255
        mask = (((mc == 30) | (mc == 150)) * 255).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"{stem}.jpg"), img)
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask)
        cv2.imwrite(str(root / "masks_multiclass" / f"{stem}.png"), mc)
        cv2.imwrite(str(root / "ignore" / f"{stem}.png"), ign)
        rows.append({"image": f"{stem}.jpg", "mask": f"{stem}.png", "image_label": lab})
        t = f"pv_{stem}_y100_x0.png"
        cv2.imwrite(str(root / "clean_tiles" / t), img[100:164, 0:64, 0] if lab == "no_crack" else img[60:124, 160:200, 0])
        tiles.append({"file": t, "source_image": stem, "x": 0, "y": 100, "size": 64})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "mask", "image_label"])
        w.writeheader()
        w.writerows(rows)
    with open(root / "clean_tiles.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "source_image", "x", "y", "size"])
        w.writeheader()
        w.writerows(tiles)
    return root


def test_paveseg_reader_split_by_frame_hard_negatives(tmp_path):
    from crackcam.train import data as D

    root = _paveseg(tmp_path / "pv")
    assert D.detect_layout(root) == "paveseg"
    items = D.list_items(root, "all")
    frames = {it.stem: it for it in items if not it.is_tile}
    # the fixed rule: within each class, sorted by name, index % 4 == 0 test, == 1 val, else train
    crack = sorted(s for s, it in frames.items() if it.image_label == "crack")
    assert [frames[s].split for s in crack] == ["test", "val", "train", "train", "test", "val"]
    assert [frames[s].split for s in ("000005", "000006", "000009")] == ["test", "val", "train"]  # sealed-only
    for it in items:
        if it.is_tile:
            assert it.split == frames[it.frame].split and it.name_label == 0 and it.mask is None
    rule = D.TileRule(tile=32, stride=32, min_crack_px=10, border=2, margin=4)
    ts = D.load_split(items, "train", "tiles", rule)
    assert ts.hard is not None and ts.hard_counts.get("sealed_crack", 0) > 0
    assert (ts.labels[ts.hard] == 0).all()  # hard negatives are crack-free tiles
    assert ts.counts()["hard_negative_tiles"] == int(ts.hard.sum())
    half = D.load_split(items, "train", "tiles", rule, max_side=100)  # work scale 0.5: 4x fewer tiles
    assert len(half) < len(ts) / 2


# ------------------------------------------------------------------------------------------------ CLI errors
def test_bad_roi_is_one_line_exit_2(tmp_path):
    pytest.importorskip("onnx")
    from crackcam.runtime.cli import app
    from crackcam.runtime.toy import make_toy_model

    model = make_toy_model(tmp_path / "m.onnx")
    (tmp_path / "src").mkdir()
    cv2.imwrite(str(tmp_path / "src" / "a.png"), np.full((32, 32, 3), 128, np.uint8))
    runner = CliRunner()
    for roi, needle in (("0,0 2,0 1,1", "outside the frame"), ("0,0 1,0", "at least 3"),
                        (str(tmp_path / "no.png"), "not found")):
        r = runner.invoke(app, ["--model", str(model), "--source", str(tmp_path / "src"), "--out",
                                str(tmp_path / "o"), "--roi", roi])
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.output
    r = runner.invoke(app, ["--model", str(model), "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                            "--roi-size", "12by4"])
    assert r.exit_code == 2 and "WIDTHxHEIGHT" in r.output


# ------------------------------------------------------------------------------------------------ eval == run
def test_eval_path_equals_run_path(tmp_path):
    """The same checkpoint and frame through crack-eval's method (PyTorch CamModel on the survey tiles) and through
    crack-run's steps (the exported ONNX graph in ONNX Runtime): same map, same mask, same decision."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from crackcam.export.api import ExportSettings, export_checkpoint
    from crackcam.models import create_model, get_spec
    from crackcam.runtime.sessions import open_session
    from crackcam.tools import methods as M

    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    model = create_model("simple_cnn", widths=(4, 8, 8, 8), pool="topk", topk=0.05).eval()
    with torch.no_grad():  # a map that depends strongly on the pixels (and on their colour order)
        model.fc.weight.mul_(40.0)
        model.fc.bias.fill_(0.5)
    torch.save(model.state_dict(), run / "best.pt")
    spec = get_spec("simple_cnn")
    (run / "config.json").write_text(json.dumps({
        "model": "simple_cnn", "model_kwargs": {"widths": [4, 8, 8, 8], "pool": "topk", "topk": 0.05}, "tile": 32,
        "mean": list(spec.mean), "std": list(spec.std), "target_layers": list(spec.target_layers)}))
    survey = {"scale": 1.0, "max_side": 96, "tile": 32, "overlap": 8, "gate": 0.55,
              "roi": [[[0, 0], [1, 0], [1, 0.8], [0, 0.8]]], "roi_mask": None, "roi_size": None, "min_length": 5.0}
    recipe = {"method": "refine-cam", "layers": None, "threshold": 0.3, "gate": 0.55,
              "postprocess": {"min_area": 5, "close_radius": 0, "open_radius": 0},
              "refine": {"cue": "blackhat", "mode": "product", "dilate": 4, "prior_power": 0.5}, "survey": survey}
    # a camera profile for frames of 170x150 (the test frame): another threshold, cue and hysteresis
    recipe["profiles"] = {"170x150": {"method": "refine-cam", "threshold": 0.2, "gate": 0.55,
                                      "postprocess": {"min_area": 3, "close_radius": 0, "open_radius": 0,
                                                      "hysteresis": 0.5},
                                      "refine": {"cue": "blackhat-fine", "mode": "component", "dilate": 4},
                                      "survey": {**survey, "min_length": 2.0}}}
    (run / "recipe.json").write_text(json.dumps(recipe))
    res = export_checkpoint(run, tmp_path / "m.onnx", ExportSettings(), log=lambda m: None)
    assert res.metadata["input"]["height"] == 32 and res.metadata["survey"]["gate"] == 0.55
    assert res.metadata["profiles"]["170x150"]["refine"]["cue"] == "blackhat-fine"
    rng = np.random.default_rng(3)
    img = cv2.GaussianBlur(rng.integers(60, 200, (150, 170, 3), dtype=np.uint8), (0, 0), 2)
    cv2.line(img, (10, 30), (150, 60), (20, 20, 20), 2)
    # crack-eval's path
    from crackcam.tools.evaluate import _job

    job = _job("refine-cam", checkpoint=run, recipe=recipe, threshold=None, layers=None, mode="whole", tile=None,
               flips=False, gate=None, refine=None, postprocess_cfg=None, data=tmp_path, split="all", tols=(0,),
               n_bins=10, limit=None, out=tmp_path / "ev", log=lambda m: None)
    v = job.variant(img.shape)
    assert v.thr == 0.2 and v.pcfg.hysteresis == 0.5 and v.survey.min_length == 2.0  # the profile
    assert job.variant((99, 77)).thr == 0.3  # another frame size (more than 2x fewer pixels): the top level
    assert job.variant((120, 180)).thr == 0.2  # a similar size: the nearest profile
    m_eval, p_eval = v.fn(img)
    from crackcam.runtime.postprocess import postprocess

    mask_eval = postprocess(m_eval, v.pcfg).mask
    # crack-run's path
    from crackcam.runtime.steps import ModelSteps

    sess = open_session(tmp_path / "m.onnx", provider="cpu", log=lambda m: None)
    ms = ModelSteps(sess.meta)
    steps = ms.for_shape(img.shape)
    assert ms.for_shape((99, 77)).post.threshold == 0.3 and steps.post.threshold == 0.2
    assert ms.for_shape((120, 180)).post.threshold == 0.2
    r = steps.process(sess, np.ascontiguousarray(img[..., ::-1]))
    assert steps.survey.to_dict() == v.survey.to_dict()
    assert r.map.shape == m_eval.shape and np.abs(r.map - m_eval).max() < 1e-4
    assert abs(r.prob - p_eval) < 1e-5
    assert np.array_equal(r.post.mask, mask_eval)
    assert r.map[int(0.8 * 150) + 1:].max() == 0  # ROI from the metadata
    # the comparison can see a colour-order slip: the same frame with R and B swapped gives another map
    m_swap, _ = v.fn(np.ascontiguousarray(img[..., ::-1]))
    assert np.abs(m_swap - m_eval).max() > 1e-2 and r.map.std() > 0.01
    assert M.resolve("refine-cam").needs_checkpoint


def test_hysteresis_keeps_weak_stretches_of_strong_pieces():
    from crackcam.runtime.postprocess import postprocess

    m = np.zeros((20, 40), np.float32)
    m[5, 2:30] = 0.3  # a weak line ...
    m[5, 10] = 0.9  # ... with one strong pixel
    m[15, 2:30] = 0.3  # a weak line alone
    off = postprocess(m, PostProcessConfig(threshold=0.5, skeleton=False)).mask
    on = postprocess(m, PostProcessConfig(threshold=0.5, hysteresis=0.5, skeleton=False)).mask
    assert off.sum() == 1 and on[5, 2:30].all() and not on[15].any()
    with pytest.raises(ValueError, match="hysteresis"):
        PostProcessConfig.from_dict({"hysteresis": 1.5})


def test_calibration_reads_only_validation_images_and_respects_the_budget(tmp_path, monkeypatch):
    """Calibrate a tiny MIL checkpoint on a drawn PaveSeg-like folder: the recipe names exactly the validation
    stems it read, carries the survey block and its figures, and says which constraints held."""
    torch = pytest.importorskip("torch")
    from crackcam.models import create_model, get_spec
    from crackcam.tools.calibration import calibrate
    from crackcam.train.data import list_items

    root = _paveseg(tmp_path / "pv")
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    model = create_model("simple_cnn", widths=(4, 8, 8, 8), pool="topk", topk=0.05)
    torch.save(model.state_dict(), run / "best.pt")
    spec = get_spec("simple_cnn")
    (run / "config.json").write_text(json.dumps({
        "model": "simple_cnn", "model_kwargs": {"widths": [4, 8, 8, 8], "pool": "topk", "topk": 0.05}, "tile": 32,
        "mean": list(spec.mean), "std": list(spec.std), "target_layers": list(spec.target_layers),
        "data": str(root), "train_config": {}}))
    import crackcam.tools.calibration as cal
    from crackcam.runtime.imageio import read_image, read_mask

    opened = []  # every image and mask file calibration actually opens
    monkeypatch.setattr(cal, "read_image", lambda p, *a, **k: (opened.append(str(p)), read_image(p, *a, **k))[1])
    monkeypatch.setattr(cal, "read_mask", lambda p, *a, **k: (opened.append(str(p)), read_mask(p, *a, **k))[1])
    r = calibrate(checkpoint=run, quick=True, log=lambda m: None)
    val = [it.image.name for it in list_items(root, "val")]
    test = {it.image.name for it in list_items(root, "test")}
    assert r["val_images"] == {"pv": val} and not set(val) & test
    val_files = {str(f) for it in list_items(root, "val") for f in (it.image, it.mask, it.ignore) if f is not None}
    assert opened and set(opened) <= val_files, sorted(set(opened) - val_files)[:3]
    assert set(r["val"]) >= {"pixel_f1_t0", "clean_tiles_flagged", "false_alarm_frames", "detection_rate"}
    assert r["survey"]["tile"] == 32 and r["method"].split("-")[-1] in ("cam", "gradcam")
    met = r["budget"]["met"]
    if met:
        assert r["val"]["clean_tiles_flagged"] <= 0.05 and r["val"]["false_alarm_frames"] <= 0.2
    assert ("every constraint met" in r["objective"]) == met
    # the search is cached: a second call with the same settings reuses it and chooses the same
    logs = []
    r2 = calibrate(checkpoint=run, quick=True, log=logs.append)
    assert any("reusing" in m for m in logs) and r2["threshold"] == r["threshold"]


def test_max_width_removes_blobs_keeps_thin_cracks():
    from crackcam.runtime.postprocess import postprocess

    m = np.zeros((80, 120), np.float32)
    cv2.line(m, (5, 10), (110, 20), 1.0, 3)  # a crack: 3 px wide
    cv2.circle(m, (60, 55), 15, 1.0, -1)  # a blob (a tree, a car): ~30 px wide
    keep = postprocess(m, PostProcessConfig(threshold=0.5, max_width=8.0))
    assert keep.mask[10:21, :].any() and not keep.mask[45:70, 45:75].any()
    assert keep.measures["components"] == 1
    both = postprocess(m, PostProcessConfig(threshold=0.5))
    assert both.measures["components"] == 2 and both.mask[55, 60]
