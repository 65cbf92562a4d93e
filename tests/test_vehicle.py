"""What a survey vehicle cannot afford: a wrong colour order, a wrong position, a silent stall, a half-written file,
a broken install that looks absent — each of these has a test that fails when it comes back."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("onnx")  # the toy models are built with onnx (the train extra)

from crackcam.runtime import cli, geo, sinks  # noqa: E402
from crackcam.runtime.pipeline import Pipeline, RunConfig  # noqa: E402
from crackcam.runtime.sessions import open_session  # noqa: E402
from crackcam.runtime.sources import CameraSource, ImageListSource, VideoSource, open_source  # noqa: E402
from crackcam.runtime.toy import make_toy_model  # noqa: E402

runner = CliRunner()


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines() if ln.strip()]


# ------------------------------------------------------------------------------------------------ colour order
def _video(path: Path, frames: list, fps: float) -> Path:
    """An MJPG video of BGR frames (OpenCV writes and decodes BGR)."""
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for f in frames:
        vw.write(f)
    vw.release()
    return path


def _dark_line_bgr(h=64, w=96) -> np.ndarray:
    img = np.full((h, w, 3), 200, np.uint8)
    img[30:33, 8:88] = 15
    return img


def _red_line_bgr(h=64, w=96) -> np.ndarray:
    """A BGR frame (as OpenCV holds it) whose only crack is dark in the RED channel: B and G are flat."""
    img = np.full((h, w, 3), 200, np.uint8)
    img[30:33, 8:88, 2] = 15
    return img


@pytest.fixture(scope="module")
def red_model(tmp_path_factory):
    """A toy graph that looks at the R channel only (input BGR, as the contract says)."""
    return make_toy_model(tmp_path_factory.mktemp("red") / "red.onnx", channel_weights=(0, 0, 1),
                          postprocess={"threshold": 0.5, "min_area": 10})


def _run(model, source, out) -> list[dict]:
    sess = open_session(model, provider="cpu", log=lambda m: None)
    Pipeline(sess, open_source(source, log=lambda m: None) if not hasattr(source, "frames") else source,
             RunConfig(out=out, progress=False, resume=False), log=lambda m: None).run()
    return _records(out)


def test_colour_order_folder_video_and_camera(tmp_path, red_model):
    """The red-only crack is found through every source; each source handing RGB instead of BGR would miss it
    (and the same frame with its channels swapped is indeed missed: the model can tell)."""
    img = _red_line_bgr()
    (tmp_path / "f").mkdir()
    cv2.imwrite(str(tmp_path / "f" / "a.png"), img)  # a file on disk holds true colours
    cv2.imwrite(str(tmp_path / "f" / "b_swapped.png"), np.ascontiguousarray(img[..., ::-1]))
    recs = {Path(r["source"]).name: r for r in _run(red_model, tmp_path / "f", tmp_path / "o1")}
    assert recs["a.png"]["cracked"] and not recs["b_swapped.png"]["cracked"]
    # video: written and decoded by OpenCV in BGR
    vid = _video(tmp_path / "v.avi", [img] * 3, fps=5.0)
    assert all(r["cracked"] for r in _run(red_model, vid, tmp_path / "o2"))

    # camera / stream: cv2.VideoCapture.read() returns BGR
    class Cap:
        def __init__(self):
            self.n = 0

        def isOpened(self):
            return True

        def read(self):
            self.n += 1
            return (True, img.copy()) if self.n <= 3 else (False, None)

        def release(self):
            pass

    caps = iter([Cap()])
    cam = CameraSource(0, retries=0, opener=lambda s: next(caps, None), log=lambda m: None)
    assert [r["cracked"] for r in _run(red_model, cam, tmp_path / "o3")] == [True, True, True]


def test_source_hands_bgr_not_rgb(tmp_path):
    """The folder source's frames equal cv2.imread (BGR) of the file, pixel for pixel."""
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "x.png"), img)
    fr = next(ImageListSource([tmp_path / "x.png"], "x", log=lambda m: None).frames())
    assert np.array_equal(fr.image, cv2.imread(str(tmp_path / "x.png")))


