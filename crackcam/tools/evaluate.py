"""``crack-eval``: score crack maps against pixel masks; ``crack-eval calibrate``: choose the recipe on val images.

    crack-eval --method blackhat --data ../shared/datasets/deepcrack --split test           # learning-free floor
    crack-eval --checkpoint runs/dc --method gradcam++ --data ../shared/datasets/deepcrack  # one CAM method
    crack-eval calibrate --checkpoint runs/dc                                                # → runs/dc/recipe.json
    crack-eval --checkpoint runs/dc --data ../shared/datasets/cfd --split all                # the recipe

Prints progress, writes ``per_image.csv``, ``pr_curve.png``, ``overlays.png`` and ``metrics.json`` to ``--out``
and prints the same JSON object as its last line.  Thresholds come from ``--threshold``, else from the recipe
(chosen on validation images by ``calibrate``), else per-image Otsu (label-free).  Methods: see
``crackcam.tools.methods`` (``crack-eval --list-methods``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from crackcam.runtime import cues as C
from crackcam.runtime.imageio import BadInputError, read_image, read_mask
from crackcam.runtime.postprocess import PostProcessConfig, postprocess, resolve_threshold
from crackcam.tools import methods as M
from crackcam.tools.metrics import BinaryScorer, MapScorer, binary_counts

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="Score crack maps (CAMs, refinements, pixel cues) against pixel masks.")

RECIPE = "recipe.json"


# ----------------------------------------------------------------------------------------------- helpers
class EvalError(Exception):
    """One-line user error (exit code 2)."""


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def parse_threshold(s) -> float | str | None:
    if s is None:
        return None
    if isinstance(s, (int, float)):
        return float(s)
    s = str(s).strip()
    try:
        return float(s)
    except ValueError:
        pass
    resolve_threshold(np.zeros((1, 1), np.float32), s)  # validates "otsu" / "pXX"
    return s


def read_recipe(checkpoint: Path | None, recipe: Path | None = None) -> dict | None:
    p = recipe or (checkpoint / RECIPE if checkpoint else None)
    if p is None or not p.is_file():
        if recipe is not None:
            raise EvalError(f"{recipe}: recipe file not found")
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise EvalError(f"{p}: not valid JSON ({exc.msg})") from None


def _model_split(meta, model, data, split: str, log) -> dict:
    """The validation carve an exported model's metadata records (``split``: its training run's val_fraction and
    split_seed); a graph exported before it was recorded gets the training default, said in one line where a
    carve decides the split (not PaveSeg, whose split is fixed)."""
    from crackcam.train.data import detect_layout

    rule = meta.raw.get("split") if isinstance(meta.raw.get("split"), dict) else None
    try:
        rule = None if rule is None else {"val_fraction": float(rule["val_fraction"]),
                                          "split_seed": int(rule["split_seed"])}
    except (KeyError, TypeError, ValueError):
        raise EvalError(f"{model}: metadata 'split' {meta.raw.get('split')!r} is not {{val_fraction, split_seed}}") \
            from None
    if rule is None:
        if split in ("train", "val") and detect_layout(Path(data)) != "paveseg":
            log(f"crack-eval: {Path(model).name} does not record its training run's validation carve; split "
                f"{split!r} uses the training default (20 % of the training images, split_seed 0)")
        return {}
    return rule


def _list(data: Path, split: str, config: dict | None, limit: int | None):
    """The items of ``split`` that can be scored: images with masks (frames), clean tiles and image-labelled
    frames (frame-level figures only).  The split rule is the training run's (val_fraction, split_seed)."""
    from crackcam.train.data import list_items

    tc = (config or {}).get("train_config", {})
    items = list_items(data, split, val_fraction=float(tc.get("val_fraction", 0.2)),
                       split_seed=int(tc.get("split_seed", 0)))
    items = [it for it in items if it.mask is not None or it.name_label is not None]
    if not items:
        raise EvalError(f"{data}: no images with masks or labels in split {split!r}")
    if limit:
        items = items[:limit]
    return items


def _context(checkpoint: Path | None, layers: str | None, mode: str, tile: int | None, flips: bool, gate: float,
             refine: C.RefineConfig, survey=None) -> M.MethodContext:
    config = {}
    if checkpoint is not None:
        from crackcam.models.checkpoint import read_config

        try:
            config = read_config(checkpoint)
        except (FileNotFoundError, ValueError) as exc:
            raise EvalError(str(exc)) from None
    lay = [s.strip() for s in layers.split(",") if s.strip()] if layers else None
    if mode not in ("whole", "sliding"):
        raise EvalError(f"--mode must be whole or sliding, not {mode!r}")
    return M.MethodContext(checkpoint=checkpoint, config=config, layers=lay, mode=mode, tile=tile, flips=flips,
                           gate=gate, refine=refine, survey=survey)


def _default_out(checkpoint: Path | None, method: str, data: Path, split: str) -> Path:
    base = checkpoint / "eval" if checkpoint else Path("runs") / "eval"
    return base / f"{method}_{data.name}_{split}".replace("+", "pp").replace("/", "_")


