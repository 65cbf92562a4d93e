"""crack-export: folded CAM graphs in ONNX Runtime against the PyTorch CamModel, metadata, refusal, CLI, TensorRT."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from crackcam.export import metadata as md
from crackcam.export.onnx_export import CamExportGraph, ExportError, preprocess_numpy, write_verified_onnx
from crackcam.export.verify import VerificationError
from crackcam.models import create_model, get_spec, list_models
from crackcam.models.cam import ABSOLUTE_METHODS, CAM_METHODS, CamHead, CamModel
from crackcam.train.synth import draw_crack_image

# every registered gradient method (a new one is tested without editing this list); gradcam first (the "map" output)
METHODS = sorted(m for m in CAM_METHODS if m not in ABSOLUTE_METHODS)


def rgb_reference(imgs_bgr: np.ndarray, mean, std) -> torch.Tensor:
    """The network input from BGR frames by an independent path (explicit channel indices, torch ops) — not the
    exporter's own preprocess_numpy mirror: a colour-order slip in the graph shows against it."""
    rgb = torch.from_numpy(np.ascontiguousarray(imgs_bgr[..., [2, 1, 0]])).to(torch.float64)
    x = rgb.permute(0, 3, 1, 2) / 255.0
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    return ((x - m) / sd).to(torch.float32)


def test_the_pytorch_stand_ins_preprocess_as_the_graph_does():
    """crack-eval's CAM predictor and the segmenter session feed PyTorch what the exported graph feeds itself:
    BGR uint8 → RGB, /255, mean/std (checked against the independent channel-index path, non-symmetric mean/std so
    a swapped channel shows)."""
    from crackcam.models.preprocess import bgr_to_tensor

    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (2, 9, 7, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    got = bgr_to_tensor(imgs, mean, std)
    assert got.shape == (2, 3, 9, 7) and got.dtype == torch.float32
    assert torch.allclose(got, rgb_reference(imgs, mean, std), atol=1e-5)
    assert np.abs(got.numpy() - preprocess_numpy(imgs, mean, std)).max() < 1e-5
    ro = imgs.copy()
    ro.setflags(write=False)  # a read-only frame: same values, and no non-writable-tensor warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(bgr_to_tensor(ro, mean, std), got)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """PyTorch's OpenMP threads spin-wait for each other: on a busy 2-core machine a 2-thread forward of ResNet-50 at
    64² took 1.2 s against 0.02 s with one thread.  These tests run small inputs, so one thread is also faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
# from the registry: a new model is exported and checked without editing a list; top-k (MIL) heads are exported at a
# fixed tile size (their k depends on it) and have their own test below
MODELS = [n for n in list_models(kind="classifier") if get_spec(n).extra.get("pool", "avg") != "topk"]
TOPK_MODELS = [n for n in list_models(kind="classifier") if get_spec(n).extra.get("pool", "avg") == "topk"]


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _images(rng, b, h, w):
    """uint8 NHWC BGR: noise images plus one synthetic crack image."""
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(b - 1)]
    crack, _ = draw_crack_image(rng, h, w, n_cracks=2)
    imgs.append(crack[..., ::-1])
    return np.ascontiguousarray(np.stack(imgs))


def _model(name):
    torch.manual_seed(0)
    return create_model(name).eval()