# ------------------------------------------------------------------------------------------------ geotags
def test_image_folder_frames_carry_file_times_and_get_positions(tmp_path):
    """Image-folder frames are stamped with the files' modification times and located on the GPS track."""
    model = make_toy_model(tmp_path / "m.onnx")
    (tmp_path / "f").mkdir()
    t0 = 1_700_000_000.0
    for k in range(4):
        p = tmp_path / "f" / f"{k}.png"
        cv2.imwrite(str(p), _red_line_bgr()[..., ::-1])
        os.utime(p, (t0 + 2 * k, t0 + 2 * k))
    gps = tmp_path / "g.csv"
    gps.write_text("time,lat,lon\n" + "\n".join(f"{t0 + k},{45 + 0.01 * k},{7 + 0.02 * k}" for k in range(8)))
    r = runner.invoke(cli.app, ["--model", str(model), "--source", str(tmp_path / "f"), "--out", str(tmp_path / "o"),
                                "--gps", str(gps), "--no-progress"])
    assert r.exit_code == 0, r.output
    for rec in _records(tmp_path / "o"):
        k = int(Path(rec["source"]).stem)
        assert rec["timestamp"] == pytest.approx(t0 + 2 * k)
        assert rec["lat"] == pytest.approx(45 + 0.02 * k) and rec["lon"] == pytest.approx(7 + 0.04 * k)


@pytest.fixture
def _local_zone_not_utc(monkeypatch):
    """This machine's local zone is UTC, where 'naive = local' and 'naive = UTC' agree: move it for the test."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30, no daylight saving
    time.tzset()
    assert time.timezone == -19800
    yield
    monkeypatch.undo()
    time.tzset()


def test_time_zones_naive_iso_is_utc_and_start_time_iso(tmp_path, _local_zone_not_utc):
    assert geo._parse_time("2024-05-01T10:00:00") == geo._parse_time("2024-05-01T10:00:00Z")
    assert geo._parse_time("2024-05-01T12:00:00+02:00") == geo._parse_time("2024-05-01T10:00:00Z")
    assert geo._parse_time("1714557600") == 1714557600.0 == geo._parse_time("2024-05-01T10:00:00Z")
    # --start-time as ISO with an offset, a GPS CSV in UTC ISO: the video frames land on the right fixes
    model = make_toy_model(tmp_path / "m.onnx")
    vid = _video(tmp_path / "v.avi", [_red_line_bgr()] * 4, fps=2.0)
    gps = tmp_path / "g.csv"
    gps.write_text("time,lat,lon\n2024-05-01T10:00:00Z,10.0,20.0\n2024-05-01T10:00:02Z,10.2,20.2\n")
    r = runner.invoke(cli.app, ["--model", str(model), "--source", str(vid), "--out", str(tmp_path / "o"), "--gps",
                                str(gps), "--start-time", "2024-05-01T12:00:00+02:00", "--no-progress"])
    assert r.exit_code == 0, r.output
    lats = [rec["lat"] for rec in _records(tmp_path / "o")]
    assert lats == pytest.approx([10.0, 10.05, 10.1, 10.15])


def _nmea(body: str) -> str:
    return f"${body}*{geo.nmea_checksum(body):02X}"


def test_nmea_across_midnight(tmp_path):
    """GGA-only logs keep counting past midnight; a dated GGA before the new day's RMC gets the next date."""
    # the checksum the sentences below are built with: the NMEA 0183 reference sentence's *47
    assert geo.nmea_checksum("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,") == 0x47
    gga = [_nmea(f"GPGGA,{hms},{4800 + i * 0.06:.4f},N,00200.0000,E,1,08,0.9,10.0,M,,M,,")
           for i, hms in enumerate(["235958.00", "235959.00", "000000.00", "000001.00"])]
    p = tmp_path / "g.nmea"
    p.write_text("\n".join(gga))
    tr = geo.read_gps(p)
    assert tr.time_of_day and tr.t == [86398.0, 86399.0, 86400.0, 86401.0]
    day = 1_700_006_400.0  # a midnight (UTC)
    assert tr.locate(day - 1.5)[0] == pytest.approx(48 + 0.03 / 60)  # 23:59:58.5
    assert tr.locate(day + 0.5)[0] == pytest.approx(48 + 0.15 / 60)  # 00:00:00.5, next day
    rmc = _nmea("GPRMC,235959.00,A,4800.0600,N,00200.0000,E,0.0,0.0,141123,,")
    after = _nmea("GPGGA,000001.00,4800.1800,N,00200.0000,E,1,08,0.9,10.0,M,,M,,")
    p.write_text(rmc + "\n" + after)
    tr = geo.read_gps(p)
    assert not tr.time_of_day and tr.t[1] - tr.t[0] == pytest.approx(2.0)