def survey_from(entry: dict, recipe: dict | None, overrides: dict | None, mode: str, tile: int | None,
                gate: float | None, config: dict | None = None):
    """The SurveyConfig of an evaluation: the recipe's ``survey`` block (else whole frames, or the training tile
    for ``--mode sliding``, gated at the recipe's gate), with command-line overrides."""
    from crackcam.runtime.survey import SurveyConfig

    block = dict(entry.get("survey") or (recipe or {}).get("survey") or {})
    if not block:
        t = None
        if mode == "sliding":
            t = int(tile or (config or {}).get("tile") or 224)
        block = {"tile": t, "overlap": (t or 0) // 4, "gate": float(entry.get("gate", 0.5) if gate is None else gate)}
    elif gate is not None:
        block["gate"] = float(gate)
    if tile is not None:
        block["tile"] = int(tile)
    try:
        return SurveyConfig.from_dict(block).replace(**(overrides or {}))
    except ValueError as exc:
        raise EvalError(f"survey settings: {exc}") from None


# ----------------------------------------------------------------------------------------------- evaluation
class _Job:
    """One method's settings and running state inside a (possibly multi-method) evaluation."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _settings(method, rec_entry, recipe, *, checkpoint, threshold, layers, mode, tile, flips, gate, refine,
              postprocess_cfg, survey, options):
    """One method's settings from its recipe entry and the command-line overrides."""
    spec = M.resolve(method)
    if spec.needs_checkpoint and checkpoint is None:
        raise EvalError(f"method {method!r} needs --checkpoint DIR")
    thr = parse_threshold(threshold)
    if thr is not None:
        source = "--threshold"
    elif rec_entry.get("threshold") is not None:
        thr = parse_threshold(rec_entry["threshold"])
        source = f"recipe ({rec_entry.get('chosen_on') or (recipe or {}).get('chosen_on') or 'validation images'})"
    else:
        thr, source = "otsu", "per-image Otsu (label-free default; no recipe for this method)"
    pp = dict(rec_entry.get("postprocess") or {})
    pp.update({k: v for k, v in (postprocess_cfg or {}).items() if v is not None})
    pp.pop("threshold", None)
    cfg0 = {}
    if checkpoint is not None:
        cfg0 = _context(checkpoint, None, "whole", None, False, 0.5, C.RefineConfig()).config
    sv = survey_from(rec_entry, recipe, survey, mode, tile, gate, cfg0) if spec.needs_checkpoint else \
        survey_from({}, None, {k: v for k, v in (survey or {}).items() if k in ("roi", "roi_mask", "roi_size",
                                                                             "min_length")},
                    "whole", None, 0.0)
    pp["skeleton"] = sv.min_length > 0
    pcfg = PostProcessConfig.from_dict({**pp, "threshold": thr})
    rcfg = C.RefineConfig.from_dict({**(rec_entry.get("refine") or {}), **(refine or {})})
    if layers is None and rec_entry.get("layers"):
        layers = ",".join(rec_entry["layers"])
    ctx = _context(checkpoint, layers, mode, tile, flips, sv.gate, rcfg, sv if spec.needs_checkpoint else None)
    ctx.options.update({k: v for k, v in (options or {}).items() if v is not None})
    return _Job(spec=spec, ctx=ctx, thr=thr, source=source, pcfg=pcfg, survey=sv, layers=layers, rcfg=rcfg,
                fn=None)


def _load_state(out: Path, key: dict, method: str, n_bins: int, tols, log) -> tuple[Path, dict]:
    """The resumable scoring state in ``out`` when it was made with ``key`` (else a fresh one)."""
    state_path = out / ".eval_state.pkl"
    state = None
    if state_path.is_file():
        try:
            state = pickle.loads(state_path.read_bytes())
            if state.get("key") != key:
                if state.get("done"):
                    log(f"{method}: the scores in {out} came from other weights or settings; scoring again")
                state = None
        except Exception:  # noqa: BLE001 - a broken state file is simply ignored
            state = None
    if state is None:
        state = {"key": key, "scorer": MapScorer(n_bins, tols), "binary": BinaryScorer(tols), "rows": [],
                 "thumbs": [], "done": set(), "skipped": [], "seconds": [], "frames": [], "worst": []}
    elif state["done"]:
        log(f"resuming {method}: {len(state['done'])} images already scored in {out}")
    return state_path, state


def _model_job(model: Path, *, threshold, tile, gate, survey, data, split, tols, n_bins, limit, out, log) -> _Job:
    """An exported model scored as crack-run runs it (crackcam.tools.eval_model): one variant per frame size,
    from the model's own camera profiles."""
    from crackcam.runtime.meta import BackendUnavailable, ModelFileError
    from crackcam.runtime.survey import RoiError
    from crackcam.tools import eval_model as EM

    model = Path(model)
    thr = parse_threshold(threshold)  # crack-run's rule: a number in [0, 1], otsu or pXX
    if isinstance(thr, float) and not 0.0 <= thr <= 1.0:
        raise EvalError(f"--threshold {threshold!r}: a number threshold must lie in [0, 1]")
    sv = dict(survey or {})
    if tile is not None:
        sv["tile"] = tile
    if gate is not None:
        sv["gate"] = gate
    try:
        sess, steps = EM.open_model(model, threshold=thr, survey=sv)
    except (ModelFileError, BackendUnavailable) as exc:
        raise EvalError(str(exc)) from None
    except RoiError as exc:
        raise EvalError(f"--roi: {exc}") from None
    method = str(sess.meta.raw.get("method") or "model")
    if steps.default.refine is not None:  # the graph gives the CAM, the metadata's refinement the map
        method = f"refine-{method}"
    out = out or Path("runs") / "eval" / f"{model.resolve().parent.name}_{model.stem}_{Path(data).name}_{split}"
    out.mkdir(parents=True, exist_ok=True)
    key = {"model": EM.model_key(model, steps), "data": str(Path(data).resolve()), "split": split, "tols": tols,
           "n_bins": n_bins, "limit": limit}
    state_path, state = _load_state(out, key, method, n_bins, tols, log)
    variants: dict = {}
    given = thr is not None
    base = EM.ModelVariant(sess, steps.default, sess.meta, model, given)
    job = _Job(method=method, spec=base.spec, ctx=base.ctx, thr=base.thr, source=base.source, pcfg=base.pcfg,
               gate=base.survey.gate, out=out, state=state, state_path=state_path, fn=None, survey=base.survey,
               base=base, profiles={}, used=set(), model=str(model), provider=getattr(sess, "provider", "?"))

    def variant(shape):
        """The settings of ``shape``'s camera profile (the runtime's rule), else the top level."""
        name = steps.profile_name(shape)
        v = variants.get(name)
        if v is None:
            st = steps.for_shape((int(shape[0]), int(shape[1])))
            v = base if name is None else EM.ModelVariant(sess, st, sess.meta, model, given)
            variants[name] = v
            if name is not None:
                job.profiles[name] = v
        job.used.add(name or "default")
        return v

    job.variant = variant
    return job


def _job(method, *, checkpoint, recipe, threshold, layers, mode, tile, flips, gate, refine, postprocess_cfg,
         data, split, tols, n_bins, limit, out, log, options=None, survey=None) -> _Job:
    rec_entry: dict = {}
    if recipe is not None:
        rec_entry = recipe if recipe.get("method") == method else (recipe.get("candidates", {}).get(method) or {})
    kw = dict(checkpoint=checkpoint, threshold=threshold, layers=layers, mode=mode, tile=tile, flips=flips,
              gate=gate, refine=refine, postprocess_cfg=postprocess_cfg, survey=survey, options=options)
    base = _settings(method, rec_entry, recipe, **kw)
    profiles = {}
    if recipe is not None and recipe.get("method") == method:  # camera profiles (per frame size) of the recipe
        for size, e in (recipe.get("profiles") or {}).items():
            if str(e.get("method")) == method:
                profiles[size] = _settings(method, {**e, "layers": rec_entry.get("layers")}, recipe, **kw)
    out.mkdir(parents=True, exist_ok=True)

    def _k(v):
        return {"threshold": v.thr, "pp": v.pcfg.to_dict(), "refine": v.rcfg.to_dict(), "survey": v.survey.to_dict()}
    key = {"method": method, "data": str(Path(data).resolve()), "split": split, "checkpoint": str(checkpoint),
           "weights": M.run_digest(checkpoint),  # a re-trained run in the same folder is another run
           "restoration_weights": M.run_digest((options or {}).get("restoration_checkpoint")
                                                 or os.environ.get("CRACKCAM_RESTORATION_CHECKPOINT"))
           if method == "fusion" or method.startswith("fusion-") else None,  # CAM × restoration: its second run
           **_k(base), "profiles": {k: _k(v) for k, v in profiles.items()}, "layers": base.layers, "mode": mode,
           "tile": tile, "flips": flips, "tols": tols, "n_bins": n_bins, "limit": limit,
           "options": {k: str(v) for k, v in sorted(base.ctx.options.items())}}
    state_path, state = _load_state(out, key, method, n_bins, tols, log)
    job = _Job(method=method, spec=base.spec, ctx=base.ctx, thr=base.thr, source=base.source, pcfg=base.pcfg,
               gate=base.survey.gate, out=out, state=state, state_path=state_path, fn=None, survey=base.survey,
               base=base, profiles=profiles, used=set())

    def variant(shape):
        """The settings (and map function) for frames of ``shape``: its camera profile (the runtime's rule,
        crackcam.runtime.steps.choose_profile), else the top level."""
        from crackcam.runtime.steps import choose_profile

        name = choose_profile(list(profiles), shape)
        v = profiles[name] if name else base
        if v.fn is None:
            v.fn = v.spec.factory(v.ctx)
        job.used.add(name or "default")
        return v

    job.variant = variant
    return job


N_WORST = 8


def evaluate(*, method: str | None, data: Path | None, split: str = "test", checkpoint: Path | None = None,
             threshold=None, layers: str | None = None, mode: str = "whole", tile: int | None = None,
             flips: bool = False, tolerance: int = 2, out: Path | None = None, limit: int | None = None,
             gate: float | None = None, refine: dict | None = None, postprocess_cfg: dict | None = None,
             recipe_path: Path | None = None, n_bins: int = 1000, n_overlays: int = 8, log=print,
             options: dict | None = None, survey: dict | None = None, model: Path | None = None,
             show_progress: bool = True):
    """Score ``method`` (or a comma-separated list of methods, scored in one pass over the images; CAM methods
    then share one forward/backward per tile batch) on ``data``/``split``.  Returns the summary dict (a list of
    them for several methods), also written to ``out/metrics.json`` (``out/<method>/metrics.json`` for several).

    Pixel figures skip ``ignore/`` pixels and pixels outside the ROI; frames of a data set with frame classes
    (PaveSeg ``labels.csv``) also give the frame-level detection and false-alarm rates, and its clean tiles the
    share flagged (each tile run as crack-run runs an image file)."""
    if model is not None:
        if checkpoint is not None or method is not None or recipe_path is not None:
            raise EvalError("--model scores an exported model as crack-run runs it: give it without --checkpoint, "
                            "--method or --recipe (its metadata holds the recipe)")
        if data is None:
            raise EvalError("--model needs --data (the folder to score)")
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise EvalError(f"{checkpoint}: run folder not found")
    recipe = read_recipe(checkpoint, recipe_path) if model is None else None
    if model is not None:
        tols = (0,) if tolerance == 0 else (0, int(tolerance))
        jobs = [_model_job(model, threshold=threshold, tile=tile, gate=gate, survey=survey, data=data, split=split,
                           tols=tols, n_bins=n_bins, limit=limit, out=out, log=log)]
        items = _list(data, split, {"train_config": _model_split(jobs[0].base.session.meta, model, data, split, log)},
                      limit)
        return _score(jobs, items, data, split, tols, recipe, n_overlays, log, show_progress)
    if method is None:
        if recipe is None:
            raise EvalError("no --method and no recipe: run `crack-eval calibrate --checkpoint DIR` first, "
                            "or pass --method")
        method = recipe["method"]
    methods = [m.strip() for m in method.split(",") if m.strip()]
    for m in methods:
        M.resolve(m)
    cfg = {}
    if checkpoint is not None:
        cfg = _context(checkpoint, None, "whole", None, False, 0.5, C.RefineConfig()).config
    if data is None:
        if not cfg.get("data"):
            raise EvalError("--data PATH is required (no checkpoint config to take it from)")
        data = Path(cfg["data"])
    items = _list(data, split, cfg, limit)
    out = out or _default_out(checkpoint, method if len(methods) == 1 else "multi", data, split)
    tols = (0,) if tolerance == 0 else (0, int(tolerance))
    jobs = [_job(m, checkpoint=checkpoint, recipe=recipe, threshold=threshold, layers=layers, mode=mode, tile=tile,
                 flips=flips, gate=gate, refine=refine, postprocess_cfg=postprocess_cfg, data=data, split=split,
                 tols=tols, n_bins=n_bins, limit=limit, out=out if len(methods) == 1 else out / _safe(m), log=log,
                 options=options, survey=survey)
            for m in methods]
    return _score(jobs, items, data, split, tols, recipe, n_overlays, log, show_progress)


def _score(jobs, items, data, split, tols, recipe, n_overlays, log, show_progress=True):
    """The scoring pass shared by checkpoints (recipe variants) and exported models (crack-run's steps)."""
    from crackcam.train.data import scored_pixels

    methods = [j.method for j in jobs]
    frames = [it for it in items if not it.is_tile]
    overlay_every = max(1, len(frames) // max(1, n_overlays))
    for j in jobs:
        n_t = sum(it.is_tile for it in items)
        log(f"crack-eval: {j.method} on {data} [{split}] — {len(frames)} frames" + (f" + {n_t} clean tiles" if n_t
            else "") + f", threshold {j.thr} ({j.source}), post-processing {j.pcfg.to_dict()}, survey "
            f"{_survey_text(j.survey)}" + (f"; camera profiles {', '.join(j.profiles)}" if j.profiles else "")
            + f", out {j.out}")
    from crackcam.runtime.progress import progress
    from crackcam.runtime.survey import decide_frame

    from crackcam.tools.figures import overlay_row

    last_save = time.time()
    k_frame = 0
    for it in (progress(items, desc="crack-eval " + ",".join(methods)[:40], unit="img", every=25) if show_progress
               else items):
        name = it.image.name
        todo = [j for j in jobs if name not in j.state["done"]]
        if not it.is_tile:
            k_frame += 1
        if not todo:
            continue
        try:
            img = read_image(it.image)
            gt = read_mask(it.mask, img.shape[:2]) if it.mask is not None else None
        except BadInputError as exc:
            log(f"skipped {exc}")
            for j in todo:
                j.state["skipped"].append(str(exc))
                j.state["done"].add(name)
            continue
        for j in todo:
            st = j.state
            v = j.variant(img.shape)
            st.setdefault("used", set()).update(j.used)  # kept with the scores: a resumed run reports the same
            valid = scored_pixels(it, img.shape[:2], v.survey) if gt is not None else None
            t0 = time.perf_counter()
            m, prob = v.fn(img)
            m = np.asarray(m, np.float32)
            res = postprocess(m, v.pcfg)
            dt = time.perf_counter() - t0
            cracked = decide_frame(float(res.measures.get("length_px", 0.0)), bool(res.mask.any()), v.survey)
            label = it.image_label or ({1: "crack", 0: "no_crack"}.get(it.name_label) if gt is None else None)
            if label is None and gt is not None:
                label = "crack" if gt.any() else "no_crack"
            fp_px = int(np.count_nonzero(res.mask & ~gt)) if gt is not None else int(np.count_nonzero(res.mask))
            st["frames"].append({"name": name, "label": label, "tile": it.is_tile, "cracked": bool(cracked),
                                 "prob": prob, "length_px": round(float(res.measures.get("length_px", 0.0)), 1),
                                 "fp_px": fp_px})
            if not it.is_tile:
                st["seconds"].append(dt)
            if gt is not None and not it.is_tile:
                st["scorer"].add(m, gt, name, valid)
                row = st["binary"].add(res.mask, gt, name, valid)
                row.update(prob=prob, threshold=res.threshold, seconds=dt, cracked=bool(cracked), label=label)
                st["rows"].append(row)
                if (k_frame - 1) % overlay_every == 0 and len(st["thumbs"]) < n_overlays:
                    st["thumbs"].append((name, overlay_row(img, m, res.mask, gt)))
            if label != "crack" and cracked:
                _keep_worst(st["worst"], fp_px, name, img, m, res.mask, gt)
            st["done"].add(name)
        if time.time() - last_save > 20:
            for j in jobs:
                _atomic_write(j.state_path, pickle.dumps(j.state))
            last_save = time.time()
    summaries = []
    for j in jobs:  # the camera profiles of images scored by an earlier, interrupted run of the same job
        for name in sorted(set(j.state.get("used", ())) - j.used):
            if name == "default":
                j.used.add(name)
            else:
                w, _, h = name.partition("x")
                j.variant((int(h), int(w)))
    for j in jobs:
        _atomic_write(j.state_path, pickle.dumps(j.state))
        if not j.state["frames"]:
            raise EvalError(f"{data}: no image could be scored")
        used = [k for k in j.used if k != "default"]
        v = j.profiles[used[0]] if len(used) == 1 and "default" not in j.used else j.base
        s = _summary(j.method, j.spec, v.ctx, data, split, v.thr, v.source, v.pcfg, v.survey.gate, j.state, tols,
                     recipe, v.survey)
        s["profiles_used"] = sorted(j.used)
        if getattr(j, "model", None):
            s["model_file"] = j.model
            s["fps_note"] = (f"{j.provider} through crack-run's session and frame steps, one frame at a time: "
                             f"model + steps + post-processing (crack-bench survey: the pipeline)")
        if len(jobs) > 1:
            s["seconds_note"] = "CAM methods of one layer group share a forward pass: the first one carries its cost"
        _write_outputs(j.out, s, j.state, j.state["scorer"], tols, j.method)
        summaries.append(s)
    return summaries[0] if len(summaries) == 1 else summaries


def _keep_worst(worst: list, fp_px: int, name: str, img, m, mask, gt) -> None:
    """Keep the N_WORST false alarms (most flagged pixels) with a small overlay each."""
    from crackcam.tools.figures import overlay_row

    if len(worst) >= N_WORST and fp_px <= min(w[0] for w in worst):
        return
    g = gt if gt is not None else np.zeros(mask.shape, bool)
    worst.append((fp_px, name, overlay_row(img, m, mask, g)))
    worst.sort(key=lambda w: -w[0])
    del worst[N_WORST:]


def _survey_text(sv) -> str:
    parts = [f"scale {sv.scale:g}" + (f" (longer side <= {sv.max_side})" if sv.max_side else "")]
    parts.append(f"tile {sv.tile or 'model/whole'} overlap {sv.overlap}")
    parts.append(f"gate {sv.gate:g}")
    if sv.has_roi:
        parts.append("ROI" + (f" for {sv.roi_size[0]}x{sv.roi_size[1]} frames" if sv.roi_size else ""))
    if sv.min_length:
        parts.append(f"min length {sv.min_length:g}px")
    return ", ".join(parts)


def _safe(name: str) -> str:
    return name.replace("+", "pp").replace("/", "_")


def frame_figures(frames: list[dict]) -> dict:
    """Frame-level figures from per-frame records (label, cracked, tile): detection rate on crack frames, false-
    alarm rate on the others (per class and together) and the share of clean tiles flagged."""
    out: dict = {}
    fr = [f for f in frames if not f["tile"]]
    by: dict[str, list] = {}
    for f in fr:
        by.setdefault(f["label"], []).append(f["cracked"])
    for lab, v in sorted(by.items()):
        out[lab] = {"frames": len(v), "flagged": int(sum(v)), "rate": round(sum(v) / len(v), 4)}
    crack = by.get("crack", [])
    neg = [c for lab, v in by.items() if lab != "crack" for c in v]
    out["detection_rate"] = round(sum(crack) / len(crack), 4) if crack else None
    out["false_alarm_rate"] = round(sum(neg) / len(neg), 4) if neg else None
    tiles = [f["cracked"] for f in frames if f["tile"]]
    if tiles:
        out["clean_tiles"] = {"tiles": len(tiles), "flagged": int(sum(tiles)), "rate": round(sum(tiles) / len(tiles), 4)}
    return out


def _summary(method, spec, ctx, data, split, thr, source, pcfg, gate_v, state, tols, recipe, survey) -> dict:
    scorer, bins = state["scorer"], state["binary"]
    tmax = max(tols)
    n_frames = sum(not f["tile"] for f in state["frames"])
    s = {"method": method, "learned": spec.learned, "checkpoint": str(ctx.checkpoint) if ctx.checkpoint else None,
         "model": ctx.config.get("model") if spec.learned else None, "data": str(data), "split": split,
         "n_images": len(state["rows"]), "n_frames": n_frames, "skipped": len(state["skipped"]), "threshold": thr,
         "threshold_source": source, "postprocess": pcfg.to_dict(), "survey": survey.to_dict()}
    if state["rows"]:
        f0 = bins.figures(0)
        s.update({k: round(v, 4) for k, v in f0.items()})
        for t in tols:
            s[f"t{t}"] = {k: round(v, 4) for k, v in bins.figures(t).items()}
        s["ods"] = {f"t{t}": {k: round(v, 4) for k, v in scorer.ods(t).items()} for t in tols}
        s["ois"] = {f"t{t}": round(scorer.ois(t)["f1"], 4) for t in tols}
        s["ods_f1"] = s["ods"]["t0"]["f1"]
        s["ois_f1"] = s["ois"]["t0"]
        s[f"f1_t{tmax}"] = s[f"t{tmax}"]["f1"]
        s["pixels_skipped"] = "ignore/ areas and pixels outside the ROI" if survey.has_roi else "ignore/ areas (if any)"
    s["frames"] = frame_figures(state["frames"])
    sec = state["seconds"]
    s["seconds_per_image"] = round(float(np.mean(sec)), 4) if sec else None
    s["fps"] = round(1.0 / float(np.mean(sec)), 2) if sec and np.mean(sec) > 0 else None
    s["fps_note"] = "PyTorch on this machine's CPU, map + post-processing per frame (crack-bench runtime: ONNX Runtime)"
    if spec.needs_checkpoint:
        probs = [f["prob"] for f in state["frames"] if f.get("prob") is not None]
        s["gate"] = gate_v
        s["mean_prob"] = round(float(np.mean(probs)), 4) if probs else None
        s["layers"] = ctx.layers
        s["mode"] = ctx.mode
    if method.startswith("refine-"):
        s["refine"] = ctx.refine.to_dict()
    if recipe is not None:
        s["recipe_method"] = recipe.get("method")
        if recipe.get("masks_used") is not None:
            s["recipe_masks_used"] = recipe.get("masks_used")
    return s


def _write_outputs(out: Path, summary: dict, state: dict, scorer: MapScorer, tols, method: str) -> None:
    from crackcam.tools.figures import overlay_grid_png, pr_curve_png

    rows = state["rows"]
    if state.get("frames"):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(state["frames"][0].keys()))
        w.writeheader()
        for r in state["frames"]:
            w.writerow({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()})
        _atomic_write(out / "per_frame.csv", buf.getvalue().encode())
    if state.get("worst"):
        overlay_grid_png(out / "false_alarms.png", [w_[2] for w_ in state["worst"]],
                         [f"{w_[1]} ({w_[0]} px)" for w_ in state["worst"]])
    if not rows:
        _write_json(out / "metrics.json", summary)
        return
    buf = io.StringIO()
    fields = list(rows[0].keys())
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()})
    _atomic_write(out / "per_image.csv", buf.getvalue().encode())
    curves, points = {}, {}
    for t in tols:
        c = scorer.curve(t)
        curves[f"{method} t={t} (ODS F1 {summary['ods'][f't{t}']['f1']:.3f})"] = (c["recall"], c["precision"])
        f = summary[f"t{t}"]
        points[f"chosen threshold t={t} (F1 {f['f1']:.3f})"] = (f["recall"], f["precision"])
    pr_curve_png(out / "pr_curve.png", curves, f"{method} — {Path(summary['data']).name} [{summary['split']}], "
                                                f"{summary['n_images']} images", points)
    if state["thumbs"]:
        overlay_grid_png(out / "overlays.png", [t[1] for t in state["thumbs"]], [t[0] for t in state["thumbs"]])
    _write_json(out / "metrics.json", summary)