# ------------------------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("name", MODELS)
def test_every_method_map_matches_pytorch(tmp_path, name):
    """One dynamic export per model holding every method's map (and the raw CAM terms); ONNX Runtime vs a fresh
    PyTorch CamModel per method at two input sizes (64×64, 80×72) and batch 1 and 4."""
    model = _model(name)
    spec = get_spec(name)
    cams = [CamModel(model, m, gate=0.0) for m in METHODS]
    graph = CamExportGraph(cams, spec.mean, spec.std, ["prob", "map", "logits", "activations", "gradients"])
    meta = md.build_metadata(model=name, method=METHODS[0], target_layers=cams[0].layers, mean=spec.mean,
                             std=spec.std, outputs=graph.output_names)
    path = tmp_path / f"{name}.onnx"
    res = write_verified_onnx(graph, path, meta, tile=64, verify=False)
    assert res.exporter == "legacy"
    sess = _session(path)
    names = [o.name for o in sess.get_outputs()]
    assert names == ["prob", "map", "logits", "activations_0", "gradients_0"] + [f"map_{m}" for m in METHODS[1:]]
    assert [i.name for i in sess.get_inputs()] == ["image"]
    shape = sess.get_inputs()[0].shape
    assert [isinstance(d, str) for d in shape[:3]] == [True, True, True] and shape[3] == 3

    refs = {m: CamModel(model, m, gate=0.0) for m in METHODS}
    head = CamHead(model, cams[0].layers)
    rng = np.random.default_rng(1)
    live = []  # whether every map of a comparison spans [0, 1] (random weights can give all-zero ReLU maps)
    for b, h, w in [(1, 64, 64), (4, 64, 64), (1, 80, 72), (4, 80, 72)]:
        imgs = _images(rng, b, h, w)
        got = dict(zip(names, sess.run(names, {"image": imgs})))
        x = rgb_reference(imgs, spec.mean, spec.std)
        assert np.abs(x.numpy() - preprocess_numpy(imgs, spec.mean, spec.std)).max() < 1e-5
        with torch.no_grad():
            for m in METHODS:
                prob, cmap = refs[m](x)
                key = "map" if m == METHODS[0] else f"map_{m}"
                assert got[key].shape == (b, h, w)
                d = np.abs(got[key] - cmap.numpy()).max()
                assert d <= 1e-4, f"{name} {m} {b}x{h}x{w}: map differs by {d:.2e}"
                live.append(float(cmap.numpy().reshape(b, -1).max(1).min()) > 0.5)
            assert np.abs(got["prob"] - prob.numpy()).max() <= 1e-5
            logit, a, g = head(x)
            assert np.abs(got["logits"][:, 0] - logit.numpy()).max() <= 1e-4 * max(1.0, float(logit.abs().max()))
            for k, ref in (("activations_0", a), ("gradients_0", g)):
                scale = max(float(ref.abs().max()), 1e-12)
                assert np.abs(got[k] - ref.numpy()).max() / scale <= 1e-4, k
    assert np.mean(live) >= 0.5, f"too few non-degenerate maps were compared: {live}"


def test_gate_and_preprocessing_in_graph(tmp_path):
    """The map is zero where prob < gate; the graph takes BGR uint8 (RGB input gives other logits)."""
    model = _model("simple_cnn")
    spec = get_spec("simple_cnn")
    cam = CamModel(model, "gradcam++", gate=0.5)
    graph = CamExportGraph(cam, spec.mean, spec.std, ["prob", "map", "logits"])
    meta = md.build_metadata(model="simple_cnn", method="gradcam++", target_layers=cam.layers, mean=spec.mean,
                             std=spec.std, outputs=graph.output_names)
    path = tmp_path / "g.onnx"
    imgs = _images(np.random.default_rng(2), 2, 64, 64)
    with torch.no_grad():
        model.fc.weight.mul_(1e4)  # logits sensitive to the input colours
    for bias, gated in ((-500.0, True), (500.0, False)):
        with torch.no_grad():
            model.fc.bias.fill_(bias)
        write_verified_onnx(graph, path, meta, tile=64, log=lambda s: None)
        sess = _session(path)
        prob, cmap, logits = sess.run(["prob", "map", "logits"], {"image": imgs})
        assert (prob < 0.5).all() == gated
        assert (cmap.reshape(2, -1).max(1) == 0).all() == gated
        assert gated or (cmap.reshape(2, -1).max(1) > 0.99).all()
    x = torch.from_numpy(preprocess_numpy(imgs, spec.mean, spec.std))
    with torch.no_grad():
        ref = model(x)[:, 0].numpy()
    swapped = sess.run(["logits"], {"image": np.ascontiguousarray(imgs[..., ::-1])})[0][:, 0]
    tol = 1e-3  # logits ≈ ±500 (float32 step 3e-5); a colour swap moves them by ≈ 0.1–1
    assert np.abs(logits[:, 0] - ref).max() <= tol
    assert np.abs(swapped - ref).max() > 100 * tol


def test_dynamo_exporter_single_file(tmp_path):
    model = _model("simple_cnn")
    spec = get_spec("simple_cnn")
    cam = CamModel(model, "hirescam", gate=0.0)
    graph = CamExportGraph(cam, spec.mean, spec.std)
    meta = md.build_metadata(model="simple_cnn", method="hirescam", target_layers=cam.layers, mean=spec.mean,
                             std=spec.std, outputs=graph.output_names)
    path = tmp_path / "d.onnx"
    lines = []
    res = write_verified_onnx(graph, path, meta, exporter="dynamo", tile=48, log=lines.append)
    assert res.exporter == "dynamo" and res.report.ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx"]  # no .onnx.data, no temp files
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim[:3]]
    assert dims == ["batch", "height", "width"]
    assert "verification passed" in lines[0]


