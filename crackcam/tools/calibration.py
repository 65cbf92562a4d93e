"""``crack-eval calibrate``: choose the recipe on VALIDATION images, under a false-alarm budget.

The recipe is everything between the classifier and a crack mask: CAM method, per-tile gate, pixel-cue refinement,
threshold, post-processing, minimum crack length for a frame to count as cracked, and whether to use the region of
interest.  It is chosen on the validation split of the run's data sets only (the stems are written into the
recipe), through the very frame steps ``crack-run`` runs (:class:`crackcam.runtime.steps.FrameSteps`):

1. per validation frame and clean tile, the tile maps of every CAM method (one pass per tile batch);
2. per (method, gate, refinement, ROI use): frame maps → threshold-free pixel ODS per data set and the label-only
   tile-decision ODS; the best few by either go on (:func:`stage3_finalists`);
3. per (threshold around the ODS, min_area, closing): post-processed masks → pixel F1 (t=0, ``ignore/`` and
   out-of-ROI pixels skipped), and per minimum length the frame decisions → detection rate on crack frames,
   false-alarm rate on crack-free / sealed-only frames, share of clean tiles flagged;
4. the **objective**: the best mean pixel F1 over the data sets among candidates that keep clean tiles flagged
   ≤ ``budget`` (default 5 %), crack-free frames flagged ≤ ``frame_budget`` (20 %) and crack frames detected
   ≥ ``min_detection`` (90 %) — the constraints a set cannot measure (no crack-free tiles or frames) drop out; when
   no candidate meets them, the one with the fewest false alarms wins and the recipe says so.

Close-up sets (every image cracked) contribute pixel F1 only; PaveSeg contributes all figures.

With fewer masks (``--masks N``, ``--labels tiles``; issue 13) a data set without a masked image is scored from its
frames' tile labels instead (stage 2: the tile-decision ODS; stage 3: the estimated pixel F1, :data:`MASK_FREE`),
and one search can serve several mask budgets, each choosing among its own finalists and thresholds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from crackcam.runtime import cues as C
from crackcam.runtime.imageio import BadInputError, read_image, read_mask
from crackcam.runtime.postprocess import PostProcessConfig, postprocess, remove_wide, skeleton_length
from crackcam.runtime.steps import FrameSteps
from crackcam.runtime.survey import SurveyConfig, decide_frame, roi_mask, work_scale
from crackcam.tools import methods as M
from crackcam.tools.metrics import Counts, MapScorer, binary_counts
from crackcam.train.data import TileRule, scaled_mask, tile_labels

RECIPE = "recipe.json"
GATES = (0.0, 0.3, 0.5, 0.7, 0.85)
REFINE_GRID = ([None]
               + [{"cue": cue, "mode": "component", "dilate": d, "component_threshold": 0.3, "prior_power": pw}
                  for cue, d, pw in (("blackhat", 8, 1.0), ("blackhat", 16, 0.5), ("blackhat-fine", 8, 1.0))]
               + [{"cue": "blackhat", "mode": "product", "dilate": 16, "prior_power": 0.5}])
THR_STEPS = (-1.2, -0.6, 0.0, 0.6, 1.2)  # around each set's ODS threshold, in logit units (works for
#                                                 saturated probability maps as for cue maps)
N_BINS = 1000
PP_GRID = ((0, 0, 0.0), (50, 0, 0.0), (150, 0, 0.0), (50, 1, 0.0), (0, 0, 0.3), (50, 0, 0.3), (50, 0, 0.5))
#          (min_area, close_radius, hysteresis)
MIN_LENGTHS = (0, 25, 50, 100, 200, 400)
MAX_WIDTHS = (0.0, 12.0, 20.0, 32.0)  # px at frame size: components wider on average are not cracks (0 = off)
TOP_K = 4
LABELS = "labels"  # the rank every mask budget shares: tile-decision ODS from the frames' tile labels
CRACK_SHARES = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16)  # the mask-free pixel estimate's expected crack share of a
#                                                  crack tile (one of them is the objective: MASK_FREE below)
PROFILE_MIN_IMAGES = 10  # a data set gets its own camera profile only when scored on this many masked images
MASK_FREE: float | None = 0.04  # the objective of a data set with no masked image: None = tile-decision F1, else
#   the estimated pixel F1 at this crack share.  0.04 won `mask_budget.objective_study` on the validation split of
#   PaveSeg + DeepCrack (runs/sv5: mean validation pixel F1 of the mask-free choice 0.499, tile-decision F1 0.497;
#   with 1 mask, PaveSeg mask-free: 0.483 vs 0.438) — see the README, section 8


class CalibrationError(Exception):
    """One-line user error (exit code 2)."""


@dataclass
class _Item:
    set_name: str
    name: str
    tile: bool  # a clean tile (standalone image)
    label: str  # crack / sealed_crack_only / no_crack / clean_tile
    gt: np.ndarray | None
    valid_roi: np.ndarray | None  # valid pixels with the ROI
    valid_noroi: np.ndarray | None  # valid pixels without it
    res: dict = field(default_factory=dict)  # CamPredictor output
    size: tuple = ()  # (H, W) of the image
    tiles: "FrameTiles | None" = None  # the training rule's tile labels (frames with a mask)

    @property
    def has_gt(self) -> bool:
        return self.gt is not None


@dataclass
class _ItemMeta:
    """What the choice needs to know of a validation image once its maps are scored."""

    set_name: str
    tile: bool
    size: tuple
    has_gt: bool
    label: str = ""
    name: str = ""


def _cache_key(checkpoint: Path, roots, sv0, cams, gates, limit, quick, layers, selections=None) -> str:
    w = checkpoint / "best.pt"
    st = w.stat() if w.is_file() else None
    return json.dumps({"weights": [str(w), st.st_size if st else None, st.st_mtime_ns if st else None],
                       "config": (checkpoint / "config.json").read_text() if (checkpoint / "config.json").is_file()
                       else None, "roots": [str(Path(r).resolve()) for r in roots], "survey": sv0.to_dict(),
                       "cams": cams, "gates": list(gates), "limit": limit, "quick": quick, "layers": layers,
                       "grids": [REFINE_GRID, PP_GRID, THR_STEPS, MIN_LENGTHS, MAX_WIDTHS, TOP_K, list(C.CUES)],
                       "masks": selections, "version": 7}, sort_keys=True, default=str)


def _strip(c: dict) -> dict:
    return {k: v for k, v in c.items() if k != "maps"}


def _write_cache(path: Path, key: str, rows, stage2, best_per_method, meta_items, stems, sec) -> None:
    import os
    import pickle

    s2 = [_strip(c) for c in stage2]
    ids = {id(c): i for i, c in enumerate(stage2)}
    rows_ = [{**r, "cand": ids[id(r["cand"])]} for r in rows]
    bpm = {m: ids[id(c)] for m, c in best_per_method.items()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pickle.dumps({"key": key, "rows": rows_, "stage2": s2, "bpm": bpm, "items": meta_items,
                                  "stems": stems, "sec": sec}))
    os.replace(tmp, path)


def _covers(stored: str | None, key: str) -> bool:
    """A search made for several mask budgets serves any of them alone (each budget's rows are its own): the same
    settings, and every requested budget among the stored ones with the same masked images."""
    try:
        a, b = json.loads(stored), json.loads(key)
    except (TypeError, ValueError):
        return False
    ma, mb = a.pop("masks", None) or {}, b.pop("masks", None) or {}
    return a == b and bool(mb) and all(k in ma and ma[k] == v for k, v in json.loads(json.dumps(mb)).items())


def _read_cache(path: Path, key: str):
    import pickle

    if not path.is_file():
        return None
    try:
        d = pickle.loads(path.read_bytes())
    except Exception:  # noqa: BLE001 - a broken cache is simply ignored
        return None
    if d.get("key") != key and not _covers(d.get("key"), key):
        return None
    s2 = d["stage2"]
    rows = [{**r, "cand": s2[r["cand"]]} for r in d["rows"]]
    return rows, s2, {m: s2[i] for m, i in d["bpm"].items()}, d["items"], d["stems"], d["sec"]


def calibrate(*, checkpoint: Path, data=None, methods: list[str] | None = None, layers: str | None = None,
              mode: str = "tiles", tile: int | None = None, gate: float | None = None, budget: float = 0.05,
              frame_budget: float = 0.20, min_detection: float = 0.90, survey: dict | None = None,
              limit: int | None = None, out: Path | None = None, quick: bool = False, profile: bool = True,
              labels: str = "masks", masks: int | None = None, seed: int = 0, budgets: list | None = None,
              crack_share: float | None = None, log=print):
    """Search the recipe on the validation split(s); write ``checkpoint/recipe.json`` (or ``out``) and return it.
    ``quick``: a smaller grid (2 gates, 2 refinements, fewer post-processing settings) for the demo and tests.

    Labels: with every mask (default) the objective is pixel F1.  ``masks=N`` uses the masks of N validation crack
    frames only (seeded, spread over the data sets, the stems written in the recipe) and ``labels="tiles"`` none:
    a data set with no masked image is scored from the tile labels of its frames (the training tile rule gives
    each tile its crack / crack-free bit) by ``MASK_FREE``: the estimated pixel F1 at ``crack_share`` (default
    :data:`MASK_FREE`; 0 = the tile-decision F1: a crack tile must hold a crack pixel, a crack-free one none).  The
    frame labels and clean tiles (false-alarm budget) are labels, so they count with any budget.
    ``budgets``: several mask budgets (N, or None = all) searched in one pass over the maps; then ``out`` is a
    folder and one ``recipe_m<N>.json`` per budget is written, and a dict {N: recipe} returned."""
    from crackcam.models.checkpoint import read_config
    from crackcam.train.data import list_items, scored_pixels

    if checkpoint is None:
        raise CalibrationError("calibrate needs --checkpoint DIR (a crack-train run folder)")
    if labels not in ("masks", "tiles"):
        raise CalibrationError(f"--labels must be masks or tiles, not {labels!r}")
    if masks is not None and int(masks) < 0:
        raise CalibrationError(f"--masks must be 0 or more, not {masks}")
    checkpoint = Path(checkpoint)
    try:
        config = read_config(checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        raise CalibrationError(str(exc)) from None
    if str(config.get("model", "")).startswith("upcracknet"):
        if budgets is not None:
            raise CalibrationError("several mask budgets in one search are implemented for classifier runs")
        return calibrate_restoration(checkpoint=checkpoint, config=config, data=data, methods=methods, limit=limit,
                                     out=out, labels=labels, masks=masks, seed=seed, log=log)
    multi = budgets is not None
    budget_list = list(budgets) if multi else [0 if labels == "tiles" else masks]
    if not budget_list:
        raise CalibrationError("no mask budget given")
    roots = _roots(data, config)
    tc = config.get("train_config", {})
    ws = config.get("work_scale") or {}
    base = {"scale": float(ws.get("scale") or 1.0), "max_side": ws.get("max_side")}
    if mode == "tiles":
        t = int(tile or config.get("tile") or 128)
        base.update(tile=t, overlap=t // 4)
    elif mode == "whole":
        base.update(tile=None, overlap=0)
    else:
        raise CalibrationError(f"--mode must be tiles or whole, not {mode!r}")
    try:
        sv0 = SurveyConfig.from_dict(base).replace(**{k: v for k, v in (survey or {}).items() if v is not None})
    except ValueError as exc:
        raise CalibrationError(f"survey settings: {exc}") from None
    roi_choices = [True, False] if sv0.has_roi else [False]
    model, _ = M.MethodContext(checkpoint=checkpoint, config=config).classifier()
    segmenter = config.get("kind") == "segmenter"
    if segmenter:  # a distilled student: one map, no refinement (the map is the product)
        cams = ["segment"]
    elif methods:
        cams = [m for m in methods if m in M.cam_method_names()]
        if not cams:
            raise CalibrationError(f"no CAM method among {methods}; choose from {', '.join(M.cam_method_names())}")
    else:
        cams = ["cam", "gradcam"] if getattr(model, "pool_kind", "avg") == "topk" else \
            (["xgradcam", "gradcam++", "xgradcam-fusion", "gradcam++-fusion", "cam"] if not quick else
             ["xgradcam", "xgradcam-fusion"])
    gates = (GATES if not quick else (0.0, 0.5)) if gate is None else (float(gate),)
    refine_grid = (REFINE_GRID if not quick else REFINE_GRID[:2]) if not segmenter else [None]
    pp_grid = PP_GRID if not quick else PP_GRID[:2] + PP_GRID[5:6]
    top_k = TOP_K if not quick else 2
    max_widths = MAX_WIDTHS if not quick else MAX_WIDTHS[:2]
    rule = tile_rule_of(config)
    ctx = M.MethodContext(checkpoint=checkpoint, config=config,
                          layers=[s.strip() for s in layers.split(",")] if layers else None, survey=sv0.replace(gate=0.0))
    ctx._model = model
    groups: dict[bool, list[str]] = {}
    for m in cams:
        groups.setdefault(m.endswith("-fusion"), []).append(m)
    if segmenter:
        from .methods_student import SegPredictor

        preds = [SegPredictor(ctx)]
    else:
        preds = [M.CamPredictor(ctx, g) for g in groups.values()]

    # the validation images (their stems decide the mask choice, so they are listed before the search)
    stems: dict[str, list[str]] = {}
    all_items = []
    for root in roots:
        vi = list_items(root, "val", val_fraction=float(tc.get("val_fraction", 0.2)),
                        split_seed=int(tc.get("split_seed", 0)))
        vi = [it for it in vi if it.mask is not None or it.is_tile]
        if limit:
            vi = vi[:limit]
        if not vi:
            raise CalibrationError(f"{root}: no validation images with masks")
        stems[root.name] = [it.image.name for it in vi]
        all_items += [(root, it) for it in vi]
    maskable = [(root.name, it.image.name) for root, it in all_items
                if not it.is_tile and (it.image_label in (None, "crack"))]
    selections = {_budget_key(b): mask_choice(maskable, b, seed) for b in budget_list}

    key = _cache_key(checkpoint, roots, sv0, cams, gates, limit, quick, ctx.layers, selections)
    cache = checkpoint / ".calibration_cache.pkl"
    cached = _read_cache(cache, key)
    if cached is not None:
        log(f"calibrate: reusing the validation search of an earlier run ({cache}); delete it to search again")
        rows, stage2, best_per_method, meta_items, stems, sec = cached
    else:
        # ---- 1. tile maps of every validation frame / clean tile
        items: list[_Item] = []
        t0 = time.perf_counter()
        from crackcam.runtime.progress import progress

        log(f"calibrate: {len(all_items)} validation images of {', '.join(str(r) for r in roots)} "
            f"({sum(it.is_tile for _, it in all_items)} clean tiles); CAM methods {cams}; gates {list(gates)}; "
            f"survey {sv0.to_dict()}; mask budgets "
            + ", ".join(f"{k} ({len(v)} masked)" for k, v in selections.items()))
        for root, it in progress(all_items, desc="calibrate: validation maps", unit="img", every=25):
            try:
                img = read_image(it.image)
                gt = None if it.is_tile else read_mask(it.mask, img.shape[:2])
                v_roi = None if it.is_tile else scored_pixels(it, img.shape[:2], sv0)
                v_no = None if it.is_tile else scored_pixels(it, img.shape[:2], _no_roi(sv0))
            except BadInputError as exc:
                log(f"skipped {exc}")
                continue
            res = {}
            for p in preds:
                r = p(img)
                res.setdefault("plan", r["plan"])
                res.setdefault("bgr", r["bgr"])
                res.setdefault("probs", r["probs"])
                res.setdefault("maps", {}).update({k: [m.astype(np.float16) for m in v] for k, v in r["maps"].items()})
            res["cues"] = {c: C.cue(img, c).astype(np.float16) for c in C.CUES}
            label = it.image_label or ("clean_tile" if it.is_tile else ("crack" if gt is not None and gt.any()
                                                                         else "no_crack"))
            tl = None if gt is None else frame_tiles(gt, rule, work_scale(*img.shape[:2], sv0.scale, sv0.max_side),
                                                     roi_mask(img.shape[:2], sv0))
            items.append(_Item(root.name, it.image.name, it.is_tile, label, gt, v_roi, v_no, res, tuple(img.shape[:2]),
                               tl))
        sec = (time.perf_counter() - t0) / max(1, len(items))
        if not any(x.gt is not None and x.gt.any() for x in items):
            raise CalibrationError("no validation image with a crack could be read")
        sets = sorted({x.set_name for x in items})
        gt_pos = _gt_positions(items)
        views = {bk: _BudgetView(items, gt_pos, sel) for bk, sel in selections.items()}

        # ---- 2. frame maps per (method, gate, refinement, ROI use) → threshold-free ODS per set and budget
        stage2 = []
        combos = [(m, g, r, u) for m in cams for g in gates for r in refine_grid for u in roi_choices]

        def score2(get_map, use_roi):
            """{budget or LABELS: {ods, ods_mean, thr_by_set, tile_thr_by_set}} of one candidate's frame maps."""
            scorers = {s: MapScorer(N_BINS, (0,)) for s in sets}
            tstats = {}
            maps = []
            for i, x in enumerate(items):
                fm = get_map(x)
                maps.append(fm.astype(np.float16))
                if x.gt is not None:
                    scorers[x.set_name].add(fm, x.gt, x.name, x.valid_roi if use_roi else x.valid_noroi)
                    tstats[i] = tile_rcum(tile_max(fm, x.tiles), x.tiles, use_roi, N_BINS)
            # the tile-decision ODS threshold of every frame of a set: labels only, so every budget's threshold
            # grid also spans it (a finer grid than around the pixel ODS alone)
            tile_thr, tile_f1 = {}, {}
            for s in sets:
                st = [tstats[i] for i in tstats if items[i].set_name == s]
                if st:
                    tile_f1[s], tile_thr[s] = tile_ods(st, N_BINS)
            out_ = {}
            for bk, v in views.items():
                ods, thr = {}, {}
                for s in sets:
                    if v.masked_local[s]:
                        o = scorers[s].ods(0, v.masked_local[s])
                        ods[s], thr[s] = o["f1"], o["threshold"]
                    elif v.unmasked[s]:
                        f, t_ = tile_ods([tstats[i] for i in v.unmasked[s]], N_BINS)
                        ods[s], thr[s] = f, t_
                out_[bk] = {"ods": {s: round(f, 4) for s, f in ods.items()},
                            "ods_mean": round(float(np.mean(list(ods.values()))), 4), "thr_by_set": thr,
                            "tile_thr_by_set": tile_thr}
            # the label-only rank (tile-decision ODS of every frame): the same for every budget, which all rank by it
            out_[LABELS] = {"ods": {s: round(f, 4) for s, f in tile_f1.items()},
                            "ods_mean": round(float(np.mean(list(tile_f1.values()))), 4) if tile_f1 else 0.0,
                            "thr_by_set": tile_thr, "tile_thr_by_set": tile_thr}
            return maps, out_

        def entry(maps, by, **kw):
            p = by[next(iter(by))]
            return {**kw, "ods": p["ods"], "ods_mean": p["ods_mean"], "thr_by_set": p["thr_by_set"],
                    "by_budget": by, "maps": maps}

        for m, g, r, use_roi in progress(combos, desc="calibrate: gates x refinements", unit="combo", every=10):
            sv = sv0.replace(gate=g) if use_roi else _no_roi(sv0.replace(gate=g))
            steps = FrameSteps(sv, C.RefineConfig(**r) if r else None, PostProcessConfig(skeleton=False))

            def fmap(x, steps=steps, m=m):
                return steps.frame_map(x.res["bgr"], x.res["plan"], x.res["probs"],
                                       [mm.astype(np.float32) for mm in x.res["maps"][m]])[0]
            maps, by = score2(fmap, use_roi)
            stage2.append(entry(maps, by, method=m, gate=g, refine=r, roi=use_roi, survey=sv))
            # keep memory flat: only the best few per method and budget keep their maps
            mine = [c for c in stage2 if c["method"] == m]
            keep = set()
            for bk in [*views, LABELS]:
                keep |= {id(c) for c in _ranked(mine, bk, sets, top_k)}
            for c in mine:
                if id(c) not in keep:
                    c["maps"] = None
        for cname in C.CUES:  # the learning-free floor, calibrated alike (reported, never chosen)
            for use_roi in roi_choices:
                sv = sv0.replace(gate=0.0) if use_roi else _no_roi(sv0.replace(gate=0.0))

                def cmap(x, sv=sv, cname=cname):
                    fm = x.res["cues"][cname].astype(np.float32)
                    roi = roi_mask(fm.shape, sv)
                    return fm * roi if roi is not None else fm
                maps, by = score2(cmap, use_roi)
                stage2.append(entry(maps, by, method=cname, learned=False, gate=0.0, refine=None, roi=use_roi,
                                    survey=sv))
        best_per_method = {}
        for c in stage2:
            if c["method"] not in best_per_method or c["ods_mean"] > best_per_method[c["method"]]["ods_mean"]:
                best_per_method[c["method"]] = c
        with_maps = [c for c in stage2 if c["maps"] is not None and c.get("learned", True)]
        first = next(iter(views))
        floors = [max((c for c in stage2 if c["method"] == n), key=lambda c: c["by_budget"][first]["ods_mean"])
                  for n in C.CUES]
        finalists, thr_of = stage3_finalists(with_maps, list(views), sets, top_k, floors)
        log("calibrate: best threshold-free ODS per method: " + ", ".join(
            f"{m} {c['ods_mean']:.3f} (gate {c['gate']}, refine {'-' if not c['refine'] else c['refine']['mode']})"
            for m, c in best_per_method.items()))

        # ---- 3. thresholds x post-processing x min length → per-image counts (pixels, tiles) and frame figures
        # each budget chooses among its own finalists and thresholds only (what a search for it alone tries)
        jobs = [(ci, t, [bk for bk, v in thr_of.items() if t in v.get(id(c), ())])
                for ci, c in enumerate(finalists)
                for t in sorted(set().union(*(v.get(id(c), set()) for v in thr_of.values())))]
        global _S3
        _S3 = {"items": items, "finalists": finalists, "gt_pos": gt_pos, "pp_grid": pp_grid,
               "max_widths": max_widths}
        rows = []
        workers = _workers(len(jobs) * len(pp_grid) * len(items))
        log(f"calibrate: {len(finalists)} finalists, {len(jobs)} (finalist, threshold) pairs x {len(pp_grid)} "
            f"post-processing settings on {workers} process(es)")
        try:
            if workers > 1:
                import multiprocessing as mp

                with mp.get_context("fork").Pool(workers) as pool:
                    done = pool.imap(_stage3_job, jobs)
                    for part in progress(done, total=len(jobs), desc="calibrate: thresholds x post-processing",
                                         unit="thr", every=10):
                        rows += part
            else:
                for job in progress(jobs, desc="calibrate: thresholds x post-processing", unit="thr", every=10):
                    rows += _stage3_job(job)
        finally:
            _S3 = None
        for r in rows:
            r["cand"] = finalists[r["cand"]]
        meta_items = [_ItemMeta(x.set_name, x.tile, x.size, x.gt is not None, x.label, x.name) for x in items]
        _write_cache(cache, key, rows, stage2, best_per_method, meta_items, stems, sec)
    items = meta_items
    gt_pos = _gt_positions(items)
    n_frames = sum(not x.tile for x in items)
    n_tiles = sum(x.tile for x in items)
    n_crack = _n_crack(items)
    recipes = {}
    share = MASK_FREE if crack_share is None else (None if crack_share == 0 else float(crack_share))
    for bk, sel in selections.items():
        view = _BudgetView(items, gt_pos, sel, share)
        all_rows, vrows = _budget_rows(rows, view, bk)
        best, met, level = _choose(vrows, budget, frame_budget, min_detection, n_crack or None)
        c = best["cand"]
        chosen_on = (f"validation split of {', '.join(r.name for r in roots)} ({n_frames} frames, {n_tiles} clean "
                     f"tiles; {len(sel)} masked)")
        recipe = {**_entry(best), "layers": ctx.layers,
                  "budget": {"clean_tiles": budget, "false_alarm_frames": frame_budget,
                             "min_detection": min_detection, "met": met},
                  "objective": view.objective_text(rule) + " subject to the false-alarm budget; " + level,
                  "chosen_on": chosen_on, "masks_used": len(sel), "labels": "tiles" if not sel else "masks",
                  "mask_images": "all" if len(sel) == len(maskable) else sorted(f"{s}/{n}" for s, n in sel),
                  "mask_seed": seed, "tile_rule": rule.as_dict(),
                  "mask_free_objective": "tile-decision F1" if share is None else {"estimated pixel F1, crack share":
                                                                                  share},
                  "val_images": stems, "val_seconds_per_image_all_maps": round(sec, 3),
                  "selection": "crack-eval calibrate (crackcam.tools.calibration)"}
        # a camera profile is tuned on one data set alone: only from pixel F1 on enough masked images (mask-free
        # or few-mask profiles overfit their objective — README section 8)
        prof_sets = view.profile_sets()
        profiles = _profiles(items, vrows, best, budget, frame_budget, min_detection, prof_sets) if profile else {}
        if profiles:
            recipe["profiles"] = profiles
            recipe["profiles_note"] = ("per camera (frame size): the settings chosen on that data set's own "
                                       "validation frames; frames of any other size use the top-level settings")
        if profile and set(view.sets) - prof_sets:
            recipe["profiles_skipped"] = (f"no camera profile for {', '.join(sorted(set(view.sets) - prof_sets))}: "
                                          f"fewer than {PROFILE_MIN_IMAGES} masked validation images")
        recipe["candidates"] = _candidates(all_rows, stage2, budget, frame_budget, min_detection)
        recipe["threshold_free"] = [{**{k: c_[k] for k in ("method", "gate", "refine", "roi")},
                                     "ods": c_["by_budget"][bk]["ods"], "ods_mean": c_["by_budget"][bk]["ods_mean"]}
                                    for c_ in stage2]
        if multi:
            target = Path(out or checkpoint / "mask_budget") / f"recipe_m{bk}.json"
        else:
            target = Path(out) if out else checkpoint / RECIPE
            if target.is_dir():
                target = target / RECIPE
        _write(target, recipe)
        log(f"calibrate [{bk} masks]: {recipe['method']} gate {c['gate']} threshold {best['threshold']} "
            f"post-processing {recipe['postprocess']} min length {best['min_length']} ROI {'on' if c['roi'] else 'off'}"
            f" — val {view.kind_text()} {best['f1']}, clean tiles flagged {best['clean_rate']}, crack-free frames "
            f"flagged {best['frame_fa']}, crack frames detected {best['detection']} ({level}) → {target}")
        for size, e in profiles.items():
            log(f"calibrate: profile {size} ({e['chosen_on']}): {e['method']} threshold {e['threshold']} "
                f"post-processing {e['postprocess']} refine {e['refine']} — val {e['val']}")
        recipes[bk] = recipe
    return recipes if multi else recipes[next(iter(recipes))]


def _ranked(cands: list[dict], rank: str, sets: list[str], top_k: int) -> list[dict]:
    """The best ``top_k`` of ``cands`` by ``rank``'s threshold-free score, then the best ``max(1, top_k // 2)`` of
    each data set alone (candidates for its camera profile), without repeats."""
    out = sorted(cands, key=lambda c: -c["by_budget"][rank]["ods_mean"])[:top_k]
    for s_ in sets:
        for c in sorted(cands, key=lambda c: -c["by_budget"][rank]["ods"].get(s_, 0.0))[:max(1, top_k // 2)]:
            if all(c is not d for d in out):
                out.append(c)
    return out


def stage3_finalists(cands: list[dict], budgets: list[str], sets: list[str], top_k: int = TOP_K,
                     floors: list[dict] = ()) -> tuple[list[dict], dict[str, dict[int, set]]]:
    """The candidates (stage-2 entries with ``by_budget``) stage 3 thresholds, and each budget's thresholds per
    candidate ({budget: {id(candidate): thresholds}}).  A budget takes the best ``top_k`` by its own threshold-free
    score (pixel ODS on its masks) and the best few of each data set alone (candidates for its camera profile),
    and the same from the label-only rank :data:`LABELS` every budget has (few masks, and a threshold-free pixel
    ODS misses candidates that win once thresholded: README, section 0).  Thresholds: around each set's ODS
    threshold and its tile-decision ODS threshold.  ``floors`` (the learning-free cues, reported, never chosen) go
    to the first budget."""
    finalists: list[dict] = []
    thr_of: dict[str, dict[int, set]] = {bk: {} for bk in budgets}
    by_labels = _ranked(cands, LABELS, sets, top_k)  # the same for every budget
    for bk in budgets:
        mine = _ranked(cands, bk, sets, top_k)
        mine += [c for c in by_labels if all(c is not d for d in mine)]
        if bk == budgets[0]:
            mine += [c for c in floors if all(c is not d for d in mine)]
        for c in mine:
            if all(c is not d for d in finalists):
                finalists.append(c)
            centres = set(c["by_budget"][bk]["thr_by_set"].values()) | \
                set(c["by_budget"][bk].get("tile_thr_by_set", {}).values())
            thr_of[bk].setdefault(id(c), set()).update(_shift(t, d) for t in centres for d in THR_STEPS)
    return finalists, thr_of


_S3: dict | None = None  # stage 3's inputs, read by the (forked) workers


def _workers(n_evals: int) -> int:
    """Stage-3 processes: CRACKCAM_CALIBRATE_WORKERS, else every core for a large search (fork keeps the maps
    shared), one for a small one."""
    import os

    env = os.environ.get("CRACKCAM_CALIBRATE_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise CalibrationError(f"CRACKCAM_CALIBRATE_WORKERS={env!r} is not a number") from None
    if n_evals < 20000 or not hasattr(os, "fork"):
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _stage3_job(job) -> list[dict]:
    """The rows of one (finalist, threshold): every post-processing setting, maximum width and minimum length,
    with the per-image pixel / tile counts a mask budget scores them by ("cand" is the finalist's index)."""
    ci, t, mine = job
    S = _S3
    items, c, gt_pos = S["items"], S["finalists"][ci], S["gt_pos"]
    max_widths = S["max_widths"]
    rows = []
    for ma, cr, hy in S["pp_grid"]:
        cfg = PostProcessConfig(threshold=t, min_area=ma, close_radius=cr, hysteresis=hy, skeleton=True)
        pix = {w: np.zeros((len(gt_pos), 3), np.int64) for w in max_widths}  # pred, tp, gt
        til = {w: np.zeros((len(gt_pos), 3), np.int64) for w in max_widths}  # tp, fp, fn tiles
        shr = {w: np.zeros((len(gt_pos), len(CRACK_SHARES), 3)) for w in max_widths}  # per share ρ
        lengths: dict = {w: [] for w in max_widths}
        for i, (x, fm) in enumerate(zip(items, c["maps"])):
            pr = postprocess(np.asarray(fm, np.float32), cfg)
            v = (x.valid_roi if c["roi"] else x.valid_noroi) if x.gt is not None else None
            for w in max_widths:
                mk, sk = pr.mask, pr.skeleton
                if w > 0 and mk.any():
                    mk, sk, _ = remove_wide(mk, w, sk)
                if x.gt is not None:
                    k = binary_counts(mk, x.gt, 0, v)
                    pix[w][gt_pos[i]] = (k.pred, k.tp_p, k.gt)
                    tpx = tile_pixels(mk, x.tiles)
                    til[w][gt_pos[i]] = tile_counts(tpx > 0, x.tiles, c["roi"])
                    shr[w][gt_pos[i]] = share_counts(tpx, x.tiles, c["roi"])
                ln = pr.measures.get("length_px", 0.0) if sk is pr.skeleton else skeleton_length(sk)
                lengths[w].append((float(ln), bool(mk.any())))
        for w in max_widths:
            length_arr = np.array([ln for ln, _ in lengths[w]], np.float32)
            for ml in MIN_LENGTHS:
                rows.append({"cand": ci, "threshold": t, "min_area": ma, "close_radius": cr, "hysteresis": hy,
                             "max_width": w, "min_length": ml, "pix": pix[w], "tiles": til[w], "share": shr[w],
                             "length_px": length_arr, "budgets": mine,
                             **_frame_figures(items, lengths[w], ml, c["survey"]),
                             "per_set": _frame_figures_per_set(items, lengths[w], ml, c["survey"])})
    return rows


# ------------------------------------------------------------------------------- labels without masks (issue 13)
def tile_rule_of(config: dict) -> TileRule:
    """The run's training tile rule (tile size, crack pixels needed, border, margin; no overlap)."""
    tc = config.get("train_config", {})
    return TileRule(tile=int(tc.get("tile") or config.get("tile") or 128),
                    min_crack_px=int(tc.get("min_crack_px", TileRule.min_crack_px)),
                    border=int(tc.get("border", TileRule.border)), margin=int(tc.get("margin", TileRule.margin)))


@dataclass
class FrameTiles:
    """The training rule's tiles of one validation frame, in frame pixels: origins, side, label (1 crack,
    0 crack-free; dropped tiles left out) and whether the tile's centre lies in the ROI (the tiles that count when
    the ROI is used)."""

    ys: np.ndarray
    xs: np.ndarray
    size: int
    labels: np.ndarray
    in_roi: np.ndarray

    def use(self, roi: bool) -> np.ndarray:
        return self.in_roi if roi else np.ones(len(self.ys), bool)


def frame_tiles(gt: np.ndarray, rule: TileRule, scale: float, roi: np.ndarray | None = None) -> FrameTiles:
    """One bit per tile of a frame, as training derives it: the tile rule on the mask at work scale ``scale``,
    tiles mapped back to frame pixels.  A user without masks has these bits (or the frame's crack-free label)."""
    origins, lab = tile_labels(scaled_mask(gt, scale), rule)
    keep = lab >= 0
    o = np.asarray(origins, np.int64).reshape(-1, 2)[keep]
    size = max(1, int(round(rule.tile / scale)))
    ys = np.round(o[:, 0] / scale).astype(np.int64)
    xs = np.round(o[:, 1] / scale).astype(np.int64)
    h, w = gt.shape[:2]
    if roi is None:
        in_roi = np.ones(len(ys), bool)
    else:
        in_roi = np.asarray(roi, bool)[np.clip(ys + size // 2, 0, h - 1), np.clip(xs + size // 2, 0, w - 1)]
    return FrameTiles(ys, xs, size, lab[keep].astype(np.int8), in_roi)


def _boxes(t: FrameTiles, shape):
    h, w = shape[:2]
    return (np.clip(t.ys, 0, h), np.clip(t.ys + t.size, 0, h), np.clip(t.xs, 0, w), np.clip(t.xs + t.size, 0, w))


def tile_pixels(mask: np.ndarray, t: FrameTiles) -> np.ndarray:
    """Per tile: how many pixels of ``mask`` lie inside it (summed-area table, one lookup per tile)."""
    if not len(t.ys):
        return np.zeros(0, np.int64)
    ii = cv2.integral(np.asarray(mask, np.uint8)).astype(np.int64)
    y0, y1, x0, x1 = _boxes(t, mask.shape)
    return ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]


def tile_hits(mask: np.ndarray, t: FrameTiles) -> np.ndarray:
    """Per tile: does ``mask`` hold a pixel inside it."""
    return tile_pixels(mask, t) > 0


def share_counts(px: np.ndarray, t: FrameTiles, roi: bool, shares=CRACK_SHARES) -> np.ndarray:
    """The mask-free pixel estimate, per expected crack share ρ of a crack tile (rows: ρ; columns TP, FP, FN
    pixels): a crack tile is taken to hold ρ·tile² crack pixels, so its first ρ·tile² predicted pixels count as
    hits, any beyond as false, any short of it as missed; every predicted pixel in a crack-free tile is false."""
    u = t.use(roi)
    pos, neg = px[(t.labels == 1) & u].astype(np.float64), px[(t.labels == 0) & u].astype(np.float64)
    out = np.zeros((len(shares), 3), np.float64)
    for k, rho in enumerate(shares):
        e = rho * t.size * t.size
        out[k] = (np.minimum(pos, e).sum(), neg.sum() + np.maximum(0.0, pos - e).sum(), np.maximum(0.0, e - pos).sum())
    return out


def tile_max(m: np.ndarray, t: FrameTiles) -> np.ndarray:
    """Per tile: the largest map value inside it (0 for a tile outside the map)."""
    y0, y1, x0, x1 = _boxes(t, m.shape)
    return np.array([float(m[a:b, c:d].max()) if b > a and d > c else 0.0 for a, b, c, d in zip(y0, y1, x0, x1)],
                    np.float32)


def tile_counts(hits: np.ndarray, t: FrameTiles, roi: bool) -> tuple[int, int, int]:
    """(TP, FP, FN) tiles: a crack tile with a predicted pixel, a crack-free one with one, a crack tile without."""
    u = t.use(roi)
    pos, neg = (t.labels == 1) & u, (t.labels == 0) & u
    return int((hits & pos).sum()), int((hits & neg).sum()), int((~hits & pos).sum())


def tile_rcum(maxima: np.ndarray, t: FrameTiles, roi: bool, n_bins: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Crack tiles and crack-free tiles whose maximum reaches each threshold k / n_bins, and the crack-tile count."""
    u = t.use(roi)

    def rc(v):
        b = np.floor(np.clip(v, 0, 1) * n_bins + 1e-6).astype(np.int64)
        return np.cumsum(np.bincount(b, minlength=n_bins + 1)[::-1])[::-1][1:]
    pos = maxima[(t.labels == 1) & u]
    return rc(pos), rc(maxima[(t.labels == 0) & u]), int(len(pos))


def tile_ods(stats: list, n_bins: int) -> tuple[float, float]:
    """Best tile-decision F1 over the threshold sweep of ``tile_rcum`` results, and its threshold."""
    tp = np.sum([s[0] for s in stats], axis=0)
    fp = np.sum([s[1] for s in stats], axis=0)
    npos = sum(s[2] for s in stats)
    f1 = 2 * tp / np.maximum(1, 2 * tp + fp + (npos - tp))
    i = int(np.argmax(f1))
    return float(f1[i]), float((i + 1) / n_bins)


def _budget_key(b) -> str:
    return "all" if b is None else str(int(b))


def mask_choice(maskable: list[tuple[str, str]], n: int | None, seed: int = 0) -> list[tuple[str, str]]:
    """The (set, image) pairs whose masks a budget of ``n`` masked images uses (None = all): taken from the data
    sets in turn (sorted by name), each set's crack frames in a seeded order — reproducible for one seed."""
    if n is None or n >= len(maskable):
        return list(maskable)
    by: dict[str, list] = {}
    for s, name in maskable:
        by.setdefault(s, []).append(name)
    rng = np.random.default_rng(seed)
    order = {s: [sorted(v)[j] for j in rng.permutation(len(v))] for s, v in sorted(by.items())}
    out: list[tuple[str, str]] = []
    while len(out) < n:
        for s in sorted(order):
            if order[s] and len(out) < n:
                out.append((s, order[s].pop(0)))
    return sorted(out)


class _BudgetView:
    """Which validation images a mask budget scores on their masks (pixel F1) and which on their tile labels."""

    def __init__(self, items, gt_pos: dict, selected, proxy: float | None = None):
        if proxy is not None and proxy not in CRACK_SHARES:
            raise CalibrationError(f"--crack-share must be one of {', '.join(map(str, CRACK_SHARES))}, not {proxy}")
        self.proxy = proxy
        sel = set(map(tuple, selected))
        self.sets = sorted({x.set_name for x in items})
        # a crack-free / sealed-only frame's crack mask is empty by its label: no mask needs drawing, so it counts
        # in the pixel F1 of every set that has a masked image at all
        has = {x.set_name for x in items if (x.set_name, x.name) in sel}
        self.masked = {s: [] for s in self.sets}  # positions in the per-image count arrays
        self.masked_local = {s: [] for s in self.sets}  # positions among the set's masked images (MapScorer order)
        self.unmasked = {s: [] for s in self.sets}  # item indices (stage 2) ...
        self.unmasked_pos = {s: [] for s in self.sets}  # ... and their count-array positions (stage 3)
        local = {s: 0 for s in self.sets}
        for i, x in enumerate(items):
            if i not in gt_pos:
                continue
            s = x.set_name
            if (s, x.name) in sel or (s in has and x.label != "crack"):
                self.masked[s].append(gt_pos[i])
                self.masked_local[s].append(local[s])
            else:
                self.unmasked[s].append(i)
                self.unmasked_pos[s].append(gt_pos[i])
            local[s] += 1

    def profile_sets(self) -> set:
        """The data sets that may get a camera profile: scored on pixel F1 of >= PROFILE_MIN_IMAGES images."""
        return {s for s in self.sets if len(self.masked[s]) >= PROFILE_MIN_IMAGES}

    def set_kind(self, s: str) -> str:
        return "pixel" if self.masked[s] else "tile"

    def row(self, r: dict) -> dict:
        """``r`` with "f1" (per set: pixel F1 on its masked images, else the tile-decision F1), "f1_mean" and
        "f1_kind"."""
        f1, kind = {}, {}
        for s in self.sets:
            if self.masked[s]:
                p, tp, g = r["pix"][self.masked[s]].sum(axis=0)
                if g <= 0:
                    continue
                f1[s] = float(prf_f1(p, tp, g))
                kind[s] = "pixel"
            elif self.unmasked_pos[s]:
                if self.proxy is None:
                    tp, fp, fn = r["tiles"][self.unmasked_pos[s]].sum(axis=0)
                else:
                    tp, fp, fn = r["share"][self.unmasked_pos[s], CRACK_SHARES.index(self.proxy)].sum(axis=0)
                if tp + fn <= 0:
                    continue
                f1[s] = 2 * tp / max(1, 2 * tp + fp + fn)
                kind[s] = "tile" if self.proxy is None else "share"
        f1 = {s: round(float(v), 4) for s, v in f1.items()}
        return {**r, "f1": f1, "f1_kind": kind, "f1_mean": round(float(np.mean(list(f1.values()))), 4) if f1 else 0.0}

    def kind_text(self) -> str:
        free = "tile" if self.proxy is None else "estimated pixel"
        return "F1 (" + ", ".join(f"{s}: {'pixel' if self.masked[s] else free}" for s in self.sets) + ")"

    def objective_text(self, rule: TileRule) -> str:
        parts = []
        for s in self.sets:
            if self.masked[s]:
                parts.append(f"{s}: pixel F1 (t=0) on {len(self.masked[s])} masked validation images")
            elif self.proxy is None:
                parts.append(f"{s}: tile-decision F1 on its {len(self.unmasked[s])} validation frames (no mask: "
                             f"a crack tile must hold a predicted pixel, a crack-free tile none; training tile rule, "
                             f"{rule.tile} px at work scale)")
            else:
                parts.append(f"{s}: estimated pixel F1 on its {len(self.unmasked[s])} validation frames from their "
                             f"tile labels alone (training tile rule, {rule.tile} px at work scale): a crack tile is "
                             f"taken to hold {self.proxy:g} x its area of crack, every predicted pixel in a "
                             f"crack-free tile is false")
        return "best mean over the data sets of " + "; ".join(parts)


def prf_f1(pred, tp, gt) -> float:
    """Pixel F1 from summed counts (t = 0)."""
    from crackcam.tools.metrics import prf

    return float(prf(pred, tp, gt, tp)["f1"])


def _gt_positions(items) -> dict[int, int]:
    """Item index → its row in the per-image count arrays (the images with a mask, in item order)."""
    return {i: k for k, i in enumerate(i for i, x in enumerate(items) if x.has_gt)}


def _budget_rows(rows: list[dict], view: "_BudgetView", bk: str) -> tuple[list[dict], list[dict]]:
    """The rows mask budget ``bk`` chooses among (its own finalists and thresholds), scored by ``view``: every one
    (the learning-free floors too, for the record) and the learned ones (the choice)."""
    all_rows = [view.row(r) for r in rows if bk in r["budgets"]]
    return all_rows, [r for r in all_rows if r["cand"].get("learned", True)]


def _n_crack(items) -> int | None:
    """Crack frames of the smallest data set that has crack-free frames (its detection rate's unit)."""
    return min((sum(1 for x in items if x.set_name == s_ and x.has_gt and not x.tile and x.label == "crack")
                for s_ in {x.set_name for x in items if x.label != "crack" and not x.tile}), default=None)


def read_search(checkpoint: Path) -> dict:
    """The cached validation search of ``checkpoint`` (rows with their candidates, image list, mask choices) —
    for studies of the objective (:func:`crackcam.tools.mask_budget.objective_study`)."""
    import pickle

    path = Path(checkpoint) / ".calibration_cache.pkl"
    if not path.is_file():
        raise CalibrationError(f"{path}: no cached search (run crack-eval calibrate / mask-budget first)")
    d = pickle.loads(path.read_bytes())
    s2 = d["stage2"]
    items = d["items"]
    return {"rows": [{**r, "cand": s2[r["cand"]]} for r in d["rows"]], "items": items,
            "selections": json.loads(d["key"]).get("masks") or {},
            "gt_pos": _gt_positions(items)}


def _entry(r: dict) -> dict:
    """The recipe entry (method, threshold, post-processing, gate, refinement, survey, validation figures) of a row."""
    c = r["cand"]
    return {"method": ("refine-" + c["method"]) if c["refine"] else c["method"], "threshold": r["threshold"],
            "postprocess": {"min_area": r["min_area"], "close_radius": r["close_radius"], "open_radius": 0,
                            "hysteresis": r["hysteresis"], "max_width": r.get("max_width", 0.0)},
            "gate": c["gate"], "refine": c["refine"],
            "survey": c["survey"].replace(min_length=float(r["min_length"])).to_dict(), "val_f1": r["f1_mean"],
            "val": {**_val_f1(r), "clean_tiles_flagged": r["clean_rate"],
                    "false_alarm_frames": r["frame_fa"], "detection_rate": r["detection"]},
            "roi_used": bool(c["roi"])}


def _val_f1(r: dict, only: str | None = None) -> dict:
    """A row's per-set objective under its own name: pixel F1 for sets scored on masks, tile F1 for the others."""
    kind = r.get("f1_kind") or {}
    out: dict = {}
    for s_, v in r["f1"].items():
        if only is None or s_ == only:
            k = kind.get(s_, "pixel")
            out.setdefault({"pixel": "pixel_f1_t0", "tile": "tile_f1"}.get(k, "estimated_pixel_f1"), {})[s_] = v
    return out or {"pixel_f1_t0": {}}


def _profiles(items, rows, best, budget, frame_budget, min_detection, sets=None) -> dict:
    """Per data set whose validation frames share one size: the best row on that set alone (its own detection and
    false-alarm constraints; the same CAM method as the top level, which is the graph's output), kept when it
    beats the top-level settings on that set by at least 0.01 F1.  ``sets``: the data sets that may have one
    (None = all)."""
    base = best["cand"]["method"]
    sizes: dict[str, set] = {}
    for x in items:
        if x.has_gt and not x.tile:
            sizes.setdefault(x.set_name, set()).add(x.size)
    owner: dict[tuple, list] = {}
    for s_, sz in sizes.items():
        if len(sz) == 1:
            owner.setdefault(next(iter(sz)), []).append(s_)
    out = {}
    for sz, owners in owner.items():
        if len(owners) != 1:
            continue
        s_ = owners[0]
        if sets is not None and s_ not in sets:
            continue
        cand = [r for r in rows if r["cand"]["method"] == base and s_ in r["f1"]]
        ok = []
        n_c = sum(1 for x in items if x.set_name == s_ and x.has_gt and not x.tile and x.label == "crack")
        for which in (("fa", "det"), ("fa",)):
            ok = [r for r in cand if _meets_some(r["per_set"][s_], which, 1.0, frame_budget, min_detection)]
            if ok and which == ("fa",):
                ok = _relaxed_detection(ok, key=lambda r: r["per_set"][s_]["detection"], n_frames=n_c)
            if ok:
                break
        if not ok:
            continue
        pick = max(ok, key=lambda r: (r["f1"][s_], -r["min_length"]))
        if pick["f1"][s_] < best["f1"].get(s_, 0.0) + 0.01:
            continue
        e = _entry(pick)
        ps = pick["per_set"][s_]
        e["val"] = {**_val_f1(pick, s_), "false_alarm_frames": ps["frame_fa"],
                    "detection_rate": ps["detection"], "clean_tiles_flagged": None}
        e["val_f1"] = pick["f1"][s_]
        e["chosen_on"] = f"validation frames of {s_} ({sz[1]}x{sz[0]})"
        out[f"{sz[1]}x{sz[0]}"] = e
    return out


def _shift(t: float, d: float) -> float:
    """``t`` moved by ``d`` in logit units, kept inside (0.002, 0.998), rounded to 4 decimals."""
    t = min(0.998, max(0.002, float(t)))
    z = np.log(t / (1 - t)) + d
    return round(float(min(0.998, max(0.002, 1 / (1 + np.exp(-z))))), 4)


def _no_roi(sv: SurveyConfig) -> SurveyConfig:
    return SurveyConfig.from_dict({**sv.to_dict(), "roi": None, "roi_mask": None, "roi_size": None})


def _roots(data, config) -> list[Path]:
    if data:
        return [Path(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
    ds = config.get("datasets")
    if ds:
        return [Path(d["data"]) for d in ds]
    if config.get("data"):
        return [Path(config["data"])]
    raise CalibrationError("--data PATH is required (no data in the run's config)")


def _frame_figures_per_set(items, lengths, min_length, survey) -> dict:
    """{set: detection / false-alarm rate of its frames (clean tiles not included)} at ``min_length``."""
    sv = survey.replace(min_length=float(min_length))
    per: dict[str, dict[str, list]] = {}
    for x, (ln, anym) in zip(items, lengths):
        if x.tile:
            continue
        d = per.setdefault(x.set_name, {"det": [], "fa": []})
        (d["det"] if x.label == "crack" else d["fa"]).append(decide_frame(ln, anym, sv))
    return {k: {"detection": round(float(np.mean(v["det"])), 4) if v["det"] else None,
                "frame_fa": round(float(np.mean(v["fa"])), 4) if v["fa"] else None, "clean_rate": None}
            for k, v in per.items()}


def _frame_figures(items, lengths, min_length, survey) -> dict:
    """Frame decisions at ``min_length``: per data set with crack-free data (tiles or frames) its detection rate,
    false-alarm rate and clean tiles flagged; the constraints use the worst set (sets of cracked close-ups, where
    nothing can be a false alarm, do not dilute the detection rate of the survey set)."""
    sv = survey.replace(min_length=float(min_length))
    per: dict[str, dict[str, list]] = {}
    for x, (ln, anym) in zip(items, lengths):
        cracked = decide_frame(ln, anym, sv)
        d = per.setdefault(x.set_name, {"det": [], "fa": [], "tiles": []})
        (d["tiles"] if x.tile else d["det"] if x.label == "crack" else d["fa"]).append(cracked)
    measurable = {k: v for k, v in per.items() if v["fa"] or v["tiles"]} or per

    def worst(key, fn):
        vals = [float(np.mean(v[key])) for v in measurable.values() if v[key]]
        return round(fn(vals), 4) if vals else None
    return {"detection": worst("det", min), "frame_fa": worst("fa", max), "clean_rate": worst("tiles", max)}


def _meets(r, budget, frame_budget, min_detection) -> bool:
    return ((r["clean_rate"] is None or r["clean_rate"] <= budget)
            and (r["frame_fa"] is None or r["frame_fa"] <= frame_budget)
            and (r["detection"] is None or r["detection"] >= min_detection))


RELAX = (("clean", "fa", "det"), ("clean", "fa"), ("clean",), ())
RELAX_TEXT = {("clean", "fa", "det"): "every constraint met",
              ("clean", "fa"): "detection rate relaxed: no candidate detected enough crack frames within the "
                               "false-alarm budget, so the most that any did (less at most one frame) is required",
              ("clean",): "frame false-alarm and detection constraints relaxed (only the clean-tile budget met)",
              (): "no candidate met the clean-tile budget: fewest false alarms"}


def _meets_some(r, which, budget, frame_budget, min_detection) -> bool:
    ok = True
    if "clean" in which:
        ok &= r["clean_rate"] is None or r["clean_rate"] <= budget
    if "fa" in which:
        ok &= r["frame_fa"] is None or r["frame_fa"] <= frame_budget
    if "det" in which:
        ok &= r["detection"] is None or r["detection"] >= min_detection
    return bool(ok)


def _relaxed_detection(ok: list, key=lambda r: r["detection"], n_frames: int | None = None) -> list:
    """Of rows that meet the false-alarm constraints, those that detect the most crack frames any of them does,
    less at most one frame (a frame of pixel quality may be traded, no more)."""
    dets = [key(r) for r in ok if key(r) is not None]
    if not dets:
        return ok
    best = max(dets)
    slack = 1.0 / n_frames if n_frames else 0.0
    return [r for r in ok if key(r) is None or key(r) >= best - slack - 1e-9]


def _choose(rows, budget, frame_budget, min_detection, n_crack: int | None = None):
    """The best mean pixel F1 among rows meeting every constraint; else the detection requirement drops to what the
    best candidate within the false-alarm budget reaches (less one frame), then frame false alarms are relaxed —
    the clean-tile budget last.  Returns (row, met, level text)."""
    for which in RELAX[:-1]:
        ok = [r for r in rows if _meets_some(r, which, budget, frame_budget, min_detection)]
        if ok and which == ("clean", "fa"):
            ok = _relaxed_detection(ok, n_frames=n_crack)
        if ok:
            return (max(ok, key=lambda r: (r["f1_mean"], r["detection"] or 0, -r["min_length"])),
                    which == RELAX[0], RELAX_TEXT[which])
    return (min(rows, key=lambda r: ((r["clean_rate"] or 0) + (r["frame_fa"] or 0), -r["f1_mean"])), False,
            RELAX_TEXT[()])


def _candidates(rows, stage2, budget, frame_budget, min_detection) -> dict:
    """Per CAM method (and its refine- variant): the best row, for the record and for `--method` overrides."""
    out = {}
    for r in rows:
        c = r["cand"]
        name = ("refine-" + c["method"]) if c["refine"] else c["method"]
        ok = _meets(r, budget, frame_budget, min_detection)
        prev = out.get(name)
        key = (ok, r["f1_mean"])
        if prev is None or key > prev["_key"]:
            out[name] = {"_key": key, "learned": c.get("learned", True), "threshold": r["threshold"], "gate": c["gate"],
                     "refine": c["refine"],
                         "postprocess": {"min_area": r["min_area"], "close_radius": r["close_radius"],
                                         "open_radius": 0, "hysteresis": r["hysteresis"],
                                         "max_width": r.get("max_width", 0.0)},
                         "survey": c["survey"].replace(min_length=float(r["min_length"])).to_dict(),
                         "val_f1": r["f1_mean"], "val": {**_val_f1(r), "clean_tiles_flagged":
                                                        r["clean_rate"], "false_alarm_frames": r["frame_fa"],
                                                        "detection_rate": r["detection"]}, "budget_met": ok}
    for c in stage2:  # every method / refinement that did not reach the threshold grid: its threshold-free ODS
        name = ("refine-" + c["method"]) if c["refine"] else c["method"]
        if name not in out or (out[name].get("_key") is None and c["ods_mean"] > out[name]["val_ods_f1"]):
            out[name] = {"_key": None, "learned": c.get("learned", True), "val_ods_f1": c["ods_mean"],
                         "gate": c["gate"], "refine": c["refine"], "note": "threshold-free ODS only"}
    for v in out.values():
        v.pop("_key", None)
    return out


def _write(path: Path, obj) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- restoration runs
RESTORATION_METHODS = ("restoration", "restoration-imagestats", "restoration-dropout", "restoration-official",
                       "restoration-official-imagestats", "restoration-official-dropout", "restoration-masked-dark",
                       "restoration-masked-dark-imagestats", "restoration-masked-dark-debias", "restoration-raw",
                       "restoration-imagestats-raw")
RESTORATION_THRESHOLDS = ("otsu",) + tuple(round(0.1 + 0.05 * i, 2) for i in range(17))
RESTORATION_MIN_AREAS = (0, 30, 100)


def calibrate_restoration(*, checkpoint: Path, config: dict, data=None, methods=None, limit=None, out=None,
                          labels: str = "masks", masks: int | None = None, seed: int = 0, log=print) -> dict:
    """The recipe of an UP-CrackNet run on the VALIDATION split (masked images): restoration map (variant,
    polarity, test-time normalisation; the paper's protocol among them), threshold (Otsu per image, the paper's,
    or one fixed value) and the smallest component kept, by dataset pixel F1 at t = 0.  Writes
    ``checkpoint/recipe.json`` (or ``out``): ``crack-eval --checkpoint RUN`` then scores the chosen map, and
    ``crack-export`` builds the best *exportable* one (``export`` block: the official protocol's resize and
    stretch steps are not in a graph)."""
    from crackcam.runtime.postprocess import PostProcessConfig, postprocess as _post
    from crackcam.tools.methods_upcracknet import _restoration_fn, parse_restoration
    from crackcam.train.data import list_items

    from crackcam.models.upcracknet import otsu_threshold

    names = list(methods or RESTORATION_METHODS)
    bad = [m for m in names if parse_restoration(m) is None]
    if bad:
        raise CalibrationError(f"not restoration methods: {', '.join(bad)} (restoration[-masked|-official]"
                               f"[-dark][-imagestats|-dropout])")
    roots = _roots(data, config)
    tc = config.get("train_config", {})
    items, stems = [], {}
    for root in roots:
        vi = [it for it in list_items(root, "val", val_fraction=float(tc.get("val_fraction", 0.2)),
                                      split_seed=int(tc.get("split_seed", 0))) if it.mask is not None]
        vi = vi[:limit] if limit else vi
        if not vi:
            raise CalibrationError(f"{root}: no validation images with masks")
        stems[root.name] = [it.image.name for it in vi]
        items += vi
    imgs = [(read_image(it.image), read_mask(it.mask)) for it in items]
    # mask budget (issue 13): pixel F1 on `masks` seeded masked images, tile-label F1 on the rest; labels="tiles"
    # = no mask at all (each validation tile's crack / crack-free bit, the training tile rule, is all it sees)
    n_masks = 0 if labels == "tiles" else (len(imgs) if masks is None else max(0, min(int(masks), len(imgs))))
    masked = sorted(np.random.default_rng(seed).choice(len(imgs), n_masks, replace=False).tolist()) \
        if n_masks < len(imgs) else list(range(len(imgs)))
    rest = [i for i in range(len(imgs)) if i not in set(masked)]
    rule = TileRule(tile=int(config.get("tile") or 128))
    tiles = {i: frame_tiles(imgs[i][1], rule, 1.0) for i in rest}
    log(f"calibrate (restoration): {len(imgs)} validation images of {', '.join(map(str, roots))}; "
        f"{len(masked)} scored on their masks, {len(rest)} on their tile labels only; maps {', '.join(names)}")
    from crackcam.runtime.progress import progress

    cands = {}
    t0 = time.perf_counter()
    for name in names:
        torch_seed()
        fn = _restoration_fn(checkpoint, parse_restoration(name))
        maps = [fn(img) for img, _ in progress(imgs, desc=f"calibrate: {name}", unit="img", every=25)]
        best = None
        for thr in RESTORATION_THRESHOLDS:
            for ma in RESTORATION_MIN_AREAS:
                c, tt = Counts(), [0, 0, 0]
                for i, (m, (_, gt)) in enumerate(zip(maps, imgs)):
                    t = otsu_threshold(m) if thr == "otsu" else float(thr)
                    r = _post(m, PostProcessConfig(threshold=t, min_area=ma, skeleton=False))
                    if i in tiles:
                        tt = [a + b for a, b in zip(tt, tile_counts(tile_hits(r.mask, tiles[i]), tiles[i], False))]
                    else:
                        c = c + binary_counts(r.mask, gt)
                pix = c.figures()["f1"] if masked else None
                tile_f1 = 2 * tt[0] / max(1, 2 * tt[0] + tt[1] + tt[2]) if rest else None
                f1 = pix if tile_f1 is None else tile_f1 if pix is None else 0.5 * (pix + tile_f1)
                if best is None or f1 > best["f1"] + 1e-9:
                    best = {"f1": round(f1, 4), "threshold": thr, "min_area": ma,
                            "pixel_f1": None if pix is None else round(pix, 4),
                            "tile_f1": None if tile_f1 is None else round(tile_f1, 4)}
        opts = parse_restoration(name)
        cands[name] = {**best, "variant": opts["variant"], "polarity": opts.get("polarity", "abs"),
                       "test_norm": opts.get("test_norm", "running"), "smooth": opts.get("smooth", True),
                       "postprocess": {"min_area": best["min_area"], "open_radius": 0, "close_radius": 0}}
        log(f"calibrate: {name}: val F1 {best['f1']:.3f} at threshold {best['threshold']}, min area "
            f"{best['min_area']}")
    win = max(cands, key=lambda k: cands[k]["f1"])
    exportable = [k for k, v in cands.items() if v["variant"] in ("full", "masked") and v["smooth"] is False
                  and v["test_norm"] != "image+dropout"]
    exp = max(exportable, key=lambda k: cands[k]["f1"]) if exportable else None
    w = cands[win]
    recipe = {"kind": "restoration", "method": win, "variant": w["variant"], "polarity": w["polarity"],
              "test_norm": w["test_norm"], "threshold": w["threshold"],
              "postprocess": {"threshold": w["threshold"], "min_area": w["min_area"], "open_radius": 0,
                              "close_radius": 0},
              "chosen_on": f"validation split of {', '.join(r.name for r in roots)} ({len(imgs)} masked images)",
              "val_images": stems, "val": {"objective": w["f1"], "pixel_f1_t0": w["pixel_f1"],
                                           "tile_f1": w["tile_f1"]},
              "masks_used": len(masked), "labels": labels,
              "mask_images": [items[i].image.name for i in masked] if len(masked) < len(imgs) else "all",
              "objective": ("best dataset pixel F1 (t = 0) on the validation images" if not rest else
                            f"best tile-decision F1 (a crack pixel in a crack tile, none in a crack-free tile; the "
                            f"training tile rule, {rule.tile} px) on {len(rest)} validation images without masks"
                            + (f", averaged with the pixel F1 (t = 0) of {len(masked)} masked ones (seed {seed})"
                               if masked else "")),
              "candidates": cands, "seconds": round(time.perf_counter() - t0, 1)}
    if exp is not None:
        e = cands[exp]
        recipe["export"] = {"method": exp, "variant": e["variant"], "polarity": e["polarity"],
                            "test_norm": e["test_norm"], "threshold": e["threshold"],
                            "postprocess": {"threshold": e["threshold"], "min_area": e["min_area"]},
                            "val": {"objective": e["f1"], "pixel_f1_t0": e["pixel_f1"], "tile_f1": e["tile_f1"]}}
        if exp != win:
            log(f"calibrate: {win} is not computed inside a graph (its bilateral filter, de-biasing, resize/stretch or "
                f"dropout run on the host); crack-export builds {exp} "
                f"(val F1 {e['f1']:.3f})")
    path = Path(out) if out else Path(checkpoint) / RECIPE
    path.write_text(json.dumps(recipe, indent=2) + "\n")
    log(f"calibrate: chose {win} (val F1 {w['f1']:.3f}) → {path}")
    return recipe


def torch_seed(seed: int = 0) -> None:
    """The 'dropout' maps are random: seed them, so a recipe's figures can be reproduced."""
    import torch

    torch.manual_seed(seed)
