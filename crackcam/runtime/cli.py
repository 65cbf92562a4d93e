"""``crack-run``: crack maps from cameras, videos and image folders with an ONNX model or a TensorRT engine.

    crack-run --model model.onnx --source 0 --out runs/cam          # camera index 0 (same as --camera 0)
    crack-run --source "survey/*.jpg" --out runs/survey --save masks,overlays --gps track.nmea --mm-per-px 0.8
    crack-run --model model.engine --source drive.mp4 --out runs/drive --batch 8

Torch-free: nothing here imports torch or crackcam.models/train/export.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from .imageio import BadInputError
from .meta import BackendUnavailable, ModelFileError
from .sinks import OutputWriteError
from .survey import RoiError

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0], pretty_exceptions_enable=False)

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "default.onnx"


def _err(msg: str, code: int = 2):
    typer.echo(f"crack-run: {msg}", err=True)
    raise typer.Exit(code)


def _parse_threshold(s: Optional[str]):
    if s is None:
        return None
    t = s.strip().lower()
    if t == "otsu" or t.startswith("p"):
        return t
    try:
        v = float(t)
    except ValueError:
        _err(f"--threshold {s!r}: give a number in [0, 1], 'otsu' or a percentile like 'p97'")
    if not 0.0 <= v <= 1.0:
        _err(f"--threshold {s!r}: a number threshold must lie in [0, 1]")
    return v


def _parse_save(s: str) -> tuple:
    from .sinks import SAVE_KINDS

    if not s or s.strip().lower() in ("none", ""):
        return ()
    if s.strip().lower() == "all":
        return SAVE_KINDS
    kinds = tuple(k.strip().lower() for k in s.split(",") if k.strip())
    bad = [k for k in kinds if k not in SAVE_KINDS]
    if bad:
        _err(f"--save {s!r}: unknown kind {bad[0]!r} (choose from {', '.join(SAVE_KINDS)}, all, none)")
    return kinds


def _survey_overrides(scale, gate, roi, roi_size, no_roi, min_length, model_pass=None, recheck=None) -> dict:
    from .survey import PASSES, parse_roi

    d: dict = {}
    if model_pass is not None:
        if model_pass not in PASSES:
            _err(f"--pass {model_pass!r}: choose {', '.join(PASSES)}")
        d["model_pass"] = model_pass
    if scale is not None:
        if not 0 < scale <= 4:
            _err(f"--scale {scale}: must lie in (0, 4]")
        d["scale"] = scale
    for key, flag, v in (("gate", "--gate", gate), ("recheck", "--recheck", recheck)):  # fractions
        if v is not None:
            if not 0 <= v <= 1:
                _err(f"{flag} {v}: must lie in [0, 1]")
            d[key] = v
    if min_length is not None:
        if min_length < 0:
            _err(f"--min-length {min_length}: must be >= 0")
        d["min_length"] = min_length
    if roi is not None and no_roi:
        _err("give --roi or --no-roi, not both")
    if no_roi:
        d.update(roi=None, roi_mask=None, roi_size=None, _clear_roi=True)
    if roi is not None:
        try:
            d.update({"roi": None, "roi_mask": None, **parse_roi(roi)})
        except RoiError as e:
            _err(f"--roi: {e}")
    if roi_size is not None:
        w, _, h = roi_size.lower().partition("x")
        try:
            d["roi_size"] = [int(w), int(h)]
            if min(d["roi_size"]) <= 0:
                raise ValueError
        except ValueError:
            _err(f"--roi-size {roi_size!r}: give WIDTHxHEIGHT in px, e.g. 1280x1080")
    return d


# options only one engine reads: typed for the other, they are one error line (not a silent no-op)
_LOCAL_ONLY = ("show", "workers", "retries", "stall_timeout", "start_time")
_RAY_ONLY = ("address", "ray_workers", "ray_decode")


def typed_options(ctx, names=None) -> list[str]:
    """The parameters of ``ctx`` (all, or those in ``names``, in their order) the user typed rather than left at
    their defaults — what the crackcam commands check before refusing an option the chosen route would ignore."""
    out = []
    for n in (ctx.params if names is None else names):
        src = ctx.get_parameter_source(n)
        if src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP"):
            out.append(n)
    return out


@app.command()
def run(
    ctx: typer.Context,
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="ONNX model (.onnx) or TensorRT engine "
                                         "(.engine); default: the model shipped in crackcam/assets/default.onnx"),
    source: Optional[str] = typer.Option(None, "--source", "-s", help="camera index (0), folder, glob "
                                         "('dir/*.jpg'), video file, or stream URL (rtsp://…)"),
    camera: Optional[int] = typer.Option(None, "--camera", help="camera index (short for --source N)"),
    out: Path = typer.Option(Path("runs/crack-run"), "--out", "-o", help="output folder"),
    provider: str = typer.Option("auto", help="ONNX Runtime provider: auto (TensorRT → CUDA → CPU), tensorrt, "
                                 "cuda, cpu"),
    batch: int = typer.Option(1, min=1, help="frames (or tiles) per inference call"),
    threshold: Optional[str] = typer.Option(None, help="map threshold: number, 'otsu' or 'pXX' "
                                            "(default: the model's metadata)"),
    save: str = typer.Option("", help="images to write: comma list of masks, overlays, skeletons (or all/none)"),
    show: bool = typer.Option(False, help="show overlays in a window (needs OpenCV with GUI); q quits"),
    max_frames: Optional[int] = typer.Option(None, min=1, help="stop after this many new frames"),
    gps: Optional[Path] = typer.Option(None, help="GPS log: CSV time,lat,lon or NMEA ($GPRMC/$GPGGA)"),
    gps_method: str = typer.Option("linear", help="GPS matching: linear (interpolate) or nearest"),
    gps_max_gap: float = typer.Option(5.0, help="no position when the nearest GPS fix is further than this (s)"),
    start_time: Optional[str] = typer.Option(None, help="video files: wall-clock time of frame 0 (epoch s or "
                                             "ISO 8601), for GPS matching"),
    mm_per_px: Optional[float] = typer.Option(None, "--mm-per-px", help="pixel size on the road (mm/px): "
                                              "measures in mm too"),
    tile: Optional[int] = typer.Option(None, help="dynamic-size models: tile size in px at work scale (default: "
                                       "the model's survey settings; a fixed-size model takes its own size)"),
    overlap: Optional[int] = typer.Option(None, min=0, help="tile overlap in px at work scale (stitched with a "
                                          "weighted blend; default: the model's)"),
    max_side: Optional[int] = typer.Option(None, help="shrink frames whose longer side exceeds this (px; default: "
                                           "the model's)"),
    scale: Optional[float] = typer.Option(None, help="work scale: resize frames by this before tiling, so crack "
                                          "widths in px match what the model learned (default: the model's)"),
    gate: Optional[float] = typer.Option(None, help="per-tile gate: a tile whose crack probability is below this "
                                         "contributes an empty map (default: the model's)"),
    roi: Optional[str] = typer.Option(None, help="region of interest: 'x,y x,y x,y ...' in frame-relative "
                                      "coordinates (0..1; ';' between polygons), a JSON polygon file or a mask PNG; "
                                      "outside it the map is 0 and nothing is counted (default: the model's)"),
    roi_size: Optional[str] = typer.Option(None, help="apply the ROI only to frames of this size (WIDTHxHEIGHT)"),
    no_roi: bool = typer.Option(False, "--no-roi", help="ignore the model's ROI"),
    min_length: Optional[float] = typer.Option(None, help="a frame is 'cracked' when its crack skeleton is at least "
                                               "this long (px; default: the model's calibrated value)"),
    model_pass: Optional[str] = typer.Option(None, "--pass", help="frame-pass graphs: tiles (every tile as a tile "
                                             "graph would), frame (one pass per frame, tiles read out of it) or "
                                             "cascade (one pass proposes, the tiles within --recheck of the gate "
                                             "are re-run as tiles); default: the model's"),
    recheck: Optional[float] = typer.Option(None, help="--pass cascade: re-run the tiles whose one-pass probability "
                                            "is at least gate - recheck (default: the model's)"),
    workers: int = typer.Option(2, min=1, help="post-processing threads"),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads (default: all cores)"),
    resume: bool = typer.Option(True, help="skip frames already in OUT/results.jsonl (written by the same model and "
                                "options, OUT/run.json says; else refused)"),
    retries: int = typer.Option(3, min=0, help="camera/stream: reconnect attempts before stopping"),
    stall_timeout: float = typer.Option(10.0, min=0, help="camera/stream: a stream silent for this long (s) without "
                                        "closing is treated as dropped: reconnect, then stop (0 = wait forever)"),
    progress: bool = typer.Option(True, help="progress bar"),
    refine: bool = typer.Option(True, help="apply the model's recorded pixel-cue refinement (metadata 'refine', "
                                "a refine-<cam> recipe); --no-refine post-processes the CAM as it is"),
    engine: str = typer.Option("local", help="local (this process) or ray (Ray Data: an actor pool "
                               "of sessions; image folders, globs and list files; needs crackcam[cluster])"),
    address: Optional[str] = typer.Option(None, help="--engine ray: the cluster (auto, ray://HOST:PORT); default: "
                                          "start a local Ray on this machine"),
    ray_workers: int = typer.Option(2, min=1, help="--engine ray: inference actors (one session each; a GPU each "
                                    "where the cluster has as many)"),
    ray_decode: str = typer.Option("auto", help="--engine ray: where frames are decoded: actor (each actor reads "
                                   "its own frames, one ahead of its model), tasks (Ray tasks, frames through the "
                                   "object store: decoding scales on CPUs other than the actors') or auto (tasks for "
                                   "GPU actors, actor for CPU actors)"),
):
    """Run a crack model on a camera, video, image folder or glob; write results.jsonl, summary.json, images."""
    from . import geo
    from .pipeline import Pipeline, RunConfig
    from .sessions import open_session
    from .sources import open_source

    if camera is not None and source is not None:
        _err("give --source or --camera, not both")
    if camera is not None:
        source = str(camera)
    if source is None:
        _err("no source: give --source (camera index, folder, glob, video, URL) or --camera N")
    if model is None:
        if not DEFAULT_MODEL.is_file():
            _err(f"no --model given and the packaged default model {DEFAULT_MODEL} is not present; "
                 f"pass --model FILE.onnx (export one with crack-export)")
        model = DEFAULT_MODEL
    thr = _parse_threshold(threshold)
    save_kinds = _parse_save(save)
    survey = _survey_overrides(scale, gate, roi, roi_size, no_roi, min_length, model_pass, recheck)
    if gps_method not in ("linear", "nearest"):
        _err(f"--gps-method {gps_method!r}: choose linear or nearest")
    if mm_per_px is not None and mm_per_px <= 0:
        _err("--mm-per-px must be positive")
    t0 = None
    if start_time is not None:
        try:
            t0 = geo._parse_time(start_time)
        except ValueError:
            _err(f"--start-time {start_time!r}: give epoch seconds or an ISO 8601 time")

    def log(msg: str):
        typer.echo(msg, err=True)

    if engine not in ("local", "ray"):
        _err(f"--engine {engine!r}: choose local or ray")
    stray = ["--" + n.replace("_", "-") for n in typed_options(ctx, _LOCAL_ONLY if engine == "ray" else _RAY_ONLY)
             if not (n == "show" and not show)]  # --no-show asks for what the Ray engine does anyway
    if stray:
        _err(f"{', '.join(stray)}: not read by --engine {engine} (" +
             ("camera/stream and display options are the local engine's; the actors run the post-processing)"
              if engine == "ray" else "give --engine ray)"))
    if engine == "ray":
        _run_ray(model, source, out, log, provider=provider, threads=threads, batch=batch, save=save_kinds,
                 threshold=thr, mm_per_px=mm_per_px, tile=tile, overlap=overlap, max_side=max_side, survey=survey,
                 gps=gps, gps_method=gps_method, gps_max_gap=gps_max_gap, no_refine=not refine, address=address,
                 workers=ray_workers, resume=resume, max_frames=max_frames, progress=progress and sys.stderr.isatty(),
                 decode=ray_decode)
        return

    pipe = None

    def storage(e):
        return storage_line(e, out, pipe)

    with _one_line_errors(out, f"{model}", storage):
        track = geo.read_gps(gps) if gps is not None else None
        # spin=False: ONNX Runtime's worker threads sleep between batches instead of busy-waiting, so the reader
        # and post-processing threads get the CPU (measured ~15 % more end-to-end FPS on 2 cores; crack-bench runtime)
        sess = open_session(model, provider=provider, log=log, threads=threads, spin=False)
        src = open_source(source, log=log, start_time=t0, retries=retries, stall_timeout=stall_timeout)
        root = source if Path(source).is_dir() else None
        cfg = RunConfig(out=out, batch=batch, save=save_kinds, threshold=thr, mm_per_px=mm_per_px, tile=tile,
                        overlap=overlap, max_side=max_side, survey=survey, max_frames=max_frames, show=show, gps=track,
                        gps_method=gps_method, gps_max_gap=gps_max_gap, post_workers=workers, resume=resume,
                        progress=progress and sys.stderr.isatty(), source_root=root, no_refine=not refine)
        pipe = Pipeline(sess, src, cfg, log=log)
        summary = pipe.run()
    typer.echo(format_summary(summary))
    if summary.get("stopped_reason") and not summary["frames"]:
        raise typer.Exit(1)


def _run_ray(model, source, out, log, *, gps, address, workers, resume, max_frames, progress, decode="auto", **job):
    from . import geo
    from .ray_engine import DECODE_MODES, RayJob, import_ray, run_ray

    if decode not in DECODE_MODES:
        _err(f"--ray-decode {decode!r}: choose {', '.join(DECODE_MODES)}")

    def storage(e):
        return storage_line(e, out, None, kept=f"the records in {out}/results.jsonl are intact")

    with _one_line_errors(out, "--engine ray", storage):
        import_ray()
        track = geo.read_gps(gps) if gps is not None else None
        root = source if Path(source).is_dir() else None
        rj = RayJob(model=str(model), out=str(out), gps=track, source_root=root, **job)
        summary = run_ray(rj, source, address=address, workers=workers, resume=resume, max_frames=max_frames,
                          progress=progress, log=log, decode=decode)
    typer.echo(format_summary(summary))


@contextmanager
def _one_line_errors(out: Path, what: str, storage):
    """Either engine's run: every failure is one line and an exit code, never a traceback — bad input / model /
    missing backend 2, Ctrl-C before the first frame 130, an output that cannot be written 3 (``storage(e)`` says
    what was kept), anything else (an inference or cluster error) 1, naming ``what`` ran."""
    try:
        yield
    except typer.Exit:
        raise
    except (BadInputError, ModelFileError, BackendUnavailable) as e:
        _err(str(e))
    except RoiError as e:
        _err(f"--roi: {e}")
    except KeyboardInterrupt:  # before the pipeline started (model loading, source opening)
        _err("interrupted before the first frame", 130)
    except OutputWriteError as e:  # disk full / read-only mid-run: stop cleanly, keep what is written, resumable
        _err(storage(e), 3)
    except OSError as e:
        if isinstance(e, (ConnectionError, TimeoutError)) and not getattr(e, "filename", None):
            first = (str(e).splitlines() or [type(e).__name__])[0][:300]  # e.g. no Ray cluster at --address
            _err(f"{what}: run failed ({type(e).__name__}: {first})", 1)
        _err(f"{getattr(e, 'filename', '') or out}: {e.strerror or e}")
    except Exception as e:  # noqa: BLE001 - e.g. an error inside ONNX Runtime or Ray: one line, not a trace
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        _err(f"{what}: run failed ({type(e).__name__}: {first}); summary in {out}/summary.json", 1)


def storage_line(e, out: Path, pipe, kept: str | None = None) -> str:
    """The one line for an output that cannot be written (exit 3), for either engine (``kept``: what the run kept,
    when the caller knows better than ``pipe``)."""
    what = "the disk is full" if e.disk_full else "the output folder is read-only" if e.read_only else "a write failed"
    n = pipe.summary["frames"] if pipe is not None and pipe.summary else 0
    if kept is None:
        kept = f"{n} new frame(s) in {out}/results.jsonl are intact" if pipe is not None else "nothing new was written"
    summ = "" if pipe is None or pipe.summary_written else " (summary.json not written)"
    return (f"{e.filename}: {e.strerror}: {what}; stopped cleanly, {kept}{summ}; "
            f"make room and run the same command again to resume")


def format_summary(s: dict) -> str:
    line = (f"crack-run: {s['frames']} frames in {s['elapsed_s']:.1f} s ({s['fps']:.1f} FPS, {s['provider']}), "
            f"cracked {s['cracked']}/{s['frames']} ({100 * s['cracked_fraction']:.1f}%)")
    if s["frames_total"] != s["frames"]:
        line += f"; all runs: {s['frames_total']} frames, {100 * s['cracked_fraction_total']:.1f}% cracked"
    if s.get("unreadable"):
        line += f"; {s['unreadable']} unreadable skipped"
    if s.get("interrupted"):
        line += "; interrupted"
    if s.get("stopped_reason"):
        line += f"; stopped: {s['stopped_reason']}"
    return line + f" → {s['out']}/summary.json"


def _ultralytics_args(argv: list[str]) -> list[str]:
    """Accept ``key=value`` words as in Ultralytics (``crack-run model=m.onnx source=0``) for known options."""
    cmd = typer.main.get_command(app)
    known = {o.lstrip("-") for p in cmd.params for o in p.opts if o.startswith("--")}
    out, prev_takes_value = [], False
    for tok in argv:
        key, eq, val = tok.partition("=")
        if eq and not prev_takes_value and not tok.startswith("-") and key.replace("_", "-") in known:
            out += [f"--{key.replace('_', '-')}", val]
            prev_takes_value = False
            continue
        out.append(tok)
        opt = next((p for p in cmd.params if tok in p.opts), None)
        prev_takes_value = bool(opt is not None and getattr(opt, "param_type_name", "") == "option"
                                and not getattr(opt, "is_flag", False))
    return out


def main():
    app(args=_ultralytics_args(sys.argv[1:]), prog_name="crack-run")


if __name__ == "__main__":
    main()
