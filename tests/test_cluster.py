"""crack-run --engine ray (Ray Data on a local 2-CPU Ray): the same records and files as the local engine, each frame
exactly once when an actor is killed mid-run, resume; and one line without the extra."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("onnx")  # the toy models are built with onnx (the train extra)

from crackcam.runtime import cli, sinks  # noqa: E402
from crackcam.runtime.toy import make_toy_model  # noqa: E402
from tests._deps import require  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def ray_local():
    ray = require("ray")
    require("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    yield ray
    ray.shutdown()


def _frames(folder: Path, n: int, h: int = 96, w: int = 128) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        img = rng.integers(90, 200, (h, w, 3), dtype=np.uint8)
        if k % 3:
            cv2.line(img, (5, 10 + 5 * k % 60), (120, 70), (200, 120, 20), 2)  # dark in red only (BGR order)
        cv2.imwrite(str(folder / f"f{k:02d}.png"), img)
    (folder / "zz_broken.png").write_bytes(b"not an image")
    return folder


def _records(out: Path) -> list[dict]:
    return list(sinks.iter_records(out / "results.jsonl"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # channels weighted unequally: an RGB/BGR slip in either engine changes the maps
    return make_toy_model(tmp_path_factory.mktemp("m") / "m.onnx", height=64, width=64,
                          postprocess={"threshold": 0.5, "min_area": 5}, channel_weights=(0.1, 0.3, 0.6))


def test_ray_engine_matches_the_local_engine(tmp_path, ray_local, model):
    import time

    src = _frames(tmp_path / "f", 9)
    t0 = time.time()
    for k, p in enumerate(sorted(src.glob("f*.png"))):  # file times a GPS track covers
        os.utime(p, (t0 + k, t0 + k))
    gps = tmp_path / "g.csv"
    gps.write_text("time,lat,lon\n" + "\n".join(f"{t0 - 5 + k},{45 + 0.001 * k},{7 + 0.002 * k}" for k in range(30)))
    base = ["--model", str(model), "--source", str(src), "--save", "masks,overlays", "--no-progress", "--overlap", "16",
            "--gps", str(gps)]
    r = runner.invoke(cli.app, base + ["--out", str(tmp_path / "local")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli.app, base + ["--out", str(tmp_path / "ray"), "--engine", "ray", "--ray-workers", "2"])
    assert r.exit_code == 0, r.output
    assert "skipped" in r.output and "zz_broken.png" in r.output  # unreadable files: one line, as locally
    # decoding in Ray tasks instead of the actors: the same records
    r = runner.invoke(cli.app, base + ["--out", str(tmp_path / "ray_tasks"), "--engine", "ray", "--ray-workers", "1",
                                       "--ray-decode", "tasks"])
    assert r.exit_code == 0, r.output
    for a, b in zip(_records(tmp_path / "ray"), _records(tmp_path / "ray_tasks"), strict=True):
        assert {k: v for k, v in a.items() if k not in {"infer_ms", "post_ms", "ms"}} == \
            {k: v for k, v in b.items() if k not in {"infer_ms", "post_ms", "ms"}}
    loc, ray_ = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert len(loc) == len(ray_) == 9
    timing = {"infer_ms", "post_ms", "ms"}
    for a, b in zip(loc, ray_):  # same order, same keys, same values
        assert set(a) == set(b)
        assert a["key"] == b["key"] and abs(a["prob"] - b["prob"]) <= 1e-6
        for k in set(a) - timing - {"prob"}:
            assert a[k] == b[k], k
        ma = cv2.imread(str(tmp_path / "local" / a["files"]["mask"]), cv2.IMREAD_GRAYSCALE)
        mb = cv2.imread(str(tmp_path / "ray" / b["files"]["mask"]), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(ma, mb)
    assert any(x["cracked"] for x in ray_) and not all(x["cracked"] for x in ray_)
    assert all(x["lat"] is not None for x in ray_)  # positions from the file times, compared above
    g_loc = json.loads((tmp_path / "local" / "cracks.geojson").read_text())
    g_ray = json.loads((tmp_path / "ray" / "cracks.geojson").read_text())
    assert g_loc["features"] and [f["geometry"] for f in g_loc["features"]] == [f["geometry"] for f in g_ray["features"]]
    s_loc = json.loads((tmp_path / "local" / "summary.json").read_text())
    s_ray = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert s_ray["engine"] == "ray" and set(s_loc) <= set(s_ray)
    assert s_ray["ray_decode"] == "actor"  # auto on CPU actors
    # the actors' start-up, apart: after the run began, before its first record and its end
    assert 0 < s_ray["ray_actor_ready_s"] < min(s_ray["ray_first_record_s"], s_ray["elapsed_s"])
    assert json.loads((tmp_path / "ray_tasks" / "summary.json").read_text())["ray_decode"] == "tasks"
    for k in ("frames", "frames_total", "cracked", "cracked_total", "unreadable"):
        assert s_loc[k] == s_ray[k], k
    # both engines say alike which model and options wrote the records (what a resume checks), GPS track included
    i_loc = json.loads((tmp_path / "local" / "run.json").read_text())
    i_ray = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert i_loc["model_sha256"] == i_ray["model_sha256"] and i_loc["settings"] == i_ray["settings"]
    assert i_ray["settings"]["survey.overlap"] == 16 and i_ray["settings"]["gps"]
    # the Ray engine refuses to resume into records written with other options (one line, exit 2)
    r = runner.invoke(cli.app, base + ["--out", str(tmp_path / "ray"), "--engine", "ray", "--threshold", "0.9"])
    assert r.exit_code == 2 and "other options (post.threshold" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("decode", ["actor", "tasks"])
def test_killed_actor_still_gives_each_frame_once_and_resume(tmp_path, ray_local, model, decode):
    """Each actor holds two batches at once (calls_per_actor 2): a killed one loses both, Ray Data redoes both."""
    from crackcam.runtime.ray_engine import RayJob, run_ray

    src = _frames(tmp_path / "f", 12)
    out = tmp_path / "o"
    marker = tmp_path / "killed"
    job = RayJob(model=str(model), out=str(out), save=("masks",), die_once_at="f07.png", die_marker=str(marker))
    s = run_ray(job, src, workers=2, progress=False, log=lambda m: None, max_frames=10, decode=decode,
                calls_per_actor=2, frames_per_call=2)
    assert marker.is_file()  # an actor really died in the middle of the run (and was restarted by Ray Data)
    keys = [r["key"] for r in _records(out)]
    assert len(keys) == len(set(keys)) == 10 == s["frames"]
    assert not list(out.rglob(f"*{sinks.TEMP_MARK}*"))
    for r in _records(out):
        assert cv2.imread(str(out / r["files"]["mask"])) is not None
    # resume: the rest, and nothing twice
    logs = []
    s = run_ray(RayJob(model=str(model), out=str(out), save=("masks",)), src, workers=1, progress=False,
                log=logs.append, decode=decode)
    assert any("resuming: 10 frames" in m for m in logs)
    keys = [r["key"] for r in _records(out)]
    assert len(keys) == len(set(keys)) == 12 and s["frames"] == 2 and s["frames_total"] == 12


def test_list_file_source_and_video_refused(tmp_path, ray_local, model):
    src = _frames(tmp_path / "f", 3)
    lst = tmp_path / "frames.txt"
    lst.write_text("# archive 2024-05\n" + "\n".join(f"f/f{k:02d}.png" for k in range(3)) + "\n")
    r = runner.invoke(cli.app, ["--model", str(model), "--source", str(lst), "--out", str(tmp_path / "o"),
                                "--engine", "ray", "--ray-workers", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert [Path(x["source"]).name for x in _records(tmp_path / "o")] == ["f00.png", "f01.png", "f02.png"]
    vid = tmp_path / "v.avi"
    vw = cv2.VideoWriter(str(vid), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (64, 48))
    vw.write(np.zeros((48, 64, 3), np.uint8))
    vw.release()
    r = runner.invoke(cli.app, ["--model", str(model), "--source", str(vid), "--out", str(tmp_path / "o2"),
                                "--engine", "ray"])
    assert r.exit_code == 2 and "image folder, a glob or a list file" in r.output
    assert len(r.output.strip().splitlines()) == 1
    (tmp_path / "bad.txt").write_text("missing.png\n")
    r = runner.invoke(cli.app, ["--model", str(model), "--source", str(tmp_path / "bad.txt"), "--out",
                                str(tmp_path / "o3")])
    assert r.exit_code == 2 and "line 1" in r.output and "missing.png" in r.output


def test_auto_decode_feeds_gpu_actors_from_tasks_and_cpu_actors_read_their_own_frames():
    from crackcam.runtime.ray_engine import resolve_decode

    assert resolve_decode("auto", gpu_actors=True) == "tasks"
    assert resolve_decode("auto", gpu_actors=False) == "actor"
    assert resolve_decode("tasks", gpu_actors=False) == "tasks" and resolve_decode("actor", gpu_actors=True) == "actor"
    with pytest.raises(ValueError, match="choose one of auto, tasks, actor"):
        resolve_decode("gpu", gpu_actors=False)


def test_without_ray_one_line_names_the_extra(tmp_path, monkeypatch, model):
    from crackcam.runtime import ray_engine

    monkeypatch.setattr(ray_engine, "import_optional", lambda name: None)
    src = _frames(tmp_path / "f", 1)
    r = runner.invoke(cli.app, ["--model", str(model), "--source", str(src), "--out", str(tmp_path / "o"),
                                "--engine", "ray"])
    assert r.exit_code == 2 and "pip install 'crackcam[cluster]'" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_each_engine_refuses_the_other_engines_options_and_fails_in_one_line(tmp_path, monkeypatch, model):
    """A typed option the chosen engine would not read is one line, exit 2; a ray run's failures take the same
    one-line ladder as the local engine's: an unwritable output exit 3, a cluster error exit 1."""
    import errno

    from crackcam.runtime import ray_engine

    src = _frames(tmp_path / "f", 1)
    base = ["--model", str(model), "--source", str(src), "--out", str(tmp_path / "o")]
    for extra in (["--engine", "ray", "--show"], ["--engine", "ray", "--retries", "1"],
                  ["--address", "auto"], ["--ray-workers", "3"], ["--ray-decode", "tasks"]):
        r = runner.invoke(cli.app, base + extra)
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, (extra, r.output)
        assert next(e for e in extra if e.startswith("--") and e != "--engine") in r.output, (extra, r.output)
    assert not (tmp_path / "o").exists()

    monkeypatch.setattr(ray_engine, "import_ray", lambda: None)
    seen = []  # --no-show asks for what the Ray engine does anyway: it reaches the run, not a refusal
    monkeypatch.setattr(ray_engine, "run_ray", lambda *a, **kw: seen.append(kw) or {"frames": 0})
    monkeypatch.setattr(cli, "format_summary", lambda s: "ran")
    r = runner.invoke(cli.app, base + ["--engine", "ray", "--no-show"])
    assert r.exit_code == 0 and seen and "ran" in r.output, r.output
    assert seen[-1]["decode"] == "auto"  # the default: the actors read their frames on CPU, tasks feed GPU actors
    r = runner.invoke(cli.app, base + ["--engine", "ray", "--ray-decode", "tasks"])
    assert r.exit_code == 0 and seen[-1]["decode"] == "tasks", r.output
    r = runner.invoke(cli.app, base + ["--engine", "ray", "--ray-decode", "gpu"])
    assert r.exit_code == 2 and r.output.strip() == "crack-run: --ray-decode 'gpu': choose auto, tasks, actor", r.output
    failures = [(3, sinks.OutputWriteError(tmp_path / "o" / "results.jsonl", OSError(errno.ENOSPC, "No space left"))),
                (1, RuntimeError("actor died\nmore detail")),
                (1, ConnectionError("Could not find any running Ray instance"))]  # an OSError, not the output's
    for code, exc in failures:
        def boom(*a, _exc=exc, **kw):
            raise _exc
        monkeypatch.setattr(ray_engine, "run_ray", boom)
        r = runner.invoke(cli.app, base + ["--engine", "ray"])
        lines = r.output.strip().splitlines()
        assert r.exit_code == code and len(lines) == 1 and "Traceback" not in r.output, r.output
        want = ("disk is full" if code == 3 else f"--engine ray: run failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0]})")
        assert want in lines[0], r.output
    from crackcam.runtime.meta import ModelFileError  # the driver reads the model before any actor starts

    with pytest.raises(ModelFileError, match="missing.onnx.*not found"):
        ray_engine._driver_steps(ray_engine.RayJob(model=str(tmp_path / "missing.onnx"), out=str(tmp_path / "o")))