# ----------------------------------------------------------------------------------------------- calibration
def calibrate(**kw):
    """See :func:`crackcam.tools.calibration.calibrate` (kept here for the CLI's error handling)."""
    from crackcam.tools.calibration import CalibrationError, calibrate as _cal

    try:
        return _cal(**kw)
    except CalibrationError as exc:
        raise EvalError(str(exc)) from None


def survey_options(roi: str | None, roi_size: str | None, scale: float | None, max_side: int | None,
                   overlap: int | None, min_length: float | None, model_pass: str | None = None,
                   recheck: float | None = None) -> dict:
    """Command-line survey overrides → a dict for SurveyConfig.replace (bad ROI → one-line EvalError)."""
    from crackcam.runtime.survey import RoiError, parse_roi

    d: dict = {"scale": scale, "max_side": max_side, "overlap": overlap, "min_length": min_length,
               "model_pass": model_pass, "recheck": recheck}
    try:
        if roi:
            d.update(parse_roi(roi))
        if roi_size:
            w, _, h = roi_size.lower().partition("x")
            d["roi_size"] = [int(w), int(h)]
    except RoiError as exc:
        raise EvalError(f"--roi: {exc}") from None
    except ValueError:
        raise EvalError(f"--roi-size {roi_size!r}: give WIDTHxHEIGHT in px, e.g. 1280x1080") from None
    return {k: v for k, v in d.items() if v is not None}


