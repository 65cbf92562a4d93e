"""`crack-eval calibrate --model`: an exported graph's run-time settings chosen on validation frames (drawn data)."""

import csv
import json

import pytest
from typer.testing import CliRunner

from crackcam.tools.evaluate import app
from tests.test_survey import _paveseg

runner = CliRunner()
pytest.importorskip("onnx")

SURVEY = {"scale": 1.0, "max_side": 400, "tile": 64, "overlap": 16, "gate": 0.0, "roi": None, "roi_mask": None,
          "roi_size": None, "min_length": 0.0}


def _graph(path, threshold=0.5):
    """The darkness toy (crack lines, grey 40, score ~0.96; the sealed bands, grey 60, ~0.58) with a survey block."""
    from crackcam.runtime.toy import make_toy_model, toy_metadata

    meta = toy_metadata(threshold=threshold, postprocess={"threshold": threshold, "min_area": 4}, survey=SURVEY)
    return make_toy_model(path, offset=0.65, metadata=meta)


def _meta(path):
    from crackcam.export import metadata as md

    return md.get_metadata(path)


def test_calibrate_model_chooses_on_validation_frames_and_writes_a_graph_that_scores_so(tmp_path):
    """A threshold that paints the sealed-crack bands (crack-free frames flagged) loses to one that keeps only the
    cracks; the written graph carries the choice (crack-eval --model on it gives the recorded validation figures);
    only validation frames are scored; a work size that shrinks no frame is not searched."""
    from crackcam.train.data import list_items

    root = _paveseg(tmp_path / "pv", n_frames=10)
    src = _graph(tmp_path / "g.onnx", threshold=0.5)
    out = tmp_path / "cal" / "g_cal.onnx"
    r = runner.invoke(app, ["calibrate", "--model", str(src), "--data", str(root), "--thresholds", "0.5,0.75",
                            "--gates", "0,0.5", "--max-sides", "800,400", "--min-lengths", "0,1000", "--out",
                            str(out)])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "cal" / "g_cal.calibration.json").read_text())
    prof = rec["profiles"]["default"]
    grid = {(g["gate"], g["threshold"], g["max_side"], g["min_length"]): g for g in prof["grid"]}
    assert len(grid) == 8 and {k[2] for k in grid} == {400}  # frames of 200 px: no value shrinks them, one size
    paint, keep = grid[(0.0, 0.5, 400, 0.0)], grid[(0.0, 0.75, 400, 0.0)]
    assert paint["frame_fa"] > 0.2 and keep["frame_fa"] <= 0.2, (paint, keep)  # the drawn data do what they should
    assert grid[(0.0, 0.75, 400, 1000.0)]["detection"] == 0.0  # no crack is 1000 px long: no frame counts
    assert prof["chosen"] == {"gate": 0.0, "threshold": 0.75, "max_side": 400, "min_length": 0.0}, prof["chosen"]

    meta = _meta(out)
    assert meta["threshold"] == 0.75 and meta["postprocess"]["threshold"] == 0.75
    assert meta["survey"]["gate"] == 0.0 and meta["survey"]["max_side"] == 400
    assert meta["calibration"]["split"] == "val" and meta["calibration"]["from"] == "g.onnx"
    assert _meta(src)["threshold"] == 0.5  # the source graph is untouched

    ev = tmp_path / "ev"
    r = runner.invoke(app, ["--model", str(out), "--data", str(root), "--split", "val", "--out", str(ev)])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["threshold"] == 0.75 and abs(s["f1"] - prof["val_chosen"]["f1_mean"]) < 1e-4
    assert s["frames"]["false_alarm_rate"] == prof["val_chosen"]["frame_fa"]
    val = {it.image.name for it in list_items(root, "val")}
    with open(ev / "per_frame.csv") as f:
        assert {row["name"] for row in csv.DictReader(f)} <= val
    scored = set()
    for p in (tmp_path / "cal").glob("g_cal.calib/**/per_frame.csv"):
        with open(p) as f:
            scored |= {row["name"] for row in csv.DictReader(f)}
    assert scored and scored <= val, sorted(scored - val)


def test_calibrate_model_settings_reach_every_place_the_runtime_reads(tmp_path):
    """apply_settings writes the gate, threshold and work size where FrameSteps reads them (top level with a
    refinement block, and a camera profile)."""
    from crackcam.runtime.meta import meta_from_map
    from crackcam.runtime.steps import ModelSteps
    from crackcam.tools.calibrate_model import apply_settings, grid_values

    meta = _meta(_graph(tmp_path / "g.onnx"))
    meta["refine"] = {"method": "refine-none", "cue": "blackhat", "mode": "product", "dilate": 8, "threshold": 0.5,
                      "postprocess": {"min_area": 4}}
    meta["profiles"] = {"300x200": {"survey": dict(SURVEY), "threshold": 0.5, "postprocess": {"min_area": 4}}}
    s = {"gate": 0.3, "threshold": 0.61, "max_side": 256, "min_length": 40.0}
    new = apply_settings(meta, s)
    new["profiles"]["300x200"] = apply_settings(meta["profiles"]["300x200"], {**s, "gate": 0.2, "threshold": 0.4})
    steps = ModelSteps(meta_from_map({"crackcam": json.dumps(new)}, tmp_path / "g.onnx"))
    top, prof = steps.default, steps.for_shape((200, 300))
    assert (top.survey.gate, top.post.threshold, top.survey.max_side, top.survey.min_length) == (0.3, 0.61, 256, 40)
    assert (prof.survey.gate, prof.post.threshold, prof.survey.max_side) == (0.2, 0.4, 256)
    assert meta["refine"]["threshold"] == 0.5  # a copy: the source dict is untouched

    g = grid_values({"gate": 0.45, "threshold": 0.3, "max_side": 640}, gates=[0.3, 0.5, 0.45], max_sides=[800, 640])
    assert g[0] == {"gate": 0.45, "threshold": 0.3, "max_side": 640, "min_length": 0.0} and len(g) == 6  # own first
    with pytest.raises(Exception, match=r"\[0, 1\]"):
        grid_values({"gate": 0.5, "threshold": 0.3, "max_side": 640}, gates=[1.5])


