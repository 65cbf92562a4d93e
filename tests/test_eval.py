"""crack-eval round trips on a tiny synthetic flat data set (blackhat, CAM, refinement, calibrate, bad input)."""

import csv
from pathlib import Path
import json

import pytest
from typer.testing import CliRunner

from crackcam.train.synth import write_synthetic_dataset
from crackcam.tools.evaluate import app

runner = CliRunner()


def _last_json(output: str) -> dict:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("flat"), n_crack=10, size=(96, 128), layout="flat", seed=3)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from crackcam.models import create_model, get_spec

    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = create_model("simple_cnn", widths=(4, 8, 8, 8))
    torch.save(model.state_dict(), d / "best.pt")
    spec = get_spec("simple_cnn")
    (d / "config.json").write_text(json.dumps({
        "model": "simple_cnn", "model_kwargs": {"widths": [4, 8, 8, 8]}, "tile": 64, "mean": list(spec.mean),
        "std": list(spec.std), "target_layers": list(spec.target_layers),
        "train_config": {"val_fraction": 0.25, "split_seed": 0}}))
    return d


def test_blackhat_round_trip(flat, tmp_path):
    out = tmp_path / "bh"
    r = runner.invoke(app, ["--method", "blackhat", "--data", str(flat), "--split", "all", "--out", str(out),
                            "--threshold", "0.5", "--min-area", "10"])
    assert r.exit_code == 0, r.output
    s = _last_json(r.output)
    assert s["method"] == "blackhat" and s["n_images"] == 10 and s["threshold"] == 0.5
    assert s["threshold_source"] == "--threshold" and s["postprocess"]["min_area"] == 10
    for k in ("precision", "recall", "f1", "iou"):
        assert 0 <= s[k] <= 1
    assert s["f1"] > 0.4  # dark synthetic cracks on texture: black-hat finds them
    assert s["t2"]["f1"] >= s["t0"]["f1"]  # tolerance can only help
    assert s["ods"]["t0"]["f1"] >= s["t0"]["f1"] - 0.02 and s["ois"]["t0"] >= s["ods"]["t0"]["f1"] - 1e-9
    assert json.loads((out / "metrics.json").read_text()) == s
    for f in ("per_image.csv", "pr_curve.png", "overlays.png"):
        assert (out / f).stat().st_size > 100
    assert len((out / "per_image.csv").read_text().strip().splitlines()) == 11
    # a re-run resumes from the saved state and gives the same figures
    r2 = runner.invoke(app, ["--method", "blackhat", "--data", str(flat), "--split", "all", "--out", str(out),
                             "--threshold", "0.5", "--min-area", "10"])
    assert r2.exit_code == 0 and "resuming" in r2.output and _last_json(r2.output)["f1"] == s["f1"]