# ------------------------------------------------------------------------------------------------ refusal
def test_refuses_to_write_when_verification_fails(tmp_path, monkeypatch):
    from crackcam.export import verify as vf

    model = _model("simple_cnn")
    spec = get_spec("simple_cnn")
    cam = CamModel(model, "gradcam", gate=0.0)
    graph = CamExportGraph(cam, spec.mean, spec.std)
    meta = md.build_metadata(model="simple_cnn", method="gradcam", target_layers=cam.layers, mean=spec.mean,
                             std=spec.std, outputs=graph.output_names)
    real = vf.reference

    def perturbed(g, images):
        out = real(g, images)
        out["map"] = out["map"] + 2e-4  # just beyond the 1e-4 tolerance
        return out

    monkeypatch.setattr(vf, "reference", perturbed)
    out = tmp_path / "m.onnx"
    with pytest.raises(VerificationError, match="not written"):
        write_verified_onnx(graph, out, meta, exporter="legacy", tile=48, log=lambda s: None)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file
    monkeypatch.setattr(vf, "reference", real)
    res = write_verified_onnx(graph, out, meta, tile=48, log=lambda s: None)
    assert out.is_file() and res.report.max_diff["map"] <= 1e-4


def test_unknown_output_rejected():
    model = _model("simple_cnn")
    with pytest.raises(ExportError, match="unknown output"):
        CamExportGraph(CamModel(model, "gradcam"), (0.5,) * 3, (0.5,) * 3, ["prob", "map", "heatmap"])