# ----------------------------------------------------------------------------------------------- CLI
def _err(msg: str) -> None:
    """Progress and notes go to stderr: stdout carries the JSON result line alone (``crack-eval … | jq``)."""
    typer.echo(msg, err=True)


def _run(fn, **kw):
    try:
        return fn(**kw)
    except (EvalError, BadInputError) as exc:
        typer.echo(f"crack-eval: {exc}", err=True)
        raise typer.Exit(2)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"crack-eval: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
        raise typer.Exit(2)


def _threads() -> None:
    n = os.environ.get("CRACKCAM_THREADS")
    if n:
        try:
            import torch

            torch.set_num_threads(int(n))
        except ImportError:
            pass


_CHECKPOINT_ONLY = ("method", "layers", "mode", "flips", "cue", "refine_mode", "dilate", "min_area", "close_radius",
                    "open_radius", "recipe", "restoration_checkpoint", "calibrate_flag")


@app.callback(invoke_without_command=True)
def cli(ctx: typer.Context,
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="crack-train run folder"),
        model: Optional[Path] = typer.Option(None, "--model", help="an exported model (.onnx, or a TensorRT "
                                             ".engine) scored exactly as crack-run runs it: its metadata's recipe, "
                                             "camera profiles and survey settings; --threshold, --gate, --tile and "
                                             "the survey options override them as in crack-run"),
        method: Optional[str] = typer.Option(None, "--method", "-m",
                                             help="crack-map method (default: the checkpoint's recipe)"),
        data: Optional[Path] = typer.Option(None, "--data", "-d", help="data folder (default: the training data)"),
        split: str = typer.Option("test", help="train | val | test | all"),
        threshold: Optional[str] = typer.Option(None, help="float, 'otsu' or 'pXX' (default: recipe, else otsu)"),
        layers: Optional[str] = typer.Option(None, help="comma-separated target layers (default: the model's)"),
        mode: str = typer.Option("whole", help="whole | sliding"),
        tile: Optional[int] = typer.Option(None, help="tile size for --mode sliding (default: training tile)"),
        flips: bool = typer.Option(False, "--flips", help="average the map over horizontal/vertical flips"),
        tolerance: int = typer.Option(2, help="tolerance in px reported next to t=0"),
        out: Optional[Path] = typer.Option(None, help="output folder"),
        limit: Optional[int] = typer.Option(None, help="score only the first N images"),
        gate: Optional[float] = typer.Option(None, help="zero the CAM where the crack probability < gate"),
        cue: Optional[str] = typer.Option(None, help="refine-*: pixel cue (blackhat | ridge | bh+ridge)"),
        refine_mode: Optional[str] = typer.Option(None, help="refine-*: product | guided | gate"),
        dilate: Optional[int] = typer.Option(None, help="refine-*: CAM prior dilation in px"),
        min_area: Optional[int] = typer.Option(None, help="remove components smaller than this (px)"),
        close_radius: Optional[int] = typer.Option(None, help="closing radius (px)"),
        open_radius: Optional[int] = typer.Option(None, help="opening radius (px)"),
        recipe: Optional[Path] = typer.Option(None, help="recipe.json to take thresholds from"),
        restoration_checkpoint: Optional[Path] = typer.Option(
            None, "--restoration-checkpoint", help="fusion*: the UP-CrackNet run folder whose restoration error is "
            "fused with the --checkpoint classifier's CAM"),
        roi: Optional[str] = typer.Option(None, "--roi", help="region of interest: 'x,y x,y x,y ...' (frame-relative, "
                                          "0..1), a JSON polygon list, or a mask PNG; outside it nothing counts"),
        roi_size: Optional[str] = typer.Option(None, "--roi-size", help="apply the ROI to frames of this size only "
                                               "(WIDTHxHEIGHT, e.g. 1280x1080)"),
        scale: Optional[float] = typer.Option(None, "--scale", help="work scale of the frames (default: recipe)"),
        max_side: Optional[int] = typer.Option(None, "--max-side", help="shrink frames to this longer side (px)"),
        overlap: Optional[int] = typer.Option(None, "--overlap", help="tile overlap in px at work scale"),
        min_length: Optional[float] = typer.Option(None, "--min-length", help="a frame is cracked when its crack "
                                                   "skeleton is at least this long (px)"),
        model_pass: Optional[str] = typer.Option(None, "--pass", help="with --model, a frame-pass graph: tiles, "
                                                 "frame or cascade (as crack-run --pass; default: the model's)"),
        recheck: Optional[float] = typer.Option(None, "--recheck", help="with --model and --pass cascade: re-run "
                                                "the tiles within this of the gate (default: the model's)"),
        calibrate_flag: bool = typer.Option(False, "--calibrate", help="run calibration (as `calibrate`) first"),
        list_methods: bool = typer.Option(False, "--list-methods", help="print the method names and exit")):
    """Score crack maps against pixel masks (see `crack-eval calibrate --help` for choosing the recipe)."""
    if ctx.invoked_subcommand is not None:
        return
    if model is not None:
        from crackcam.runtime.cli import typed_options

        typed = typed_options(ctx, _CHECKPOINT_ONLY)
        if typed:
            opts = ", ".join("--" + ("calibrate" if n == "calibrate_flag" else n.replace("_", "-")) for n in typed)
            typer.echo(f"crack-eval: {opts}: not read with --model (the exported graph's metadata holds its method "
                       f"and recipe; score a run folder with --checkpoint for those)", err=True)
            raise typer.Exit(2)
    if model is None and (model_pass is not None or recheck is not None):
        typer.echo("crack-eval: --pass / --recheck: read with --model (a frame-pass graph) only", err=True)
        raise typer.Exit(2)
    _threads()
    if list_methods:
        for n in _run(M.list_method_names):
            typer.echo(n)
        return
    if calibrate_flag:
        if checkpoint is None:
            typer.echo("crack-eval: --calibrate needs --checkpoint DIR", err=True)
            raise typer.Exit(2)
        _run(calibrate, checkpoint=checkpoint, data=data, layers=layers, tile=tile, gate=gate, log=_err,
             survey=_run(survey_options, roi=roi, roi_size=roi_size, scale=scale, max_side=max_side,
                         overlap=overlap, min_length=None))
    refine = {k: v for k, v in {"cue": cue, "mode": refine_mode, "dilate": dilate}.items() if v is not None}
    summary = _run(evaluate, log=_err, method=method, data=data, split=split, checkpoint=checkpoint,
                   threshold=threshold,
                   layers=layers, mode=mode, tile=tile, flips=flips, tolerance=tolerance, out=out, limit=limit,
                   gate=gate, refine=refine,
                   postprocess_cfg={"min_area": min_area, "close_radius": close_radius, "open_radius": open_radius},
                   recipe_path=recipe, options={"restoration_checkpoint": restoration_checkpoint}, model=model,
                   survey=_run(survey_options, roi=roi, roi_size=roi_size, scale=scale, max_side=max_side,
                               overlap=overlap, min_length=min_length, model_pass=model_pass, recheck=recheck))
    if isinstance(summary, list):
        for t in summary:
            typer.echo(f"{t['method']:<24} P {t['precision']:.3f} R {t['recall']:.3f} F1 {t['f1']:.3f} "
                       f"IoU {t['iou']:.3f} (t=0) | F1 t={tolerance} {t.get(f'f1_t{tolerance}', t['f1']):.3f} | "
                       f"ODS {t['ods_f1']:.3f} OIS {t['ois_f1']:.3f} | threshold {t['threshold']}", err=True)
        typer.echo(json.dumps({"results": summary}))
        return
    t = summary
    typer.echo(f"{t['method']}: P {t['precision']:.3f} R {t['recall']:.3f} F1 {t['f1']:.3f} IoU {t['iou']:.3f} "
               f"(t=0) | F1 t={tolerance} {t.get(f'f1_t{tolerance}', t['f1']):.3f} | ODS {t['ods_f1']:.3f} "
               f"OIS {t['ois_f1']:.3f} | threshold {t['threshold']} ({t['threshold_source']})", err=True)
    typer.echo(json.dumps(summary))


