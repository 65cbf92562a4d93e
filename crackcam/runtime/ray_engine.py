"""``crack-run --engine ray``: re-process a survey archive (image folder, glob or list file) on Ray Data.

Inference and the frame steps run in an actor pool (one ONNX Runtime session per actor: a GPU per actor where the
cluster has as many, CPU otherwise); each actor reads its frames' files itself, one ahead of its model
(``decode="actor"``: only paths travel, and no decoding workers start), or Ray tasks decode them and hand them
over through the object store (``decode="tasks"``: decoding scales on CPUs other than the actors', which a GPU
actor needs: one reader thread would not keep a GPU busy); ``auto`` (the default) takes ``tasks`` for GPU actors
and ``actor`` for CPU actors.  The driver alone appends to ``results.jsonl``.  The per-frame work is the local pipeline's own (:func:`crackcam.runtime.pipeline.build_model_steps`,
:func:`~crackcam.runtime.steps.infer_tiles`, :func:`~crackcam.runtime.pipeline.finish_frame`,
:func:`~crackcam.runtime.pipeline.run_summary`; frames read by the local source's own loader), so the files and their schema are the same: results.jsonl,
masks / overlays / skeletons, summary.json, cracks.geojson.

Exactly once: Ray Data restarts a killed actor and retries its batch (``max_restarts=-1``, ``max_task_retries=-1``
are its defaults for actor pools); a retried frame rewrites its images atomically (same bytes, temp file + rename)
and the driver writes each frame's record once (it keeps the keys it wrote).  Resume: frames already in
``results.jsonl`` are never submitted.  Ray is an optional extra (``pip install 'crackcam[cluster]'``); without it
``--engine ray`` is one line.  ``docs/cluster.md`` has the commands for a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import geo, sinks
from .imageio import BadInputError
from .meta import BackendUnavailable
from .optional import OptionalBroken, import_optional
from .pipeline import build_model_steps, finish_frame, run_identity, run_summary, start_results, write_run_files
from .progress import bar as progress_bar
from .sources import Frame, ImageListSource, SourceStats, open_source

RAY_HINT = "pip install 'crackcam[cluster]'"
DECODE_MODES = ("auto", "tasks", "actor")


def import_ray():
    """Ray with Ray Data, or one line saying it is missing (or installed but broken)."""
    try:
        ray = import_optional("ray")
        data = import_optional("ray.data") if ray is not None else None
    except OptionalBroken as exc:
        raise BackendUnavailable(f"--engine ray: {exc}") from None
    if ray is None or data is None:
        raise BackendUnavailable(f"--engine ray needs Ray Data ({RAY_HINT}); it is not installed here")
    return ray


@dataclass
class RayJob:
    """What each actor needs (picklable: it travels to the workers)."""

    model: str
    out: str
    provider: str = "auto"
    threads: int | None = None
    batch: int = 1
    save: tuple = ()
    threshold: float | str | None = None
    mm_per_px: float | None = None
    tile: int | None = None
    overlap: int | None = None
    max_side: int | None = None
    survey: dict = field(default_factory=dict)
    gps: geo.GpsTrack | None = None
    gps_method: str = "linear"
    gps_max_gap: float = 5.0
    source_root: str | None = None
    no_refine: bool = False
    die_once_at: str | None = None  # fault injection (tests): the actor exits hard on this key, once
    die_marker: str | None = None  # ... and leaves this file so the restarted actor goes on


def decode_batch(batch: dict) -> dict:
    """Ray task: :func:`decode_row` for a batch of paths; equal-size frames travel as one N×H×W×3 array (a
    fixed-shape tensor column: no per-row conversion through the object store)."""
    rows = [decode_row({k: batch[k][i] for k in batch}) for i in range(len(batch["key"]))]
    out = {k: np.array([r[k] for r in rows], dtype=object if k in ("path", "key", "error") else None)
           for k in ("index", "path", "key", "ts", "error")}
    shapes = {r["image"].shape for r in rows}
    if len(shapes) == 1:
        out["image"] = np.stack([r["image"] for r in rows])
    else:
        arr = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows):
            arr[i] = r["image"]
        out["image"] = arr
    return out


def decode_row(row: dict) -> dict:
    """Ray task: read one image (BGR uint8, as the local source hands it) and its file time."""
    img, err, ts = ImageListSource._load(Path(row["path"]))  # the local source's own read: BGR, file time
    out = dict(row)
    out["image"] = img if err is None else np.zeros((1, 1, 3), np.uint8)
    out["error"] = "" if err is None else str(err)
    out["ts"] = float("nan") if ts is None else ts
    return out


def _driver_steps(job: RayJob):
    """The job's frame steps on the driver, from the model's metadata alone (a CPU session reads an ONNX graph's;
    an engine's comes from its side-car): what the run's identity records.  A bad model or option fails here, in
    one line, before any actor starts."""
    from .meta import ModelFileError, is_engine_path, sidecar_meta
    from .sessions import open_session

    p = Path(job.model)
    if not p.is_file():
        raise ModelFileError(p, "model file not found")
    if is_engine_path(p):
        class _Meta:  # build_model_steps reads .meta and .path only
            meta, path = sidecar_meta(p), p
        sess = _Meta
    else:
        sess = open_session(p, provider="cpu", log=lambda m: None, threads=1)
    return build_model_steps(sess, tile=job.tile, overlap=job.overlap, max_side=job.max_side, survey=job.survey,
                             threshold=job.threshold, no_refine=job.no_refine)


class FrameWorker:
    """Ray Data actor: one ONNX Runtime session; a batch of decoded frames in, their JSON records out."""

    JOB: RayJob | None = None  # set on a per-run subclass (see run_ray): no constructor arguments in the object store

    def __init__(self, job: RayJob | None = None):
        from .sessions import open_session

        job = job or self.JOB
        self.job = job
        self.sess = open_session(job.model, provider=job.provider, log=lambda m: None, threads=job.threads,
                                 spin=False)
        self.steps = build_model_steps(self.sess, tile=job.tile, overlap=job.overlap, max_side=job.max_side,
                                       survey=job.survey, threshold=job.threshold, no_refine=job.no_refine)
        mb = self.sess.max_batch
        self.fixed_batch = self.sess.meta.batch
        self.batch = self.fixed_batch or (min(job.batch, mb) if mb else job.batch)
        self.out = Path(job.out)
        # Ray Data may hand this actor its next batch while this one's last frames are still being finished
        # (max_concurrent_calls_per_actor 2): one call at a time runs the model, the post-processing thread and
        # the reader thread serve both in submission order, so the model does not wait for a batch to drain
        self._model_lock = threading.Lock()
        self._post = ThreadPoolExecutor(1, thread_name_prefix="crackpost")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="crackread")
        # wall-clock time this actor could take frames (its process started, Ray Data, crackcam and ONNX Runtime
        # imported, session open): what the run's summary reports as the actors' start-up
        self.ready_at = time.time()

    def _maybe_die(self, key: str) -> None:
        j = self.job
        if j.die_once_at and key.endswith(j.die_once_at) and j.die_marker and not os.path.exists(j.die_marker):
            Path(j.die_marker).write_text(str(os.getpid()))
            os._exit(1)  # a worker killed mid-batch (as the OOM killer or a lost node would)

    def __call__(self, batch: dict) -> dict:
        """Frames in order: plan → tiles → model for each, while the frame steps after the model (merge, refine,
        post-processing, images) run in a second thread, as in the local pipeline.  With ``decode="actor"`` the
        batch holds paths only, and a reader thread decodes them one ahead of the model."""
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["key"]))]
        reading = "image" not in batch  # decode="actor": paths only
        if reading:
            rows = [self._reader.submit(decode_row, r) for r in rows]
        futs = []
        with self._model_lock:
            for row in rows:
                row = row.result() if reading else row
                key = str(row["key"])
                if row["error"]:
                    futs.append(json.dumps({"key": key, "_error": str(row["error"])}))
                    continue
                self._maybe_die(key)
                t0 = time.perf_counter()
                img = np.ascontiguousarray(row["image"], dtype=np.uint8)
                ts = float(row["ts"])
                fr = Frame(int(row["index"]), img, str(row["path"]), None if np.isnan(ts) else ts, key)
                steps = self.steps.for_shape(img.shape)
                plan = steps.plan(img)
                probs, maps, infer_s = steps.infer(self.sess, img, plan, self.batch)  # tiles, one pass or a cascade
                futs.append(self._post.submit(self._finish, fr, steps, plan, probs, maps, infer_s, t0))
        return {"record": np.array([f if isinstance(f, str) else f.result() for f in futs], dtype=object),
                "ready_at": np.full(len(futs), self.ready_at)}

    def _finish(self, fr, steps, plan, probs, maps, infer_s, t0) -> str:
        j = self.job
        rec, _ = finish_frame(fr, steps, plan, probs, maps, infer_s, t0, out=self.out, save=j.save,
                              source_kind="images", source_root=j.source_root, mm_per_px=j.mm_per_px, gps=j.gps,
                              gps_method=j.gps_method, gps_max_gap=j.gps_max_gap)
        return json.dumps(rec)


def resolve_decode(decode: str, gpu_actors: bool) -> str:
    """``auto`` → ``tasks`` where each actor has a GPU (one reader thread would starve it: decoding goes to the
    cluster's CPUs), ``actor`` on CPU actors (no decoding workers to start, no frames through the object store)."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode {decode!r}: choose one of {', '.join(DECODE_MODES)}")
    return ("tasks" if gpu_actors else "actor") if decode == "auto" else decode


def _cluster_gpus(ray) -> int:
    try:
        return int(ray.cluster_resources().get("GPU", 0))
    except Exception:  # noqa: BLE001
        return 0


def run_ray(job: RayJob, source, *, address: str | None = None, workers: int = 2, resume: bool = True,
            max_frames: int | None = None, progress: bool = True, log: Callable[[str], None] = print,
            blocks_per_worker: int = 4, frames_per_call: int = 4, decode: str = "auto",
            calls_per_actor: int = 2) -> dict:
    """Process an image folder / glob / list file on Ray; returns the summary (also in ``out/summary.json``).

    ``decode``: ``tasks`` (frames decoded in Ray tasks, handed to the actors through the object store),
    ``actor`` (each actor reads its frames' files itself, one frame ahead of its model, as the local pipeline's
    reader thread does: only the paths travel) or ``auto`` (tasks for GPU actors, actor for CPU actors).
    ``calls_per_actor``: batches an actor holds at once (2: its model starts on the next batch while the last
    frames of the previous one are post-processed; 1: one at a time)."""
    resolve_decode(decode, False)  # a bad value fails before Ray starts
    ray = import_ray()
    src = open_source(source, log=log)
    if src.kind != "images":
        raise BadInputError(source, "--engine ray takes an image folder, a glob or a list file (.txt); run videos "
                                    "and cameras with the local engine")
    out = Path(job.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise sinks.OutputWriteError(out, e) from None
    results = out / "results.jsonl"
    identity = run_identity(job.model, _driver_steps(job), mm_per_px=job.mm_per_px, gps=job.gps,
                            gps_method=job.gps_method, gps_max_gap=job.gps_max_gap)
    done = start_results(out, resume, log, identity=identity)
    stats = SourceStats()
    rows = []
    for i, p in enumerate(src.paths):
        if str(p) in done:
            stats.skipped += 1
        else:
            rows.append({"index": i, "path": str(p), "key": str(p)})
    if max_frames is not None:
        rows = rows[:max_frames]

    for name in ("ray", "ray.data"):  # the run says what it does; Ray's INFO lines would drown it
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # Ray's C++ notices on stderr (RAY_BACKEND_LOG_LEVEL=info)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 configure_logging=True, ignore_reinit_error=True,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_pythonpath())}} if address is None
                 else None)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # records in source order, as the local engine writes them
    ctx.enable_progress_bars = False
    with_gpu = _cluster_gpus(ray) >= workers
    decode = resolve_decode(decode, with_gpu)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    if job.threads is None:
        job.threads = max(1, int(cpus // max(1, workers))) if not with_gpu else 1
    stats_run = {"frames": 0, "cracked": 0, "infer_s": 0.0, "batches": 0}
    jw = sinks.JsonlWriter(results)
    bar = progress_bar(len(rows) or None, "crack-run[ray]", "frame", every=100) if progress else None
    written: set[str] = set()
    interrupted, error = False, None
    t_start, started = time.perf_counter(), time.time()
    t_first = None  # the first record: actors started, pipeline full
    ready_at = float("inf")  # the first actor ready to take frames (wall clock: one node's, or the cluster's NTP)
    try:
        if rows:
            ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), workers * blocks_per_worker)))
            if decode == "tasks":
                ds = ds.map_batches(decode_batch, batch_size=frames_per_call, batch_format="numpy", num_cpus=0.25)
            worker_cls = type("FrameWorker", (FrameWorker,), {"JOB": job})  # pickled by value, with its job
            spare = 0.5 if decode == "tasks" else 0.0  # CPU left to the decoding tasks
            ds = ds.map_batches(worker_cls, compute=ray.data.ActorPoolStrategy(
                                    size=workers, max_concurrent_calls_per_actor=calls_per_actor,
                                    enable_true_multi_threading=calls_per_actor > 1), batch_size=frames_per_call,
                                batch_format="numpy", num_cpus=0 if with_gpu else max(0.25, (cpus - spare) / workers),
                                num_gpus=1 if with_gpu else 0)
            for row in ds.iter_rows():
                if t_first is None:
                    t_first = time.perf_counter()
                ready_at = min(ready_at, float(row["ready_at"]))
                rec = json.loads(row["record"])
                if "_error" in rec:
                    log(f"crack-run: skipped {rec['_error']}")
                    stats.errors.append(rec["_error"])
                    continue
                if rec["key"] in written:  # a retried batch delivered twice: the record is written once
                    continue
                jw.write(rec)
                written.add(rec["key"])
                stats.read += 1
                stats_run["frames"] += 1
                stats_run["cracked"] += int(rec["cracked"])
                stats_run["infer_s"] += rec.get("infer_ms", 0.0) / 1000.0
                if bar is not None:
                    bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
        log("crack-run: interrupted; the records written so far are kept (run again to resume)")
    except sinks.OutputWriteError as e:
        error = e
    except Exception as e:  # noqa: BLE001 - a task error from the cluster: surfaced as the real cause
        cause = getattr(e, "cause", None) or e
        error = cause if isinstance(cause, sinks.OutputWriteError) else e
    finally:
        try:
            jw.close()
        except sinks.OutputWriteError as e:
            error = error or e
        if bar is not None:
            bar.close()
        if started_here:
            ray.shutdown()
    if not interrupted:  # every actor has stopped: temp files of an actor killed mid-write (its retry wrote the image)
        stale = sinks.remove_stale_temps(out)
        if stale:
            log(f"crack-run: removed {stale} temp file(s) left by a worker killed mid-write (its frame was redone)")
    t_end = time.perf_counter()
    elapsed = t_end - t_start
    summary, feats = run_summary(
        results, stats_run, stats, elapsed=elapsed, started=started,
        head={"model": str(job.model), "provider": job.provider, "source": src.name, "source_kind": "images",
              "out": str(out), "engine": "ray", "ray_workers": workers, "ray_address": address or "local",
              "ray_gpu_per_worker": bool(with_gpu), "ray_decode": decode,
              "ray_actor_ready_s": round(ready_at - started, 3) if np.isfinite(ready_at) else None,
              "ray_first_record_s": round(t_first - t_start, 3) if t_first else None},
        tail={"batch": job.batch, "threshold": job.threshold, "interrupted": interrupted,
              "stopped_reason": None if error is None else f"{type(error).__name__}: {error}"})
    write_run_files(out, summary, feats, geojson=job.gps is not None or bool(feats))
    if error is not None:
        raise error
    return summary


def _pythonpath() -> list[str]:
    """This checkout first, so local workers import the same crackcam as the driver."""
    here = str(Path(__file__).resolve().parents[2])
    return [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