# ------------------------------------------------------------------------------------------------ CLI + metadata
def _make_run(root: Path, name="simple_cnn", recipe=None, seed=0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = create_model(name).eval()
    with torch.no_grad():
        model.fc.bias.fill_(5.0)  # confident "crack": maps are not gated off
    torch.save(model.state_dict(), root / "best.pt")
    spec = get_spec(name)
    (root / "config.json").write_text(json.dumps({
        "model": name, "tile": 64, "mean": list(spec.mean), "std": list(spec.std),
        "target_layers": list(spec.target_layers), "data_card_sha256": "ab" * 32}))
    if recipe is not None:
        (root / "recipe.json").write_text(json.dumps(recipe))
    return root


def _cli(args):
    from typer.testing import CliRunner

    from crackcam.export.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_round_trip_and_metadata(tmp_path):
    recipe = {"method": "xgradcam", "layers": ["body.19"], "threshold": 0.3, "gate": 0.4,
              "postprocess": {"min_area": 5, "close_radius": 1}}
    run = _make_run(tmp_path / "run", recipe=recipe)
    r = _cli(["--checkpoint", run, "--format", "onnx"])
    assert r.exit_code == 0, r.output
    path = run / "export" / "simple_cnn_xgradcam.onnx"
    assert path.is_file() and "verification passed" in r.output and "wrote" in r.output

    meta = md.get_metadata(path)
    assert list(meta) == list(md.SCHEMA_KEYS)
    assert meta["format"] == 1 and meta["kind"] == "cam" and meta["model"] == "simple_cnn"
    import crackcam

    assert meta["version"] == crackcam.__version__
    assert meta["method"] == "xgradcam" and meta["target_layers"] == ["body.19"]
    assert meta["input"] == {"name": "image", "layout": "NHWC", "color": "BGR", "dtype": "uint8",
                             "height": None, "width": None, "batch": None}
    spec = get_spec("simple_cnn")
    assert meta["normalization"] == {"mean": list(spec.mean), "std": list(spec.std)}
    assert meta["threshold"] == 0.3 and meta["gate"] == 0.4
    assert meta["postprocess"]["min_area"] == 5 and meta["postprocess"]["close_radius"] == 1
    assert meta["postprocess"]["threshold"] == 0.3
    assert meta["class_names"] == ["background", "crack"] and meta["data_card_sha256"] == "ab" * 32
    assert meta["outputs"] == ["prob", "map"]

    # the runtime's torch-free reader accepts it, and so does its post-processing config
    from crackcam.runtime.meta import check_io, meta_from_map
    from crackcam.runtime.postprocess import PostProcessConfig

    sess = _session(path)
    rm = meta_from_map(sess.get_modelmeta().custom_metadata_map, path)
    check_io(rm, [(i.name, i.type, i.shape) for i in sess.get_inputs()], [o.name for o in sess.get_outputs()], path)
    assert rm.gate == 0.4 and rm.method == "xgradcam"
    PostProcessConfig.from_dict(meta["postprocess"])

    # the graph computes what PyTorch computes with the recipe's settings
    from crackcam.models.checkpoint import load_classifier

    model, _ = load_classifier(run)
    rgb, _ = draw_crack_image(np.random.default_rng(5), 80, 72)
    bgr = np.ascontiguousarray(rgb[None, ..., ::-1])
    prob, cmap = sess.run(["prob", "map"], {"image": bgr})
    with torch.no_grad():
        p_ref, m_ref = CamModel(model, "xgradcam", layers=["body.19"], gate=0.4)(
            torch.from_numpy(preprocess_numpy(bgr, spec.mean, spec.std)))
    assert prob[0] > 0.4 and np.abs(cmap - m_ref.numpy()).max() <= 1e-4 and abs(prob[0] - p_ref.item()) <= 1e-5

    # fixed shape, explicit method and outputs
    out = tmp_path / "fixed.onnx"
    r = _cli(["--checkpoint", run, "--method", "gradcam++", "--out", out, "--batch", "2", "--height", "64",
              "--width", "96", "--outputs", "map,prob,logits"])
    assert r.exit_code == 0, r.output
    meta = md.get_metadata(out)
    assert meta["method"] == "gradcam++" and meta["outputs"] == ["prob", "map", "logits"]
    assert (meta["input"]["batch"], meta["input"]["height"], meta["input"]["width"]) == (2, 64, 96)
    assert _session(out).get_inputs()[0].shape == [2, 64, 96, 3]


def test_cli_default_checkpoint_and_bad_input(tmp_path, monkeypatch):
    import time

    monkeypatch.chdir(tmp_path)
    r = _cli(["--method", "gradcam"])
    assert r.exit_code == 2 and "no run folder found under ./runs" in r.output and "Traceback" not in r.output
    _make_run(tmp_path / "runs" / "old")
    time.sleep(0.05)
    newest = _make_run(tmp_path / "runs" / "new", seed=1)
    os.utime(newest / "best.pt", (time.time() + 10, time.time() + 10))
    r = _cli(["--method", "layercam", "--no-verify"])
    assert r.exit_code == 0, r.output
    assert (newest / "export" / "simple_cnn_layercam.onnx").is_file()
    assert not (tmp_path / "runs" / "old" / "export").exists()

    r = _cli(["--checkpoint", newest, "--method", "nosuchcam"])
    assert r.exit_code == 2 and "unknown CAM method" in r.output and "Traceback" not in r.output
    r = _cli(["--checkpoint", tmp_path / "missing"])
    assert r.exit_code == 2 and "missing" in r.output
    (newest / "best.pt").write_bytes(b"not a state dict")
    r = _cli(["--checkpoint", newest])
    assert r.exit_code == 2 and "best.pt" in r.output and "Traceback" not in r.output
    r = _cli(["--checkpoint", newest, "--height", "abc"])
    assert r.exit_code == 2 and "--height" in r.output


# ------------------------------------------------------------------------------------------------ TensorRT
def _trt_and_gpu_present() -> bool:
    """tensorrt installed *and* a GPU; a broken install of either raises (the tests fail, they do not skip)."""
    from crackcam.runtime.optional import cuda_device_count, import_cudart, import_optional

    if import_optional("tensorrt") is None:
        return False
    cudart = import_cudart()
    return cudart is not None and cuda_device_count(cudart) > 0


def test_tensorrt_absence_is_one_clear_line(tmp_path):
    if _trt_and_gpu_present():
        pytest.skip("TensorRT and a GPU are present here; the absence path cannot be exercised")
    run = _make_run(tmp_path / "run")
    r = _cli(["--checkpoint", run, "--method", "gradcam++", "--format", "trt"])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output
    assert "pip install 'crackcam[trt]'" in lines[0] and ("TensorRT" in lines[0] or "GPU" in lines[0])
    assert not (run / "export").exists()  # nothing half-written


def test_tensorrt_cache_key_and_profile():
    from crackcam.export.tensorrt import Profile, cache_key, make_profile

    gpu = {"name": "NVIDIA H100", "compute_capability": "9.0"}
    p = make_profile({"batch": None, "height": None, "width": None}, opt_hw=(448, 448), max_batch=8)
    assert p == Profile((1, 64, 64), (1, 448, 448), (8, 1024, 1024))
    assert make_profile({"batch": 2, "height": 96, "width": 128}).shapes() == ((2, 96, 128, 3),) * 3
    base = dict(gpu=gpu, trt_version="10.3.0", onnx_sha256="0" * 64, fp16=False, int8=False, profile=p,
                workspace_gb=4.0)
    k = cache_key(**base)
    assert k == cache_key(**base)
    for change in ({"fp16": True}, {"trt_version": "10.4.0"}, {"onnx_sha256": "1" * 64},
                   {"gpu": {"name": "NVIDIA H100", "compute_capability": "8.9"}},
                   {"gpu": {"name": "NVIDIA A100", "compute_capability": "9.0"}}):
        assert cache_key(**{**base, **change}) != k, change


def test_tensorrt_engine_build(tmp_path):
    """FP32 and INT8 (entropy calibrator over a folder) engines, the cache, and engine == ONNX Runtime.  Skips only
    where tensorrt / cuda-python are not installed or there is no GPU; a broken install fails."""
    from tests._deps import require, require_gpu

    require("tensorrt")
    require_gpu()
    from crackcam.export.tensorrt import build_engine, make_profile, verify_engine

    run = _make_run(tmp_path / "run")
    r = _cli(["--checkpoint", run, "--method", "gradcam++", "--format", "onnx", "--out", tmp_path / "m.onnx"])
    assert r.exit_code == 0, r.output
    meta = md.get_metadata(tmp_path / "m.onnx")
    prof = make_profile(meta["input"], opt_hw=(128, 128), min_hw=(64, 64), max_hw=(256, 256), max_batch=4)
    eng = build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", meta, profile=prof, cache_dir=tmp_path / "cache")
    assert eng.path.is_file() and not eng.from_cache and (tmp_path / "m.engine.json").is_file()
    again = build_engine(tmp_path / "m.onnx", tmp_path / "m2.engine", meta, profile=prof, cache_dir=tmp_path / "cache")
    assert again.from_cache and again.key == eng.key
    imgs = [_images(np.random.default_rng(0), 2, 128, 128)]
    diff = verify_engine(eng.path, tmp_path / "m.onnx", imgs)
    assert diff["prob"] < 1e-2 and diff["map"] < 5e-2
    import cv2

    calib = tmp_path / "calib"
    calib.mkdir()
    for k, img in enumerate(_images(np.random.default_rng(1), 8, 128, 128)):
        cv2.imwrite(str(calib / f"{k}.png"), img)
    e8 = build_engine(tmp_path / "m.onnx", tmp_path / "m8.engine", meta, profile=prof, int8=True, calib=calib,
                      cache_dir=tmp_path / "cache")
    assert e8.path.is_file() and e8.key != eng.key
    d8 = verify_engine(e8.path, tmp_path / "m.onnx", imgs)
    assert d8["prob"] < 0.1 and np.isfinite(d8["map"])


# ------------------------------------------------------------------------------------------------ UP-CrackNet
def test_upcracknet_restoration_graph(tmp_path):
    from crackcam.models.upcracknet import build_generator, restoration_map

    run = tmp_path / "up"
    run.mkdir()
    cfg = {"model": "upcracknet", "tile": 32, "width": 8, "data_card_sha256": "cd" * 32}
    torch.manual_seed(0)
    gen = build_generator(cfg).eval()
    torch.save(gen.state_dict(), run / "best.pt")
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "recipe.json").write_text(json.dumps({"polarity": "dark", "threshold": "otsu"}))
    r = _cli(["--checkpoint", run, "--out", tmp_path / "up.onnx"])
    assert r.exit_code == 0, r.output
    meta = md.get_metadata(tmp_path / "up.onnx")
    assert meta["kind"] == "restoration" and meta["outputs"] == ["restored", "map"]
    assert meta["threshold"] == "otsu" and meta["normalization"]["mean"] == [0.5, 0.5, 0.5]
    assert meta["input"]["height"] is None  # any size: the graph pads to a multiple of 2**levels itself
    sess = _session(tmp_path / "up.onnx")
    rgb, _ = draw_crack_image(np.random.default_rng(3), 40, 56)  # not a multiple of 32
    restored, cmap = sess.run(["restored", "map"], {"image": np.ascontiguousarray(rgb[None, ..., ::-1])})
    ref_map, ref_rest = restoration_map(gen, rgb, "full", smooth=False, polarity="dark", return_restored=True)
    assert np.abs(cmap[0] - ref_map).max() <= 1e-4
    assert restored.dtype == np.uint8 and restored.shape == (1, 40, 56, 3)
    assert np.abs(restored[0, ..., ::-1].astype(int) - ref_rest.astype(int)).max() <= 1
    # the six-checkerboard "masked" variant, masks built in the graph for this size, batch of two frames
    r = _cli(["--checkpoint", run, "--method", "restoration-masked-dark", "--out", tmp_path / "upm.onnx"])
    assert r.exit_code == 0, r.output
    assert md.get_metadata(tmp_path / "upm.onnx")["method"] == "upcracknet-masked-dark"
    rgb2, _ = draw_crack_image(np.random.default_rng(4), 40, 56)
    frames = np.ascontiguousarray(np.stack([rgb, rgb2])[..., ::-1])
    restored, cmap = _session(tmp_path / "upm.onnx").run(["restored", "map"], {"image": frames})
    for i, im in enumerate((rgb, rgb2)):
        ref_map, ref_rest = restoration_map(gen, im, "masked", tile=32, smooth=False, polarity="dark",
                                            return_restored=True)
        assert np.abs(cmap[i] - ref_map).max() <= 1e-4
        assert np.abs(restored[i, ..., ::-1].astype(int) - ref_rest.astype(int)).max() <= 1
    r = _cli(["--checkpoint", run, "--method", "restoration-masked-debias", "--out", tmp_path / "x.onnx"])
    assert r.exit_code == 2 and "restoration[-masked][-dark]" in r.output and not (tmp_path / "x.onnx").exists()


