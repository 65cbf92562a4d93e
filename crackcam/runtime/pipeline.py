"""The ``crack-run`` pipeline: reader thread → batched inference → post-processing workers → ordered writer.

* Queues are bounded (``queue_frames`` decoded frames, ``queue_results`` frames in post-processing/writing), so
  memory stays flat however long the run.
* Frames are written in source order (post-processing runs in a small thread pool; the writer takes the futures in
  submission order).
* Every frame goes through the model's frame steps (:class:`crackcam.runtime.steps.FrameSteps`, the ones
  ``crack-eval`` runs): work scale, native-scale tiles (the model's fixed size, or ``tile`` px for a dynamic model,
  with ``overlap`` px of overlap), per-tile gate, weighted blend, refinement, ROI, post-processing and the frame
  decision.  The model's metadata (``survey``) gives the defaults; the run config overrides single fields.
* Ctrl-C (KeyboardInterrupt in the main thread): the reader stops, frames already read are finished and written,
  the summary is written.  A camera that drops is retried by the source, which then ends the stream cleanly.
* Resume: records already in ``DIR/results.jsonl`` are read first and their frames skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import queue
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from . import geo, sinks
from . import survey as S
from .imageio import BadInputError
from .meta import ModelFileError, is_engine_path
from .progress import bar as progress_bar
from .sources import Frame, Source
from .steps import (FrameSteps, ModelSteps, PassError, infer_frame, model_refine_block, model_survey_block,  # noqa: F401
                    pad_batch, post_config_dict)

_END = object()


@dataclass
class RunConfig:
    out: Path
    batch: int = 1
    save: tuple = ()  # subset of sinks.SAVE_KINDS
    threshold: float | str | None = None  # None → model metadata
    mm_per_px: float | None = None
    tile: int | None = None  # dynamic-size models: tile size in px (None = the model's survey settings)
    overlap: int | None = None  # px of overlap between tiles (None = the model's, else 32)
    max_side: int | None = None  # resize frames whose longer side is larger (None = the model's)
    survey: dict = field(default_factory=dict)  # further survey overrides: scale, gate, roi, roi_mask, roi_size,
    #                                             min_length (None values ignored)
    max_frames: int | None = None  # new frames to process in this run
    show: bool = False
    gps: geo.GpsTrack | None = None
    gps_method: str = "linear"
    gps_max_gap: float = 5.0
    post_workers: int = 2
    queue_frames: int = 0  # 0 → 2 × batch + 2
    queue_results: int = 0  # 0 → 2 × batch + 2 × post_workers
    resume: bool = True
    progress: bool = True
    fsync_every: int = 50
    source_root: str | None = None
    stop_event: threading.Event | None = None  # set it to stop like Ctrl-C (tests, embedding)
    no_refine: bool = False  # ignore the metadata's "refine" step: post-process the graph's map as it is


@dataclass
class _Plan:
    frame: Frame
    t_read: float
    plan: S.FramePlan
    tiles: list  # list of uint8 arrays (h, w, 3), same shape
    steps: FrameSteps | None = None
    one_pass: bool = False  # the steps' pass is "frame" or "cascade": the frame goes to the model whole
    probs: list = field(default_factory=list)
    maps: list = field(default_factory=list)
    infer_s: float = 0.0
    n_tiles: int = 0

    def __post_init__(self):
        self.n_tiles = len(self.tiles)

    @property
    def done(self) -> bool:
        return len(self.maps) == self.n_tiles


# kept importable from here (earlier versions defined them in this module)
tile_origins = S.tile_origins
blend_window = S.blend_window
stitch = S.stitch


def refine_frame(image_bgr: np.ndarray, cmap: np.ndarray, rcfg) -> np.ndarray:
    """The refinement step on one frame (BGR or gray uint8) and its map, at the frame's own scale."""
    from .cues import refine

    gray = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY) if image_bgr.ndim == 3 else image_bgr
    return refine(gray, cmap, rcfg)