def test_calibrate_model_bad_input_is_one_line(tmp_path):
    root = _paveseg(tmp_path / "pv", n_frames=6)
    src = _graph(tmp_path / "g.onnx")
    for argv, says in ((["--model", str(src), "--data", str(root), "--gates", "a,b"], "--gates"),
                       (["--model", str(src), "--data", str(root), "--gates", "2"], "[0, 1]"),
                       (["--model", str(src), "--data", str(root), "--checkpoint", str(tmp_path)], "--checkpoint"),
                       (["--model", str(tmp_path / "none.onnx"), "--data", str(root)], "none.onnx"),
                       (["--model", str(src)], "--data"),
                       (["--checkpoint", str(tmp_path), "--gates", "0.5"], "only with --model")):
        r = runner.invoke(app, ["calibrate", *argv, "--out", str(tmp_path / "o.onnx")])
        assert r.exit_code == 2 and says in r.output and len(r.output.strip().splitlines()) == 1, (argv, r.output)


def test_calibrate_model_writes_a_camera_profile_and_resumes_into_the_same_choice(tmp_path):
    """Frames that take a camera profile: the profile's settings are chosen and written, the top level left as it
    was (clean tiles, tile-sized, do not count as another profile); a second run into the same --out reuses every
    grid point and writes the same graph; a resumed crack-eval --model reports the profile's settings."""
    from crackcam.runtime.toy import make_toy_model, toy_metadata

    root = _paveseg(tmp_path / "pv", n_frames=10)
    prof = {"survey": dict(SURVEY), "threshold": 0.5, "postprocess": {"threshold": 0.5, "min_area": 4}}
    meta = toy_metadata(threshold=0.5, postprocess={"threshold": 0.5, "min_area": 4}, survey=dict(SURVEY),
                        profiles={"200x160": prof})
    src = make_toy_model(tmp_path / "p.onnx", offset=0.65, metadata=meta)
    out = tmp_path / "cal" / "p_cal.onnx"
    argv = ["calibrate", "--model", str(src), "--data", str(root), "--thresholds", "0.5,0.75", "--out", str(out)]
    r = runner.invoke(app, argv)
    assert r.exit_code == 0, r.output
    m1 = _meta(out)
    assert m1["profiles"]["200x160"]["threshold"] == 0.75 and m1["profiles"]["200x160"]["postprocess"]["threshold"] == 0.75
    assert m1["threshold"] == 0.5 and m1["postprocess"]["threshold"] == 0.5  # the top level untouched
    rec = json.loads((tmp_path / "cal" / "p_cal.calibration.json").read_text())
    assert list(rec["profiles"]) == ["200x160"]
    r = runner.invoke(app, argv)
    assert r.exit_code == 0, r.output
    assert _meta(out) == m1
    ev = tmp_path / "ev"
    for _ in range(2):  # the second run finds every image scored
        r = runner.invoke(app, ["--model", str(out), "--data", str(root), "--split", "val", "--out", str(ev)])
        assert r.exit_code == 0, r.output
        s = json.loads(r.stdout)
        assert s["profiles_used"] == ["200x160", "default"], s["profiles_used"]  # frames + tile-sized clean tiles
    with open(ev / "per_image.csv") as f:
        assert {float(row["threshold"]) for row in csv.DictReader(f)} == {0.75}  # every frame: the profile's


def test_calibrate_model_refuses_a_graph_that_gates_inside_itself_and_keeps_a_threshold_rule(tmp_path):
    from crackcam.runtime.toy import make_toy_model, toy_metadata
    from crackcam.tools.calibrate_model import _block_settings, apply_settings

    root = _paveseg(tmp_path / "pv", n_frames=6)
    gated = make_toy_model(tmp_path / "gated.onnx", gate=0.5)
    r = runner.invoke(app, ["calibrate", "--model", str(gated), "--data", str(root), "--gates", "0.2"])
    assert r.exit_code == 2 and "gates inside itself" in r.output and len(r.output.strip().splitlines()) == 1
    meta = toy_metadata(threshold="otsu", postprocess={"threshold": "otsu", "min_area": 4}, survey=dict(SURVEY))
    assert _block_settings(meta)["threshold"] == "otsu"
    otsu = make_toy_model(tmp_path / "otsu.onnx", offset=0.65, metadata=meta)
    out = tmp_path / "o_cal.onnx"
    r = runner.invoke(app, ["calibrate", "--model", str(otsu), "--data", str(root), "--gates", "0,0.5", "--out",
                            str(out)])
    assert r.exit_code == 0, r.output
    assert _meta(out)["threshold"] == "otsu" and _meta(out)["survey"]["gate"] in (0.0, 0.5)
    blk = {"refine": {"threshold": 0.5, "postprocess": {"threshold": 0.5}}, "survey": {}}
    assert _block_settings(apply_settings(blk, {"gate": 0.1, "threshold": 0.6, "max_side": 640}))["threshold"] == 0.6