@app.command("calibrate")
def calibrate_cmd(
        ctx: typer.Context,
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="crack-train run folder"),
        model: Optional[Path] = typer.Option(None, "--model", help="an exported graph (.onnx): re-choose its "
                                             "run-time settings (gate, threshold, work size per camera profile) on "
                                             "the validation split of --data, written into a copy (--out, default "
                                             "runs/<stem>_calibrated.onnx)"),
        gates: Optional[str] = typer.Option(None, "--gates", help="with --model: comma-separated gates to try "
                                            "(default: the graph's)"),
        thresholds: Optional[str] = typer.Option(None, "--thresholds", help="with --model: comma-separated "
                                                 "thresholds to try (default: the graph's)"),
        max_sides: Optional[str] = typer.Option(None, "--max-sides", help="with --model: comma-separated work "
                                                "sizes (longer side, px) to try (default: the graph's)"),
        min_lengths: Optional[str] = typer.Option(None, "--min-lengths", help="with --model: comma-separated "
                                                  "minimum crack lengths (px of skeleton) for a frame to count as "
                                                  "cracked (default: the graph's)"),
        data: Optional[List[Path]] = typer.Option(None, "--data", "-d", help="data folder(s) whose VALIDATION "
                                                  "split is used (default: the run's training sets)"),
        out: Optional[Path] = typer.Option(None, help="recipe file (default: DIR/recipe.json); with --model the "
                                           "calibrated graph"),
        methods: Optional[str] = typer.Option(None, help="comma-separated CAM methods (default: per model kind)"),
        layers: Optional[str] = typer.Option(None, help="comma-separated target layers"),
        mode: str = typer.Option("tiles", help="tiles (native-scale tiles of the training size, per-tile gate) | "
                                 "whole (one pass per frame)"),
        tile: Optional[int] = typer.Option(None, help="tile size in px at work scale (default: the training tile)"),
        gate: Optional[float] = typer.Option(None, help="fix the per-tile gate (default: choose on validation)"),
        budget: float = typer.Option(0.05, help="false-alarm budget: share of clean validation tiles flagged"),
        frame_budget: float = typer.Option(0.20, help="share of crack-free / sealed-only validation frames flagged"),
        min_detection: float = typer.Option(0.90, help="share of crack validation frames that must be detected"),
        roi: Optional[str] = typer.Option(None, "--roi", help="region of interest to try (with and without); see "
                                          "crack-eval --help"),
        roi_size: Optional[str] = typer.Option(None, "--roi-size", help="the ROI's frame size (WIDTHxHEIGHT)"),
        scale: Optional[float] = typer.Option(None, "--scale", help="work scale (default: the training run's)"),
        max_side: Optional[int] = typer.Option(None, "--max-side", help="longer side cap (default: the run's)"),
        overlap: Optional[int] = typer.Option(None, "--overlap", help="tile overlap in px (default: tile/4)"),
        limit: Optional[int] = typer.Option(None, help="use only the first N validation images per set"),
        labels: str = typer.Option("masks", help="masks (pixel F1 on the masked validation images) | tiles (no "
                                   "mask: each validation tile's crack / crack-free bit, the training tile rule)"),
        masks: Optional[int] = typer.Option(None, help="a mask budget: pixel F1 on N seeded masked validation "
                                            "crack frames, tile labels for the rest (stems in the recipe)"),
        seed: int = typer.Option(0, help="seed of the --masks choice")):
    """Choose method, gate, refinement, threshold, post-processing, minimum crack length and ROI use on the
    VALIDATION split under a false-alarm budget → DIR/recipe.json.  With --model: an exported graph's gate,
    threshold and work size, chosen the same way, into a copy of the graph."""
    _threads()
    if model is not None:
        _calibrate_model_cmd(ctx, model=model, data=data, out=out, gates=gates, thresholds=thresholds,
                             max_sides=max_sides, min_lengths=min_lengths, budget=budget, frame_budget=frame_budget,
                             min_detection=min_detection, limit=limit)
        return
    typed = [n for n in ("gates", "thresholds", "max_sides", "min_lengths") if n in _typed(ctx)]
    if typed:
        typer.echo(f"crack-eval calibrate: {', '.join('--' + n.replace('_', '-') for n in typed)}: only with "
                   f"--model (a run folder's calibration searches its own grid)", err=True)
        raise typer.Exit(2)
    ms = [s.strip() for s in methods.split(",")] if methods else None
    sv = _run(survey_options, roi=roi, roi_size=roi_size, scale=scale, max_side=max_side, overlap=overlap,
              min_length=None)
    r = _run(calibrate, log=_err, checkpoint=checkpoint, data=list(data) if data else None, methods=ms,
             layers=layers,
             mode=mode, tile=tile, gate=gate, budget=budget, frame_budget=frame_budget, min_detection=min_detection,
             survey=sv, limit=limit, out=out, labels=labels, masks=masks, seed=seed)
    typer.echo(json.dumps({k: v for k, v in r.items() if k not in ("candidates", "val_images")}))