class Pipeline:
    def __init__(self, session, source: Source, cfg: RunConfig, log: Callable[[str], None] = print):
        self.session = session
        self.source = source
        self.cfg = cfg
        self.log = log
        self.meta = session.meta
        fixed = self.meta.fixed_size
        self.fixed = fixed
        # The model's frame steps: survey geometry and gate, the refine-<cam> pixel-cue step (the graph gives the
        # CAM, the cue and the combination run here with the refined map's own threshold), post-processing.
        self.refine_block: dict | None = None if cfg.no_refine else model_refine_block(self.meta)
        self.model_steps = self._frame_steps()
        self.steps = self.model_steps.default
        self.refine_cfg = self.steps.refine
        self.pp_cfg = self.steps.post
        self.stop = cfg.stop_event or threading.Event()
        self._abort = threading.Event()
        self._written = threading.Event()  # the writer is done
        self.error: BaseException | None = None
        self.interrupted = False
        mb = session.max_batch
        self.batch = max(1, int(cfg.batch))
        if mb is not None and self.batch > mb and not (self.meta.batch and self.meta.batch == mb):
            self.log(f"crack-run: batch {self.batch} is above the engine's maximum {mb}; using {mb}")
            self.batch = mb
        self.fixed_batch = self.meta.batch  # the graph only takes exactly this batch → pad
        if self.fixed_batch and self.batch != self.fixed_batch:
            self.log(f"crack-run: the model takes batches of exactly {self.fixed_batch}; using that")
            self.batch = self.fixed_batch
        qf = cfg.queue_frames or 2 * self.batch + 2
        qr = cfg.queue_results or 2 * self.batch + 2 * max(1, cfg.post_workers)
        self.q_frames: queue.Queue = queue.Queue(maxsize=qf)
        self.q_results: queue.Queue = queue.Queue(maxsize=qr)
        self.pool = ThreadPoolExecutor(max_workers=max(1, cfg.post_workers), thread_name_prefix="crackpost")
        self.out = Path(cfg.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise sinks.OutputWriteError(self.out, e) from None
        self.results_path = self.out / "results.jsonl"
        self.stats = {"frames": 0, "cracked": 0, "infer_s": 0.0, "batches": 0}
        self._show_ok = cfg.show
        self.reader_grace_s = 2.0  # after a stop, how long to wait for a silent source
        self.summary: dict | None = None  # set at the end of run(), also when it raises
        self.summary_written = False
        self._reader_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ config
    def _frame_steps(self) -> ModelSteps:
        c = self.cfg
        return build_model_steps(self.session, tile=c.tile, overlap=c.overlap, max_side=c.max_side, survey=c.survey,
                                 threshold=c.threshold, no_refine=c.no_refine)

    # ------------------------------------------------------------------ planning (tiling)
    def plan(self, fr: Frame) -> _Plan:
        t0 = time.perf_counter()
        steps = self.model_steps.for_shape(fr.image.shape)
        plan = steps.plan(fr.image)
        one = steps.pass_for(self.meta) != "tiles"  # a frame pass (or a cascade): no tile batches across frames
        return _Plan(fr, t0, plan, [] if one else steps.tiles(fr.image, plan), steps, one)

    # ------------------------------------------------------------------ stages
    def _put(self, q: queue.Queue, item) -> bool:
        while not self._abort.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _reader(self, skip):
        n = 0
        try:
            for fr in self.source.frames(skip=skip):
                if self.stop.is_set() or self._abort.is_set():
                    break
                if not self._put(self.q_frames, fr):
                    break
                n += 1
                if self.cfg.max_frames is not None and n >= self.cfg.max_frames:
                    break
        except BaseException as e:  # noqa: BLE001 - surface in the main thread
            self._fail(e)
        finally:
            self._put(self.q_frames, _END)

    def _fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
        self._abort.set()
        self.stop.set()

    def _infer(self):
        pending: list[_Plan] = []  # plans with tiles not yet all inferred (FIFO)
        buf: list[tuple[_Plan, int]] = []  # tiles waiting for a batch

        def run_chunk(items):
            arr = pad_batch(np.stack([p.tiles[i] for p, i in items]), self.fixed_batch)
            n = len(items)
            t = time.perf_counter()
            prob, cmap = self.session.run(arr)
            dt = time.perf_counter() - t
            self.stats["infer_s"] += dt
            self.stats["batches"] += 1
            for k, (p, i) in enumerate(items):
                p.probs.append(float(prob[k]))
                p.maps.append(np.array(cmap[k], np.float32, copy=True))
                p.infer_s += dt / n
            while pending and pending[0].done:
                p = pending.pop(0)
                p.tiles = []  # free the input pixels early
                fut = self.pool.submit(self._finish, p)
                if not self._put(self.q_results, fut):
                    return False
            return True

        def flush(all_=True):
            while buf and (all_ or len(buf) >= self.batch):
                chunk = buf[:self.batch]
                del buf[:self.batch]
                if not run_chunk(chunk):
                    return False
            return True

        idle_since = None
        try:
            while True:
                try:
                    item = self.q_frames.get(timeout=0.05)
                    idle_since = None
                except queue.Empty:
                    if buf and not flush(True):  # starved: don't hold a partial batch back
                        break
                    if self._abort.is_set():
                        break
                    if self.stop.is_set():  # stopping, and the reader may hang in a dead camera's read()
                        idle_since = idle_since or time.monotonic()
                        if time.monotonic() - idle_since > self.reader_grace_s:
                            self.log("crack-run: the source does not answer; stopping without it")
                            break
                    continue
                if item is _END:
                    break
                plan = self.plan(item)
                if plan.one_pass:  # the whole work image in one call, the tiles read out of it (cascade: and
                    # the proposed ones re-run as tiles); earlier frames still waiting for a tile batch go first,
                    # so that records stay in source order when a model mixes passes across camera profiles
                    if buf and not flush(True):
                        break
                    probs, maps, dt = plan.steps.infer(self.session, plan.frame.image, plan.plan, self.batch)
                    plan.probs, plan.maps, plan.infer_s, plan.n_tiles = probs, maps, dt, len(maps)
                    self.stats["infer_s"] += dt
                    self.stats["batches"] += 1
                    if not self._put(self.q_results, self.pool.submit(self._finish, plan)):
                        break
                    continue
                if buf and buf[-1][0].tiles[0].shape != plan.tiles[0].shape and not flush(True):
                    break
                pending.append(plan)
                buf.extend((plan, i) for i in range(len(plan.tiles)))
                if not flush(False):
                    break
            flush(True)
        except BaseException as e:  # noqa: BLE001
            self._fail(e)
        finally:
            self._put(self.q_results, _END)

    def _finish(self, p: _Plan) -> dict:
        """Post-processing worker: the frame steps after the model, the frame's images; returns its JSON record."""
        c = self.cfg
        rec, res = finish_frame(p.frame, p.steps or self.steps, p.plan, p.probs, p.maps, p.infer_s, p.t_read,
                                out=self.out, save=c.save, source_kind=self.source.kind, source_root=c.source_root,
                                mm_per_px=c.mm_per_px, gps=c.gps, gps_method=c.gps_method, gps_max_gap=c.gps_max_gap)
        if self._show_ok:
            rec["_show"] = (p.frame.image, res.mask, res.skeleton)
        return rec

    def _writer(self, jw: sinks.JsonlWriter, bar):
        try:
            self._write_loop(jw, bar)
        finally:
            self._written.set()

    def _write_loop(self, jw: sinks.JsonlWriter, bar):
        try:
            while True:
                try:
                    item = self.q_results.get(timeout=0.1)
                except queue.Empty:
                    if self._abort.is_set():
                        break
                    continue
                if item is _END:
                    break
                rec = item.result() if isinstance(item, Future) else item
                show = rec.pop("_show", None)
                jw.write(rec)
                self.stats["frames"] += 1
                self.stats["cracked"] += int(rec["cracked"])
                if bar is not None:
                    bar.update(1)
                if show is not None and self._show_ok:
                    self._show(*show)
        except BaseException as e:  # noqa: BLE001
            self._fail(e)

    def _show(self, img, mask, sk):
        try:
            cv2.imshow("crack-run", sinks.overlay(img, mask, sk))
            if (cv2.waitKey(1) & 0xFF) in (ord("q"), 27):
                self.log("crack-run: window closed (q); stopping")
                self.stop.set()
        except cv2.error:
            self.log("crack-run: --show needs an OpenCV build with GUI support (opencv-python); showing disabled")
            self._show_ok = False

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        cfg = self.cfg
        identity = run_identity(self.session.path, self.model_steps, mm_per_px=cfg.mm_per_px, gps=cfg.gps,
                                gps_method=cfg.gps_method, gps_max_gap=cfg.gps_max_gap,
                                start_time=getattr(self.source, "start_time", None))
        try:
            done = start_results(self.out, cfg.resume, self.log, live=self.source.live, identity=identity)
        except BaseException:  # refused (another model's records) or unwritable: release the camera / file
            with contextlib.suppress(Exception):
                self.source.close()
            raise
        skip = (lambda k: k in done) if done else None
        jw = sinks.JsonlWriter(self.results_path, fsync_every=cfg.fsync_every)
        total = len(self.source)
        if total:
            total = max(0, total - len(done))
            if cfg.max_frames is not None:
                total = min(total, cfg.max_frames)
        bar = progress_bar(total or None, "crack-run", "frame", every=100) if cfg.progress else None
        t_start = time.perf_counter()
        started = time.time()
        # consumers first, the reader last; SIGINT is held back while the threads start (so a Ctrl-C cannot leave
        # a stage unstarted) and the main thread waits on an Event, not Thread.join (a KeyboardInterrupt inside
        # join() can leave the thread state wrong)
        stages = [threading.Thread(target=self._infer, name="crackinfer", daemon=True),
                  threading.Thread(target=self._writer, args=(jw, bar), name="crackwrite", daemon=True),
                  threading.Thread(target=self._reader, args=(skip,), name="crackread", daemon=True)]
        try:
            self._reader_thread = stages[-1]
            with _sigint_held():
                for t in stages:
                    t.start()
            while not self._written.wait(timeout=0.2):
                pass
        except KeyboardInterrupt:
            self.interrupted = True
            self.log("crack-run: interrupted; finishing the frames in flight (Ctrl-C again to abort)")
            self.stop.set()
            try:
                while not self._written.wait(timeout=0.2):
                    pass
            except KeyboardInterrupt:
                self._abort.set()
                self._written.wait(timeout=5)
        finally:
            elapsed = time.perf_counter() - t_start
            self.pool.shutdown(wait=True)
            try:
                jw.close()
            except sinks.OutputWriteError as e:
                if self.error is None:
                    self.error = e
            if bar is not None:
                bar.close()
            rt = self._reader_thread
            if rt is not None:
                rt.join(timeout=1.0)
            if rt is None or not rt.is_alive():  # never release a capture another thread is reading from
                self.source.close()
            if self._show_ok:
                try:
                    cv2.destroyAllWindows()
                except cv2.error:
                    pass
        if self.cfg.stop_event is not None and self.cfg.stop_event.is_set() and self.error is None:
            self.interrupted = True
        summary = self._summary(elapsed, started)
        if isinstance(self.error, sinks.OutputWriteError):
            summary["stopped_reason"] = f"cannot write {self.error.filename}: {self.error.strerror}"
        if self.error is not None:
            summary["error"] = f"{type(self.error).__name__}: {self.error}"
        self.summary = summary
        try:
            write_run_files(self.out, summary, self._feats, geojson=self.cfg.gps is not None or bool(self._n_geo))
            self.summary_written = True
        except sinks.OutputWriteError as e:  # the disk is still full: results.jsonl is what counts
            self.summary_written = False
            if self.error is None:
                self.error = e
        if self.error is not None:
            raise self.error
        return summary

    def _summary(self, elapsed: float, started: float) -> dict:
        summary, self._feats = run_summary(
            self.results_path, self.stats, self.source.stats, elapsed=elapsed, started=started,
            head={"model": str(self.session.path), "provider": self.session.provider, "source": self.source.name,
                  "source_kind": self.source.kind, "out": str(self.out)},
            tail={"batch": self.batch, "threshold": self.pp_cfg.threshold, "interrupted": self.interrupted,
                  "stopped_reason": self.source.stopped_reason})
        self._n_geo = len(self._feats)
        return summary


# ---------------------------------------------------------------------------------------------------- shared steps
def build_model_steps(session, *, tile=None, overlap=None, max_side=None, survey=None, threshold=None,
                      no_refine: bool = False) -> ModelSteps:
    """The model's frame steps with the run's overrides (a fixed-size graph takes its own tile size)."""
    over = {"tile": tile, "overlap": overlap, "max_side": max_side, **(survey or {})}
    if session.meta.fixed_size is not None:
        over.pop("tile", None)
    try:
        return ModelSteps(session.meta, survey=over, threshold=threshold, no_refine=no_refine)
    except S.RoiError:
        raise
    except PassError as e:  # a pass this graph cannot run: the option's fault, not the metadata's
        raise ModelFileError(session.path, str(e)) from None
    except (ValueError, TypeError) as e:
        raise ModelFileError(session.path, f"crackcam metadata 'survey'/'postprocess' does not fit this "
                                           f"runtime or the options ({e})")


RUN_FILE = "run.json"  # what wrote OUT/results.jsonl: the model's sha256 and the options that change a record
RUN_FILE_FORMAT = 2  # 2: the effective frame-step settings (stop 22); 1 (no "format" key): the options as typed


class ResumeMismatch(BadInputError):
    """``OUT/results.jsonl`` was written by another model or other options: resuming would mix two runs' records."""


def _file_sha256(path) -> str | None:
    try:
        return sinks.file_sha256(path)
    except OSError:
        return None


def run_identity(model, steps: ModelSteps, *, mm_per_px=None, gps=None, gps_method="linear", gps_max_gap=5.0,
                 start_time=None) -> dict:
    """What makes a run's records what they are (both engines): the model file's bytes (a TensorRT engine's
    metadata side-car too) and the *effective* settings — the frame steps the model's metadata and the run's
    options give, for the top level and every camera profile (:meth:`FrameSteps.settings`; a ROI mask PNG by its
    content) — plus the measure and GPS options.  So ``--threshold`` at the model's own value is the same run as no
    ``--threshold``, and ``--threshold 0.5`` on a model with camera profiles is not.  Batch size, workers,
    --save, the engine, the execution provider (the same graph, equal within float tolerance) and the model's
    *path* do not count."""
    g = None
    if gps is not None:
        g = hashlib.sha256(json.dumps([gps.t, gps.lat, gps.lon, gps.time_of_day]).encode()).hexdigest()[:16]
    settings = {}
    for name, st in steps.profiles():
        for k, v in st.settings().items():
            if k == "survey.roi_mask" and v:  # by content: the same mask under another path is the same run
                v = {"sha256": _file_sha256(v)}
            settings[f"{name}:{k}" if name else k] = v
    settings.update({"mm_per_px": mm_per_px, "gps": g, "gps_method": gps_method if g else None,
                     "gps_max_gap": gps_max_gap if g else None, "start_time": start_time})
    settings = json.loads(json.dumps(settings, default=str))  # tuples → lists, paths → str: as read back
    model = Path(model)
    sha = _file_sha256(model)
    if is_engine_path(model):  # its metadata lives beside it (crackcam.runtime.meta.sidecar_meta)
        side = [c for c in (model.with_name(model.name + ".json"), model.with_suffix(".json"),
                            model.with_suffix(".onnx")) if c.is_file()]
        if side:
            sha = hashlib.sha256((str(sha) + "".join(str(_file_sha256(c)) for c in side)).encode()).hexdigest()
    return {"format": RUN_FILE_FORMAT, "model_sha256": sha, "model": str(model), "settings": settings}


def _check_identity(out: Path, identity: dict, live: bool = False) -> None:
    """Refuse to resume ``out`` when its records came from another model or other options (one line).  A live
    source only ever appends, so there the way out is a new --out (--no-resume would delete the earlier records)."""
    fix = ("choose a new --out (--no-resume would delete its earlier records)" if live else
           "pass --no-resume to start over, or choose a new --out")
    try:
        prev = json.loads((out / RUN_FILE).read_text())
    except FileNotFoundError:
        raise ResumeMismatch(out, f"its results.jsonl has no {RUN_FILE} saying which model and options wrote it "
                                  f"(an older crackcam, or another tool); resuming could mix two runs — {fix}") from None
    except (OSError, ValueError) as e:
        raise ResumeMismatch(out / RUN_FILE, f"unreadable ({e}); pass --no-resume to start over") from None
    if prev.get("format") != identity.get("format"):
        raise ResumeMismatch(out, f"its {RUN_FILE} was written by another crackcam version (format "
                                  f"{prev.get('format', 1)}, this one writes {identity.get('format')}), which "
                                  f"recorded the options differently; {fix}")
    if prev.get("model_sha256") != identity["model_sha256"]:
        raise ResumeMismatch(out, f"its results were written by another model ({prev.get('model')}, sha256 "
                                  f"{str(prev.get('model_sha256'))[:12]}…, not {identity['model']}, "
                                  f"{str(identity['model_sha256'])[:12]}…); {fix}")
    a, b = prev.get("settings") or {}, identity["settings"]
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        what = ", ".join(f"{k} {a.get(k)!r} → {b.get(k)!r}" for k in diff[:4])
        if len(diff) > 4:
            what += f", and {len(diff) - 4} more"
        raise ResumeMismatch(out, f"its results were written with other options ({what}); {fix}")


def start_results(out: Path, resume: bool, log, live: bool = False, identity: dict | None = None) -> set[str]:
    """The start of a run's output, for both engines: the keys already in ``out/results.jsonl`` (``resume``; none
    for a live source, whose frames are never the same twice: it keeps appending), else the old file removed; temp
    files a killed run left removed.  With ``identity`` (:func:`run_identity`), records already there must come
    from the same model and options (:class:`ResumeMismatch` otherwise), and ``out/run.json`` records it."""
    out = Path(out)
    results = out / "results.jsonl"
    done = sinks.read_keys(results) if resume else set()
    if not resume and results.exists():
        try:
            results.unlink()
        except OSError as e:
            raise sinks.OutputWriteError(results, e) from None
    if identity is not None:
        if resume and done:  # records there (a cut-off last line alone is none)
            _check_identity(out, identity, live=live)
        sinks.atomic_write_json(out / RUN_FILE, identity)
    if done and live:
        done = set()
    if done:
        log(f"crack-run: resuming: {len(done)} frames already in {results}")
    stale = sinks.remove_stale_temps(out)
    if stale:
        log(f"crack-run: removed {stale} half-written temp file(s) a killed run left in {out}")
    return done


def write_run_files(out: Path, summary: dict, feats: list, geojson: bool) -> None:
    """``summary.json`` and (with a GPS track, or located records from earlier runs) ``cracks.geojson``."""
    sinks.atomic_write_json(Path(out) / "summary.json", summary)
    if geojson:
        geo.write_geojson(Path(out) / "cracks.geojson", feats)


# The per-frame record, the frame's images and the run summary: one implementation for the local pipeline and the
# Ray engine (crackcam.runtime.ray_engine), so both write the same files with the same schema.

def frame_record(fr: Frame, r, steps: FrameSteps, *, mm_per_px: float | None = None, gps=None,
                 gps_method: str = "linear", gps_max_gap: float = 5.0) -> dict:
    """The results.jsonl record of one finished frame (``r``: :meth:`FrameSteps.finish`'s result)."""
    H, W = fr.image.shape[:2]
    m = r.post.measures
    gate = steps.survey.gate
    rec = {"key": fr.key, "source": fr.source, "frame": fr.index, "timestamp": fr.timestamp,
           "width": W, "height": H, "prob": round(r.prob, 6), "cracked": bool(r.cracked),
           "threshold": round(float(r.post.threshold), 6),
           "length_px": round(float(m.get("length_px", 0.0)), 3), "area_px": int(m.get("area_px", 0)),
           "mean_width_px": round(float(m.get("mean_width_px", 0.0)), 3),
           "max_width_px": round(float(m.get("max_width_px", 0.0)), 3), "segments": int(m.get("segments", 0)),
           "tiles": int(r.plan.n_tiles),
           "tiles_gated": int(np.count_nonzero(np.asarray(r.tile_probs) < gate)) if gate > 0 else 0}
    if mm_per_px:
        for k in ("length_mm", "area_mm2", "mean_width_mm", "max_width_mm"):
            rec[k] = round(float(m.get(k, 0.0)), 3)
    if gps is not None:
        loc = gps.locate(fr.timestamp, gps_method, gps_max_gap)
        rec["lat"], rec["lon"] = (round(loc[0], 8), round(loc[1], 8)) if loc else (None, None)
    return rec


def finish_frame(fr: Frame, steps: FrameSteps, plan, probs, maps, infer_s: float, t0: float, *, out: Path, save,
                 source_kind: str, source_root: str | None, mm_per_px=None, gps=None, gps_method: str = "linear",
                 gps_max_gap: float = 5.0):
    """The frame steps after the model, the frame's images (before its record) and the record with its timings
    (``ms`` counted from ``t0``): ``(record, post-processing result)``."""
    t = time.perf_counter()
    r = steps.finish(fr.image, plan, probs, maps, mm_per_px=mm_per_px)
    rec = frame_record(fr, r, steps, mm_per_px=mm_per_px, gps=gps, gps_method=gps_method, gps_max_gap=gps_max_gap)
    if save:
        rec["files"] = save_frame_images(out, fr, r.post, steps, save, source_kind, source_root)
    t2 = time.perf_counter()
    rec["infer_ms"] = round(infer_s * 1000, 3)
    rec["post_ms"] = round((t2 - t) * 1000, 3)
    rec["ms"] = round((t2 - t0) * 1000, 3)
    return rec, r.post


def save_frame_images(out: Path, fr: Frame, res, steps: FrameSteps, save, source_kind: str,
                      source_root: str | None) -> dict:
    """Write the frame's masks / skeletons / overlays atomically (before its record); returns ``files``."""
    H, W = fr.image.shape[:2]
    stem = sinks.output_stem(fr.source, fr.index, source_kind, source_root)
    files = {}
    if "masks" in save:
        f = out / "masks" / f"{stem}.png"
        sinks.write_png(f, res.mask.astype(np.uint8) * 255)
        files["mask"] = str(f.relative_to(out))
    if "skeletons" in save:
        f = out / "skeletons" / f"{stem}.png"
        sk = res.skeleton if res.skeleton is not None else np.zeros((H, W), bool)
        sinks.write_png(f, sk.astype(np.uint8) * 255)
        files["skeleton"] = str(f.relative_to(out))
    if "overlays" in save:
        f = out / "overlays" / f"{stem}.jpg"
        roi = S.roi_mask((H, W), steps.survey)
        sinks.write_jpeg(f, sinks.overlay(fr.image, res.mask, res.skeleton, roi=roi))
        files["overlay"] = str(f.relative_to(out))
    return files


def run_summary(results_path: Path, stats: dict, source_stats, *, elapsed: float, started: float, head: dict,
                tail: dict) -> tuple[dict, list]:
    """``summary.json`` (totals over the whole results file, earlier runs included, streamed) and the GeoJSON
    features of its cracked, located frames."""
    n_all = cracked_all = 0
    feats = []
    for r in sinks.iter_records(results_path):
        n_all += 1
        if r.get("cracked"):
            cracked_all += 1
            if r.get("lat") is not None and r.get("lon") is not None:
                feats.append(geo.point_feature(r["lat"], r["lon"], _geo_props(r)))
    n = stats["frames"]
    st = source_stats
    summary = {
        **head,
        "frames": n, "frames_total": n_all, "skipped_done": st.skipped, "unreadable": len(st.errors),
        "cracked": stats["cracked"], "cracked_fraction": round(stats["cracked"] / n, 6) if n else 0.0,
        "cracked_total": cracked_all, "cracked_fraction_total": round(cracked_all / n_all, 6) if n_all else 0.0,
        "elapsed_s": round(elapsed, 3), "fps": round(n / elapsed, 3) if elapsed > 0 and n else 0.0,
        "infer_fps": round(n / stats["infer_s"], 3) if stats["infer_s"] > 0 else 0.0,
        "batch": tail["batch"], "threshold": tail["threshold"], "interrupted": tail["interrupted"],
        "stopped_reason": tail["stopped_reason"], "errors": st.errors[:100],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "rss_mb_end": round(rss_mb(), 1),
    }
    summary.update({k: v for k, v in tail.items() if k not in summary})
    return summary, feats


def _geo_props(r: dict) -> dict:
    keys = ("source", "frame", "timestamp", "prob", "length_px", "area_px", "mean_width_px", "max_width_px",
            "segments", "length_mm", "area_mm2", "mean_width_mm", "max_width_mm")
    return {k: r[k] for k in keys if k in r}


@contextlib.contextmanager
def _sigint_held():
    """Block SIGINT in the calling thread for the duration (it is delivered when unblocked); threads started
    inside inherit the block, so Ctrl-C always lands in the main thread.  No-op where unsupported."""
    can = (hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread())
    if can:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if can:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0