def test_geojson_after_resume_holds_both_runs(tmp_path):
    model = make_toy_model(tmp_path / "m.onnx")
    vid = _video(tmp_path / "v.avi", [_dark_line_bgr()] * 6, fps=1.0)
    t0 = 1_700_000_000.0
    gps = tmp_path / "g.csv"
    gps.write_text("time,lat,lon\n" + "\n".join(f"{t0 + k},{1 + k},{2 + k}" for k in range(8)))
    args = ["--model", str(model), "--source", str(vid), "--out", str(tmp_path / "o"), "--gps", str(gps),
            "--start-time", str(t0), "--no-progress"]
    assert runner.invoke(cli.app, args + ["--max-frames", "2"]).exit_code == 0
    assert len(json.loads((tmp_path / "o" / "cracks.geojson").read_text())["features"]) == 2
    r = runner.invoke(cli.app, args)
    assert r.exit_code == 0 and "resuming" in r.output
    feats = json.loads((tmp_path / "o" / "cracks.geojson").read_text())["features"]
    assert sorted(f["properties"]["frame"] for f in feats) == list(range(6))
    assert [f["geometry"]["coordinates"] for f in sorted(feats, key=lambda f: f["properties"]["frame"])] == \
        [[2.0 + k, 1.0 + k] for k in range(6)]


# ------------------------------------------------------------------------------------------------ storage faults
class _Disk:
    """Fault injection at ``sinks._open_for_write`` (every output file is opened there): after ``budget`` bytes the
    disk is full (``ENOSPC``: a partial write, then the error) or the folder turns read-only (``EROFS``: every
    later open and write fails), as a USB stick pulled or a full SSD would."""

    def __init__(self, budget: int, err: int):
        self.left, self.err, self.failed = budget, err, 0

    def _raise(self, path):
        self.failed += 1
        raise OSError(self.err, os.strerror(self.err), str(path))

    def open(self, path, mode):
        if self.left <= 0 and self.err == errno.EROFS:
            self._raise(path)
        f = open(path, mode)
        disk = self

        class W:
            closed = property(lambda s: f.closed)

            def write(s, b):
                if len(b) > disk.left:
                    if disk.err == errno.ENOSPC and disk.left > 0:
                        f.write(b[:disk.left])
                        f.flush()
                    disk.left = 0
                    disk._raise(path)
                disk.left -= len(b)
                return f.write(b)

            def flush(s):
                f.flush()

            def fileno(s):
                return f.fileno()

            def close(s):
                f.close()

            def __enter__(s):
                return s

            def __exit__(s, *a):
                f.close()

        return W()


