"""A model's frame steps, in one place: tile plan → model → gate/stitch → refine → frame map → post-process →
frame decision.  NumPy + OpenCV only.

:class:`FrameSteps` is built from a model's metadata (``survey``, ``refine``, ``postprocess``, ``threshold``) plus
command-line overrides.  ``crack-run``'s pipeline calls its pieces from its threads (plan and cut in the inference
thread, :meth:`FrameSteps.finish` in the post-processing pool); ``crack-eval``, the false-alarm tool and the
benchmarks call :meth:`FrameSteps.process` on one frame with any session-like object (``.run(batch) -> (prob,
map)``, ``.meta.fixed_size``): the same functions in the same order, so a figure from the evaluation is what the
runtime runs (tests/test_survey.py pins the two together).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from . import survey as S
from .cues import RefineConfig, refine
from .postprocess import PostProcessConfig, PostResult, postprocess

__all__ = ["FrameSteps", "FrameResult", "PassError", "frame_pass_input", "infer_frame", "infer_tiles", "model_refine_block",
           "proposed_tiles", "recheck_tiles", "tile_batch",
           "model_survey_block", "pad_batch",
           "post_config_dict"]


class PassError(ValueError):
    """A ``model_pass`` the graph cannot run (a one-pass mode on a tile graph)."""


def model_refine_block(meta) -> dict | None:
    """The metadata's ``refine`` step (a ``refine-<cam>`` recipe: the graph gives the CAM, the pixel cue and the
    combination run on the frame), or None."""
    rf = (getattr(meta, "raw", None) or {}).get("refine")
    return dict(rf) if isinstance(rf, dict) else None


def model_survey_block(meta) -> dict:
    """The metadata's ``survey`` block ({} when the model has none: whole frames, no gate, no ROI)."""
    sv = (getattr(meta, "raw", None) or {}).get("survey")
    return dict(sv) if isinstance(sv, dict) else {}


def profile_key(shape) -> str:
    """The profile name of a frame of ``shape`` (H, W[, C]): ``"WxH"``."""
    return f"{int(shape[1])}x{int(shape[0])}"


PROFILE_AREA_FACTOR = 2.0  # a profile also serves frames within this factor of its pixel count


def choose_profile(names, shape) -> str | None:
    """The camera profile for frames of ``shape``: the one of exactly that size, else the one whose frame size is
    nearest in pixel count within a factor of :data:`PROFILE_AREA_FACTOR` (cameras of similar resolution see cracks
    at similar widths), else None (the top-level settings)."""
    import math

    if shape is None:
        return None
    names = [n for n in names if isinstance(n, str) and "x" in n]
    key = profile_key(shape)
    if key in names:
        return key
    area = float(shape[0]) * float(shape[1])
    best, best_d = None, math.log(PROFILE_AREA_FACTOR) + 1e-9
    for n in names:
        try:
            w, _, h = n.partition("x")
            d = abs(math.log(area / (float(w) * float(h))))
        except (ValueError, ZeroDivisionError):
            continue
        if d <= best_d:
            best, best_d = n, d
    return best


def model_profile(meta, shape) -> dict | None:
    """The metadata's camera profile for frames of ``shape`` (:func:`choose_profile`), or None."""
    pr = (getattr(meta, "raw", None) or {}).get("profiles")
    if not isinstance(pr, dict) or shape is None:
        return None
    name = choose_profile(list(pr), shape)
    p = pr.get(name) if name else None
    return dict(p) if isinstance(p, dict) else None


def post_config_dict(meta, refine_block: dict | None, threshold=None) -> dict:
    """The post-processing settings of a model's frames: the refinement's own when it has one, else the
    metadata's ``postprocess`` (with the top-level ``threshold`` when it has none); ``threshold`` overrides."""
    src = refine_block if refine_block is not None else {"postprocess": meta.postprocess, "threshold": meta.threshold}
    d = dict(src.get("postprocess") or {})
    if "threshold" not in d and src.get("threshold") is not None:
        d["threshold"] = src["threshold"]
    if threshold is not None:
        d["threshold"] = threshold
    return d