def test_refine_recipe_exports_the_cam_and_carries_the_refinement(tmp_path):
    """crack-eval may choose ``refine-<cam>`` (CAM × pixel cue, a NumPy step): the graph holds the plain CAM with
    that CAM's own calibrated threshold; the refinement settings travel in the metadata."""
    pp_raw = {"min_area": 0, "close_radius": 0, "open_radius": 0}
    pp_ref = {"min_area": 100, "close_radius": 1, "open_radius": 0}
    refine = {"cue": "blackhat", "mode": "product", "dilate": 16}
    recipe = {"method": "refine-gradcam++", "refine": refine, "threshold": 0.34, "postprocess": pp_ref, "gate": 0.5,
              "layers": None,
              "candidates": {"gradcam++": {"threshold": 0.11, "postprocess": pp_raw, "gate": 0.5, "layers": None},
                             "layercam": {"threshold": 0.2, "postprocess": pp_raw, "gate": 0.6, "layers": None}},
              "masks_used": 12}
    run = _make_run(tmp_path / "run", recipe=recipe)
    r = _cli(["--checkpoint", run, "--no-verify"])
    assert r.exit_code == 0, r.output
    meta = md.get_metadata(run / "export" / "simple_cnn_gradcampp.onnx")
    assert meta["method"] == "gradcam++" and meta["threshold"] == 0.11 and meta["postprocess"]["min_area"] == 0
    assert meta["masks_used"] == 12  # the recipe's mask count travels into the model file (issue 13)
    assert meta["refine"] == {"method": "refine-gradcam++", **refine, "threshold": 0.34, "postprocess": pp_ref}
    r = _cli(["--checkpoint", run, "--no-verify", "--method", "layercam"])  # another calibrated candidate
    meta = md.get_metadata(run / "export" / "simple_cnn_layercam.onnx")
    assert meta["threshold"] == 0.2 and meta["gate"] == 0.6 and "refine" not in meta
    r = _cli(["--checkpoint", run, "--no-verify", "--method", "hirescam"])  # never calibrated: defaults
    meta = md.get_metadata(run / "export" / "simple_cnn_hirescam.onnx")
    assert meta["threshold"] == 0.5 and meta["gate"] == 0.5 and "refine" not in meta


