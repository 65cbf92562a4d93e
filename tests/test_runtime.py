"""crack-run: sources, pipeline, outputs, resume, faults, tiling — with tiny ONNX models built in the tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from crackcam.runtime import cli, geo
from crackcam.runtime.pipeline import Pipeline, RunConfig, blend_window, stitch, tile_origins
from crackcam.runtime.postprocess import PostProcessConfig, postprocess
from crackcam.runtime.sessions import OrtSession, choose_providers, open_session
from crackcam.runtime.sinks import iter_records
from crackcam.runtime.sources import CameraSource, Frame, Source, open_source
from crackcam.runtime.toy import make_toy_model, toy_metadata
from crackcam.train.synth import draw_crack_image

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

RECORD_KEYS = {"key": str, "source": str, "frame": int, "timestamp": (float, int, type(None)), "width": int,
               "height": int, "prob": float, "cracked": bool, "threshold": float, "length_px": float,
               "area_px": int, "mean_width_px": float, "max_width_px": float, "segments": int, "infer_ms": float,
               "post_ms": float, "ms": float}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "dyn": make_toy_model(d / "dyn.onnx"),
        "fixed": make_toy_model(d / "fixed64.onnx", height=64, width=64),
        "batch4": make_toy_model(d / "batch4.onnx", height=64, width=64, batch=4),
        "nometa": make_toy_model(d / "nometa.onnx", metadata=False),
        "badsize": make_toy_model(d / "badsize.onnx", metadata=toy_metadata(height=64, width=64)),
        "rgb": make_toy_model(d / "rgb.onnx", metadata={**toy_metadata(), "input": {
            **toy_metadata()["input"], "color": "RGB"}}),
        "badjson": _with_raw_meta(make_toy_model(d / "badjson.onnx", metadata=False), "{not json"),
    }


def _with_raw_meta(path: Path, text: str) -> Path:
    import onnx
    from onnx import helper

    m = onnx.load(str(path))
    helper.set_model_props(m, {"crackcam": text})
    onnx.save(m, str(path))
    return path


def synth_images(folder: Path, n: int, h: int = 96, w: int = 128, seed: int = 0, ext: str = ".jpg") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img, _ = draw_crack_image(rng, h, w, n_cracks=1 + i % 2)
        p = folder / f"img_{i:03d}{ext}"
        cv2.imwrite(str(p), img[..., ::-1])
        paths.append(p)
    return paths


def records(out: Path) -> list[dict]:
    return list(iter_records(out / "results.jsonl"))


def run_cli(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


# ------------------------------------------------------------------------------------------------ torch-free
def test_runtime_never_imports_torch(tmp_path, models):
    synth_images(tmp_path / "imgs", 2)
    code = f"""
import sys, importlib, pkgutil
import crackcam.runtime
mods = [m.name for m in pkgutil.walk_packages(crackcam.runtime.__path__, "crackcam.runtime.")]
assert len(mods) >= 10 and "crackcam.runtime.pipeline" in mods, mods  # every module, found by walking the package
for m in mods:
    importlib.import_module(m)
from crackcam.runtime import cli
sys.argv = ["crack-run", "--model", {str(models['dyn'])!r}, "--source", {str(tmp_path / 'imgs')!r},
            "--out", {str(tmp_path / 'out')!r}, "--save", "all"]
try:
    cli.main()
except SystemExit as e:
    assert not e.code, e.code
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "crackcam.models", "crackcam.train",
                                                                     "crackcam.export", "torchvision")))
print("FORBIDDEN", bad)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "FORBIDDEN []" in r.stdout, r.stdout
    assert len(records(tmp_path / "out")) == 2


# ------------------------------------------------------------------------------------------------ sources
def test_folder_run_schema_files_and_summary(tmp_path, models):
    paths = synth_images(tmp_path / "imgs", 5)
    out = tmp_path / "out"
    r = run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", out, "--save",
                "masks,overlays,skeletons", "--mm-per-px", "0.5", "--batch", "2")
    assert r.exit_code == 0, r.output
    recs = records(out)
    assert [Path(x["source"]).name for x in recs] == [p.name for p in paths]  # in order
    for rec in recs:
        for k, typ in RECORD_KEYS.items():
            assert isinstance(rec[k], typ), (k, rec[k])
        assert 0.0 <= rec["prob"] <= 1.0
        assert (rec["width"], rec["height"]) == (128, 96)
        assert rec["length_mm"] == pytest.approx(rec["length_px"] * 0.5, abs=2e-3)
        assert rec["area_mm2"] == pytest.approx(rec["area_px"] * 0.25, abs=2e-3)
        assert rec["max_width_mm"] == pytest.approx(rec["max_width_px"] * 0.5, abs=2e-3)
        for kind in ("mask", "overlay", "skeleton"):
            f = out / rec["files"][kind]
            img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
            assert img.shape[:2] == (96, 128)
        mask = cv2.imread(str(out / rec["files"]["mask"]), cv2.IMREAD_GRAYSCALE) > 0
        assert int(mask.sum()) == rec["area_px"]
        assert rec["cracked"] == (rec["area_px"] > 0)
    # the mask is the shared post-processing of the model's map (same numbers as calling it directly)
    sess = open_session(models["dyn"], provider="cpu")
    bgr = cv2.imread(str(paths[0]))
    prob, cmap = sess.run(bgr[None])
    res = postprocess(cmap[0], PostProcessConfig.from_dict(sess.meta.postprocess))
    assert recs[0]["area_px"] == int(res.mask.sum())
    assert recs[0]["prob"] == pytest.approx(float(prob[0]), abs=1e-6)
    s = json.loads((out / "summary.json").read_text())
    assert s["frames"] == 5 and s["frames_total"] == 5
    assert s["cracked"] == sum(x["cracked"] for x in recs)
    assert s["cracked_fraction"] == pytest.approx(s["cracked"] / 5, abs=1e-6)
    assert s["fps"] > 0 and not s["interrupted"]
    assert "5 frames" in r.output and "FPS" in r.output
    assert not list(out.rglob(".*.tmp*"))  # no temp files left behind