@dataclass
class FrameResult:
    map: np.ndarray  # float32 H×W on [0, 1] at frame size (0 outside the ROI)
    prob: float  # frame probability: the largest tile probability inside the ROI
    tile_probs: np.ndarray
    post: PostResult
    cracked: bool
    plan: S.FramePlan | None = None
    extra: dict = field(default_factory=dict)


def _profile_shape(name: str) -> tuple[int, int]:
    """``"WxH"`` → ``(H, W)``."""
    w, _, h = str(name).partition("x")
    return int(h), int(w)


class ModelSteps:
    """The FrameSteps of one model for every frame size it meets (camera profiles; one cache entry per size)."""

    def __init__(self, meta, **kw):
        self.meta = meta
        self.kw = kw
        self._by: dict[tuple, FrameSteps] = {}
        self.default = FrameSteps.from_meta(meta, **kw)  # checks the settings once, before any frame
        self.profile_names = sorted(str(n) for n in (getattr(meta, "raw", None) or {}).get("profiles") or {})
        for name in self.profile_names:  # and every profile's
            FrameSteps.from_meta(meta, shape=_profile_shape(name), **kw)

    def profile_name(self, shape) -> str | None:
        """The camera profile frames of ``shape`` get (:func:`choose_profile`), or None for the top level."""
        return choose_profile(self.profile_names, shape)

    def profiles(self) -> list[tuple[str, "FrameSteps"]]:
        """``[("", the top level), ("WxH", that profile's steps), ...]``: every set of steps a frame can get."""
        return [("", self.default)] + [(n, self.for_shape(_profile_shape(n))) for n in self.profile_names]

    def for_shape(self, shape) -> "FrameSteps":
        key = (int(shape[0]), int(shape[1]))
        st = self._by.get(key)
        if st is None:
            st = FrameSteps.from_meta(self.meta, shape=key, **self.kw) if model_profile(self.meta, key) else \
                self.default
            if len(self._by) > 64:
                self._by.clear()
            self._by[key] = st
        return st