@pytest.mark.parametrize("name", TOPK_MODELS)
def test_topk_cam_graph_matches_an_rgb_reference(tmp_path, name):
    """A top-k (MIL) classifier's absolute `cam` map, exported at a fixed tile, against PyTorch on the independent
    RGB path; prob too (the top-k pool inside the graph)."""
    model = _model(name)
    with torch.no_grad():  # random features are tiny: a large head makes the map vary with the pixels
        model.fc.weight.copy_(torch.randn_like(model.fc.weight) * 3000.0)
    spec = get_spec(name)
    cam = CamModel(model, "cam", gate=0.0)
    graph = CamExportGraph(cam, spec.mean, spec.std)
    meta = md.build_metadata(model=name, method="cam", target_layers=cam.layers, mean=spec.mean, std=spec.std,
                             outputs=graph.output_names, height=64, width=64)
    path = tmp_path / "mil.onnx"
    write_verified_onnx(graph, path, meta, height=64, width=64, tile=64)
    sess = _session(path)
    imgs = _images(np.random.default_rng(4), 3, 64, 64)
    prob, cmap = sess.run(["prob", "map"], {"image": imgs})
    with torch.no_grad():
        p_ref, m_ref = cam(rgb_reference(imgs, spec.mean, spec.std))
    assert np.abs(cmap - m_ref.numpy()).max() <= 1e-4 and np.abs(prob - p_ref.numpy()).max() <= 1e-5
    assert float(m_ref.std()) > 1e-3  # a map that depends on the pixels
    swapped = sess.run(["map"], {"image": np.ascontiguousarray(imgs[..., ::-1])})[0]
    assert np.abs(swapped - cmap).max() > 1e-3  # and on their colour order
    assert not [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Pad"]  # folded into the Convs


def test_upcracknet_image_statistics_norm_round_trip(tmp_path):
    """test_norm 'image' (the official test's per-image batch-norm statistics, dropout off): equal to PyTorch batch
    norm in train mode on a batch of one (running statistics untouched), different from eval mode, and the same
    through the exported ONNX graph (InstanceNormalization with the BN affine); 'image+dropout' refuses to export."""
    from crackcam.models import upcracknet as up

    run = tmp_path / "up"
    run.mkdir()
    cfg = {"model": "upcracknet", "tile": 32, "width": 8, "data_card_sha256": "cd" * 32}
    torch.manual_seed(0)
    gen = up.build_generator(cfg)
    for m in gen.modules():  # running statistics far from any one image's
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 3)
    gen.eval()
    torch.save(gen.state_dict(), run / "best.pt")
    (run / "config.json").write_text(json.dumps(cfg))
    rgb, _ = draw_crack_image(np.random.default_rng(5), 64, 64)
    x = up.to_tensor(rgb)
    img_gen = up.with_test_norm(gen, "image")
    with torch.no_grad():
        ref_train = gen.train()(x)  # BN with the batch's (= this image's) statistics
        for mod in gen.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.eval()
        ref_train_nodrop = gen(x)
        gen.eval()
        ours = img_gen(x)
        eval_out = gen(x)
    assert torch.allclose(ours, ref_train_nodrop, atol=1e-5)
    assert not torch.allclose(ref_train, ref_train_nodrop)  # dropout on (the official test) is another map again
    assert (ours - eval_out).abs().max() > 1e-2  # per-image and running statistics do differ
    (run / "recipe.json").write_text(json.dumps({"polarity": "abs", "threshold": "otsu", "test_norm": "image"}))
    r = _cli(["--checkpoint", run, "--out", tmp_path / "img.onnx"])
    assert r.exit_code == 0, r.output
    assert md.get_metadata(tmp_path / "img.onnx")["method"] == "upcracknet-full-abs-imagestats"
    m = onnx.load(str(tmp_path / "img.onnx"))
    assert any(n.op_type == "InstanceNormalization" for n in m.graph.node)
    _, cmap = _session(tmp_path / "img.onnx").run(["restored", "map"],
                                                  {"image": np.ascontiguousarray(rgb[None, ..., ::-1])})
    fresh = up.build_generator(cfg)
    fresh.load_state_dict(torch.load(run / "best.pt", weights_only=True))
    ref = up.restoration_map(up.with_test_norm(fresh.eval(), "image"), rgb, "full", smooth=False)
    assert np.abs(cmap[0] - ref).max() <= 1e-4
    (run / "recipe.json").write_text(json.dumps({"threshold": "otsu", "test_norm": "image+dropout"}))
    r = _cli(["--checkpoint", run, "--out", tmp_path / "drop.onnx"])
    assert r.exit_code == 2 and "not exportable" in r.output and not (tmp_path / "drop.onnx").exists()


