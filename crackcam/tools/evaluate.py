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
from typing import Optional

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


def _list(data: Path, split: str, config: dict | None, limit: int | None):
    from crackcam.train.data import list_items

    tc = (config or {}).get("train_config", {})
    items = list_items(data, split, val_fraction=float(tc.get("val_fraction", 0.2)),
                       split_seed=int(tc.get("split_seed", 0)))
    items = [it for it in items if it.mask is not None] if items else items
    if not items:
        raise EvalError(f"{data}: no images with masks in split {split!r}")
    if limit:
        items = items[:limit]
    return items


def _context(checkpoint: Path | None, layers: str | None, mode: str, tile: int | None, flips: bool, gate: float,
             refine: C.RefineConfig) -> M.MethodContext:
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
                           gate=gate, refine=refine)


def _default_out(checkpoint: Path | None, method: str, data: Path, split: str) -> Path:
    base = checkpoint / "eval" if checkpoint else Path("runs") / "eval"
    return base / f"{method}_{data.name}_{split}".replace("+", "pp").replace("/", "_")


# ----------------------------------------------------------------------------------------------- evaluation
class _Job:
    """One method's settings and running state inside a (possibly multi-method) evaluation."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _job(method, *, checkpoint, recipe, threshold, layers, mode, tile, flips, gate, refine, postprocess_cfg,
         data, split, tols, n_bins, limit, out, log, options=None) -> _Job:
    source = None
    rec_entry: dict = {}
    if recipe is not None:
        rec_entry = recipe if recipe.get("method") == method else (recipe.get("candidates", {}).get(method) or {})
    spec = M.resolve(method)
    if spec.needs_checkpoint and checkpoint is None:
        raise EvalError(f"method {method!r} needs --checkpoint DIR")
    thr = parse_threshold(threshold)
    if thr is not None:
        source = "--threshold"
    elif rec_entry.get("threshold") is not None:
        thr = parse_threshold(rec_entry["threshold"])
        source = f"recipe ({rec_entry.get('chosen_on', 'validation images')})"
    else:
        thr, source = "otsu", "per-image Otsu (label-free default; no recipe for this method)"
    pp = dict(rec_entry.get("postprocess") or {})
    pp.update({k: v for k, v in (postprocess_cfg or {}).items() if v is not None})
    pp.pop("threshold", None)
    pp["skeleton"] = False
    pcfg = PostProcessConfig.from_dict({**pp, "threshold": thr})
    rcfg = C.RefineConfig.from_dict({**(rec_entry.get("refine") or {}), **(refine or {})})
    gate_v = gate if gate is not None else float(rec_entry.get("gate", 0.5))
    if layers is None and rec_entry.get("layers"):
        layers = ",".join(rec_entry["layers"])
    ctx = _context(checkpoint, layers, mode, tile, flips, gate_v, rcfg)
    ctx.options.update({k: v for k, v in (options or {}).items() if v is not None})
    out.mkdir(parents=True, exist_ok=True)
    key = {"method": method, "data": str(Path(data).resolve()), "split": split, "checkpoint": str(checkpoint),
           "threshold": thr, "pp": pcfg.to_dict(), "refine": rcfg.to_dict(), "gate": gate_v, "layers": layers,
           "mode": mode, "tile": tile, "flips": flips, "tols": tols, "n_bins": n_bins, "limit": limit,
           "options": {k: str(v) for k, v in sorted(ctx.options.items())}}
    state_path = out / ".eval_state.pkl"
    state = None
    if state_path.is_file():
        try:
            state = pickle.loads(state_path.read_bytes())
            if state.get("key") != key:
                state = None
        except Exception:  # noqa: BLE001 - a broken state file is simply ignored
            state = None
    if state is None:
        state = {"key": key, "scorer": MapScorer(n_bins, tols), "binary": BinaryScorer(tols), "rows": [],
                 "thumbs": [], "done": set(), "skipped": [], "seconds": []}
    elif state["done"]:
        log(f"resuming {method}: {len(state['done'])} images already scored in {out}")
    return _Job(method=method, spec=spec, ctx=ctx, thr=thr, source=source, pcfg=pcfg, gate=gate_v, out=out,
                state=state, state_path=state_path, fn=None)


def evaluate(*, method: str | None, data: Path | None, split: str = "test", checkpoint: Path | None = None,
             threshold=None, layers: str | None = None, mode: str = "whole", tile: int | None = None,
             flips: bool = False, tolerance: int = 2, out: Path | None = None, limit: int | None = None,
             gate: float | None = None, refine: dict | None = None, postprocess_cfg: dict | None = None,
             recipe_path: Path | None = None, n_bins: int = 100, n_overlays: int = 8, log=print,
             options: dict | None = None):
    """Score ``method`` (or a comma-separated list of methods, scored in one pass over the images; CAM methods
    then share one forward/backward per image) on ``data``/``split``.  Returns the summary dict (a list of them
    for several methods), also written to ``out/metrics.json`` (``out/<method>/metrics.json`` for several)."""
    recipe = read_recipe(checkpoint, recipe_path)
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
                 options=options)
            for m in methods]
    overlay_every = max(1, len(items) // max(1, n_overlays))
    for j in jobs:
        j.fn = j.spec.factory(j.ctx)
        log(f"crack-eval: {j.method} on {data} [{split}] — {len(items)} images, threshold {j.thr} ({j.source}), "
            f"post-processing {j.pcfg.to_dict()}, out {j.out}")
    from tqdm import tqdm

    from crackcam.tools.figures import overlay_row

    last_save = time.time()
    for i, it in enumerate(tqdm(items, desc=",".join(methods)[:40], unit="img", file=sys.stderr)):
        name = it.image.name
        todo = [j for j in jobs if name not in j.state["done"]]
        if not todo:
            continue
        try:
            img = read_image(it.image)
            gt = read_mask(it.mask, img.shape[:2])
        except BadInputError as exc:
            tqdm.write(f"skipped {exc}", file=sys.stderr)
            for j in todo:
                j.state["skipped"].append(str(exc))
                j.state["done"].add(name)
            continue
        for j in todo:
            st = j.state
            t0 = time.perf_counter()
            m, prob = j.fn(img)
            dt = time.perf_counter() - t0
            m = np.asarray(m, np.float32)
            st["scorer"].add(m, gt, name)
            res = postprocess(m, j.pcfg)
            row = st["binary"].add(res.mask, gt, name)
            row.update(prob=prob, threshold=res.threshold, seconds=dt)
            st["rows"].append(row)
            st["seconds"].append(dt)
            if i % overlay_every == 0 and len(st["thumbs"]) < n_overlays:
                st["thumbs"].append((name, overlay_row(img, m, res.mask, gt)))
            st["done"].add(name)
        if time.time() - last_save > 20:
            for j in jobs:
                _atomic_write(j.state_path, pickle.dumps(j.state))
            last_save = time.time()
    summaries = []
    for j in jobs:
        _atomic_write(j.state_path, pickle.dumps(j.state))
        if not j.state["rows"]:
            raise EvalError(f"{data}: no image could be scored")
        s = _summary(j.method, j.spec, j.ctx, data, split, j.thr, j.source, j.pcfg, j.gate, j.state, tols, recipe)
        if len(jobs) > 1:
            s["seconds_note"] = "CAM methods of one layer group share a forward pass: the first one carries its cost"
        _write_outputs(j.out, s, j.state, j.state["scorer"], tols, j.method)
        summaries.append(s)
    return summaries[0] if len(summaries) == 1 else summaries


def _safe(name: str) -> str:
    return name.replace("+", "pp").replace("/", "_")


def _summary(method, spec, ctx, data, split, thr, source, pcfg, gate_v, state, tols, recipe) -> dict:
    scorer, bins = state["scorer"], state["binary"]
    tmax = max(tols)
    s = {"method": method, "learned": spec.learned, "checkpoint": str(ctx.checkpoint) if ctx.checkpoint else None,
         "model": ctx.config.get("model") if spec.learned else None, "data": str(data), "split": split, "n_images": len(state["rows"]),
         "skipped": len(state["skipped"]), "threshold": thr, "threshold_source": source,
         "postprocess": pcfg.to_dict()}
    f0 = bins.figures(0)
    s.update({k: round(v, 4) for k, v in f0.items()})
    for t in tols:
        s[f"t{t}"] = {k: round(v, 4) for k, v in bins.figures(t).items()}
    s["ods"] = {f"t{t}": {k: round(v, 4) for k, v in scorer.ods(t).items()} for t in tols}
    s["ois"] = {f"t{t}": round(scorer.ois(t)["f1"], 4) for t in tols}
    s["ods_f1"] = s["ods"]["t0"]["f1"]
    s["ois_f1"] = s["ois"]["t0"]
    s[f"f1_t{tmax}"] = s[f"t{tmax}"]["f1"]
    s["seconds_per_image"] = round(float(np.mean(state["seconds"])), 4) if state["seconds"] else None
    if spec.needs_checkpoint:
        probs = [r["prob"] for r in state["rows"] if r.get("prob") is not None]
        s["gate"] = gate_v
        s["gated_images"] = int(sum(p < gate_v for p in probs)) if gate_v else 0
        s["mean_prob"] = round(float(np.mean(probs)), 4) if probs else None
        s["layers"] = ctx.layers
        s["mode"] = ctx.mode
        s["flips"] = ctx.flips
    if method.startswith("refine-"):
        s["refine"] = ctx.refine.to_dict()
    if recipe is not None:
        s["recipe_method"] = recipe.get("method")
    return s


def _write_outputs(out: Path, summary: dict, state: dict, scorer: MapScorer, tols, method: str) -> None:
    from crackcam.tools.figures import overlay_grid_png, pr_curve_png

    rows = state["rows"]
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
PP_GRID = {"min_area": (0, 20, 50, 100), "close_radius": (0, 1)}
THR_FACTORS = (0.6, 0.75, 0.9, 1.0, 1.1, 1.25, 1.45)
REFINE_GRID = ([{"cue": "blackhat", "mode": "product", "dilate": 16, "prior_power": 0.5}]
               + [{"cue": "blackhat", "mode": "component", "dilate": d, "component_threshold": tc, "prior_power": pw}
                  for d, tc, pw in ((16, 0.2, 1.0), (16, 0.3, 1.0), (16, 0.3, 0.5), (32, 0.3, 1.0))]
               + [{"cue": "bh+ridge", "mode": "component", "dilate": 16, "component_threshold": 0.3,
                   "prior_power": 1.0}])
GATE_GRID = (0.5, 0.0)


def _grid_search(maps, gts, base_thr: float) -> dict:
    """Best (threshold, postprocess) on F1 at t=0 over a small grid around ``base_thr`` (the raw-map ODS)."""
    thrs = sorted({round(min(0.99, max(0.01, base_thr * f)), 3) for f in THR_FACTORS})
    best = None
    for ma in PP_GRID["min_area"]:
        for cr in PP_GRID["close_radius"]:
            for t in thrs:
                cfg = PostProcessConfig(threshold=t, min_area=ma, close_radius=cr, skeleton=False)
                tot = None
                for m, g in zip(maps, gts):
                    c = binary_counts(postprocess(np.asarray(m, np.float32), cfg).mask, g, 0)
                    tot = c if tot is None else tot + c
                f = tot.figures()["f1"]
                if best is None or f > best["val_f1"]:
                    best = {"threshold": t, "postprocess": {"min_area": ma, "close_radius": cr, "open_radius": 0},
                            "val_f1": round(f, 4)}
    return best


def calibrate(*, checkpoint: Path | None, data: Path | None = None, methods: list[str] | None = None,
              layers: str | None = None, mode: str = "whole", tile: int | None = None, flips: bool = False,
              gate: float = 0.5, limit: int | None = None, top_k: int = 8, out: Path | None = None,
              gate_grid=GATE_GRID, log=print) -> dict:
    """Search methods × refinements × thresholds × post-processing on the VALIDATION split; write DIR/recipe.json.

    Without a checkpoint only the learning-free cues are calibrated and the recipe goes to ``out`` (default
    ``runs/eval/recipe_<data name>.json``; use it with ``crack-eval --method blackhat --recipe FILE``).
    """
    ctx = _context(checkpoint, layers, mode, tile, flips, gate, C.RefineConfig())
    if data is None:
        if not ctx.config.get("data"):
            raise EvalError("--data PATH is required")
        data = Path(ctx.config["data"])
    items = _list(data, "val", ctx.config, limit)
    cam_names = (methods or [n for n in M.cam_method_names()]) if checkpoint is not None else []
    cam_names = [n for n in cam_names if n in M.cam_method_names()]
    cues = [c for c in C.CUES]
    log(f"calibrate: {len(items)} validation images of {data}; CAM methods {cam_names}; cues {cues}")
    pred = M.CamPredictor(ctx, cam_names) if cam_names else None
    from tqdm import tqdm

    gts, cue_maps, cam_maps, probs = [], {c: [] for c in cues}, {n: [] for n in cam_names}, []
    t0 = time.perf_counter()
    for it in tqdm(items, desc="val maps", unit="img", file=sys.stderr):
        try:
            img = read_image(it.image)
            gt = read_mask(it.mask, img.shape[:2])
        except BadInputError as exc:
            tqdm.write(f"skipped {exc}", file=sys.stderr)
            continue
        gts.append(gt)
        bh, rd = C.blackhat(img), C.ridge(img)
        for c in cues:
            cm = bh if c == "blackhat" else rd if c == "ridge" else np.sqrt(bh * rd) if c == "bh+ridge" else C.cue(img, c)
            cue_maps[c].append(cm.astype(np.float16))
        if pred is not None:
            res = pred(img)
            p = None
            for n in cam_names:
                m, p = res[n]
                cam_maps[n].append(m.astype(np.float16))
            probs.append(p)
    sec = (time.perf_counter() - t0) / max(1, len(gts))
    if not gts:
        raise EvalError(f"{data}: no validation image could be read")

    def raw_ods(maps):
        s = MapScorer(100, (0,))
        for m, g in zip(maps, gts):
            s.add(np.asarray(m, np.float32), g)
        return s.ods(0)

    cands: dict[str, dict] = {}
    for c in cues:
        o = raw_ods(cue_maps[c])
        cands[c] = {"learned": False, "val_ods_f1": round(o["f1"], 4), "ods_threshold": o["threshold"],
                    "maps": cue_maps[c]}
    gates = (gate,) if gate_grid is None else tuple(gate_grid)
    for n in cam_names:
        best_c, best_r = None, None
        for gv in gates:
            gated = [np.zeros_like(m) if (gv > 0 and p is not None and p < gv) else m
                     for m, p in zip(cam_maps[n], probs)]
            o = raw_ods(gated)
            if best_c is None or o["f1"] > best_c["val_ods_f1"]:
                best_c = {"learned": True, "val_ods_f1": round(o["f1"], 4), "ods_threshold": o["threshold"],
                          "maps": gated, "gate": gv}
            for rc in REFINE_GRID:
                rcfg = C.RefineConfig(**rc)
                maps = [_refine_cached(cm, cue_maps[rcfg.cue][k], rcfg).astype(np.float16)
                        for k, cm in enumerate(gated)]
                o = raw_ods(maps)
                if best_r is None or o["f1"] > best_r["val_ods_f1"]:
                    best_r = {"learned": True, "val_ods_f1": round(o["f1"], 4), "ods_threshold": o["threshold"],
                              "maps": maps, "refine": rcfg.to_dict(), "gate": gv}
        cands[n] = best_c
        cands["refine-" + n] = best_r
        r = best_r["refine"]
        log(f"  {n}: raw ODS F1 {best_c['val_ods_f1']:.3f} (gate {best_c['gate']}); refine-{n}: "
            f"{best_r['val_ods_f1']:.3f} ({r['mode']}, {r['cue']}, dilate {r['dilate']}, gate {best_r['gate']})")
    # post-processing grid for the cues and the best top_k learned candidates (by raw ODS)
    learned = sorted((k for k, v in cands.items() if v["learned"]), key=lambda k: -cands[k]["val_ods_f1"])
    to_grid = list(cues) + learned[:top_k]
    for k in tqdm(to_grid, desc="threshold/post-processing grid", unit="method", file=sys.stderr):
        cands[k].update(_grid_search(cands[k]["maps"], gts, cands[k]["ods_threshold"]))
    for k, v in cands.items():
        v.pop("maps", None)
        if "threshold" not in v:  # not grid-searched: raw ODS threshold, no cleaning
            v.update(threshold=v["ods_threshold"], postprocess={"min_area": 0, "close_radius": 0, "open_radius": 0},
                     val_f1=v["val_ods_f1"])
        v["chosen_on"] = f"validation split of {data} ({len(gts)} images)"
        if v["learned"]:
            v["layers"] = ctx.layers
    best = max((k for k in cands if cands[k]["learned"]), key=lambda k: cands[k]["val_f1"], default=None)
    if best is None:
        best = max(cands, key=lambda k: cands[k]["val_f1"])
    recipe = {"method": best, **{k: v for k, v in cands[best].items()}, "val_images": len(gts),
              "val_seconds_per_image_all_maps": round(sec, 3), "mode": mode, "flips": flips,
              "selection": "best validation F1 (t=0, after post-processing) among learned methods",
              "candidates": cands}
    target = out or (checkpoint / RECIPE if checkpoint is not None else Path("runs") / "eval" / f"recipe_{data.name}.json")
    if target.is_dir():
        target = target / RECIPE
    _write_json(target, recipe)
    log("calibrate: validation F1 (t=0) by method: " + ", ".join(
        f"{k} {v['val_f1']:.3f}" for k, v in sorted(cands.items(), key=lambda kv: -kv[1]["val_f1"])))
    log(f"calibrate: recipe {best} threshold {recipe['threshold']} post-processing {recipe['postprocess']} "
        f"(val F1 {recipe['val_f1']:.3f}) → {target}")
    return recipe


def _refine_cached(cam: np.ndarray, cue_map: np.ndarray, rcfg: C.RefineConfig) -> np.ndarray:
    cam = np.asarray(cam, np.float32)
    return C.refine(np.zeros(cam.shape + (3,), np.uint8), cam, rcfg, cue_map=np.asarray(cue_map, np.float32))


# ----------------------------------------------------------------------------------------------- CLI
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


@app.callback(invoke_without_command=True)
def cli(ctx: typer.Context,
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="crack-train run folder"),
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
        calibrate_flag: bool = typer.Option(False, "--calibrate", help="run calibration (as `calibrate`) first"),
        list_methods: bool = typer.Option(False, "--list-methods", help="print the method names and exit")):
    """Score crack maps against pixel masks (see `crack-eval calibrate --help` for choosing the recipe)."""
    if ctx.invoked_subcommand is not None:
        return
    _threads()
    if list_methods:
        for n in _run(M.list_method_names):
            typer.echo(n)
        return
    if calibrate_flag:
        if checkpoint is None:
            typer.echo("crack-eval: --calibrate needs --checkpoint DIR", err=True)
            raise typer.Exit(2)
        _run(calibrate, checkpoint=checkpoint, data=data, layers=layers, mode=mode, tile=tile, flips=flips,
             gate=0.5 if gate is None else gate, gate_grid=GATE_GRID if gate is None else None)
    refine = {k: v for k, v in {"cue": cue, "mode": refine_mode, "dilate": dilate}.items() if v is not None}
    summary = _run(evaluate, method=method, data=data, split=split, checkpoint=checkpoint, threshold=threshold,
                   layers=layers, mode=mode, tile=tile, flips=flips, tolerance=tolerance, out=out, limit=limit,
                   gate=gate, refine=refine,
                   postprocess_cfg={"min_area": min_area, "close_radius": close_radius, "open_radius": open_radius},
                   recipe_path=recipe, options={"restoration_checkpoint": restoration_checkpoint})
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
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c",
                                                  help="crack-train run folder (none: calibrate the cues only)"),
        data: Optional[Path] = typer.Option(None, "--data", "-d", help="data folder (default: the training data)"),
        out: Optional[Path] = typer.Option(None, help="recipe file (default: DIR/recipe.json)"),
        methods: Optional[str] = typer.Option(None, help="comma-separated CAM methods (default: all)"),
        layers: Optional[str] = typer.Option(None, help="comma-separated target layers"),
        mode: str = typer.Option("whole", help="whole | sliding"),
        tile: Optional[int] = typer.Option(None),
        flips: bool = typer.Option(False, "--flips"),
        gate: Optional[float] = typer.Option(None, help="probability gate of the CAM (default: choose 0.5 or 0 "
                                                       "on validation images)"),
        limit: Optional[int] = typer.Option(None, help="use only the first N validation images")):
    """Choose method, refinement, threshold and post-processing on the VALIDATION split → DIR/recipe.json."""
    _threads()
    ms = [s.strip() for s in methods.split(",")] if methods else None
    r = _run(calibrate, checkpoint=checkpoint, data=data, methods=ms, layers=layers, mode=mode, tile=tile,
             flips=flips, gate=0.5 if gate is None else gate, gate_grid=GATE_GRID if gate is None else None,
             limit=limit, out=out)
    typer.echo(json.dumps({k: v for k, v in r.items() if k != "candidates"}))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