def test_glob_source_and_camera_short_form(tmp_path, models):
    synth_images(tmp_path / "a", 3, ext=".png")
    synth_images(tmp_path / "a", 2, seed=1, ext=".jpg")
    out = tmp_path / "out"
    r = run_cli("--model", models["dyn"], "--source", str(tmp_path / "a" / "*.png"), "--out", out)
    assert r.exit_code == 0, r.output
    assert [Path(x["source"]).suffix for x in records(out)] == [".png"] * 3
    assert isinstance(open_source("0"), CameraSource) and open_source("0").spec == 0
    assert isinstance(open_source("rtsp://cam.local/stream"), CameraSource)
    r = run_cli("--model", models["dyn"], "--source", "0", "--camera", "0", "--out", out)
    assert r.exit_code == 2 and "not both" in r.output


def test_ultralytics_key_value_words(tmp_path, models, monkeypatch):
    assert cli._ultralytics_args(["model=m.onnx", "source=0", "--out", "x=y", "batch=4", "--save", "all"]) == [
        "--model", "m.onnx", "--source", "0", "--out", "x=y", "--batch", "4", "--save", "all"]
    assert cli._ultralytics_args(["max_frames=3", "a=b.jpg"]) == ["--max-frames", "3", "a=b.jpg"]
    synth_images(tmp_path / "imgs", 4)
    monkeypatch.setattr(sys, "argv", ["crack-run", f"model={models['dyn']}", f"source={tmp_path / 'imgs'}",
                                      f"out={tmp_path / 'o'}", "max_frames=3"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert not e.value.code
    assert len(records(tmp_path / "o")) == 3


def _write_video(path: Path, n: int, h: int = 96, w: int = 128, fps: float = 10.0) -> list[np.ndarray]:
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened()
    rng = np.random.default_rng(3)
    frames = []
    for i in range(n):
        img, _ = draw_crack_image(rng, h, w, n_cracks=i % 2)
        frames.append(img[..., ::-1].copy())
        vw.write(frames[-1])
    vw.release()
    return frames


def test_video_source_order_timestamps_and_resume(tmp_path, models):
    vid = tmp_path / "drive.avi"
    _write_video(vid, 12)
    out = tmp_path / "out"
    t0 = 1_700_000_000.0
    r = run_cli("--model", models["dyn"], "--source", vid, "--out", out, "--max-frames", "5", "--batch", "3",
                "--start-time", str(t0))
    assert r.exit_code == 0, r.output
    assert [x["frame"] for x in records(out)] == [0, 1, 2, 3, 4]
    # interrupted write: a truncated last line is tolerated and that frame redone
    with open(out / "results.jsonl", "ab") as f:
        f.write(b'{"key": "' + str(vid).encode() + b'#5", "frame": 5, "prob"')
    r = run_cli("--model", models["dyn"], "--source", vid, "--out", out, "--batch", "3", "--start-time", str(t0))
    assert r.exit_code == 0, r.output
    recs = records(out)
    assert [x["frame"] for x in recs] == list(range(12))
    assert [x["timestamp"] for x in recs] == pytest.approx([t0 + i / 10.0 for i in range(12)])
    s = json.loads((out / "summary.json").read_text())
    assert s["frames"] == 7 and s["frames_total"] == 12 and s["skipped_done"] == 5
    assert "resuming: 5 frames" in r.output
    # a third run has nothing left to do
    r = run_cli("--model", models["dyn"], "--source", vid, "--out", out, "--start-time", str(t0))
    assert r.exit_code == 0 and len(records(out)) == 12
    # without --start-time its timestamps would be others: refused, not mixed
    r = run_cli("--model", models["dyn"], "--source", vid, "--out", out)
    assert r.exit_code == 2 and "start_time" in r.output


def test_resume_folder_after_max_frames_same_results(tmp_path, models):
    synth_images(tmp_path / "imgs", 6)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", a).exit_code == 0
    assert run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", b, "--max-frames", "4").exit_code == 0
    assert len(records(b)) == 4
    assert run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", b).exit_code == 0
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("ms")}  # noqa: E731
    assert [strip(x) for x in records(b)] == [strip(x) for x in records(a)]
    keys = [x["key"] for x in records(b)]
    assert len(keys) == len(set(keys)) == 6



def test_resume_refuses_records_of_another_model_or_other_options(tmp_path, models):
    """Resuming into an OUT whose records another model or other options wrote would mix two runs in one
    results.jsonl and summary: one line, exit 2, nothing touched; --no-resume starts over."""
    from crackcam.runtime.pipeline import RUN_FILE

    synth_images(tmp_path / "imgs", 4)
    out = tmp_path / "out"
    base = ("--source", tmp_path / "imgs", "--out", out)
    assert run_cli("--model", models["dyn"], *base, "--max-frames", "2").exit_code == 0
    ident = json.loads((out / RUN_FILE).read_text())
    own = ident["settings"]["post.threshold"]  # the effective settings: the model's own threshold ...
    assert len(ident["model_sha256"]) == 64 and own is not None and "survey.overlap" in ident["settings"]
    before = (out / "results.jsonl").read_bytes()
    r = run_cli("--model", models["dyn"], *base, "--threshold", str(own), "--max-frames", "1")
    assert r.exit_code == 0 and "resuming: 2 frames" in r.output, r.output  # ... typed: the same run
    assert len(records(out)) == 3 and json.loads((out / RUN_FILE).read_text()) == ident
    before = (out / "results.jsonl").read_bytes()

    r = run_cli("--model", models["fixed"], *base)  # another model file
    assert r.exit_code == 2 and "written by another model" in r.output and "--no-resume" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    r = run_cli("--model", models["dyn"], *base, "--threshold", "0.7")  # same model, another threshold
    assert r.exit_code == 2 and f"other options (post.threshold {own!r} → 0.7)" in r.output, r.output
    r = run_cli("--model", models["dyn"], *base, "--roi", "0,0 1,0 1,0.5")
    assert r.exit_code == 2 and "other options (survey.roi " in r.output, r.output
    assert (out / "results.jsonl").read_bytes() == before  # refused runs wrote nothing
    assert json.loads((out / RUN_FILE).read_text()) == ident  # ... and left the record of what wrote it

    # the same model under another path (a copy) and the same options: resumes
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(Path(models["dyn"]).read_bytes())
    r = run_cli("--model", copy, *base)
    assert r.exit_code == 0 and "resuming: 3 frames" in r.output and len(records(out)) == 4
    # --no-resume starts over with the new options and records them
    r = run_cli("--model", models["dyn"], *base, "--threshold", "0.7", "--no-resume")
    assert r.exit_code == 0 and len(records(out)) == 4
    assert json.loads((out / RUN_FILE).read_text())["settings"]["post.threshold"] == 0.7

    r = run_cli("--model", models["dyn"], *base, "--threshold", "0.7", "--no-refine", "--gate", "0.9",
                "--overlap", "4", "--min-length", "5", "--scale", "0.5", "--max-side", "64")  # many differences: the first four, then a count
    assert r.exit_code == 2 and "and 1 more); pass --no-resume" in r.output and len(r.output) < 600, r.output
    # a run.json of the format before (the options as typed): said so, not a list of every key
    old_format = json.loads((out / RUN_FILE).read_text())
    old_format.pop("format")
    (out / RUN_FILE).write_text(json.dumps(old_format))
    r = run_cli("--model", models["dyn"], *base, "--threshold", "0.7")
    assert r.exit_code == 2 and "another crackcam version (format 1" in r.output, r.output
    # records with no run.json (an older crackcam): not resumed blindly
    (out / RUN_FILE).unlink()
    r = run_cli("--model", models["dyn"], *base, "--threshold", "0.7")
    assert r.exit_code == 2 and "no run.json" in r.output
    # a ROI mask PNG counts by its content: the same mask elsewhere resumes, an edited one is refused
    roi = np.zeros((96, 128), np.uint8)
    roi[:, :100] = 255
    cv2.imwrite(str(tmp_path / "roi.png"), roi)
    out2 = tmp_path / "out2"
    assert run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", out2, "--roi",
                   tmp_path / "roi.png", "--max-frames", "2").exit_code == 0
    (tmp_path / "elsewhere").mkdir()
    cv2.imwrite(str(tmp_path / "elsewhere" / "roi.png"), roi)
    r = run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", out2, "--roi",
                tmp_path / "elsewhere" / "roi.png", "--max-frames", "1")
    assert r.exit_code == 0 and "resuming: 2 frames" in r.output, r.output
    roi[:, 100:] = 255
    cv2.imwrite(str(tmp_path / "roi.png"), roi)
    r = run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", out2, "--roi", tmp_path / "roi.png")
    assert r.exit_code == 2 and "other options (survey.roi_mask " in r.output

    # ... but a file holding only a cut-off line has no record to mix with: the run goes on
    (out / "results.jsonl").write_text('{"key": "cut off by a power fail')
    r = run_cli("--model", models["dyn"], *base)
    assert r.exit_code == 0 and len(records(out)) == 4 and (out / RUN_FILE).is_file()