class FrameSteps:
    """The survey, refinement and post-processing settings of one model, and the steps that use them."""

    def __init__(self, survey: S.SurveyConfig, refine_cfg: RefineConfig | None, post: PostProcessConfig,
                 fixed_size: tuple | None = None):
        self.survey = survey
        self.refine = refine_cfg
        self.post = post
        self.fixed_size = fixed_size
        self.mode: str | None = None  # the pass resolved against the model's graph (from_meta), for settings()

    @classmethod
    def from_meta(cls, meta, *, survey: dict | None = None, threshold=None, no_refine: bool = False,
                  skeleton: bool = True, shape=None) -> "FrameSteps":
        """From a model's metadata (its camera profile for frames of ``shape`` when it has one, else the top-level
        settings); ``survey`` holds overrides (None values are ignored).  Bad settings raise ValueError naming
        the key."""
        prof = model_profile(meta, shape)
        if prof is not None:
            class _M:  # the profile's blocks in place of the top-level ones
                fixed_size = getattr(meta, "fixed_size", None)
                frame_pass = getattr(meta, "frame_pass", None)
                postprocess = dict(prof.get("postprocess") or {})
                threshold_ = prof.get("threshold")
                raw = {**(getattr(meta, "raw", None) or {}), "survey": prof.get("survey") or {},
                       "refine": prof.get("refine")}
            _M.threshold = _M.threshold_
            meta = _M
        rb = None if no_refine else model_refine_block(meta)
        block = model_survey_block(meta)
        if "gate" not in block:  # graphs without a survey block gate inside the graph (metadata 'gate')
            block["gate"] = 0.0
        over = dict(survey or {})
        if over.pop("_clear_roi", False) or over.get("roi") is not None or over.get("roi_mask") is not None:
            for k in ("roi", "roi_mask", "roi_size"):  # a new ROI (or --no-roi) replaces the model's
                block.pop(k, None)
        sv = S.SurveyConfig.from_dict(block).replace(**over)
        pp = post_config_dict(meta, rb, threshold)
        if not skeleton:
            pp["skeleton"] = False
        elif sv.min_length > 0:
            pp["skeleton"] = True
        steps = cls(sv, RefineConfig.from_dict(rb) if rb else None, PostProcessConfig.from_dict(pp),
                    getattr(meta, "fixed_size", None))
        steps.mode = steps.pass_for(meta)  # a pass the graph cannot run is a bad setting now, not at the first frame
        return steps

    def pass_for(self, meta) -> str:
        """How frames meet a graph with metadata ``meta``: ``"tiles"``, ``"frame"`` or ``"cascade"``
        (``survey.model_pass``; unset: one pass for a frame-pass graph, tiles otherwise).  ValueError for a one-pass
        mode on a tile graph."""
        fp = getattr(meta, "frame_pass", None)
        mode = self.survey.model_pass or ("frame" if fp else "tiles")
        if mode != "tiles" and not fp:
            raise PassError(f"survey model_pass {mode!r} needs a frame-pass graph (python -m "
                             f"crackcam.export.frame_pass cuts one from a top-k tile graph); this graph runs tiles")
        return mode

    def settings(self) -> dict:
        """Every setting that shapes a frame's record, flat (``survey.tile``, ``refine.mode``, ``post.threshold``,
        ``fixed_size``): what a run's identity compares, so options that give the same steps are the same run."""
        flat = {f"survey.{k}": v for k, v in self.survey.to_dict().items()}
        if self.mode is not None:  # the resolved pass, and a margin only where it acts (the same steps, one run)
            flat["survey.model_pass"] = self.mode
            if self.mode != "cascade":
                flat["survey.recheck"] = 0.0
        if self.refine is None:
            flat["refine"] = None
        else:
            flat.update({f"refine.{k}": v for k, v in self.refine.to_dict().items()})
        flat.update({f"post.{k}": v for k, v in self.post.to_dict().items()})
        flat["fixed_size"] = list(self.fixed_size) if self.fixed_size else None
        return flat

    # ------------------------------------------------------------------ the steps
    def plan(self, image: np.ndarray) -> S.FramePlan:
        return S.plan_frame(image.shape, self.survey, self.fixed_size)

    def tiles(self, image: np.ndarray, plan: S.FramePlan) -> list[np.ndarray]:
        return S.cut_tiles(image, plan)

    def frame_map(self, image: np.ndarray, plan: S.FramePlan, probs, maps) -> tuple[np.ndarray, float, np.ndarray]:
        """Gated, stitched tile maps → (refined) map at frame size with the ROI applied; frame prob; tile probs."""
        work, prob, tprobs = S.merge_tiles(plan, probs, maps, self.survey)
        if self.refine is not None:
            wimg = S.work_image(image, plan)[:plan.work_shape[0], :plan.work_shape[1]]
            gray = cv2.cvtColor(wimg, cv2.COLOR_BGR2GRAY) if wimg.ndim == 3 else wimg
            work = refine(gray, work, self.refine)
        return S.frame_map(work, plan, self.survey), prob, tprobs

    def finish(self, image: np.ndarray, plan: S.FramePlan, probs, maps, mm_per_px: float | None = None
               ) -> FrameResult:
        """Everything after the model for one frame (BGR or gray uint8 ``image``)."""
        cmap, prob, tprobs = self.frame_map(image, plan, probs, maps)
        res = postprocess(cmap, self.post, mm_per_px=mm_per_px)
        length = float(res.measures.get("length_px", 0.0))
        cracked = S.decide_frame(length, bool(res.mask.any()), self.survey)
        return FrameResult(cmap, prob, tprobs, res, cracked, plan)

    def process(self, session, image_bgr: np.ndarray, mm_per_px: float | None = None,
                batch: int | None = None) -> FrameResult:
        """One frame through the whole chain with ``session`` (sequential: evaluation, tools, benchmarks)."""
        plan, probs, maps = self.run_model(session, image_bgr, batch)
        return self.finish(image_bgr, plan, probs, maps, mm_per_px)

    def run_model(self, session, image_bgr: np.ndarray, batch: int | None = None) -> tuple:
        """Plan → model for one frame: ``(plan, tile probabilities, tile maps)`` (:meth:`infer`)."""
        meta = getattr(session, "meta", None)
        fixed = self.fixed_size or getattr(meta, "fixed_size", None)
        plan = S.plan_frame(image_bgr.shape, self.survey, fixed)
        probs, maps, _ = self.infer(session, image_bgr, plan, batch)
        return plan, probs, maps

    def infer(self, session, image: np.ndarray, plan: S.FramePlan, batch: int | None = None,
              tiles: list | None = None) -> tuple[list, list, float]:
        """The model's part of one frame, in the steps' pass (:meth:`pass_for`): ``(probs, maps, seconds in the
        model)``.  Tiles go in chunks of ``batch`` (default: all of them) that the session takes — a fixed-batch
        graph's size, at most a TensorRT engine's largest batch; ``tiles``: the plan's tiles when already cut."""
        mode = self.pass_for(getattr(session, "meta", None))
        if mode == "tiles":
            tiles = self.tiles(image, plan) if tiles is None else tiles
            return infer_tiles(session, tiles, *tile_batch(session, batch, len(tiles)))
        probs, maps, secs = infer_frame(session, image, plan)
        if mode == "cascade":
            probs, maps, secs = recheck_tiles(session, image, plan, probs, maps, secs, self.recheck_floor, batch)
        return probs, maps, secs

    @property
    def recheck_floor(self) -> float:
        """The cascade's floor: a tile whose one-pass probability is at least this is re-run as a tile."""
        return float(self.survey.gate) - float(self.survey.recheck)