def test_a_retrained_run_in_the_same_folder_is_not_resumed(tmp_path, flat, tiny_ckpt):
    """crack-eval resumes a scoring run only for the same weights: new weights in the same run folder (a re-run
    of crack-train there) start the scoring over instead of mixing two models' images in one figure."""
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(tiny_ckpt, run)
    out = tmp_path / "ev"
    args = ["--checkpoint", str(run), "--method", "gradcam", "--data", str(flat), "--split", "all", "--gate", "0",
            "--threshold", "0.5", "--out", str(out), "--limit", "3"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "resuming" in r.output  # same weights: resumes
    def probs():
        return [row["prob"] for row in csv.DictReader((out / "per_frame.csv").open())]

    before = probs()
    state = torch.load(run / "best.pt", weights_only=True)
    torch.save({k: v * 1.5 + 0.05 if v.is_floating_point() else v for k, v in state.items()}, run / "best.pt")
    r = runner.invoke(app, args)  # same process: the CAM predictor cached for this run folder is not reused either
    assert r.exit_code == 0 and "resuming" not in r.output, r.output
    assert len(probs()) == len(before) == 3 and probs() != before  # scored with the new weights


def test_bad_input_is_one_line_exit_2(tmp_path, flat):
    r = runner.invoke(app, ["--method", "blackhat", "--data", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "nope" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["--method", "no-such-method", "--data", str(flat), "--split", "all"])
    assert r.exit_code == 2 and "unknown method" in r.output
    r = runner.invoke(app, ["--method", "gradcam", "--data", str(flat), "--split", "all"])
    assert r.exit_code == 2 and "--checkpoint" in r.output
    # a mistyped run folder is named as such (not "no --method and no recipe")
    r = runner.invoke(app, ["--checkpoint", str(tmp_path / "no-run"), "--data", str(flat), "--split", "all"])
    assert r.exit_code == 2 and "no-run: run folder not found" in r.output and "Traceback" not in r.output


def test_cam_refine_and_calibrated_recipe(flat, tiny_ckpt, tmp_path):
    r = runner.invoke(app, ["--checkpoint", str(tiny_ckpt), "--method", "gradcam++", "--data", str(flat),
                            "--split", "all", "--gate", "0", "--out", str(tmp_path / "cam"), "--limit", "4"])
    assert r.exit_code == 0, r.output
    s = _last_json(r.output)
    assert s["method"] == "gradcam++" and s["n_images"] == 4 and s["learned"] and s["mean_prob"] is not None
    # several methods in one pass (shared forward) give the same figures as one at a time
    r = runner.invoke(app, ["--checkpoint", str(tiny_ckpt), "--method", "gradcam++,blackhat,layercam", "--data",
                            str(flat), "--split", "all", "--gate", "0", "--out", str(tmp_path / "multi"),
                            "--limit", "4"])
    assert r.exit_code == 0, r.output
    multi = {d["method"]: d for d in _last_json(r.output)["results"]}
    assert set(multi) == {"gradcam++", "blackhat", "layercam"}
    assert multi["gradcam++"]["ods_f1"] == s["ods_f1"] and multi["gradcam++"]["f1"] == s["f1"]
    assert (tmp_path / "multi" / "layercam" / "metrics.json").is_file()
    r = runner.invoke(app, ["--checkpoint", str(tiny_ckpt), "--method", "refine-gradcam", "--data", str(flat),
                            "--split", "all", "--gate", "0", "--out", str(tmp_path / "ref"), "--limit", "4",
                            "--cue", "ridge", "--dilate", "6"])
    assert r.exit_code == 0, r.output
    s = _last_json(r.output)
    assert s["refine"]["cue"] == "ridge" and s["refine"]["dilate"] == 6
    # calibrate on the val split (25 % of the 7 train images by name order = 2 images), then the recipe is default
    r = runner.invoke(app, ["calibrate", "--checkpoint", str(tiny_ckpt), "--data", str(flat),
                            "--methods", "gradcam,layercam", "--gate", "0"])
    assert r.exit_code == 0, r.output
    rec = json.loads((tiny_ckpt / "recipe.json").read_text())
    assert rec["method"] in ("gradcam", "layercam", "refine-gradcam", "refine-layercam")
    assert set(rec["candidates"]) >= {"blackhat", "gradcam", "refine-layercam"}
    assert rec["candidates"]["blackhat"]["learned"] is False and "validation" in rec["chosen_on"]
    r = runner.invoke(app, ["--checkpoint", str(tiny_ckpt), "--data", str(flat), "--split", "test",
                            "--out", str(tmp_path / "rec")])
    assert r.exit_code == 0, r.output
    s = _last_json(r.output)
    assert s["method"] == rec["method"] and s["threshold"] == rec["threshold"]
    assert s["threshold_source"].startswith("recipe")


def test_results_table_collects_crack_eval_outputs(flat, tmp_path):
    from crackcam.tools import results_table

    for thr in ("0.3", "0.6"):
        r = runner.invoke(app, ["--method", "blackhat", "--data", str(flat), "--split", "all",
                                "--out", str(tmp_path / "ev" / f"bh{thr}"), "--threshold", thr])
        assert r.exit_code == 0, r.output
    rows = results_table.collect([tmp_path / "ev"])
    assert len(rows) == 2 and {m["threshold"] for m in rows} == {0.3, 0.6}
    table = results_table.markdown(rows).splitlines()
    assert len(table) == 4 and all(f"**{m['f1']:.3f}**" in "\n".join(table) for m in rows)
    png = results_table.figure(rows, tmp_path / "f.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert results_table.main([str(tmp_path / "nothing")]) == 2


def test_default_model_provenance_reads_the_licence(tmp_path):
    from crackcam.tools.default_model import _licence_lines

    (tmp_path / "SOURCE.md").write_text("# X\n- **Repository:** a/b\n- **License / terms:** \"Research only.\"\n"
                                        "  second line of terms\n- **Content:** 10 images\n")
    lines = _licence_lines(tmp_path)
    assert lines[0].startswith("- **License") and "second line of terms" in lines[1] and len(lines) == 2
    assert _licence_lines(tmp_path / "none") == []


def test_false_alarm_rates_on_known_tiles(tmp_path):
    """crack-free (flat bright) tiles are not flagged by the darkness toy model, drawn cracks are; a gate above
    every probability flags nothing; the command reads tiles from a flat data set."""
    import numpy as np

    from crackcam.runtime.toy import make_toy_model
    from crackcam.tools.false_alarms import flag_rates, main
    from crackcam.train.synth import draw_crack_image

    model = make_toy_model(tmp_path / "toy.onnx")
    rng = np.random.default_rng(0)
    cracks = np.stack([draw_crack_image(rng, 64, 64)[0] for _ in range(4)])
    free = np.full((3, 64, 64, 3), 200, np.uint8)
    tiles, labels = np.concatenate([cracks, free]), np.array([1] * 4 + [0] * 3)
    r = flag_rates(model, tiles, labels)
    assert r["crack"] == {"tiles": 4, "flagged": 1.0, "mean_prob": r["crack"]["mean_prob"]}
    assert r["crack_free"]["tiles"] == 3 and r["crack_free"]["flagged"] == 0.0
    assert flag_rates(model, tiles, labels, gate=1.01)["crack"]["flagged"] == 0.0
    data = write_synthetic_dataset(tmp_path / "flat", n_crack=4, size=(128, 128), layout="flat", seed=1)
    assert main(["--model", str(model), "--data", str(data), "--split", "all", "--tile", "64"]) == 0
    assert main(["--model", str(model), "--data", str(tmp_path / "missing")]) == 2


def test_crack_eval_model_scores_an_exported_graph_as_crack_run_runs_it(tmp_path):
    """`crack-eval --model FILE` runs crack-run's session and frame steps: its pixel figures are those of
    crack-run's own masks against the ground truth, and its frame decisions and probabilities crack-run's
    records; options it would not read are one line."""
    pytest.importorskip("onnx")
    import numpy as np

    from crackcam.runtime import cli as run_cli
    from crackcam.runtime.imageio import read_mask
    from crackcam.runtime.toy import make_toy_model

    import cv2

    data = write_synthetic_dataset(tmp_path / "flat", n_crack=5, size=(96, 128), layout="flat", seed=2)
    for k, f in enumerate(sorted((data / "images").iterdir())):  # colour: the toy model sees only red, so a
        im = cv2.imread(str(f)).astype(np.float32)              # channel-order slip changes every map
        im[..., 0] = 255 - im[..., 0] * 0.5  # blue: the cracks bright, the inverse of red's
        cv2.imwrite(str(f), np.clip(im, 0, 255).astype(np.uint8))
    model = make_toy_model(tmp_path / "toy.onnx", threshold=0.5, postprocess={"min_area": 4},
                           channel_weights=(0, 0, 1))
    r = runner.invoke(app, ["--model", str(model), "--data", str(data), "--split", "all", "--out",
                            str(tmp_path / "ev"), "--tolerance", "0"])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.strip().splitlines()) == 1, r.stdout  # stdout: the JSON line alone (notes on stderr)
    s = json.loads(r.stdout)
    assert s["model_file"] == str(model) and s["threshold"] == 0.5 and s["n_images"] == 5
    rr = CliRunner().invoke(run_cli.app, ["--model", str(model), "--source", str(data / "images"), "--out",
                                          str(tmp_path / "run"), "--save", "masks", "--no-progress"])
    assert rr.exit_code == 0, rr.output
    recs = {Path(x["key"]).name: x for x in map(json.loads, (tmp_path / "run" / "results.jsonl").read_text()
                                                 .splitlines())}
    tp = fp = fn = 0
    for img in sorted((data / "images").iterdir()):
        pred = read_mask(tmp_path / "run" / recs[img.name]["files"]["mask"])
        gt = read_mask(data / "masks" / f"{img.stem}.png", pred.shape)
        tp, fp, fn = tp + int((pred & gt).sum()), fp + int((pred & ~gt).sum()), fn + int((~pred & gt).sum())
    assert tp > 0 and abs(s["precision"] - tp / (tp + fp)) < 1e-4 and abs(s["recall"] - tp / (tp + fn)) < 1e-4
    with open(tmp_path / "ev" / "per_frame.csv") as f:
        frames = {row["name"]: row for row in csv.DictReader(f)}
    assert set(frames) == set(recs)
    for name, row in frames.items():
        assert (row["cracked"] == "True") == recs[name]["cracked"]
        assert abs(float(row["prob"]) - recs[name]["prob"]) < 1e-6

    for extra in (["--method", "gradcam"], ["--recipe", "r.json"], ["--min-area", "3"]):
        r = runner.invoke(app, ["--model", str(model), "--data", str(data), *extra])
        assert r.exit_code == 2 and extra[0] in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = runner.invoke(app, ["--model", str(model)])
    assert r.exit_code == 2 and "--model needs --data" in r.output
    r = runner.invoke(app, ["--model", str(model), "--data", str(data), "--threshold", "7"])
    assert r.exit_code == 2 and "[0, 1]" in r.output
    r = runner.invoke(app, ["--model", str(model), "--data", str(data), "--split", "all", "--threshold", "0.6",
                            "--out", str(tmp_path / "ev6")])
    s6 = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.exit_code == 0 and s6["threshold"] == 0.6 and s6["threshold_source"] == "--threshold"
    r = runner.invoke(app, ["--model", str(tmp_path / "missing.onnx"), "--data", str(data)])
    assert r.exit_code == 2 and "missing.onnx" in r.output and len(r.output.strip().splitlines()) == 1


def test_crack_eval_model_scores_the_validation_images_its_training_run_carved(tmp_path):
    """An export records its run's validation carve (metadata ``split``); `crack-eval --model --split val` on a
    flat set scores exactly those images; a graph without the record gets the training default, said in one line."""
    pytest.importorskip("onnx")
    import onnx

    from crackcam.export import metadata as md
    from crackcam.runtime.toy import make_toy_model
    from crackcam.train.data import list_items

    cfg = {"train_config": {"val_fraction": 0.5, "split_seed": 3}}
    assert md.split_rule(cfg) == {"val_fraction": 0.5, "split_seed": 3} and md.split_rule({}) is None
    data = write_synthetic_dataset(tmp_path / "flat", n_crack=10, size=(64, 64), layout="flat", seed=4)
    plain = make_toy_model(tmp_path / "plain.onnx")
    meta = md.get_metadata(plain)
    rec = md.build_metadata(**{k: v for k, v in dict(
        kind=meta["kind"], model=meta["model"], method=meta["method"], target_layers=meta["target_layers"],
        mean=meta["normalization"]["mean"], std=meta["normalization"]["std"], outputs=meta["outputs"],
        threshold=meta["threshold"], gate=meta["gate"], postprocess=meta["postprocess"]).items()},
        split=md.split_rule(cfg))
    assert rec["split"] == {"val_fraction": 0.5, "split_seed": 3}
    proto = onnx.load(str(plain))
    md.set_metadata(proto, rec)
    carved = tmp_path / "carved.onnx"
    onnx.save(proto, str(carved))

    def names(frac, seed):
        return sorted(it.image.name for it in list_items(data, "val", val_fraction=frac, split_seed=seed)
                      if it.mask is not None)

    assert names(0.5, 3) != names(0.2, 0)
    for model, want, says in ((carved, names(0.5, 3), False), (plain, names(0.2, 0), True)):
        out = tmp_path / f"ev_{model.stem}"
        r = runner.invoke(app, ["--model", str(model), "--data", str(data), "--split", "val", "--out", str(out)])
        assert r.exit_code == 0, r.output
        with open(out / "per_frame.csv") as f:
            assert sorted(row["name"] for row in csv.DictReader(f)) == want
        assert ("does not record its training run's validation carve" in r.output) == says, r.output