def test_a_live_source_is_never_told_to_delete_its_records(tmp_path):
    """A camera's OUT only ever appends: a mismatch there points to a new --out, not to --no-resume."""
    from crackcam.runtime.pipeline import ResumeMismatch, start_results

    (tmp_path / "results.jsonl").write_text('{"key": "camera:0#1", "frame": 1}\n')
    ident = {"model_sha256": "a" * 64, "model": "m.onnx", "settings": {}}
    start_results(tmp_path, False, print, identity=ident)  # --no-resume: starts over, records the identity
    (tmp_path / "results.jsonl").write_text('{"key": "camera:0#1", "frame": 1}\n')
    other = {**ident, "model_sha256": "b" * 64}
    with pytest.raises(ResumeMismatch, match="choose a new --out .--no-resume would delete"):
        start_results(tmp_path, True, print, live=True, identity=other)
    with pytest.raises(ResumeMismatch, match="pass --no-resume to start over"):
        start_results(tmp_path, True, print, live=False, identity=other)
    assert start_results(tmp_path, True, print, live=True, identity=ident) == set()  # same: appends


# ------------------------------------------------------------------------------------------------ faults
def test_unreadable_files_are_skipped_with_one_line(tmp_path, models):
    paths = synth_images(tmp_path / "imgs", 3)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # truncated JPEG
    (tmp_path / "imgs" / "zz_text.png").write_text("not an image")
    out = tmp_path / "out"
    r = run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", out)
    assert r.exit_code == 0, r.output
    assert [Path(x["source"]).name for x in records(out)] == [paths[0].name, paths[2].name]
    skipped = [ln for ln in r.output.splitlines() if ln.startswith("crack-run: skipped")]
    assert len(skipped) == 2 and any("img_001.jpg: truncated JPEG" in ln for ln in skipped)
    assert "Traceback" not in r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["unreadable"] == 2 and s["frames"] == 2


@pytest.mark.parametrize("which,needle", [("nometa", "no crackcam metadata"), ("badsize", "does not match"),
                                          ("rgb", "input.color is 'RGB'"), ("badjson", "not valid JSON")])
def test_model_metadata_problems_one_line_exit_2(tmp_path, models, which, needle):
    synth_images(tmp_path / "imgs", 1)
    r = run_cli("--model", models[which], "--source", tmp_path / "imgs", "--out", tmp_path / "out")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and str(models[which]) in lines[0] and needle in lines[0], r.output