def _typed(ctx) -> list[str]:
    from crackcam.runtime.cli import typed_options

    return typed_options(ctx)


def _floats(name: str, text: str | None, cast=float) -> list | None:
    if text is None:
        return None
    try:
        vals = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        typer.echo(f"crack-eval calibrate: --{name} {text!r}: comma-separated numbers", err=True)
        raise typer.Exit(2)
    if not vals:
        typer.echo(f"crack-eval calibrate: --{name} {text!r}: no value", err=True)
        raise typer.Exit(2)
    return vals


def _calibrate_model_cmd(ctx, *, model, data, out, gates, thresholds, max_sides, min_lengths, budget, frame_budget,
                         min_detection, limit) -> None:
    from crackcam.tools.calibrate_model import calibrate_model

    other = [n for n in _typed(ctx) if n in ("checkpoint", "methods", "layers", "mode", "tile", "gate", "roi",
                                             "roi_size", "scale", "max_side", "overlap", "labels", "masks", "seed")]
    if other:
        typer.echo(f"crack-eval calibrate: {', '.join('--' + n.replace('_', '-') for n in other)}: not read with "
                   f"--model (it searches --gates, --thresholds, --max-sides, --min-lengths on the graph's own recipe)", err=True)
        raise typer.Exit(2)
    r = _run(calibrate_model, model=model, data=list(data or []), out=out, gates=_floats("gates", gates),
             thresholds=_floats("thresholds", thresholds), max_sides=_floats("max-sides", max_sides, int),
             min_lengths=_floats("min-lengths", min_lengths),
             budget=budget, frame_budget=frame_budget, min_detection=min_detection, limit=limit,
             log=_err)
    typer.echo(json.dumps({k: v for k, v in r.items() if k != "profiles"}
                          | {"profiles": {p: {k: v for k, v in e.items() if k != "grid"}
                                          for p, e in r["profiles"].items()}}))