def tile_batch(session, batch: int | None, n: int) -> tuple[int, int | None]:
    """``(tiles per call, fixed batch or None)`` for ``n`` tiles through ``session``: ``batch`` (default: all
    ``n``), a fixed-batch graph's own size, at most a TensorRT engine's largest batch."""
    meta = getattr(session, "meta", None)
    nb = getattr(meta, "batch", None)
    k = nb or batch or n
    mb = getattr(session, "max_batch", None)
    if mb and not nb:
        k = min(k, mb)
    return max(1, k), nb


def recheck_tiles(session, image: np.ndarray, plan: S.FramePlan, probs: list, maps: list, secs: float,
                  floor: float, batch: int | None = None) -> tuple[list, list, float]:
    """The cascade's second step: the tiles whose one-pass probability is at least ``floor`` (the gate less the
    recheck margin) are cut and run as tiles through the same graph; their probabilities and maps replace the
    read-out ones (the tile graph's outputs, within float rounding).  The others keep their one-pass figures:
    they lie below the floor, so the gate drops them either way unless the one pass underrated them by more
    than the margin (the margin is chosen so that this does not happen on validation frames).  So the maps,
    masks and decisions are the tile graph's; a probability below the floor (a frame's ``prob`` when no tile
    reaches it) is the one pass's estimate."""
    idx, tiles = proposed_tiles(image, plan, probs, floor)
    if not idx:
        return probs, maps, secs
    p2, m2, s2 = infer_tiles(session, tiles, *tile_batch(session, batch, len(tiles)))
    probs, maps = list(probs), list(maps)
    for j, i in enumerate(idx):
        probs[i], maps[i] = p2[j], m2[j]
    return probs, maps, secs + s2


def proposed_tiles(image: np.ndarray, plan: S.FramePlan, probs, floor: float) -> tuple[list, list]:
    """``(indices, tiles)``: the tiles of ``plan`` whose one-pass probability is at least ``floor``, cut from the
    frame's work image as :func:`crackcam.runtime.survey.cut_tiles` cuts them (views)."""
    idx = [i for i, p in enumerate(probs) if p >= floor]
    if not idx:
        return idx, []
    work = S.work_image(image, plan)
    th, tw = plan.tile
    return idx, [work[y:y + th, x:x + tw] for y, x in (plan.coords[i] for i in idx)]