class _SamePad(torch.nn.Module):
    """TF-"same" padding before a stride-2 conv, as EfficientNet-Lite has it: fixed amounts (``dynamic`` False)
    or amounts computed from the input size (``dynamic`` True: an odd size pads differently)."""

    def __init__(self, dynamic: bool):
        super().__init__()
        self.dynamic = dynamic
        self.a = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.b = torch.nn.Conv2d(8, 8, 5, stride=2, padding=1)

    def forward(self, x):
        if self.dynamic:
            ph, pw = x.shape[2] % 2 + 1, x.shape[3] % 2 + 1
            x = torch.nn.functional.pad(x, (0, pw, 0, ph))
        else:
            x = torch.nn.functional.pad(x, (0, 1, 0, 1))
        x = torch.relu(self.a(x))
        return self.b(torch.nn.functional.pad(x, (1, 2, 1, 2)))


@pytest.mark.parametrize("dynamic", [False, True])
def test_fuse_pads_is_exact_and_leaves_size_dependent_amounts(tmp_path, dynamic):
    from crackcam.export.graph_passes import fuse_pads, main

    torch.manual_seed(0)
    net = _SamePad(dynamic).eval()
    path = tmp_path / "p.onnx"
    axes = {"x": {0: "b", 2: "h", 3: "w"}} if dynamic else {"x": {0: "b"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes=axes, opset_version=18)
    proto = onnx.load(str(path))
    assert sum(n.op_type == "Pad" for n in proto.graph.node) == 2
    n = fuse_pads(proto)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    after = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert np.abs(before - ref).max() < 1e-5 and np.array_equal(after, before)  # bit-identical
    pads_left = sum(node.op_type == "Pad" for node in proto.graph.node)
    if dynamic:  # computed amounts with a dynamic size (the first change with it): the graph is left as it is
        assert n == 0 and pads_left == 2
        x2 = np.random.default_rng(1).standard_normal((1, 3, 33, 31)).astype(np.float32)
        b2 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x2})[0]
        a2 = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x2})[0]
        assert np.array_equal(a2, b2)
    else:
        assert n == 2 and pads_left == 0
        assert main([str(path), str(tmp_path / "q.onnx")]) == 0  # the file tool: the same graph
        q = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert np.array_equal(q, before)
        assert not any(node.op_type == "Pad" for node in onnx.load(str(tmp_path / "q.onnx")).graph.node)
    (tmp_path / "bad.onnx").write_bytes(b"junk")
    assert main([str(tmp_path / "bad.onnx")]) == 2