@app.command("mask-budget")
def mask_budget_cmd(
        checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="crack-train run folder"),
        test: List[str] = typer.Option(..., "--test", help="DATA[:SPLIT] to score each recipe on (repeatable; "
                                       "split default test)"),
        budgets: str = typer.Option("0,1,5,20,all", help="comma-separated mask budgets (N or all)"),
        seed: int = typer.Option(0, help="seed of the masked images' choice"),
        out: Optional[Path] = typer.Option(None, help="folder of the recipes, evaluations and table (default: "
                                           "DIR/mask_budget)"),
        tile: Optional[int] = typer.Option(None, help="calibration tile size (see crack-eval calibrate)"),
        roi: Optional[str] = typer.Option(None, "--roi", help="region of interest to try (see crack-eval --help)"),
        roi_size: Optional[str] = typer.Option(None, "--roi-size", help="the ROI's frame size (WIDTHxHEIGHT)"),
        limit: Optional[int] = typer.Option(None, help="score only the first N images per test set")):
    """The recipe chosen with 0 (mask-free), 1, 5, 20 and all masked validation images, each scored on the test
    sets next to Otsu with defaults → OUT/table.md, OUT/table.json."""
    from crackcam.tools.mask_budget import mask_budget, parse_test

    _threads()
    try:
        bl = [None if b.strip() == "all" else int(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        typer.echo(f"crack-eval: --budgets {budgets!r}: comma-separated numbers or 'all'", err=True)
        raise typer.Exit(2)
    sv = _run(survey_options, roi=roi, roi_size=roi_size, scale=None, max_side=None, overlap=None, min_length=None)
    r = _run(mask_budget, log=_err, checkpoint=checkpoint, tests=[parse_test(t) for t in test], budgets=bl,
             seed=seed, out=out,
             limit=limit, calibrate_kw={"tile": tile, "survey": sv})
    typer.echo(json.dumps(r))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