def test_bad_model_file_and_missing_source(tmp_path, models):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x00\x01 not a model")
    synth_images(tmp_path / "imgs", 1)
    r = run_cli("--model", bad, "--source", tmp_path / "imgs", "--out", tmp_path / "o")
    assert r.exit_code == 2 and str(bad) in r.output and len(r.output.strip().splitlines()) == 1
    r = run_cli("--model", models["dyn"], "--source", tmp_path / "nope", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "nope: source not found" in r.output
    (tmp_path / "empty").mkdir()
    r = run_cli("--model", models["dyn"], "--source", tmp_path / "empty", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "no images in folder" in r.output
    r = run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", tmp_path / "o", "--save", "pdf")
    assert r.exit_code == 2 and "unknown kind 'pdf'" in r.output


def test_packaged_default_model_runs_and_matches_its_provenance(tmp_path):
    """crack-run with no --model uses crackcam/assets/default.onnx, built by crackcam.tools.default_model."""
    import hashlib

    assert cli.DEFAULT_MODEL.is_file(), "the packaged default model is missing (python -m crackcam.tools.default_model)"
    prov = json.loads(cli.DEFAULT_MODEL.with_name("default_model.json").read_text())
    assert prov["sha256"] == hashlib.sha256(cli.DEFAULT_MODEL.read_bytes()).hexdigest()
    assert prov["commands"][0].startswith("crack-train ") and prov["licence_of_the_data"]
    sess = open_session(cli.DEFAULT_MODEL, provider="cpu", log=lambda m: None)
    assert sess.meta.kind == "cam" and sess.meta.raw.get("data_card_sha256") == prov["data"]["data_card_sha256"]
    synth_images(tmp_path / "imgs", 3)
    r = run_cli("--source", tmp_path / "imgs", "--out", tmp_path / "o", "--save", "masks", "--no-progress")
    assert r.exit_code == 0, r.output
    recs = list(iter_records(tmp_path / "o" / "results.jsonl"))
    assert len(recs) == 3 and all(rec["area_px"] > 0 for rec in recs)  # the drawn cracks are found


def test_missing_default_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "DEFAULT_MODEL", tmp_path / "assets" / "default.onnx")
    synth_images(tmp_path / "imgs", 1)
    r = run_cli("--source", tmp_path / "imgs", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "default.onnx is not present" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_tensorrt_engine_absent_is_one_line(tmp_path, models):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here; the absence message cannot be checked")
    except ImportError:
        pass
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"not really an engine")
    (tmp_path / "m.engine.json").write_text(json.dumps(toy_metadata()))
    synth_images(tmp_path / "imgs", 1)
    r = run_cli("--model", eng, "--source", tmp_path / "imgs", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "TensorRT" in r.output and len(r.output.strip().splitlines()) == 1
    (tmp_path / "m.engine.json").unlink()
    r = run_cli("--model", eng, "--source", tmp_path / "imgs", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "no crackcam metadata" in r.output and str(eng) in r.output


def test_tensorrt_engine_runs_like_onnx(tmp_path):
    """Build a TensorRT engine from the toy ONNX (TensorRT 10 builder API) and check TrtSession == ONNX Runtime."""
    from tests._deps import require, require_gpu

    trt = require("tensorrt")  # skip when not installed; a broken install fails
    require_gpu()
    from crackcam.runtime.sessions import TrtSession

    onnx_path = make_toy_model(tmp_path / "m.onnx")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    prof = builder.create_optimization_profile()
    prof.set_shape("image", (1, 32, 32, 3), (2, 96, 128, 3), (4, 256, 256, 3))
    config.add_optimization_profile(prof)
    engine = builder.build_serialized_network(network, config)
    eng = tmp_path / "m.engine"
    eng.write_bytes(bytes(engine))
    (tmp_path / "m.engine.json").write_text(json.dumps(toy_metadata()))
    trt_sess = TrtSession(eng, log=lambda m: None)
    ort_sess = open_session(onnx_path)
    rng = np.random.default_rng(0)
    x = np.stack([draw_crack_image(rng, 96, 128)[0][..., ::-1] for _ in range(3)])
    p1, m1 = trt_sess.run(x)
    p0, m0 = ort_sess.run(x)
    assert np.abs(p1 - p0).max() < 1e-3 and np.abs(m1 - m0).max() < 1e-3
    trt_sess.close()


def test_provider_choice_and_unavailable_provider(tmp_path, models):
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("auto", avail) == avail
    assert choose_providers("auto", ["CPUExecutionProvider", "AzureExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers("cuda", avail) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present: the unavailable-provider line cannot be checked")
    synth_images(tmp_path / "imgs", 1)
    r = run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", tmp_path / "o", "--provider", "cuda")
    assert r.exit_code == 2 and "provider 'cuda' is not available" in r.output
    assert len(r.output.strip().splitlines()) == 1


class FakeCap:
    """A cv2.VideoCapture stand-in: ``n`` frames then a failed read (a dropped camera)."""

    def __init__(self, n: int, start: int = 0, opened: bool = True):
        self.n, self.i, self.start, self.opened = n, 0, start, opened
        self.released = False

    def isOpened(self):
        return self.opened

    def read(self):
        if self.i >= self.n:
            return False, None
        v = (self.start + self.i) * 10 % 200
        img = np.full((48, 64, 3), 150, np.uint8)
        img[20:23, 5:60] = v  # a dark line when v is small
        self.i += 1
        return True, img

    def release(self):
        self.released = True


def _camera(caps, **kw):
    it = iter(caps)
    logs = []
    src = CameraSource(0, retries=2, backoff=0.01, log=logs.append, opener=lambda spec: next(it, None),
                       sleep=lambda s: None, **kw)
    return src, logs


def test_camera_drop_reconnects_then_stops_cleanly(tmp_path, models):
    caps = [FakeCap(4), FakeCap(3, start=4), None, FakeCap(0, opened=False), None]
    src, logs = _camera(caps)
    sess = open_session(models["dyn"])
    s = Pipeline(sess, src, RunConfig(out=tmp_path / "out", batch=2, progress=False), log=logs.append).run()
    recs = records(tmp_path / "out")
    assert [x["frame"] for x in recs] == list(range(7))  # 4 before the drop, 3 after the reconnect
    assert s["frames"] == 7 and "lost after frame 7" in s["stopped_reason"]
    assert src.reconnects == 1
    assert sum("retry" in ln for ln in logs) == 2  # the last reconnect round: 3 attempts, 2 backoff waits
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["stopped_reason"] == s["stopped_reason"]
    assert caps[0].released and caps[1].released


def test_camera_never_opens_gives_summary(tmp_path, models):
    src, logs = _camera([None, FakeCap(0, opened=False), None])
    s = Pipeline(open_session(models["dyn"]), src, RunConfig(out=tmp_path / "o", progress=False), log=logs.append).run()
    assert s["frames"] == 0 and "cannot open after 3 attempts" in s["stopped_reason"]
    assert (tmp_path / "o" / "summary.json").is_file()


class HangingCap(FakeCap):
    """Gives ``n`` frames, then read() blocks (an RTSP stream that went silent without an error)."""

    def __init__(self, n, on_hang):
        super().__init__(n)
        self.on_hang, self.gate = on_hang, threading.Event()

    def read(self):
        if self.i >= self.n:
            self.on_hang()
            self.gate.wait(30)
            return False, None
        return super().read()


def test_silent_camera_does_not_block_stopping(tmp_path, models):
    import time

    ev = threading.Event()
    cap = HangingCap(3, on_hang=ev.set)
    src, logs = _camera([cap])
    pipe = Pipeline(open_session(models["dyn"]), src, RunConfig(out=tmp_path / "o", progress=False, stop_event=ev),
                    log=logs.append)
    pipe.reader_grace_s = 0.3
    t = time.perf_counter()
    s = pipe.run()
    assert time.perf_counter() - t < 10
    assert s["frames"] == 3 and s["interrupted"]
    assert any("does not answer" in ln for ln in logs)
    assert not cap.released  # not released under the reader's feet
    cap.gate.set()


class InterruptingSource(Source):
    """Yields frames forever; after ``at`` frames it raises Ctrl-C in the main thread (as a user would)."""

    kind = "video"

    def __init__(self, at: int):
        super().__init__(log=lambda m: None)
        self.at = at
        self.name = "fake.avi"
        self.yielded = 0

    def frames(self, skip=None):
        rng = np.random.default_rng(0)
        i = 0
        while True:
            img, _ = draw_crack_image(rng, 48, 64)
            if i == self.at:
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
            self.yielded += 1
            self.stats.read += 1
            yield Frame(i, img, self.name, float(i), f"fake.avi#{i}")
            i += 1
            if i > 10_000:
                return


def test_ctrl_c_finishes_frames_in_flight_and_writes_summary(tmp_path, models):
    src = InterruptingSource(at=6)
    logs = []
    pipe = Pipeline(open_session(models["dyn"]), src, RunConfig(out=tmp_path / "o", batch=2, progress=False),
                    log=logs.append)
    s = pipe.run()
    recs = records(tmp_path / "o")
    assert s["interrupted"] and any("interrupted" in ln for ln in logs)
    assert 6 <= len(recs) < 1000
    assert [x["frame"] for x in recs] == list(range(len(recs)))  # every frame taken in was finished, in order
    assert src.yielded - len(recs) <= 1  # at most the one frame being read when Ctrl-C came
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["frames"] == len(recs)


def test_stop_event_and_show_without_gui(tmp_path, models):
    ev = threading.Event()
    src = InterruptingSource(at=10 ** 9)
    orig = src.frames

    def frames(skip=None):
        for fr in orig(skip):
            if fr.index == 3:
                ev.set()
            yield fr

    src.frames = frames
    logs = []
    s = Pipeline(open_session(models["dyn"]), src, RunConfig(out=tmp_path / "o", progress=False, stop_event=ev,
                                                             show=True), log=logs.append).run()
    assert s["interrupted"] and 3 <= s["frames"] <= 5
    if re.search(r"GUI:\s+NONE", cv2.getBuildInformation()):
        # headless OpenCV (this project's dependency): one line, then the run goes on
        assert len([ln for ln in logs if "--show needs an OpenCV build with GUI" in ln]) == 1


class FailingSession:
    """Wraps a session; the ``fail_at``-th inference call raises (a driver/runtime error mid-run)."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.meta, self.path, self.provider, self.max_batch = inner.meta, inner.path, "fake", inner.max_batch

    def run(self, batch):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("CUDA error: device lost")
        return self.inner.run(batch)


def test_inference_error_mid_run_keeps_written_frames_and_summary(tmp_path, models, monkeypatch):
    synth_images(tmp_path / "imgs", 6)
    sess = FailingSession(open_session(models["dyn"]), fail_at=3)
    pipe = Pipeline(sess, open_source(tmp_path / "imgs"), RunConfig(out=tmp_path / "o", batch=1, progress=False,
                                                                     post_workers=1), log=lambda m: None)
    with pytest.raises(RuntimeError, match="device lost"):
        pipe.run()
    recs = records(tmp_path / "o")
    assert [x["frame"] for x in recs] == [0, 1]  # what was done before the failure stays written
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["frames"] == 2 and "device lost" in s["error"]
    # the CLI turns it into one line, exit 1
    import crackcam.runtime.sessions as sessions_mod

    real = sessions_mod.open_session
    monkeypatch.setattr(sessions_mod, "open_session", lambda *a, **k: FailingSession(real(*a, **k), fail_at=2))
    r = run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", tmp_path / "o", "--workers", "1")
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 2 and "resuming: 2 frames" in lines[0] and "device lost" in lines[1]
    assert len(records(tmp_path / "o")) == 3
    monkeypatch.undo()
    # a re-run resumes after the frames written
    r = run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", tmp_path / "o")
    assert r.exit_code == 0 and len(records(tmp_path / "o")) == 6


# ------------------------------------------------------------------------------------------------ tiling
def test_tile_origins_cover_and_blend_is_a_partition():
    for size, tile, ov in [(300, 64, 16), (64, 64, 16), (65, 64, 32), (4096, 448, 64), (50, 64, 8)]:
        o = tile_origins(size, tile, ov)
        assert o[0] == 0 and (o[-1] + tile >= size)
        assert all(b - a <= tile - ov for a, b in zip(o, o[1:])) or len(o) == 1
    w = blend_window(64, 64, 16)
    assert w.min() > 0 and w[32, 32] == 1.0
    # a constant map stitches to the same constant; two different tiles blend convexly in the overlap
    maps = [np.full((64, 64), 0.2, np.float32), np.full((64, 64), 0.8, np.float32)]
    m = stitch(maps, [(0, 0), (0, 48)], (64, 112), 16)
    assert np.allclose(m[:, :48], 0.2) and np.allclose(m[:, 64:], 0.8)
    mid = m[10, 48:64]
    assert np.all(np.diff(mid) > 0) and mid.min() > 0.2 and mid.max() < 0.8
    # gated tiles are skipped, not stitched as zero maps: the same map to the bit (weights over every tile)
    rng = np.random.default_rng(2)
    coords = [(0, 0), (0, 48), (48, 0), (48, 48)]
    maps = [rng.random((64, 64)).astype(np.float32) for _ in coords]
    for keep in ([True, False, True, False], [False] * 4, [False, False, False, True]):
        zeroed = [mp if k else np.zeros_like(mp) for mp, k in zip(maps, keep)]
        assert np.array_equal(stitch(maps, coords, (112, 112), 16, keep), stitch(zeroed, coords, (112, 112), 16))


def test_postprocess_of_an_empty_map_is_the_empty_result_of_any_map():
    """A gated frame's all-zero map short-cuts the post-processing; its result (mask, skeleton, measures,
    threshold) is what a map whose pixels are all cleaned away gives."""
    from crackcam.runtime.postprocess import PostProcessConfig, postprocess

    speck = np.zeros((60, 80), np.float32)
    speck[10, 10:12] = 0.9
    for cfg in (PostProcessConfig(threshold=0.5, min_area=10), PostProcessConfig(threshold=0.5, min_area=10,
                                                                                  skeleton=False)):
        a = postprocess(np.zeros((60, 80), np.float32), cfg, mm_per_px=0.4)
        b = postprocess(speck, cfg, mm_per_px=0.4)
        assert not a.mask.any() and not b.mask.any() and a.threshold == b.threshold == 0.5
        assert a.measures == b.measures, (a.measures, b.measures)
        assert (a.skeleton is None) == (b.skeleton is None) and (a.skeleton is None or not a.skeleton.any())


def test_tiled_large_frame_equals_whole_frame(tmp_path, models):
    """A pixel-wise model: tiles of a fixed 64×64 model stitched back == the dynamic model on the whole frame."""
    rng = np.random.default_rng(5)
    img, _ = draw_crack_image(rng, 200, 330, n_cracks=3)
    (tmp_path / "big").mkdir()
    cv2.imwrite(str(tmp_path / "big" / "big.png"), img[..., ::-1])
    cv2.imwrite(str(tmp_path / "big" / "small.png"), img[:40, :50, ::-1].copy())  # smaller than the tile: padded
    outs = {}
    for name, extra in (("dyn", []), ("fixed", ["--overlap", "16", "--batch", "5"]), ("batch4", ["--overlap", "24"])):
        out = tmp_path / name
        r = run_cli("--model", models[name], "--source", tmp_path / "big", "--out", out, "--save", "masks", *extra)
        assert r.exit_code == 0, r.output
        outs[name] = out
    for stem in ("big", "small"):
        ref = cv2.imread(str(outs["dyn"] / "masks" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
        for name in ("fixed", "batch4"):
            got = cv2.imread(str(outs[name] / "masks" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
            assert got.shape == ref.shape
            assert np.array_equal(got, ref), (name, stem, int((got != ref).sum()))
    a, b = records(outs["dyn"]), records(outs["fixed"])
    for x, y in zip(a, b):
        assert x["prob"] == pytest.approx(y["prob"], abs=1e-6)
        assert x["length_px"] == pytest.approx(y["length_px"], abs=1e-3)
    # and the stitched map itself matches to float precision
    sess_f, sess_d = open_session(models["fixed"]), open_session(models["dyn"])
    pipe = Pipeline(sess_f, open_source(tmp_path / "big"), RunConfig(out=tmp_path / "x", overlap=16, progress=False))
    plan = pipe.plan(Frame(0, img[..., ::-1].copy(), "big", None, "big"))
    assert len(plan.tiles) > 4
    maps = [sess_f.run(t[None])[1][0] for t in plan.tiles]
    stitched = stitch(maps, plan.plan.coords, plan.plan.padded_shape, plan.plan.overlap)[:img.shape[0], :img.shape[1]]
    whole = sess_d.run(img[None, ..., ::-1].copy())[1][0]
    assert np.abs(stitched - whole).max() < 1e-5


def test_dynamic_model_max_side_resizes_and_maps_back(tmp_path, models):
    synth_images(tmp_path / "imgs", 2, h=240, w=320)
    out = tmp_path / "o"
    r = run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", out, "--max-side", "160",
                "--save", "masks")
    assert r.exit_code == 0, r.output
    for rec in records(out):
        assert cv2.imread(str(out / rec["files"]["mask"]), cv2.IMREAD_GRAYSCALE).shape == (240, 320)


# ------------------------------------------------------------------------------------------------ GPS
def test_gps_csv_geojson_and_threshold_override(tmp_path, models):
    vid = tmp_path / "v.avi"
    _write_video(vid, 12, fps=2.0)
    t0 = 1_700_000_000.0
    gps = tmp_path / "track.csv"
    gps.write_text("time,lat,lon\n" + "\n".join(f"{t0 + k},{50 + 0.001 * k},{4 + 0.002 * k}" for k in range(4)))
    out = tmp_path / "o"
    r = run_cli("--model", models["dyn"], "--source", vid, "--out", out, "--gps", gps, "--start-time", str(t0),
                "--gps-max-gap", "1.5", "--threshold", "0.3")
    assert r.exit_code == 0, r.output
    recs = records(out)
    assert all(x["threshold"] == 0.3 for x in recs)
    # frame i at t0 + i/2 s: interpolated while inside the log; beyond its end by more than 1.5 s: none
    for x in recs:
        dt = x["frame"] / 2.0
        if dt <= 3 + 1.5:
            assert x["lat"] == pytest.approx(50 + 0.001 * min(dt, 3), abs=1e-7)
            assert x["lon"] == pytest.approx(4 + 0.002 * min(dt, 3), abs=1e-7)
        else:
            assert x["lat"] is None and x["lon"] is None
    gj = json.loads((out / "cracks.geojson").read_text())
    want = [x for x in recs if x["cracked"] and x["lat"] is not None]
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(want) > 0
    f0 = gj["features"][0]
    assert f0["geometry"]["coordinates"] == [want[0]["lon"], want[0]["lat"]]
    assert f0["properties"]["length_px"] == want[0]["length_px"]


def _nmea(body: str) -> str:
    return f"${body}*{geo.nmea_checksum(body):02X}"


def test_gps_nmea_rmc_gga_matching(tmp_path):
    from datetime import datetime, timezone

    from crackcam.runtime.geo import read_gps

    lines = [
        _nmea("GPRMC,120000.00,A,5030.0000,N,00400.0000,E,10.0,90.0,010524,,"),
        _nmea("GPGGA,120000.00,5030.0000,N,00400.0000,E,1,08,0.9,10.0,M,0.0,M,,"),
        _nmea("GPRMC,120001.00,A,5030.0600,N,00400.1200,E,10.0,90.0,010524,,"),
        "$GPRMC,120002.00,A,5031.0000,N,00401.0000,E,10.0,90.0,010524,,*00",  # bad checksum: ignored
        _nmea("GPRMC,120003.00,V,5032.0000,N,00402.0000,E,10.0,90.0,010524,,"),  # void fix: ignored
        _nmea("GPGGA,120004.00,3330.0000,S,07030.0000,W,1,08,0.9,10.0,M,0.0,M,,"),
    ]
    p = tmp_path / "log.nmea"
    p.write_text("\n".join(lines) + "\n")
    tr = read_gps(p)
    t0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc).timestamp()
    assert len(tr) == 3 and not tr.time_of_day
    assert tr.locate(t0) == pytest.approx((50.5, 4.0))
    assert tr.locate(t0 + 0.5) == pytest.approx((50.5005, 4.001))  # linear between 5030.00 and 5030.06
    assert tr.locate(t0 + 0.4, method="nearest") == pytest.approx((50.5, 4.0))
    assert tr.locate(t0 + 4) == pytest.approx((-33.5, -70.5))  # S / W are negative
    assert tr.locate(t0 + 2.5, max_gap=1.0) is None  # 3 s between fixes, 1.5 s from each
    assert tr.locate(t0 + 60) is None
    # GGA only (no date): matched on time of day
    q = tmp_path / "gga.nmea"
    q.write_text("\n".join([_nmea("GPGGA,235959.00,0100.0000,N,00100.0000,E,1,08,0.9,1,M,0,M,,"),
                            _nmea("GPGGA,000000.00,0000.0000,N,00000.0000,E,0,00,,,M,,M,,")]))
    tq = read_gps(q)
    assert tq.time_of_day and len(tq) == 1
    assert tq.locate(t0 - 12 * 3600 - 1 + 86400) == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError, match="no valid fix"):
        (tmp_path / "junk.csv").write_text("time,lat,lon\nx,y,z\n")
        read_gps(tmp_path / "junk.csv")


def test_gps_iso_times_and_bad_log_is_one_line(tmp_path, models):
    from crackcam.runtime.geo import read_gps

    p = tmp_path / "iso.csv"
    p.write_text("2024-05-01T12:00:00Z,10,20\n2024-05-01T12:00:10Z,11,22\n")
    tr = read_gps(p)
    assert tr.locate(tr.t[0] + 5, max_gap=20) == pytest.approx((10.5, 21.0))
    assert tr.locate(tr.t[0] + 5, max_gap=5) == pytest.approx((10.0, 20.0))  # gap too wide: nearest fix
    synth_images(tmp_path / "imgs", 1)
    r = run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", tmp_path / "o",
                "--gps", tmp_path / "missing.csv")
    assert r.exit_code == 2 and "missing.csv: GPS log not found" in r.output


# ------------------------------------------------------------------------------------------------ batching
def test_fixed_batch_model_pads_and_order_is_kept(tmp_path, models):
    synth_images(tmp_path / "imgs", 7, h=64, w=64)
    out = tmp_path / "o"
    r = run_cli("--model", models["batch4"], "--source", tmp_path / "imgs", "--out", out, "--batch", "2",
                "--workers", "3")
    assert r.exit_code == 0, r.output
    assert "exactly 4" in r.output
    recs = records(out)
    assert [x["frame"] for x in recs] == list(range(7))
    ref = tmp_path / "ref"
    assert run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", ref).exit_code == 0
    assert [x["area_px"] for x in recs] == [x["area_px"] for x in records(ref)]


def test_restoration_graph_without_prob(tmp_path, models):
    """UP-CrackNet-style graphs: outputs restored + map, no prob; the frame's prob is the map maximum."""
    m = make_toy_model(tmp_path / "rest.onnx", kind="restoration")
    synth_images(tmp_path / "imgs", 3)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("--model", m, "--source", tmp_path / "imgs", "--out", a, "--save", "masks").exit_code == 0
    assert run_cli("--model", models["dyn"], "--source", tmp_path / "imgs", "--out", b).exit_code == 0
    ra, rb = records(a), records(b)
    assert [x["area_px"] for x in ra] == [x["area_px"] for x in rb]
    assert [x["prob"] for x in ra] == pytest.approx([x["prob"] for x in rb], abs=1e-6)


def test_cli_sigint_subprocess_writes_summary(tmp_path, models):
    """A real crack-run process, Ctrl-C (SIGINT) mid-run: exit 0, frames so far written in order, summary."""
    import time

    vid = tmp_path / "long.avi"
    _write_video(vid, 400, h=48, w=64)
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "crackcam.runtime.cli", "--model", str(models["dyn"]), "--source",
                             str(vid), "--out", str(out), "--workers", "1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    res = out / "results.jsonl"
    t0 = time.time()
    while time.time() - t0 < 60 and proc.poll() is None:
        if res.is_file() and res.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    so, se = proc.communicate(timeout=60)
    assert proc.returncode == 0, se
    assert "Traceback" not in se
    s = json.loads((out / "summary.json").read_text())
    recs = records(out)
    assert [x["frame"] for x in recs] == list(range(len(recs))) and s["frames"] == len(recs) >= 3
    if len(recs) < 400:  # the usual case: stopped early
        assert s["interrupted"] and "interrupted" in se and "interrupted" in so


def test_session_reads_metadata(models):
    s = OrtSession(models["fixed"], provider="cpu", log=lambda m: None)
    assert s.meta.fixed_size == (64, 64) and s.meta.kind == "cam" and s.provider == "CPU"
    prob, cmap = s.run(np.zeros((3, 64, 64, 3), np.uint8))
    assert prob.shape == (3,) and cmap.shape == (3, 64, 64) and np.allclose(prob, 1.0)


def test_metadata_refine_step_is_applied_on_the_frame(tmp_path):
    """A refine-<cam> recipe: the graph's map is the region prior, the shared cue refinement runs on the frame
    with the refined map's own threshold/post-processing; --no-refine post-processes the graph's map as it is."""
    from crackcam.runtime.cues import RefineConfig, refine

    rf = {"method": "refine-toy", "cue": "blackhat", "mode": "component", "dilate": 8, "prior_power": 0.5,
          "threshold": 0.3, "postprocess": {"min_area": 10}}
    model = make_toy_model(tmp_path / "refine.onnx", metadata=toy_metadata(refine=rf))
    paths = synth_images(tmp_path / "imgs", 2)
    r1 = run_cli("--model", model, "--source", tmp_path / "imgs", "--out", tmp_path / "a", "--save", "masks")
    r2 = run_cli("--model", model, "--source", tmp_path / "imgs", "--out", tmp_path / "b", "--save", "masks",
                 "--no-refine")
    assert r1.exit_code == 0 and r2.exit_code == 0, (r1.output, r2.output)
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert a[0]["threshold"] == pytest.approx(0.3) and b[0]["threshold"] == pytest.approx(0.5)
    sess = open_session(model, provider="cpu")
    bgr = cv2.imread(str(paths[0]))
    _, cmap = sess.run(bgr[None])
    want = postprocess(refine(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), cmap[0], RefineConfig.from_dict(rf)),
                       PostProcessConfig.from_dict({"threshold": 0.3, "min_area": 10}))
    got = cv2.imread(str(tmp_path / "a" / a[0]["files"]["mask"]), cv2.IMREAD_GRAYSCALE) > 0
    assert np.array_equal(got, want.mask)
    assert a[0]["area_px"] != b[0]["area_px"]


@pytest.mark.parametrize("area", ["survey", "runtime"])
def test_crack_bench_bad_model_is_one_line_exit_2(tmp_path, area):
    """A benchmark pointed at a broken model file says so in one line (exit 2), as crack-run does."""
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "a.png"), np.full((64, 64, 3), 128, np.uint8))
    argv = [area, "--model", str(bad)] + (["--frames", str(frames), "--n", "1"] if area == "survey" else [])
    r = subprocess.run([sys.executable, "-c", f"import sys; from crackcam.tools import bench; "
                        f"sys.exit(bench.main({argv!r}))"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-800:]
    assert "bad.onnx: not a loadable ONNX model" in r.stderr and "Traceback" not in r.stderr


def test_crack_bench_runtime_measures_the_model_alone_for_tiled_models_too(tmp_path, models):
    """A fixed-input model (the packaged default is one: 128² tiles) is timed alone on the tiles crack-run cuts;
    this used to print 'nan' for it."""
    from crackcam.tools.bench_runtime import bench_fps

    for name in ("fixed", "dyn"):
        r = bench_fps(models[name], n_images=4, size=96, batch=2, provider="cpu", threads=1,
                      workdir=tmp_path / name, repeats=1)
        assert r["bare_fps"] is not None and np.isfinite(r["bare_fps"]) and r["bare_fps"] > 0, name
        assert r["e2e_fps"] > 0 and r["frames"] == 4


def test_run_identity_is_the_effective_steps_of_every_camera_profile():
    """The packaged default has a camera profile (544x384): --threshold at the top level's own value changes that
    profile's frames, so it is another run; the top level's overlap typed at its own value is not."""
    from crackcam.runtime.cli import DEFAULT_MODEL
    from crackcam.runtime.pipeline import build_model_steps, run_identity
    from crackcam.runtime.sessions import open_session

    sess = open_session(DEFAULT_MODEL, provider="cpu", log=lambda m: None, threads=1)
    plain = build_model_steps(sess)
    names = [n for n, _ in plain.profiles()]
    assert names[0] == "" and "544x384" in names
    base = run_identity(DEFAULT_MODEL, plain)["settings"]
    top = base["post.threshold"]
    assert base["544x384:post.threshold"] != top
    same = run_identity(DEFAULT_MODEL, build_model_steps(sess, overlap=base["survey.overlap"]))["settings"]
    assert same == base
    other = run_identity(DEFAULT_MODEL, build_model_steps(sess, threshold=top))["settings"]
    assert [k for k in base if base[k] != other[k]] == ["544x384:post.threshold"]


def test_read_image_bgr_is_the_rgb_read_in_the_other_order(tmp_path):
    """The sources read frames straight to BGR (no RGB round trip): the same pixels as the RGB read, for gray,
    colour, alpha and 16-bit files."""
    from crackcam.runtime.imageio import read_image

    rng = np.random.default_rng(0)
    files = {"gray.png": rng.integers(0, 255, (20, 30), dtype=np.uint8),
             "gray.jpg": rng.integers(0, 255, (20, 30), dtype=np.uint8),
             "bgr.png": rng.integers(0, 255, (20, 30, 3), dtype=np.uint8),
             "bgr.jpg": rng.integers(0, 255, (20, 30, 3), dtype=np.uint8),
             "bgra.png": rng.integers(0, 255, (20, 30, 4), dtype=np.uint8),
             "gray16.png": rng.integers(0, 65535, (20, 30), dtype=np.uint16)}
    for name, a in files.items():
        cv2.imwrite(str(tmp_path / name), a)
        rgb, bgr = read_image(tmp_path / name), read_image(tmp_path / name, order="bgr")
        assert bgr.shape == rgb.shape == (20, 30, 3) and bgr.flags["C_CONTIGUOUS"], name
        assert np.array_equal(bgr, rgb[..., ::-1]), name
    assert np.array_equal(read_image(tmp_path / "bgr.png", order="bgr"), files["bgr.png"])  # as written
    with pytest.raises(ValueError):
        read_image(tmp_path / "bgr.png", order="hsv")
