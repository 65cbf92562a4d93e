"""Training loop and crack-train CLI: short runs, interrupt + resume, checkpoints, bad input, upcracknet hand-over."""

import json

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from crackcam.models.checkpoint import load_classifier
from crackcam.train import cli, loop
from crackcam.train.metrics import binary_metrics, roc_auc
from crackcam.train.synth import write_synthetic_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def kaggle_root(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("k") / "data", n_crack=16, n_free=16, size=(48, 48),
                                   layout="kaggle", seed=5)


@pytest.fixture()
def flat_root(tmp_path):
    return write_synthetic_dataset(tmp_path / "flat", n_crack=8, size=(64, 96), layout="flat", seed=6)


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), model="simple_cnn", epochs=2, batch=8, tile=48, seed=3,
                progress=False, threads=1, test=True)
    base.update(kw)
    return loop.TrainConfig(**base)


def _hist(out):
    return json.loads((out / "metrics.json").read_text())["history"]


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_known_values():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.8, 0.3, 0.6, 0.1, 0.2, 0.4, 0.7])
    m = binary_metrics(y, p)
    assert m["confusion"] == [[3, 1], [1, 3]]
    assert m["accuracy"] == 0.75 and m["precision"] == 0.75 and m["recall"] == 0.75 and m["f1"] == 0.75
    # AUC by brute force over all (pos, neg) pairs, ties counted 1/2
    pos, neg = p[y == 1], p[y == 0]
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert roc_auc(y, p) == pytest.approx(brute)
    assert roc_auc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([1, 1], [0.2, 0.3]) is None


# ------------------------------------------------------------------------------------------------ train + resume
def test_train_interrupt_resume_equals_straight_run(kaggle_root, tmp_path):
    # straight 2-epoch run
    straight = tmp_path / "straight"
    loop.train(_cfg(kaggle_root, straight))
    # the same, stopped after epoch 1 (as after Ctrl-C), then resumed
    run = tmp_path / "run"
    with pytest.raises(loop.TrainingInterrupted):
        loop.train(_cfg(kaggle_root, run), stop_after=1)
    h1 = _hist(run)
    assert [h["epoch"] for h in h1] == [1]
    assert torch.load(run / "best.pt", weights_only=True)  # plain state dict after epoch 1
    m = loop.train(_cfg(kaggle_root, run, resume=True))
    h2 = _hist(run)
    assert [h["epoch"] for h in h2] == [1, 2] and h2[0] == h1[0]  # history continues, epoch 1 kept
    # deterministic with the seed: interrupted + resumed == straight
    hs = _hist(straight)
    for a, b in zip(hs, h2):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val"]["f1"] == pytest.approx(b["val"]["f1"])
    assert m["best_epoch"] in (1, 2) and "test" in m
    # run folder contract
    cfg = json.loads((run / "config.json").read_text())
    for k in ("model", "tile", "mean", "std", "target_layers", "label_rule", "data", "data_card_sha256", "splits",
              "seed", "pretrained_source"):
        assert k in cfg
    assert cfg["label_rule"]["name"] == "name" and cfg["target_layers"][0] == "body.26"
    import hashlib

    assert cfg["data_card_sha256"] == hashlib.sha256((run / "data_card.json").read_bytes()).hexdigest()
    for f in ("best.pt", "last.pt", "curves.png", "data_card.png", "train_state.pt"):
        assert (run / f).is_file()
    model, conf = load_classifier(run, "best")
    assert not model.training and conf["model"] == "simple_cnn"
    sd = torch.load(run / "last.pt", weights_only=True)
    assert set(sd) == set(model.state_dict())
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 48, 64)).shape == (2, 1)


