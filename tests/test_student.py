"""The distilled segmenter (issue 10): pseudo-mask rules on drawn cracks, the confident-pixel loss, the student
networks, their export (ONNX Runtime vs PyTorch, metadata round trip, crack-run runs it) and a distillation run on
drawn data with a toy teacher (calibrate → eval → export → run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from crackcam.train import pseudo as P  # noqa: E402


def _line_image(h=96, w=128, y=40):
    score = np.zeros((h, w), np.float32)
    score[y - 1:y + 2, 10:118] = 0.9  # the teacher's confident crack
    score[y + 10:y + 14, 10:118] = 0.3  # a band between lo·thr and thr
    binary = score >= 0.5
    cue = np.zeros((h, w), np.float32)
    cue[y - 1:y + 2, 10:118] = 1.0
    cue[y + 10:y + 14, 10:118] = 0.8
    cue[70:74, :] = 0.9  # a dark thin structure the teacher missed: not a confident background
    return score, binary, cue


def test_pseudo_labels_confident_ignore_and_background_regions():
    score, binary, cue = _line_image()
    lab = P.pseudo_labels(score, binary, 0.5, negative=False, cue=cue, rule=P.PseudoRule(lo=0.5, cue_quantile=0.8))
    assert (lab[39:42, 10:118] == P.CRACK).all()
    assert (lab[50:54, 10:118] == P.IGNORE).all()  # score 0.3 >= 0.25: the band between
    assert (lab[70:74, :] == P.IGNORE).all()  # low score but a strong cue: maybe a missed crack, not background
    assert (lab[0:30, :] == P.BACKGROUND).all()  # smooth, low score
    assert set(np.unique(lab)) == {P.CRACK, P.IGNORE, P.BACKGROUND}


def test_pseudo_labels_negative_images_roi_and_tile_bits():
    score, binary, cue = _line_image()
    valid = np.ones(score.shape, bool)
    valid[:, 100:] = False
    neg = P.pseudo_labels(score, binary, 0.5, negative=True, valid=valid, cue=cue)
    assert (neg[:, :100] == P.BACKGROUND).all() and (neg[:, 100:] == P.IGNORE).all()  # the hood is not a label
    # tile bits: left half crack-free (a sealed crack there), right half crack → teacher pixels only on the right
    tiles = np.full(score.shape, -1, np.int8)
    tiles[:, :64] = 0
    tiles[:, 64:] = 1
    lab = P.pseudo_labels(score, binary, 0.5, negative=False, cue=cue, tiles=tiles)
    assert (lab[:, :64] == P.BACKGROUND).all()  # crack-free tiles are background even where the teacher fires
    assert (lab[39:42, 64:118] == P.CRACK).all()
    gate = np.zeros(score.shape, bool)
    gate[:, 90:] = True  # a self-training round: only inside tiles the teacher's gate lets through
    lab2 = P.pseudo_labels(score, binary, 0.5, negative=False, cue=cue, tiles=tiles, gate=gate)
    assert (lab2[39:42, 64:90] != P.CRACK).all() and (lab2[39:42, 90:118] == P.CRACK).all()


def test_tile_topk_labels_the_strongest_pixels_of_crack_tiles_only():
    score = np.zeros((64, 128), np.float32)
    score[30:32, :] = 0.3  # a weak teacher response below its threshold 0.5, in both tiles
    score[10, 70] = 0.1  # below half of lo × threshold: never crack
    tiles = np.zeros((64, 128), np.int8)
    tiles[:, 64:] = 1  # only the right tile holds a crack (tile rule)
    binary = score >= 0.5
    rule = P.PseudoRule(tile_topk=0.04, tile=64)
    lab = P.pseudo_labels(score, binary, 0.5, negative=False, tiles=tiles, rule=rule)
    assert (lab[30:32, 64:] == P.CRACK).all()  # the top 4 % of the crack tile
    assert (lab[:, :64] == P.BACKGROUND).all()  # the crack-free tile stays background
    assert lab[10, 70] != P.CRACK
    off = P.pseudo_labels(score, binary, 0.5, negative=False, tiles=tiles, rule=P.PseudoRule(tile=64))
    assert not (off == P.CRACK).any()  # without tile_topk only the teacher's binary counts
    empty = P.pseudo_labels(np.zeros_like(score), binary & False, 0.5, negative=False, tiles=tiles, rule=rule)
    assert not (empty == P.CRACK).any()  # an empty teacher map labels nothing, whatever the share


def test_tile_state_follows_the_tile_rule():
    from crackcam.train.data import TileRule

    mask = np.zeros((128, 192), bool)
    mask[20:22, 70:120] = True  # inside the middle top tile
    st = P.tile_state(mask, mask.shape, TileRule(tile=64, min_crack_px=12, border=4, margin=8))
    assert (st[:64, 64:128] == 1).all()
    assert (st[64:, :] == 0).all()  # far from the crack
    assert P.tile_state(None, mask.shape, TileRule()) is None


def test_confident_loss_ignores_the_ignore_band():
    from crackcam.train.distill import confident_loss

    lab = torch.full((1, 1, 8, 8), P.BACKGROUND, dtype=torch.uint8)
    lab[..., 2, :] = P.CRACK
    lab[..., 5:, :] = P.IGNORE
    logits = torch.zeros(1, 1, 8, 8, requires_grad=True)
    loss = confident_loss(logits, lab, 3.0, 1.0)
    loss.backward()
    assert torch.all(logits.grad[..., 5:, :] == 0)
    assert torch.all(logits.grad[..., 2, :] < 0) and torch.all(logits.grad[..., 0, :] > 0)
    other = logits.detach().clone()
    other[..., 5:, :] = 50.0  # anything in the ignore band: same loss
    assert float(confident_loss(other, lab, 3.0, 1.0)) == pytest.approx(float(loss.detach()), abs=1e-6)


def test_pixel_ods_matches_the_evaluation_scorer():
    from crackcam.tools.metrics import MapScorer
    from crackcam.train.metrics import pixel_ods

    rng = np.random.default_rng(0)
    maps, gts, vals = [], [], []
    sc = MapScorer(100, (0,))
    for i in range(4):
        g = rng.random((40, 50)) < 0.1
        m = np.clip(g * 0.5 + rng.random((40, 50)) * 0.6, 0, 1).astype(np.float32)
        v = rng.random((40, 50)) < 0.9
        maps.append(m), gts.append(g), vals.append(v)
        sc.add(m, g, str(i), v)
    a = pixel_ods(maps, gts, vals)
    b = sc.ods(0)
    assert a["f1"] == pytest.approx(b["f1"], abs=1e-9) and a["threshold"] == pytest.approx(b["threshold"])


@pytest.mark.parametrize("name", ["seg_tiny", "seg_lite0"])
def test_students_are_registered_segmenters_at_input_size(name):
    import crackcam.models as M

    spec = M.get_spec(name)
    assert spec.kind == "segmenter" and name in M.list_models(kind="segmenter")
    assert name not in M.list_models(kind="classifier")
    m = M.create_model(name).eval()
    n = sum(p.numel() for p in m.parameters())
    assert n < 1_000_000
    with torch.no_grad():
        y = m(torch.randn(2, 3, 72, 104))
    assert y.shape == (2, 1, 72, 104)


def _student_run(tmp_path: Path, name="seg_tiny") -> Path:
    """A segmenter run folder (random weights) as distill writes it."""
    import crackcam.models as M
    from crackcam.models.checkpoint import save_state_dict, write_json

    run = tmp_path / "st"
    torch.manual_seed(0)
    m = M.create_model(name)
    with torch.no_grad():  # non-trivial batch-norm statistics
        m.train()
        for _ in range(3):
            m(torch.randn(4, 3, 64, 64) * 0.5)
    save_state_dict(m, run / "best.pt")
    spec = M.get_spec(name)
    write_json(run / "config.json", {"model": name, "model_kwargs": {}, "kind": "segmenter", "tile": 64,
                                     "mean": list(spec.mean), "std": list(spec.std),
                                     "survey": {"tile": 64, "overlap": 8, "gate": 0.0}})
    write_json(run / "recipe.json", {"method": "segment", "threshold": 0.6, "postprocess": {"min_area": 3},
                                     "survey": {"tile": 64, "overlap": 8, "gate": 0.2, "scale": 1.0},
                                     "masks_used": 7})
    return run


def test_student_export_matches_pytorch_and_runs_in_the_runtime(tmp_path):
    pytest.importorskip("onnx")
    from crackcam.export.api import export_checkpoint
    from crackcam.models.checkpoint import load_classifier
    from crackcam.models.student import StudentSession
    from crackcam.runtime.sessions import open_session

    run = _student_run(tmp_path)
    res = export_checkpoint(run, tmp_path / "st.onnx", log=lambda s: None)
    assert res.report is not None and res.report.ok
    sess = open_session(tmp_path / "st.onnx", log=lambda s: None)
    meta = sess.meta
    assert meta.kind == "segmenter" and meta.raw["survey"]["gate"] == 0.2 and meta.threshold == 0.6
    assert meta.raw["masks_used"] == 7 and "refine" not in meta.raw
    model, cfg = load_classifier(run)
    ref = StudentSession(model, cfg["mean"], cfg["std"])  # the torch path evaluation uses
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
    p0, m0 = ref.run(x)
    p1, m1 = sess.run(x)
    assert m1.shape == (3, 64, 96)
    np.testing.assert_allclose(m1, m0, atol=1e-4)
    np.testing.assert_allclose(p1, p0, atol=1e-5)
    # the tile probability is the largest 3x3 mean of the map
    k = np.ones((3, 3)) / 9
    import cv2

    best = [cv2.filter2D(mm.astype(np.float64), -1, k, borderType=cv2.BORDER_CONSTANT)[1:-1, 1:-1].max() for mm in m0]
    assert p0.min() >= np.min(best) - 1e-6


def test_crack_run_runs_the_student_graph(tmp_path):
    pytest.importorskip("onnx")
    from crackcam.export.api import export_checkpoint
    from crackcam.runtime.imageio import write_image

    run = _student_run(tmp_path)
    export_checkpoint(run, tmp_path / "st.onnx", log=lambda s: None)
    src = tmp_path / "frames"
    rng = np.random.default_rng(0)
    for i in range(3):
        write_image(src / f"f{i}.png", rng.integers(0, 256, (100, 140, 3), dtype=np.uint8))
    r = subprocess.run([sys.executable, "-m", "crackcam.runtime.cli", "--model", str(tmp_path / "st.onnx"),
                        "--source", str(src), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(l) for l in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all("prob" in x for x in recs)


def test_distill_on_drawn_data_with_a_toy_teacher_then_calibrate_export_and_run(tmp_path):
    pytest.importorskip("onnx")
    import cv2

    from crackcam.runtime.imageio import read_mask
    from crackcam.runtime.toy import make_toy_model
    from crackcam.tools.calibration import calibrate
    from crackcam.train.distill import DistillConfig, distill
    from crackcam.train.synth import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "drawn", n_crack=10, n_free=6, size=(96, 96), layout="kaggle", seed=3)
    teacher = make_toy_model(tmp_path / "toy.onnx", threshold=0.5, offset=0.65)
    cfg = DistillConfig(data=[str(data)], out=str(tmp_path / "st"), model="seg_tiny", teacher=str(teacher),
                        rounds=2, epochs=2, samples=48, batch=8, crop=64, val_tile=64, progress=False,
                        tile_rule={"tile": 32, "min_crack_px": 8, "border": 2, "margin": 4})
    logs = []
    m = distill(cfg, log=logs.append)
    run = tmp_path / "st"
    assert (run / "best.pt").is_file() and (run / "curves.png").is_file()
    assert sorted(m["rounds"]) == [1, 2] and len(m["history"]) == 4  # round 2: max(2, epochs // 2) epochs
    assert any("TRAINING images" in s for s in logs)
    # round-1 pseudo-masks: crack-free images all background; crack pixels lie on the drawn cracks
    rows = [json.loads(l) for l in (run / "pseudo/round1/manifest.jsonl").read_text().splitlines()]
    assert rows and all(r["key"].split("/")[-1] for r in rows)
    assert not any("/test/" in r["image"] for r in rows)  # training images only
    on = tot = 0
    for r in rows:
        _, lab = P.read_pseudo(run / "pseudo/round1", r)
        if r["negative"]:
            assert (lab == P.BACKGROUND).all()
        else:
            gt = read_mask(Path(r["image"]).parent.parent / "masks" / (Path(r["image"]).stem + ".png"))
            c = lab == P.CRACK
            dist = cv2.distanceTransform((~gt).astype(np.uint8), cv2.DIST_L2, 3)
            assert (dist[c] <= 32 + 4 + 1).all()  # never in a tile the tile rule calls crack-free
            on += int((c & (dist <= 3)).sum())
            tot += int(c.sum())
    assert tot > 0 and on / tot > 0.5, on / tot  # the toy teacher (darkness) also takes dark grains near cracks
    assert (run / "pseudo/round1/preview.png").is_file() and (run / "pseudo/round2/manifest.jsonl").is_file()
    # a finished run is not overwritten without --overwrite / --resume
    with pytest.raises(FileExistsError):
        distill(cfg, log=lambda s: None)
    # --resume with another tile rule would mix pseudo-masks made under two rules: refused, nothing touched
    from dataclasses import replace

    before = (run / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"another tile rule .*tile 32 → 48"):
        distill(replace(cfg, resume=True, tile_rule={**cfg.tile_rule, "tile": 48}), log=lambda s: None)
    assert (run / "config.json").read_bytes() == before
    rec = calibrate(checkpoint=run, quick=True, log=lambda s: None)
    assert rec["method"] == "segment" and rec.get("refine") in (None, {})
    from crackcam.export.api import export_checkpoint
    from crackcam.runtime.sessions import open_session

    export_checkpoint(run, run / "export" / "st.onnx", log=lambda s: None)
    meta = open_session(run / "export" / "st.onnx", log=lambda s: None).meta
    assert meta.kind == "segmenter" and meta.threshold == rec["threshold"]
    assert meta.raw["teacher"] == str(teacher)


def test_int8_graph_keeps_the_contract_and_follows_the_fp32_map(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime.quantization")
    from crackcam.export.api import export_checkpoint
    from crackcam.export.quantize import quantize_int8
    from crackcam.runtime.sessions import open_session
    from crackcam.train.synth import write_synthetic_dataset

    run = _student_run(tmp_path)
    export_checkpoint(run, tmp_path / "st.onnx", log=lambda s: None)
    data = write_synthetic_dataset(tmp_path / "calib", n_crack=6, n_free=4, size=(96, 96), layout="kaggle")
    block = quantize_int8(tmp_path / "st.onnx", tmp_path / "st.int8.onnx", data, log=lambda s: None)
    assert block["images"] > 0 and block["split"] == "train"  # a data-set folder: its training images only
    s32 = open_session(tmp_path / "st.onnx", log=lambda s: None)
    s8 = open_session(tmp_path / "st.int8.onnx", log=lambda s: None)
    assert s8.meta.kind == "segmenter" and s8.meta.raw["int8"]["tiles"] == block["tiles"]
    assert s8.meta.raw["survey"] == s32.meta.raw["survey"]
    import onnx

    from crackcam.export.quantize import FLOAT_HEAD

    qg = onnx.load(str(tmp_path / "st.int8.onnx")).graph
    ops = {n.op_type for n in qg.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    fp_convs = [n.name for n in onnx.load(str(tmp_path / "st.onnx")).graph.node if n.op_type == "Conv"]
    assert block["float_convs"] == fp_convs[:FLOAT_HEAD]
    dq_out = {o for n in qg.node if n.op_type == "DequantizeLinear" for o in n.output}
    by_name = {n.name: n for n in qg.node}
    for name in fp_convs:  # the first convolutions keep fp32 weights, the rest take dequantized int8 ones
        w_in = by_name[name].input[1]
        assert (w_in in dq_out) == (name not in block["float_convs"]), name
    x = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    _, m32 = s32.run(x)
    _, m8 = s8.run(x)
    assert np.corrcoef(m32.ravel(), m8.ravel())[0, 1] > 0.95
    assert np.abs(m32 - m8).mean() < 0.05


def test_crack_bench_student_prints_every_model_side_by_side(tmp_path):
    pytest.importorskip("onnx")
    from crackcam.export.api import export_checkpoint
    from crackcam.train.synth import write_synthetic_dataset

    run = _student_run(tmp_path)
    export_checkpoint(run, tmp_path / "st.onnx", log=lambda s: None)
    data = write_synthetic_dataset(tmp_path / "drawn", n_crack=8, n_free=4, size=(96, 96), layout="kaggle")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "crackcam.tools.bench", "student", "--student", str(tmp_path / "st.onnx"),
                        "--images", "8", "--size", "128", "--repeats", "1", "--data", str(data), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [x["model"] for x in rows] == ["packaged default (teacher)", "student fp32", "student fp32, --tile 128"]
    assert rows[1]["bare_fps"] > 0 and rows[1]["crack_run_fps"] > 0 and rows[1]["ratio"] is not None
    assert "f1_t0" in rows[1]["val"]["drawn"] and "val" not in rows[2]
    assert "student vs packaged default" in r.stdout


@pytest.mark.parametrize("teacher", ["missing.onnx", "garbage.onnx"])
def test_a_bad_teacher_is_one_line_and_exit_2(tmp_path, teacher):
    from crackcam.train.synth import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "drawn", n_crack=4, n_free=2, size=(64, 64), layout="kaggle")
    if teacher == "garbage.onnx":
        (tmp_path / teacher).write_bytes(b"not a model")
    r = subprocess.run([sys.executable, "-m", "crackcam.train.cli", "--model", "seg_tiny", "--data", str(data),
                        "--teacher", str(tmp_path / teacher), "--out", str(tmp_path / "st")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and teacher in lines[0], r.stderr
    assert "Traceback" not in r.stderr