def _frames_folder(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        img = rng.integers(90, 200, (64, 96, 3), dtype=np.uint8)  # noise: PNGs that do not compress away
        img[30:33, 8:88] = 10
        cv2.imwrite(str(folder / f"f{k:02d}.png"), img)
    return folder


def _check_outputs_intact(out: Path) -> list[dict]:
    """Every record parses, names files that exist and decode; no temp file is left."""
    recs = list(sinks.iter_records(out / "results.jsonl"))
    for r in recs:
        for rel in r.get("files", {}).values():
            assert cv2.imread(str(out / rel)) is not None, rel
    assert not [p for p in out.rglob(f"*{sinks.TEMP_MARK}*")], "a temp file was left behind"
    return recs


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only")])
def test_disk_full_or_read_only_mid_run_stops_cleanly_and_resumes(tmp_path, monkeypatch, err, words):
    model = make_toy_model(tmp_path / "m.onnx")
    src = _frames_folder(tmp_path / "f", 12)
    out = tmp_path / "o"
    args = ["--model", str(model), "--source", str(src), "--out", str(out), "--save", "masks,overlays",
            "--no-progress", "--workers", "1"]
    disk = _Disk(budget=40_000, err=err)  # a few frames' images and records, then the fault
    monkeypatch.setattr(sinks, "_open_for_write", disk.open)
    r = runner.invoke(cli.app, args)
    assert r.exit_code == 3, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert words in lines[0] and "resume" in lines[0] and os.strerror(err) in lines[0]
    assert disk.failed >= 1
    before = _check_outputs_intact(out)
    assert 0 < len(before) < 12  # it stopped mid-run, and what it wrote is whole
    monkeypatch.undo()  # space made / the folder writable again: the same command resumes
    r = runner.invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    assert f"resuming: {len(before)} frames" in r.output
    after = _check_outputs_intact(out)
    assert sorted(Path(x["source"]).name for x in after) == [f"f{k:02d}.png" for k in range(12)]  # each once
    assert json.loads((out / "summary.json").read_text())["frames_total"] == 12


def test_a_real_full_disk(tmp_path):
    """The same on a real 200 kB tmpfs (needs permission to mount; this project's machines run tests as root)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        model = make_toy_model(tmp_path / "m.onnx")
        src = _frames_folder(tmp_path / "f", 30)
        args = ["--model", str(model), "--source", str(src), "--out", str(mnt / "o"), "--save", "masks,overlays",
                "--no-progress", "--workers", "1"]
        r = runner.invoke(cli.app, args)
        assert r.exit_code == 3 and "No space left on device" in r.output and "disk is full" in r.output, r.output
        n = len(_check_outputs_intact(mnt / "o"))
        assert 0 < n < 30
        subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
        r = runner.invoke(cli.app, args)
        assert r.exit_code == 0 and f"resuming: {n} frames" in r.output, r.output
        assert len(_check_outputs_intact(mnt / "o")) == 30
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)  # a read-only folder: one line, exit 3
        r = runner.invoke(cli.app, args + ["--no-resume"])
        assert r.exit_code == 3 and "read-only" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_interrupted_image_write_leaves_no_half_file(tmp_path, monkeypatch):
    """A write cut off half-way (the process dies in the middle): the old file or nothing, never half a file."""
    target = tmp_path / "masks" / "a.png"
    target.parent.mkdir()
    target.write_bytes(b"old complete file")

    class Cut(Exception):
        pass

    real_open = sinks._open_for_write

    def dying_open(path, mode):
        f = real_open(path, mode)

        class W:
            def write(s, b):
                f.write(b[: len(b) // 2])
                f.flush()
                raise Cut  # not an OSError: nothing catches it, like a power cut

            def __enter__(s):
                return s

            def __exit__(s, *a):
                f.close()

        return W()

    monkeypatch.setattr(sinks, "_open_for_write", dying_open)
    with pytest.raises(Cut):
        sinks.write_png(target, np.full((40, 40), 255, np.uint8))
    assert target.read_bytes() == b"old complete file"
    assert list(tmp_path.rglob(f"*{sinks.TEMP_MARK}*")) == []


def test_killed_during_a_write_then_the_next_run_cleans_up(tmp_path):
    """SIGKILL in the middle of an image write: the half file is only ever the temp file, and the next run removes it."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "o"
    code = (
        "import sys, time, numpy as np\n"
        "from crackcam.runtime import sinks\n"
        "real = sinks._open_for_write\n"
        "def slow(path, mode):\n"
        "    f = real(path, mode)\n"
        "    class W:\n"
        "        def write(s, b):\n"
        "            f.write(b[:len(b)//2]); f.flush(); print('half', flush=True); time.sleep(60)\n"
        "        def __enter__(s): return s\n"
        "        def __exit__(s, *a): f.close()\n"
        "    return W()\n"
        "sinks._open_for_write = slow\n"
        f"sinks.write_png(__import__('pathlib').Path({str(out / 'masks' / 'x.png')!r}), np.zeros((64, 64), np.uint8))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "half"
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        p.kill()
    assert not (out / "masks" / "x.png").exists()
    assert len(list((out / "masks").glob(f".*{sinks.TEMP_MARK}*"))) == 1  # the half-written temp file
    model = make_toy_model(tmp_path / "m.onnx")
    r = runner.invoke(cli.app, ["--model", str(model), "--source", str(_frames_folder(tmp_path / "f", 2)),
                                "--out", str(out), "--no-progress"])
    assert r.exit_code == 0 and "removed 1 half-written temp file" in r.output, r.output
    assert list(out.rglob(f"*{sinks.TEMP_MARK}*")) == []


# ------------------------------------------------------------------------------------------------ stalls
class _Cap:
    def __init__(self, n, hang=False):
        self.n, self.i, self.hang, self.released = n, 0, hang, False
        self.gate = threading.Event()

    def isOpened(self):
        return True

    def read(self):
        if self.i >= self.n:
            if self.hang:  # silent, never closing: read() just does not return
                self.gate.wait(30)
            return False, None
        self.i += 1
        return True, _dark_line_bgr()

    def release(self):
        self.released = True


def _cam_run(tmp_path, caps, stall):
    it = iter(caps)
    logs = []
    cam = CameraSource("rtsp://cam/1", retries=1, backoff=0.01, sleep=lambda s: None, log=logs.append,
                       opener=lambda s: next(it, None), stall_timeout=stall)
    sess = open_session(make_toy_model(tmp_path / "m.onnx"), provider="cpu", log=lambda m: None)
    t = time.perf_counter()
    s = Pipeline(sess, cam, RunConfig(out=tmp_path / "o", progress=False), log=logs.append).run()
    return s, cam, logs, time.perf_counter() - t


def test_stalled_stream_is_reconnected_by_the_watchdog(tmp_path):
    hung = _Cap(3, hang=True)
    s, cam, logs, dt = _cam_run(tmp_path, [hung, _Cap(2)], stall=0.3)
    assert s["frames"] == 5 and cam.stalls == 1 and cam.reconnects == 1
    assert any("no frame for 0.3 s (stream stalled without closing); reconnecting" in ln for ln in logs)
    assert dt < 10
    assert not hung.released  # never released under its stuck read() ...
    hung.gate.set()
    for _ in range(100):
        if hung.released:
            break
        time.sleep(0.02)
    assert hung.released  # ... but released once it returns


def test_stalled_stream_that_does_not_come_back_ends_the_run(tmp_path):
    hung = _Cap(2, hang=True)
    s, cam, logs, dt = _cam_run(tmp_path, [hung], stall=0.3)
    assert s["frames"] == 2 and "stalled after frame 2" in s["stopped_reason"] and dt < 10
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["stopped_reason"] == s["stopped_reason"]
    hung.gate.set()


def test_stall_timeout_reaches_the_source():
    r = runner.invoke(cli.app, ["--help"])
    assert "--stall-timeout" in r.output
    assert open_source("rtsp://x/y", stall_timeout=2.5, log=lambda m: None).stall_timeout == 2.5
    assert open_source("0", stall_timeout=0, log=lambda m: None).stall_timeout == 0.0


# ------------------------------------------------------------------------------------------------ broken installs
def _package(root: Path, name: str, body: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(body)


def test_not_installed_is_not_broken(tmp_path, monkeypatch):
    from crackcam.runtime.optional import OptionalBroken, import_optional

    assert import_optional("json") is not None
    assert import_optional("crackcam_no_such_package") is None
    assert import_optional("crackcam_no_such_package.sub") is None
    _package(tmp_path, "brokenlib", "raise OSError('libnvinfer.so.10: cannot open shared object file')\n")
    _package(tmp_path, "halflib", "import crackcam_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("brokenlib", "halflib"):
        with pytest.raises(OptionalBroken, match=f"'{name}' is installed but not loadable"):
            import_optional(name)


def test_a_broken_tensorrt_is_reported_and_fails_the_tests(tmp_path, monkeypatch):
    """A tensorrt that is installed but cannot load: the product says 'installed but not loadable' (not 'absent'),
    and the GPU tests' guard fails instead of skipping."""
    import sys

    from crackcam.runtime.meta import BackendUnavailable
    from crackcam.runtime.sessions import _import_trt
    from tests._deps import require

    _package(tmp_path, "tensorrt", "raise ImportError('libnvinfer.so.10: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    with pytest.raises(BackendUnavailable, match="installed but not loadable.*libnvinfer"):
        _import_trt()
    with pytest.raises(pytest.fail.Exception, match="installed but broken is a failure"):
        require("tensorrt")
    export_trt = pytest.importorskip("crackcam.export.tensorrt")
    with pytest.raises(export_trt.TensorRTUnavailable, match="installed but not loadable"):
        export_trt.check_available()


def test_cuda_error_with_a_driver_is_broken_without_one_is_absent(monkeypatch):
    from crackcam.runtime import optional

    class Rt:
        def __init__(self, res):
            self.res = res

        def cudaGetDeviceCount(self):
            return self.res

    monkeypatch.setattr(optional, "nvidia_driver_present", lambda: False)
    assert optional.cuda_device_count(Rt((100, 0))) == 0  # cudaErrorNoDevice on a machine without a GPU
    assert optional.cuda_device_count(Rt((0, 2))) == 2
    monkeypatch.setattr(optional, "nvidia_driver_present", lambda: True)
    with pytest.raises(optional.OptionalBroken, match="driver loaded"):
        optional.cuda_device_count(Rt((35, 0)))  # cudaErrorInsufficientDriver with a driver: a mismatch


def test_provider_fall_back_paths_are_said(tmp_path, monkeypatch):
    """A GPU provider that raises while the session starts, or that ORT drops silently: one line each, then CPU."""
    import onnxruntime as ort

    model = make_toy_model(tmp_path / "m.onnx")
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    def raising(path, so=None, providers=None, provider_options=None):
        if providers[0] == "CUDAExecutionProvider":
            raise RuntimeError("CUDA failure 35: CUDA driver version is insufficient")
        return real(path, so, providers=providers)

    def dropping(path, so=None, providers=None, provider_options=None):
        return real(path, so, providers=["CPUExecutionProvider"])  # what ORT does with a provider it cannot start

    x = np.stack([_dark_line_bgr()])
    ref = open_session(model, provider="cpu", log=lambda m: None).run(x)
    for fake, words in ((raising, "failed to start (CUDA failure 35"), (dropping, "did not initialise")):
        monkeypatch.setattr(ort, "InferenceSession", fake)
        logs = []
        sess = open_session(model, provider="cuda", log=logs.append)
        assert sess.provider == "CPU"
        assert len(logs) == 1 and words in logs[0] and "falling back to CPU" in logs[0], logs
        assert np.array_equal(sess.run(x)[1], ref[1])
    monkeypatch.setattr(ort, "InferenceSession", raising)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(Exception, match="not a loadable ONNX model"):
        open_session(tmp_path / "bad.onnx", provider="cuda", log=lambda m: None)
