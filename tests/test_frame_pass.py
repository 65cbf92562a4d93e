"""Frame-pass graphs: a top-k tile graph cut at its per-position logits, run once per frame
(crackcam.export.frame_pass, crackcam.runtime.steps.infer_frame)."""

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from crackcam.runtime.sessions import open_session
from crackcam.runtime.steps import FrameSteps, infer_frame
from crackcam.train.synth import draw_crack_image, write_synthetic_dataset

ASSETS = Path(__file__).resolve().parents[1] / "crackcam" / "assets"
PACKAGED = ASSETS / "default_tiles.onnx"  # the exported top-k tile graph (default.onnx is its cascade)
runner = CliRunner()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The packaged top-k tile graph and its frame pass (written by the module's command)."""
    pytest.importorskip("onnx")
    from crackcam.export.frame_pass import main

    out = tmp_path_factory.mktemp("fp") / "frame.onnx"
    assert main([str(PACKAGED), str(out)]) == 0
    return PACKAGED, out


def _sig(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def test_the_frame_pass_reproduces_the_tile_graph_on_tiles(graphs):
    """On 128² tiles the cut graph gives the tile graph's probability and map; its metadata says what it is and
    the runtime cuts frames into the same 128² tiles."""
    tile_g, frame_g = graphs
    ts, fs = open_session(tile_g, provider="cpu"), open_session(frame_g, provider="cpu")
    assert fs.meta.frame_pass == {"tile": [128, 128], "stride": 8, "k": 26}
    assert fs.meta.fixed_size == (128, 128) and fs.meta.height is None and fs.output_names == ["logits"]
    x = np.random.default_rng(0).integers(0, 256, (5, 128, 128, 3), dtype=np.uint8)
    x[1] = draw_crack_image(np.random.default_rng(1), 128, 128)[0][..., ::-1]
    (p0, m0), (p1, m1) = ts.run(x), fs.run(x)
    assert np.abs(p0 - p1).max() < 1e-5 and np.abs(m0 - m1).max() < 1e-5
    z = fs.run_logits(x)
    assert z.shape == (5, 16, 16)
    want = _sig(np.sort(z.reshape(5, -1), axis=1)[:, -26:].mean(axis=1))
    assert np.abs(want - p0).max() < 1e-5  # the top-26 mean of the per-position logits is the tile graph's prob
    # a frame of exactly one tile: the one pass is the tile pass
    im = np.ascontiguousarray(x[1])
    st = FrameSteps.from_meta(ts.meta)
    pa, pb = st.run_model(ts, im), FrameSteps.from_meta(fs.meta).run_model(fs, im)
    assert pa[0].coords == pb[0].coords == [(0, 0)]
    assert abs(pa[1][0] - pb[1][0]) < 1e-5 and np.abs(pa[2][0] - pb[2][0]).max() < 1e-5


def test_infer_frame_reads_each_tile_out_of_one_pass(graphs):
    """Each tile's probability is the top-26 mean of the logits in its 16×16 window of the one pass, its map that
    window's crop of the upsampled map, for origins on the stride grid and off it (rounded to the nearest)."""
    _, frame_g = graphs
    fs = open_session(frame_g, provider="cpu")
    img = draw_crack_image(np.random.default_rng(3), 300, 410)[0][..., ::-1].copy()  # 300x410: not whole strides
    steps = FrameSteps.from_meta(fs.meta)
    plan = steps.plan(img)
    assert plan.scale == 1.0 and len(plan.coords) > 4
    assert any(y % 8 or x % 8 for y, x in plan.coords)  # the last row / column sit flush with the border
    probs, maps, secs = infer_frame(fs, img, plan)
    pad = cv2.copyMakeBorder(img, 0, 304 - 300, 0, 416 - 410, cv2.BORDER_REFLECT_101)
    z = fs.run_logits(pad[None])[0]
    assert z.shape == (38, 52) and secs > 0
    up = cv2.resize(_sig(z).astype(np.float32), (416, 304), interpolation=cv2.INTER_LINEAR)
    for (y, x), p, m in zip(plan.coords, probs, maps):
        ly, lx = int(np.floor(y / 8 + 0.5)), int(np.floor(x / 8 + 0.5))
        ly, lx = min(ly, 38 - 16), min(lx, 52 - 16)
        win = z[ly:ly + 16, lx:lx + 16]
        assert abs(p - _sig(np.sort(win.ravel())[-26:].mean())) < 1e-5, (y, x)
        assert m.shape == (128, 128) and np.abs(m - up[y:y + 128, x:x + 128]).max() < 1e-6, (y, x)
    # the whole chain after the model is the tiles' chain: same plan, same frame steps
    res = steps.process(fs, img)
    cmap, prob, _ = steps.frame_map(img, plan, probs, maps)
    assert np.array_equal(res.map, cmap) and res.prob == prob


def test_crack_run_and_crack_eval_run_a_frame_pass_graph_alike(graphs, tmp_path):
    """crack-run's pipeline (one pass per frame in its inference thread) and crack-eval --model (FrameSteps)
    give the same decisions and probabilities; the Ray engine's actor does the same frames the same way."""
    from crackcam.runtime import cli as run_cli
    from crackcam.runtime.ray_engine import FrameWorker, RayJob
    from crackcam.tools.evaluate import app

    _, frame_g = graphs
    data = write_synthetic_dataset(tmp_path / "flat", n_crack=4, n_free=2, size=(200, 260), layout="flat", seed=5)
    r = runner.invoke(app, ["--model", str(frame_g), "--data", str(data), "--split", "all", "--out",
                            str(tmp_path / "ev"), "--tolerance", "0"])
    assert r.exit_code == 0, r.output
    rr = runner.invoke(run_cli.app, ["--model", str(frame_g), "--source", str(data / "images"), "--out",
                                     str(tmp_path / "run"), "--no-progress", "--batch", "4"])
    assert rr.exit_code == 0, rr.output
    recs = {Path(x["key"]).name: x for x in map(json.loads, (tmp_path / "run" / "results.jsonl").read_text()
                                                 .splitlines())}
    with open(tmp_path / "ev" / "per_frame.csv") as f:
        frames = {row["name"]: row for row in csv.DictReader(f)}
    assert set(frames) == set(recs) and len(recs) == 4
    for name, row in frames.items():
        assert (row["cracked"] == "True") == recs[name]["cracked"]
        assert abs(float(row["prob"]) - recs[name]["prob"]) < 1e-5  # per_frame.csv keeps 5 decimals
    # the Ray actor, called directly (no cluster needed): the same records
    from crackcam.runtime.ray_engine import decode_batch

    paths = sorted(str(p) for p in (data / "images").iterdir())
    batch = decode_batch({"index": np.arange(len(paths)), "path": np.array(paths, object),
                          "key": np.array(paths, object)})
    worker = FrameWorker(RayJob(model=str(frame_g), out=str(tmp_path / "ray"), provider="cpu", batch=4))
    for rec in map(json.loads, worker(batch)["record"]):
        assert abs(rec["prob"] - recs[Path(rec["key"]).name]["prob"]) < 1e-6
        assert rec["cracked"] == recs[Path(rec["key"]).name]["cracked"]


def test_a_graph_without_a_top_k_head_is_one_line(tmp_path, capsys):
    pytest.importorskip("onnx")
    from crackcam.export.frame_pass import FramePassError, frame_pass_model, main
    from crackcam.runtime.toy import make_toy_model

    toy = make_toy_model(tmp_path / "toy.onnx", height=64, width=64)
    with pytest.raises(FramePassError, match="not a top-k"):
        frame_pass_model(toy)
    assert main([str(toy), str(tmp_path / "o.onnx")]) == 2
    assert main([str(tmp_path / "missing.onnx"), str(tmp_path / "o.onnx")]) == 2
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    assert main([str(tmp_path / "junk.onnx"), str(tmp_path / "o.onnx")]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and "not a top-k" in lines[0] and "not found" in lines[1], lines
    assert "junk.onnx" in lines[2] and "Traceback" not in "".join(lines)
    assert not (tmp_path / "o.onnx").exists()


def test_malformed_frame_pass_metadata_is_refused():
    from crackcam.runtime.meta import ModelFileError, parse_meta

    base = {"format": 1, "kind": "cam", "input": {"name": "image", "layout": "NHWC", "color": "BGR",
                                                   "dtype": "uint8", "height": None, "width": None, "batch": None},
            "outputs": ["logits"]}
    assert parse_meta({**base, "frame_pass": {"tile": [128, 128], "stride": 8, "k": 26}}, "m.onnx").fixed_size \
        == (128, 128)
    for bad in ({"tile": [128], "stride": 8, "k": 26}, {"tile": [128, 128], "stride": 0, "k": 26},
                {"tile": [128, 128], "stride": 8, "k": "x"}, "yes", {}, {"tile": [100, 128], "stride": 8, "k": 5},
                {"tile": [128, 128], "stride": 8, "k": 257}):
        with pytest.raises(ModelFileError, match="frame_pass"):
            parse_meta({**base, "frame_pass": bad}, "m.onnx")
    pytest.importorskip("onnx")
    from crackcam.export import metadata as md  # the exporter keeps the same rule

    meta = md.get_metadata(PACKAGED)
    with pytest.raises(ValueError, match="frame_pass"):
        md.validate_metadata({**meta, "outputs": ["logits"], "frame_pass": {"tile": [128, 128], "stride": 8,
                                                                            "k": 257}})


def test_the_packaged_frame_pass_is_the_default_cut_by_its_recorded_command(tmp_path):
    """crackcam/assets/default_frame.onnx is what its provenance command makes of default_tiles.onnx."""
    pytest.importorskip("onnx")
    import hashlib
    import shlex

    from crackcam.export.frame_pass import main

    prov = json.loads(PACKAGED.with_name("default_model.json").read_text())["frame_pass"]
    packaged = PACKAGED.with_name(prov["file"])
    assert prov["sha256"] == hashlib.sha256(packaged.read_bytes()).hexdigest()
    args = shlex.split(prov["command"])
    assert args[:3] == ["python", "-m", "crackcam.export.frame_pass"]
    root = PACKAGED.parents[2]
    out = tmp_path / "again.onnx"
    assert main([str(root / args[3]), str(out), *args[5:]]) == 0
    # the same graph (the bytes may differ with the onnx version that serialises it): same metadata, same logits
    again, pk = open_session(out, provider="cpu"), open_session(packaged, provider="cpu")
    assert again.meta.raw == pk.meta.raw
    x = np.random.default_rng(7).integers(0, 256, (1, 136, 264, 3), dtype=np.uint8)
    assert np.array_equal(again.run_logits(x), pk.run_logits(x))
    meta = open_session(packaged, provider="cpu").meta
    assert meta.frame_pass["gate"] == prov["gate"] == meta.raw["survey"]["gate"]
    assert all(p["survey"]["gate"] == prov["gate"] for p in meta.raw.get("profiles", {}).values())


# ------------------------------------------------------------------------------------------------- the cascade
def _steps(sess, **survey):
    from crackcam.runtime.pipeline import build_model_steps

    return build_model_steps(sess, survey=survey).default


def test_the_cascade_reruns_the_proposed_tiles_as_tiles(graphs):
    """``model_pass="cascade"``: the tiles whose one-pass probability is at least gate - recheck get the tile
    graph's probability and map, the others keep the one pass's; with every tile proposed the frame is the tile
    graph's frame, with none it is the one pass's."""
    tile_g, frame_g = graphs
    ts, fs = open_session(tile_g, provider="cpu"), open_session(frame_g, provider="cpu")
    img = draw_crack_image(np.random.default_rng(11), 540, 640)[0][..., ::-1].copy()
    tiles = _steps(ts, gate=0.5)
    plan = tiles.plan(img)
    pt, mt, _ = tiles.infer(ts, img, plan)
    pf, mf, _ = _steps(fs, gate=0.5, model_pass="frame").infer(fs, img, plan)
    assert len(pt) == len(pf) == plan.n_tiles > 20
    assert max(abs(a - b) for a, b in zip(pt, pf)) > 1e-3  # the one pass does differ from the tiles
    margin = float(np.median(np.abs(0.5 - np.asarray(pf))))  # about half the tiles proposed
    casc = _steps(fs, gate=0.5, model_pass="cascade", recheck=margin)
    assert casc.pass_for(fs.meta) == "cascade"
    pc, mc, _ = casc.infer(fs, img, plan, batch=4)
    proposed = [p >= 0.5 - margin for p in pf]
    assert 0 < sum(proposed) < len(pf)
    for i, on in enumerate(proposed):
        want_p, want_m = (pt[i], mt[i]) if on else (pf[i], mf[i])
        assert abs(pc[i] - want_p) < 1e-5 and np.abs(mc[i] - want_m).max() < 1e-5, i
    everything = _steps(fs, gate=0.5, model_pass="cascade", recheck=1.0).process(fs, img)
    ref = tiles.process(ts, img)
    assert np.array_equal(everything.post.mask, ref.post.mask) and everything.cracked == ref.cracked
    assert np.abs(everything.map - ref.map).max() < 1e-4
    nothing = _steps(fs, gate=2.0, model_pass="cascade", recheck=0.0).infer(fs, img, plan)
    assert np.allclose(nothing[0], pf)  # a gate no tile reaches proposes none: the one pass as it is


def test_a_pass_the_graph_cannot_run_is_one_line(graphs, tmp_path):
    """A one-pass mode on a tile graph, or an unknown pass, stops crack-run and crack-eval with one line."""
    from crackcam.runtime import cli as run_cli
    from crackcam.runtime.meta import ModelFileError
    from crackcam.runtime.survey import SurveyConfig
    from crackcam.tools.evaluate import app

    tile_g, frame_g = graphs
    with pytest.raises(ModelFileError, match="needs a frame-pass graph"):
        _steps(open_session(tile_g, provider="cpu"), model_pass="cascade")
    with pytest.raises(ValueError, match="model_pass"):
        SurveyConfig(model_pass="sometimes")
    with pytest.raises(ValueError, match="recheck"):
        SurveyConfig(recheck=-0.1)
    assert _steps(open_session(tile_g, provider="cpu")).pass_for(open_session(tile_g, provider="cpu").meta) == \
        "tiles"
    fs = open_session(frame_g, provider="cpu")  # the same steps are the same run (run.json): pass resolved,
    plain = _steps(fs).settings()               # a margin only where it acts
    assert plain["survey.model_pass"] == "frame" and plain["survey.recheck"] == 0.0
    assert _steps(fs, model_pass="frame", recheck=0.2).settings() == plain
    assert _steps(fs, model_pass="cascade", recheck=0.2).settings()["survey.recheck"] == 0.2
    data = write_synthetic_dataset(tmp_path / "flat", n_crack=1, n_free=1, size=(130, 130), layout="flat", seed=2)
    for args, want in ((["--model", str(tile_g), "--pass", "cascade"], "needs a frame-pass graph"),
                       (["--model", str(frame_g), "--pass", "both"], "--pass 'both'"),
                       (["--model", str(frame_g), "--recheck", "2"], "--recheck 2")):
        r = runner.invoke(run_cli.app, [*args, "--source", str(data / "images"), "--out", str(tmp_path / "o"),
                                        "--no-progress"])
        assert r.exit_code == 2 and want in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = runner.invoke(app, ["--model", str(tile_g), "--pass", "cascade", "--data", str(data), "--split", "all",
                            "--out", str(tmp_path / "ev")])
    assert r.exit_code == 2 and "needs a frame-pass graph" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    r = runner.invoke(run_cli.app, ["--model", str(tile_g), "--pass", "frame", "--engine", "ray", "--source",
                                    str(data / "images"), "--out", str(tmp_path / "or"), "--no-progress"])
    assert r.exit_code == 2, r.output  # refused before Ray starts (or: the extra is not installed)
    assert len(r.output.strip().splitlines()) == 1 and ("needs a frame-pass graph" in r.output
                                                        or "crackcam[cluster]" in r.output), r.output


def test_crack_run_with_the_cascade_writes_the_tile_graphs_records(graphs, tmp_path):
    """crack-run --pass cascade: with a margin that proposes some tiles its records are the shared steps' own
    (FrameSteps.infer, as crack-eval runs them); with every tile re-checked they are the tile graph's records and
    masks, which the one pass alone does not give."""
    from crackcam.runtime import cli as run_cli

    tile_g, frame_g = graphs
    src = tmp_path / "frames"
    src.mkdir()
    imgs = {}
    for i in range(3):
        imgs[f"f{i}.png"] = draw_crack_image(np.random.default_rng(20 + i), 300, 420)[0][..., ::-1].copy()
        cv2.imwrite(str(src / f"f{i}.png"), imgs[f"f{i}.png"])

    def run(model, *extra):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        r = runner.invoke(run_cli.app, ["--model", str(model), "--source", str(src), "--out", str(out),
                                        "--no-progress", "--save", "masks", "--gate", "0.5", *extra])
        assert r.exit_code == 0, r.output
        recs = {Path(x["key"]).name: x for x in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
        masks = {p.name: cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted((out / "masks").iterdir())}
        return recs, masks

    ref, ref_m = run(tile_g)
    got, got_m = run(frame_g, "--pass", "cascade", "--recheck", "1")
    assert set(ref) == set(got) and len(ref) == 3 and set(ref_m) == set(got_m)
    for k in ref:
        assert got[k]["cracked"] == ref[k]["cracked"] and abs(got[k]["prob"] - ref[k]["prob"]) < 1e-5
        assert abs(got[k]["length_px"] - ref[k]["length_px"]) < 1e-6
    assert all(np.array_equal(ref_m[n], got_m[n]) for n in ref_m)
    one, _ = run(frame_g, "--pass", "frame")
    assert max(abs(one[k]["prob"] - ref[k]["prob"]) for k in ref) > 1e-4  # the one pass alone differs
    fs = open_session(frame_g, provider="cpu")
    part, part_m = run(frame_g, "--pass", "cascade", "--recheck", "0.15")
    from crackcam.runtime.pipeline import build_model_steps

    casc = build_model_steps(fs, survey={"gate": 0.5, "model_pass": "cascade", "recheck": 0.15})
    some, total = 0, 0
    for k, im in imgs.items():
        steps = casc.for_shape(im.shape)  # the camera profile these frames take, as crack-run picks it
        plan = steps.plan(im)
        total += plan.n_tiles
        pf = infer_frame(fs, im, plan)[0]
        some += sum(p >= 0.35 for p in pf)
        res = steps.process(fs, im, batch=1)  # crack-run's --batch default
        assert part[k]["cracked"] == res.cracked and abs(part[k]["prob"] - res.prob) < 1e-5, k
        assert np.array_equal(part_m[Path(k).stem + ".png"] > 0, res.post.mask), k
    assert 0 < some < total  # some tiles re-checked, not all


def test_cascade_agreement_and_choice():
    """The margin rule: the smallest margin that loses no tile the tile pass keeps; the cascade only where it puts
    fewer pixels through the network than the tiles (the margin is recorded either way)."""
    from crackcam.tools.cascade import agreement, choose

    pf = np.array([0.9, 0.42, 0.3, 0.1])
    pt = np.array([0.95, 0.55, 0.52, 0.2])  # tiles 1 and 2 are kept by the tile pass
    assert agreement(pf, pt, 0.5, 0.0) == (1, 2)
    assert agreement(pf, pt, 0.5, 0.1) == (2, 1)
    assert agreement(pf, pt, 0.5, 0.2) == (3, 0)
    rec = {"gate": 0.5, "frames": [(pf, pt)], "frame_s": 0.004, "tiles_s": 0.020, "per_tile_s": [0.0025],
           "one_pass_px": [40]}
    c = choose(rec, (0.05, 0.1, 0.2, 0.3), tile_px=100)
    assert c["model_pass"] == "cascade" and c["recheck"] == 0.2
    assert [r["tiles_lost"] for r in c["table"]] == [2, 1, 0, 0]
    assert c["table"][2]["cost"] == pytest.approx((40 + 3 * 100) / 400)  # one pass + 3 re-run tiles
    assert c["table"][2]["model_ms"] == pytest.approx(4 + 3 * 2.5)  # reported beside it
    dear = choose({**rec, "one_pass_px": [120]}, (0.05, 0.1, 0.2, 0.3), tile_px=100)  # 420 px > 400
    assert dear["model_pass"] == "tiles" and dear["recheck"] == 0.2  # the measured margin is kept
    slow = choose({**rec, "frame_s": 1.0}, (0.05, 0.1, 0.2, 0.3), tile_px=100)  # timing does not decide
    assert slow["model_pass"] == "cascade"
    none = choose(rec, (0.05,), tile_px=100)
    assert none["model_pass"] == "tiles" and none["recheck"] == 0.05  # no margin loses nothing


def test_the_cascade_tool_gives_unmeasured_profiles_the_tiles(graphs, tmp_path):
    """A camera profile no measured image reached runs tiles (the exact computation) at its own gate, so the
    written graph never leaves a block in the plain one pass by omission."""
    pytest.importorskip("onnx")
    from crackcam.export import metadata as md
    from crackcam.tools.cascade import write_graph

    _, frame_g = graphs
    assert "544x384" in (md.get_metadata(frame_g).get("profiles") or {})
    chosen = {"default": {"gate": 0.5, "images": 3, "tiles_ms": 1.0, "frame_ms": 0.5, "model_pass": "cascade",
                          "recheck": 0.3, "why": "test"}}
    new = write_graph(frame_g, tmp_path / "c.onnx", chosen, {"data": ["x"]})
    assert new["survey"]["model_pass"] == "cascade" and new["survey"]["recheck"] == 0.3
    prof = new["profiles"]["544x384"]["survey"]
    assert prof["model_pass"] == "tiles" and prof["gate"] == md.get_metadata(frame_g)["profiles"]["544x384"][
        "survey"]["gate"]
    sess = open_session(tmp_path / "c.onnx", provider="cpu")
    from crackcam.runtime.pipeline import build_model_steps

    ms = build_model_steps(sess)
    assert ms.for_shape((384, 544, 3)).pass_for(sess.meta) == "tiles"
    assert ms.for_shape((1080, 1280, 3)).survey.model_pass == "cascade"


def test_records_stay_in_source_order_when_profiles_mix_passes(graphs, tmp_path):
    """A cascade top level and a tiles profile in one folder: every record in source order (a one-pass frame
    must not overtake a tile-pass frame still waiting for its batch)."""
    pytest.importorskip("onnx")
    from crackcam.runtime import cli as run_cli
    from crackcam.tools.cascade import write_graph

    _, frame_g = graphs
    chosen = {"default": {"gate": 0.5, "images": 1, "tiles_ms": 1.0, "frame_ms": 0.5, "model_pass": "cascade",
                          "recheck": 0.3, "why": "test"}}
    g = tmp_path / "mixed.onnx"
    write_graph(frame_g, g, chosen, {"data": ["x"]})  # 544x384 frames: tiles; other sizes: the cascade
    from crackcam.runtime.pipeline import build_model_steps

    gs = open_session(g, provider="cpu")
    ms = build_model_steps(gs)
    assert [ms.for_shape(sh).pass_for(gs.meta) for sh in ((384, 544, 3), (200, 260, 3))] == ["tiles", "cascade"]
    src = tmp_path / "frames"
    src.mkdir()
    for i in range(8):
        h, w = (384, 544) if i % 2 == 0 else (200, 260)  # the 544x384 profile; the top level (4x fewer px)
        cv2.imwrite(str(src / f"f{i:02d}.png"), draw_crack_image(np.random.default_rng(40 + i), h, w)[0][..., ::-1])
    for batch in ("7", "5"):
        out = tmp_path / f"o{batch}"
        r = runner.invoke(run_cli.app, ["--model", str(g), "--source", str(src), "--out", str(out), "--no-progress",
                                        "--batch", batch])
        assert r.exit_code == 0, r.output
        keys = [Path(json.loads(x)["key"]).name for x in (out / "results.jsonl").read_text().splitlines()]
        assert keys == [f"f{i:02d}.png" for i in range(8)], keys


def test_the_packaged_default_is_the_cascade_of_the_tile_graph():
    """crackcam/assets/default.onnx: the packaged tile graph's frame pass (same logits) with the cascade chosen
    by crackcam.tools.cascade (its provenance says on what); on survey-size frames it gives the tile graph's
    masks."""
    pytest.importorskip("onnx")
    import hashlib

    from crackcam.export.frame_pass import frame_pass_model

    default = ASSETS / "default.onnx"
    prov = json.loads((ASSETS / "default_model.json").read_text())
    assert prov["file"] == "default.onnx" and prov["sha256"] == hashlib.sha256(default.read_bytes()).hexdigest()
    assert prov["tiles"]["sha256"] == hashlib.sha256(PACKAGED.read_bytes()).hexdigest()
    ds = open_session(default, provider="cpu")
    sv = ds.meta.raw["survey"]
    assert ds.meta.frame_pass and sv["model_pass"] == "cascade" and sv["gate"] == prov["recipe"]["gate"]
    assert sv["recheck"] == prov["cascade"]["profiles"]["default"]["recheck"] > 0
    assert ds.meta.raw["cascade"]["chosen_on"]["splits"] == ["train", "val"]
    body, _ = frame_pass_model(PACKAGED, check=False)
    ts = open_session(PACKAGED, provider="cpu")
    x = np.random.default_rng(8).integers(0, 256, (1, 144, 200, 3), dtype=np.uint8)
    import onnxruntime as ort

    z = ort.InferenceSession(body.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert np.array_equal(np.asarray(z, np.float32).reshape(ds.run_logits(x).shape), ds.run_logits(x))
    for name, c in prov["cascade"]["profiles"].items():  # every block of the graph as the provenance says
        block = ds.meta.raw if name == "default" else ds.meta.raw["profiles"][name]
        assert block["survey"]["model_pass"] == c["model_pass"] and block["survey"]["recheck"] == c["recheck"]
    assert set(prov["cascade"]["profiles"]) == {"default", *ds.meta.raw.get("profiles", {})}
    # held-out frames (the PaveSeg test split, never used to choose the margin) and close-ups (their profile):
    # the tile graph's masks; drawn frames where the shared data is absent
    from crackcam.runtime.pipeline import build_model_steps
    from crackcam.train.data import list_items

    shared = Path(__file__).resolve().parents[2] / "shared" / "datasets"
    paths = []
    if (shared / "paveseg").is_dir():
        paths += [it.image for it in list_items(shared / "paveseg", "test") if not it.is_tile][:5]
    if (shared / "deepcrack").is_dir():
        paths += [it.image for it in list_items(shared / "deepcrack", "test")][:2]
    imgs = [cv2.imread(str(p)) for p in paths] or \
        [draw_crack_image(np.random.default_rng(30 + i), 1080, 1280)[0][..., ::-1].copy() for i in range(2)]
    a, b = build_model_steps(ts), build_model_steps(ds)
    for im in imgs:
        ra, rb = a.for_shape(im.shape).process(ts, im), b.for_shape(im.shape).process(ds, im)
        assert np.array_equal(ra.post.mask, rb.post.mask) and ra.cracked == rb.cracked


def test_the_cascade_command_measures_and_writes_a_graph(graphs, tmp_path, capsys):
    """python -m crackcam.tools.cascade on a drawn set: the table, the choice, a written graph whose blocks carry
    it; test splits, a tile graph and bad margins are one line and exit 2."""
    pytest.importorskip("onnx")
    from crackcam.export import metadata as md
    from crackcam.tools.cascade import main

    tile_g, frame_g = graphs
    data = write_synthetic_dataset(tmp_path / "flat", n_crack=4, n_free=2, size=(200, 260), layout="flat", seed=9)
    out = tmp_path / "c.onnx"
    assert main([str(frame_g), "--data", str(data), "--gate", "0.5", "--rechecks", "0.1,0.3,1", "--out",
                 str(out)]) == 0
    text = capsys.readouterr().out
    summary = json.loads(text.strip().splitlines()[-1])
    from crackcam.train.data import list_items

    want = len(list_items(data, "train")) + len(list_items(data, "val"))
    assert summary["chosen_on"]["splits"] == ["train", "val"] and summary["chosen_on"]["images"] == want > 0
    assert want < len(list_items(data, "all"))  # the test images are not measured
    meta = md.get_metadata(out)
    for name, c in meta["cascade"]["profiles"].items():
        block = meta if name == "default" else meta["profiles"][name]
        assert block["survey"]["model_pass"] == c["model_pass"] in ("tiles", "cascade")
        assert block["survey"]["gate"] == 0.5
    assert set(meta["cascade"]["profiles"]) == {"default", *meta.get("profiles", {})}
    measured = [c for c in summary["profiles"].values() if c["images"]]
    assert measured and all(c["recheck"] in (0.1, 0.3, 1.0) for c in measured)
    for args in ([str(frame_g), "--data", str(data), "--splits", "val,test"],
                 [str(tile_g), "--data", str(data)],
                 [str(frame_g), "--data", str(data), "--rechecks", "0.1,x"]):
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "never on test" in err[0] and "not a frame-pass graph" in err[1], err


def test_crack_bench_survey_runs_the_three_packaged_graphs_and_compares_their_records(tmp_path, capsys):
    """crack-bench survey with no --model: the default (cascade), the tile graph and the one pass on the same
    frames, each with its figures, then how the default's and the one pass's records agree with the tiles'."""
    from crackcam.tools.bench_survey import compare_records, main

    a = [{"key": "f1", "cracked": True, "area_px": 10, "length_px": 5.0, "prob": 0.9},
         {"key": "f2", "cracked": False, "area_px": 0, "length_px": 0.0, "prob": 0.2}]
    b = [dict(a[0], prob=0.85), dict(a[1], area_px=3, cracked=True)]
    assert compare_records(a, b) == {"frames": 2, "same_decision_length_area": 1, "max_prob_diff": 0.05}
    src = tmp_path / "frames"
    src.mkdir()
    for i in range(2):
        cv2.imwrite(str(src / f"f{i}.jpg"), draw_crack_image(np.random.default_rng(50 + i), 1080, 1280)[0][..., ::-1])
    assert main(["--frames", str(src), "--n", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    figs = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert [Path(f["model"]).name for f in figs] == ["default.onnx", "default_tiles.onnx", "default_frame.onnx"]
    assert [f["model_pass"] for f in figs] == ["cascade", "tiles", "frame"]
    assert all(f["frames"] == 2 and f["e2e_fps"] > 0 and f["bare_fps"] > 0 for f in figs)
    lines = [x for x in out.splitlines() if " vs default_tiles.onnx: " in x]
    assert len(lines) == 2 and all(" of 2 frames" in x for x in lines), out