def test_keyboard_interrupt_saves_and_cli_resumes(kaggle_root, tmp_path, monkeypatch):
    out = tmp_path / "ki"
    calls = {"n": 0}
    real_predict = loop.predict

    def predict_then_ctrl_c(*a, **k):  # Ctrl-C during the validation of epoch 2
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_predict(*a, **k)

    monkeypatch.setattr(loop, "predict", predict_then_ctrl_c)
    args = ["--data", str(kaggle_root), "--out", str(out), "--epochs", "2", "--batch", "8", "--tile", "48",
            "--no-progress", "--threads", "1", "--no-test"]
    r = runner.invoke(cli.app, args)
    assert r.exit_code == 130, r.output
    assert "--resume" in r.output and "Traceback" not in r.output
    assert [h["epoch"] for h in _hist(out)] == [1]
    monkeypatch.setattr(loop, "predict", real_predict)
    r = runner.invoke(cli.app, args)  # no --resume on a folder holding a run → refused, nothing lost
    assert r.exit_code == 2 and "already holds a training run" in r.output
    r = runner.invoke(cli.app, args + ["--resume"])
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output and [h["epoch"] for h in _hist(out)] == [1, 2]


def test_cli_flat_layout_tile_rule(flat_root, tmp_path):
    out = tmp_path / "flat_run"
    r = runner.invoke(cli.app, ["--data", str(flat_root), "--out", str(out), "--epochs", "1", "--batch", "16",
                                "--tile", "32", "--min-crack-px", "10", "--border", "2", "--margin", "4",
                                "--no-progress", "--threads", "1", "--double"])
    assert r.exit_code == 0, r.output
    assert "label rule: tiles" in r.output and "--double" in r.output
    card = json.loads((out / "data_card.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert card["label_rule"]["name"] == "tiles" and card["label_rule"]["min_crack_px"] == 10
    assert cfg["label_rule"] == card["label_rule"]
    tr = card["splits"]["train"]
    assert tr["crack"] > 0 and tr["crack_free"] > 0 and tr["images"] > 0
    assert set(cfg["val_images"]) == set(json.loads((out / "splits.json").read_text())["val"])


# ------------------------------------------------------------------------------------------------ bad input
def _one_error_line(r):
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_cli_missing_and_empty_data(tmp_path):
    r = runner.invoke(cli.app, ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and str(tmp_path / "nope") in _one_error_line(r)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    r = runner.invoke(cli.app, ["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no images found" in _one_error_line(r)
    r = runner.invoke(cli.app, ["--model", "nonet", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown model" in _one_error_line(r)
    r = runner.invoke(cli.app, ["--out", str(tmp_path / "o2"), "--resume"])
    assert r.exit_code == 2 and "nothing to resume" in _one_error_line(r)


def test_cli_skips_bad_files_with_a_warning(flat_root, tmp_path):
    imgs = sorted((flat_root / "images").iterdir())
    data = imgs[0].read_bytes()
    imgs[0].write_bytes(data[: len(data) // 3])  # truncated
    (flat_root / "images" / "zz_garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really IEND")  # unreadable
    cv2.imwrite(str(flat_root / "masks" / (imgs[1].stem + ".png")), np.zeros((5, 5), np.uint8))  # size mismatch
    out = tmp_path / "o"
    r = runner.invoke(cli.app, ["--data", str(flat_root), "--out", str(out), "--epochs", "1", "--tile", "32",
                                "--min-crack-px", "10", "--border", "2", "--margin", "4", "--no-progress",
                                "--threads", "1"])
    assert r.exit_code == 0, r.output
    warns = [ln for ln in r.output.splitlines() if ln.startswith("warning: skipping")]
    assert len(warns) == 3
    assert any(f"{imgs[0]}: truncated JPEG" in w for w in warns)
    assert any("zz_garbage.png" in w for w in warns)
    assert any("mask size 5x5 differs" in w for w in warns)
    assert len(json.loads((out / "data_card.json").read_text())["skipped_files"]) == 3


def test_cli_default_synthetic_set_is_drawn(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "SYNTH_PER_CLASS", 10)
    out = tmp_path / "demo"
    r = runner.invoke(cli.app, ["--out", str(out), "--epochs", "1", "--tile", "32", "--no-progress", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert (out / "synthetic_data" / "train" / "images").is_dir()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["label_rule"]["name"] == "name" and cfg["layout"] == "kaggle"


def test_upcracknet_is_handed_over(tmp_path, monkeypatch):
    import crackcam.train.upcracknet as up

    seen = {}

    def fake(*args, **kw):
        seen["args"], seen["kw"] = args, kw

    monkeypatch.setattr(up, "train_upcracknet", fake)
    r = runner.invoke(cli.app, ["--model", "upcracknet", "--data", str(tmp_path), "--out", str(tmp_path / "u"),
                                "--epochs", "3", "--tile", "64", "--seed", "7"])
    assert r.exit_code == 0, r.output
    flat = list(seen["args"]) + list(seen["kw"].values())
    assert tmp_path in flat and tmp_path / "u" in flat and 3 in flat and 64 in flat and 7 in flat


def test_each_route_reads_what_is_typed_and_refuses_what_it_would_ignore(tmp_path, monkeypatch):
    """crack-train hands --model seg_* to the distiller and upcracknet to its trainer; a typed option the chosen
    route would not read is one error line (exit 2), and the tile-rule options a segmenter does read reach it —
    only those typed, over the distiller's own defaults (not crack-train's classifier defaults)."""
    import crackcam.train.distill as dist
    import crackcam.train.upcracknet as up

    seen = {}
    monkeypatch.setattr(dist, "distill", lambda cfg, log=print: seen.setdefault("cfg", cfg))
    monkeypatch.setattr(up, "train_upcracknet", lambda *a, **kw: seen.setdefault("up", (a, kw)))
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "o")]

    r = runner.invoke(cli.app, ["--model", "seg_tiny", *base, "--tile", "48", "--min-crack-px", "20",
                                "--val-fraction", "0.3"])
    assert r.exit_code == 0, r.output
    cfg = seen.pop("cfg")
    default = dist.DistillConfig(data=[], out="")
    assert cfg.tile_rule == {**default.tile_rule, "tile": 48, "min_crack_px": 20}
    assert cfg.tile_rule["border"] == default.tile_rule["border"] != 8  # crack-train's classifier default is 8
    assert cfg.val_fraction == 0.3 and cfg.photometric == default.photometric

    for model, opt in [("seg_tiny", ["--max-side", "640"]), ("seg_lite0", ["--hard-repeat", "3"]),
                       ("upcracknet", ["--topk", "0.1"]), ("upcracknet", ["--teacher", "t.onnx"]),
                       ("simple_cnn", ["--rounds", "3"]), ("simple_cnn", ["--preset", "official"])]:
        r = runner.invoke(cli.app, ["--model", model, *base, *opt])
        assert r.exit_code == 2, (model, opt, r.output)
        msg = [l for l in r.output.splitlines() if l.strip()]
        assert len(msg) == 1 and opt[0] in msg[0] and model in msg[0], (model, opt, r.output)
    assert not seen

    r = runner.invoke(cli.app, ["--model", "upcracknet", *base, "--epochs", "2"])  # batch, tile: the preset's
    assert r.exit_code == 0, r.output
    args, kw = seen.pop("up")
    assert args[3] is None and args[5] is None and kw["preset"] == "cpu"
    r = runner.invoke(cli.app, ["--model", "upcracknet", *base, "--devices", "2"])
    assert r.exit_code == 2 and "--devices" in r.output

    # checked before torchrun starts N processes (each would print the error): one line, exit 2, nothing launched
    monkeypatch.setattr(cli, "_launch_torchrun", lambda *a: seen.setdefault("torchrun", a) and 0)
    for model in ("seg_tiny", "simple_cnn"):
        r = runner.invoke(cli.app, ["--model", model, *base, "--devices", "2",
                                    "--max-side" if model == "seg_tiny" else "--rounds", "3"])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    r = runner.invoke(cli.app, ["--model", "no_such_net", *base, "--devices", "2"])
    assert r.exit_code == 2 and "unknown model" in r.output
    assert "torchrun" not in seen