def test_base_install_stays_ray_free():
    """Importing every runtime module (and running the local engine's CLI module) never imports ray."""
    import subprocess
    import sys

    code = ("import sys, importlib, pkgutil, crackcam.runtime as R\n"
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(R.__path__, 'crackcam.runtime.')]\n"
            "print('RAY', sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "RAY []" in r.stdout


# ------------------------------------------------------------------------------------------------ torchrun
def test_crack_train_devices_2_on_cpu_trains_like_one_process(tmp_path):
    """crack-train --devices 2 (torchrun, gloo, DistributedSampler, rank 0 writes) on a drawn set: the same val F1
    band as one process, the same metrics.json schema, one set of checkpoints."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    from crackcam.train.synth import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", n_crack=120, n_free=120, size=(32, 32), layout="kaggle",
                                   seed=1234)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    figs, seen = {}, {}
    for n in (1, 2):
        out = tmp_path / f"r{n}"
        r = subprocess.run([sys.executable, "-m", "crackcam.train.cli", "--data", str(data), "--out", str(out),
                            "--devices", str(n), "--epochs", "5", "--tile", "32", "--batch", "16", "--no-progress",
                            "--no-test"], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        m = json.loads((out / "metrics.json").read_text())
        figs[n] = m["best_val_f1"]
        seen[n] = m["history"][0]["tiles_seen"]
        assert len(m["history"]) == 5 and (out / "best.pt").is_file() and (out / "train_state.pt").is_file()
        if n == 2:
            assert m["distributed"] == {"world_size": 2, "backend": "gloo", "batch_per_process": 8}
            assert "launching 2 processes with torchrun" in r.stderr
            assert r.stdout.count("best epoch") == 1  # one process (rank 0) reports and writes
    assert figs[1] >= 0.7 and abs(figs[2] - figs[1]) <= 0.1, figs
    assert abs(seen[2] - seen[1] / 2) <= 8, seen  # each process trains on its half of every epoch


def test_crack_train_devices_2_distils_the_segmenter_like_one_process(tmp_path):
    """The segmenter too: crack-train --model seg_tiny --teacher T --devices 2 (torchrun, gloo) — rank 0 alone makes
    the pseudo-masks, validates and writes; each process trains on half the crops of every epoch; the validation
    figure lands in the band of one process."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    from crackcam.runtime.toy import make_toy_model
    from crackcam.train.synth import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", n_crack=20, n_free=10, size=(160, 160), layout="kaggle", seed=5)
    teacher = make_toy_model(tmp_path / "toy.onnx", threshold=0.5, offset=0.65)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    figs, seen = {}, {}
    for n in (1, 2):
        out = tmp_path / f"s{n}"
        r = subprocess.run([sys.executable, "-m", "crackcam.train.cli", "--data", str(data), "--out", str(out),
                            "--model", "seg_tiny", "--teacher", str(teacher), "--devices", str(n), "--rounds", "1",
                            "--epochs", "4", "--samples", "256", "--batch", "16", "--crop", "64", "--no-progress"],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        m = json.loads((out / "metrics.json").read_text())
        figs[n] = m["best"]["ods_mean"]
        seen[n] = m["history"][0]["crops_seen"]
        assert len(m["history"]) == 4 and (out / "best.pt").is_file() and (out / "distill_state.pt").is_file()
        assert (out / "pseudo" / "round1" / "manifest.jsonl").is_file()
        if n == 2:
            assert m["distributed"] == {"world_size": 2, "backend": "gloo", "batch_per_process": 8}
            assert "launching 2 processes with torchrun" in r.stderr
            assert r.stdout.count("distill: best round") == 1 and r.stdout.count("pseudo-masks:") == 1
        else:
            assert "distributed" not in m
    assert figs[1] >= 0.5 and abs(figs[2] - figs[1]) <= 0.1, figs
    assert seen[2] * 2 == seen[1], seen  # each process its half of every epoch's crops