def pad_batch(arr: np.ndarray, fixed_batch: int | None) -> np.ndarray:
    """Zero frames appended up to a fixed-batch graph's size (their outputs are dropped)."""
    n = len(arr)
    if fixed_batch and n < fixed_batch:
        arr = np.concatenate([arr, np.zeros((fixed_batch - n,) + arr.shape[1:], arr.dtype)])
    return arr


def frame_pass_input(image: np.ndarray, plan: S.FramePlan, stride: int) -> np.ndarray:
    """What a frame-pass graph takes for ``image``: its work image (``plan``), reflect-padded at the bottom and
    right to whole multiples of ``stride``, as a batch of one."""
    work = S.work_image(image, plan)
    ph, pw = work.shape[:2]
    H, W = -(-ph // stride) * stride, -(-pw // stride) * stride
    if (H, W) != (ph, pw):
        mode = cv2.BORDER_REFLECT_101 if min(ph, pw) > 1 else cv2.BORDER_REPLICATE
        work = cv2.copyMakeBorder(work, 0, H - ph, 0, W - pw, mode)
    return np.ascontiguousarray(work[None])


def infer_frame(session, image: np.ndarray, plan: S.FramePlan) -> tuple[list, list, float]:
    """A frame-pass graph (``session.meta.frame_pass``: a top-k tile graph cut at its per-position logits) run
    once over the frame's work image, reflect-padded to whole strides; each tile of ``plan`` is read out of that
    pass as the tile graph would give it: probability σ(mean of the top k logits in the tile's window), map the
    tile's crop of σ(logits) upsampled bilinearly.  ``(probs, maps, seconds in the model)``, like
    :func:`infer_tiles`."""
    from .sessions import frame_pass_probs, sigmoid

    fp = session.meta.frame_pass
    st, k = int(fp["stride"]), int(fp["k"])
    th, tw = plan.tile
    work = frame_pass_input(image, plan, st)
    t = time.perf_counter()
    z = session.run_logits(work)[0]
    secs = time.perf_counter() - t
    lh, lw = z.shape
    if (lh * st, lw * st) != work.shape[1:3]:
        from .meta import ModelFileError

        raise ModelFileError(session.path, f"frame-pass logits {lh}x{lw} do not cover the {work.shape[1]}x"
                                           f"{work.shape[2]} input at stride {st}")
    wh, ww = th // st, tw // st
    wins = []
    for y, x in plan.coords:  # a window on the logit grid: the tile's origin rounded to whole strides
        ly = min(max(0, (y + st // 2) // st), lh - wh)
        lx = min(max(0, (x + st // 2) // st), lw - ww)
        wins.append(z[ly:ly + wh, lx:lx + ww])
    prob = frame_pass_probs(np.stack(wins), k)
    full = cv2.resize(sigmoid(z), (lw * st, lh * st), interpolation=cv2.INTER_LINEAR)
    maps = [np.array(full[y:y + th, x:x + tw], np.float32) for y, x in plan.coords]
    return [float(p) for p in prob], maps, secs


def infer_tiles(session, tiles: list, batch: int, fixed_batch: int | None = None) -> tuple[list, list, float]:
    """Run one frame's tiles through ``session`` in chunks of ``batch`` (padded to a fixed-batch graph's size);
    ``(probs, maps, seconds)``.  The maps are copies (a session may reuse its output buffers between calls).  The
    local pipeline batches tiles across frames in its inference thread instead."""
    probs, maps, secs = [], [], 0.0
    for k in range(0, len(tiles), batch):
        n = len(tiles[k:k + batch])
        arr = pad_batch(np.ascontiguousarray(np.stack(tiles[k:k + batch])), fixed_batch)
        t = time.perf_counter()
        p, m = session.run(arr)
        secs += time.perf_counter() - t
        probs += [float(x) for x in np.asarray(p).reshape(-1)[:n]]
        maps += [np.array(x, np.float32, copy=True) for x in m[:n]]
    return probs, maps, secs