def test_the_packaged_default_has_no_pad_nodes_left():
    """The exported EfficientNet-Lite graphs keep no separate Pad (ONNX Runtime ran each as its own node plus two
    layout reorders: a third of the packaged model's time)."""
    from crackcam.runtime.cli import DEFAULT_MODEL

    for g in (DEFAULT_MODEL.with_name("default_tiles.onnx"), DEFAULT_MODEL):  # the tile graph and its cascade
        assert not [n.name for n in onnx.load(str(g)).graph.node if n.op_type == "Pad"], g.name


def _pad_conv_graph(case: str):
    """x → Pad(0,0,1,1 bottom/right) → Conv(3×3, stride 2) → y, with one twist per ``case``."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")
    inits, nodes, outs = [w, pads], [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])]
    pad_in = ["x", "pads"]
    if case == "nonzero_value":
        inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "val"))
        pad_in.append("val")
    nodes.append(helper.make_node("Pad", pad_in, ["p"], mode="constant"))
    nodes.append(helper.make_node("Conv", ["p", "w"], ["y"], strides=[2, 2], kernel_shape=[3, 3]))
    if case == "two_consumers":
        nodes.append(helper.make_node("Relu", ["p"], ["r"]))
        outs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 3, 17, 17]))
    if case == "graph_output":
        outs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 3, 17, 17]))
    if case == "subgraph":  # an If body reads the Pad's output from the outer graph
        inits.append(numpy_helper.from_array(np.array(True), "cond"))
        body = helper.make_graph([helper.make_node("Identity", ["p"], ["z"])], "b", [],
                                 [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 17, 17])])
        nodes.append(helper.make_node("If", ["cond"], ["q"], then_branch=body, else_branch=body))
        outs.append(helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 3, 17, 17]))
    if case == "mode_reflect":
        nodes[0] = helper.make_node("Pad", pad_in, ["p"], mode="reflect")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          outs, initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("case", ["plain", "nonzero_value", "two_consumers", "graph_output", "subgraph",
                                  "mode_reflect"])
def test_fuse_pads_folds_only_a_zero_pad_whose_one_reader_is_the_conv(case):
    from crackcam.export.graph_passes import fuse_pads

    proto = _pad_conv_graph(case)
    onnx.checker.check_model(proto)
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    before = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    n = fuse_pads(proto)
    assert n == (1 if case == "plain" else 0), case
    onnx.checker.check_model(proto)
    after = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    if case == "plain":
        assert [nd.op_type for nd in proto.graph.node] == ["Conv"] and not any(
            i.name == "pads" for i in proto.graph.initializer)
