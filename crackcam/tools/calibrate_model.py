"""``crack-eval calibrate --model G.onnx``: re-choose an exported graph's run-time settings on VALIDATION images.

A graph's metadata carries the knobs crack-run reads at run time: the per-tile gate, the threshold, the work size
(``max_side``) and the frame decision's minimum crack length of the top level and of each camera profile.  They were chosen for the graph they were calibrated
with; a derived graph (a frame pass, ``crackcam.export.frame_pass``) or a new camera may want others.  This searches
a grid of them through crack-eval's own scoring of the graph (:func:`crackcam.tools.evaluate.evaluate` with
``model=``: the runtime's session and frame steps, as crack-run runs them) on the validation split only, and chooses
with the calibration's rule (:func:`crackcam.tools.calibration._choose`: best mean pixel F1 subject to the
false-alarm budget, the detection requirement relaxed as there when no candidate meets it).  Each data set is
scored with the settings of the camera profile its frames take; a profile's settings are chosen on the sets that
take it, and written into a copy of the graph (the weights untouched) with a ``calibration`` block saying on what.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

from crackcam.tools.evaluate import EvalError, evaluate

__all__ = ["calibrate_model", "grid_values", "apply_settings"]


def _rnd(x):
    """Floats to 4 decimals; a threshold rule (``otsu``, ``pXX``) as it is."""
    return x if isinstance(x, str) else round(float(x), 4)


def grid_values(current: dict, gates=None, thresholds=None, max_sides=None, min_lengths=None) -> list[dict]:
    """The grid of one profile: every combination of the given values (the current value where a list is None),
    nearest the current settings first — the choice keeps the first of equal candidates, so a tie keeps what the
    graph had."""
    def near(vals, cur):
        return sorted(dict.fromkeys(vals), key=lambda v: abs(v - cur) if isinstance(cur, (int, float)) else 0.0)

    gs = near([float(g) for g in gates], current["gate"]) if gates else [current["gate"]]
    ts = near([float(t) for t in thresholds], current["threshold"]) if thresholds else [current["threshold"]]
    ms = near([int(m) for m in max_sides], current["max_side"]) if max_sides else [current["max_side"]]
    cur_len = float(current.get("min_length") or 0.0)
    ls = near([float(v) for v in min_lengths], cur_len) if min_lengths else [cur_len]
    for v in ls:
        if v < 0:
            raise EvalError(f"--min-lengths: {v:g} px must be >= 0")
    for g in gs:
        if not 0.0 <= g <= 1.0:
            raise EvalError(f"--gates: {g:g} must lie in [0, 1]")
    for t in ts:
        if not isinstance(t, str) and not 0.0 <= t <= 1.0:
            raise EvalError(f"--thresholds: {t:g} must lie in [0, 1]")
    for m in ms:
        if m is not None and m < 32:
            raise EvalError(f"--max-sides: {m} px is too small (the tiles need at least 32)")
    return [{"gate": _rnd(g), "threshold": _rnd(t), "max_side": None if m is None else int(m),
             "min_length": _rnd(v)} for g, t, m, v in itertools.product(gs, ts, ms, ls)]


def _block_settings(block: dict) -> dict:
    """``{gate, threshold, max_side}`` of the metadata's top level or one profile (``block`` has survey, threshold,
    refine, postprocess as the metadata does)."""
    sv = block.get("survey") or {}
    rb = block.get("refine")  # the runtime's order (steps.post_config_dict): the refinement's own block first
    src = rb if isinstance(rb, dict) else {"postprocess": block.get("postprocess"), "threshold": block.get("threshold")}
    thr = (src.get("postprocess") or {}).get("threshold", src.get("threshold"))
    thr = 0.5 if thr is None else thr if isinstance(thr, str) else float(thr)
    return {"gate": float(sv.get("gate", block.get("gate", 0.0)) or 0.0), "threshold": thr,
            "max_side": sv.get("max_side"), "min_length": float(sv.get("min_length") or 0.0)}


def apply_settings(block: dict, s: dict) -> dict:
    """A copy of the metadata block (top level or profile) with the gate, threshold and max_side of ``s`` written
    wherever the runtime reads them (survey, threshold, refine and post-processing)."""
    b = json.loads(json.dumps(block))
    b["survey"] = {**(b.get("survey") or {}), "gate": float(s["gate"]), "max_side": s["max_side"],
                   "min_length": float(s.get("min_length", (b.get("survey") or {}).get("min_length", 0.0)) or 0.0)}
    t = s["threshold"] if isinstance(s["threshold"], str) else float(s["threshold"])
    b["threshold"] = t
    if isinstance(b.get("postprocess"), dict):
        b["postprocess"]["threshold"] = t
    if isinstance(b.get("refine"), dict):
        b["refine"]["threshold"] = t
        if isinstance(b["refine"].get("postprocess"), dict) and "threshold" in b["refine"]["postprocess"]:
            b["refine"]["postprocess"]["threshold"] = t  # read before refine.threshold
    return b


def _row(settings: dict, summaries: dict) -> dict:
    """One grid point's figures over its data sets, in the shape the calibration's choice reads."""
    f1s = [s["f1"] for s in summaries.values() if s.get("f1") is not None]
    fr = [s.get("frames") or {} for s in summaries.values()]
    dets = [f["detection_rate"] for f in fr if f.get("detection_rate") is not None]
    fas = [f["false_alarm_rate"] for f in fr if f.get("false_alarm_rate") is not None]
    cls = [f["clean_tiles"]["rate"] for f in fr if f.get("clean_tiles")]
    return {**settings, "min_length": float(settings.get("min_length") or 0.0),
            "f1_mean": _rnd(sum(f1s) / len(f1s)) if f1s else 0.0,
            "detection": min(dets) if dets else None, "frame_fa": max(fas) if fas else None,
            "clean_rate": max(cls) if cls else None,
            "sets": {k: {"f1": s.get("f1"), "f1_t2": s.get("f1_t2"), "frames": s.get("frames")}
                     for k, s in summaries.items()}}


def _set_names(data) -> dict[str, str]:
    """A folder name per data set, made unique (``a``, ``a_2``) where two sets share one."""
    out, seen = {}, {}
    for d in data:
        n = Path(d).name or "data"
        seen[n] = seen.get(n, 0) + 1
        out[str(d)] = n if seen[n] == 1 else f"{n}_{seen[n]}"
    return out


def _val_frames(model: Path, data: Path, limit: int | None) -> list[tuple[tuple, str]]:
    """``[(frame shape, camera profile)]`` of the validation frames crack-eval --model scores (clean tiles left
    out: they are tile-sized, and each set's frames decide its profile)."""
    from crackcam.runtime.imageio import BadInputError, read_image
    from crackcam.tools import eval_model as EM
    from crackcam.tools.evaluate import _list, _model_split

    from crackcam.runtime.meta import BackendUnavailable, ModelFileError

    try:
        sess, steps = EM.open_model(model)
    except (ModelFileError, BackendUnavailable) as exc:
        raise EvalError(str(exc)) from None
    items = _list(data, "val", {"train_config": _model_split(sess.meta, model, data, "val", lambda m: None)}, limit)
    out = []
    for it in items:
        if it.is_tile:
            continue
        try:
            shape = read_image(it.image).shape[:2]
        except BadInputError:
            continue  # crack-eval skips it too, and says so
        out.append((tuple(int(v) for v in shape), steps.profile_name(shape) or "default"))
    if not out:
        raise EvalError(f"{data}: no validation frame to calibrate on")
    return out


def calibrate_model(*, model: Path, data: list[Path], out: Path | None = None, gates=None, thresholds=None,
                    max_sides=None, min_lengths=None, budget: float = 0.05, frame_budget: float = 0.20, min_detection: float = 0.90,
                    limit: int | None = None, log=print) -> dict:
    """Search the grid on the validation split of ``data``; write the chosen settings into a copy of ``model`` at
    ``out`` (default ``runs/<stem>_calibrated.onnx``) and ``out`` with ``.calibration.json``; returns that record."""
    from crackcam.runtime.progress import progress
    from crackcam.tools.calibration import _choose

    model = Path(model)
    if not model.is_file():
        raise EvalError(f"{model}: model file not found")
    if model.suffix != ".onnx":
        raise EvalError(f"{model}: calibrate --model rewrites an ONNX graph's metadata (.onnx), not {model.suffix!r}")
    if not data:
        raise EvalError("calibrate --model needs --data (the sets whose validation split it is chosen on)")
    try:
        import onnx  # noqa: F401 - the graph is written with it (metadata.write_with_metadata)

        from crackcam.export import metadata as md
    except ImportError:
        raise EvalError("calibrate --model writes a graph: it needs the onnx package (pip install 'crackcam[train]')") \
            from None
    grid_values({"gate": 0.0, "threshold": 0.5, "max_side": 640}, gates, thresholds, max_sides,
                min_lengths)  # bad values first
    out = Path(out) if out else Path("runs") / f"{model.stem}_calibrated.onnx"
    work = out.with_suffix(".calib")
    try:
        meta = md.get_metadata(model)
    except Exception as exc:  # noqa: BLE001 - a corrupt file, no crackcam metadata
        raise EvalError(f"{model}: no readable crackcam metadata ({str(exc).splitlines()[0][:120]})") from None
    if float(meta.get("gate") or 0.0) > 0 and not meta.get("survey"):
        raise EvalError(f"{model}: the graph gates inside itself (metadata gate {meta['gate']:g}, no survey block): "
                        f"a run-time gate below it changes nothing; export it with a survey recipe")
    t0 = time.time()
    names = _set_names(data)
    frames = {str(d): _val_frames(model, Path(d), limit) for d in data}  # [(shape, profile)] of the frames
    by_profile: dict[str, list[str]] = {}
    for d, fr in frames.items():
        used = sorted({p for _, p in fr})
        if len(used) != 1:
            raise EvalError(f"{d}: its validation frames take several camera profiles ({', '.join(used)}); "
                            f"calibrate each frame size's images as a set of its own")
        by_profile.setdefault(used[0], []).append(d)

    chosen, record_profiles = {}, {}
    new = json.loads(json.dumps(meta))
    for prof, sets in sorted(by_profile.items()):
        block = meta if prof == "default" else (meta.get("profiles") or {})[prof]
        cur = _block_settings(block)
        if cur["max_side"] is None and max_sides:
            raise EvalError(f"{model}: profile {prof!r} has no survey block (no max_side) to calibrate")
        sides = max_sides
        longest = max(max(sh) for d in sets for sh, _ in frames[d])
        if sides and longest <= min([int(m) for m in sides] + [int(cur["max_side"])]):
            sides = None  # no frame of these sets is shrunk by any of the values (nor by the graph's): one row
        grid = grid_values(cur, gates, thresholds, sides, min_lengths)
        rows = []
        for pt in progress(grid, desc=f"calibrate {prof}", unit="setting", every=5):
            sv = {"gate": pt["gate"], "min_length": pt["min_length"]}
            if cur["max_side"] is not None:
                sv["max_side"] = pt["max_side"]
            thr = pt["threshold"]
            tag = (f"g{pt['gate']:g}_t{thr if isinstance(thr, str) else format(thr, 'g')}_m{pt['max_side']}"
                   f"_l{pt['min_length']:g}")
            sums = {names[d]: evaluate(method=None, data=Path(d), split="val", model=model, limit=limit,
                                       threshold=thr, survey=sv, out=work / prof / tag / names[d],
                                       log=lambda m: None, show_progress=False)
                    for d in sets}
            rows.append(_row(pt, sums))
        n_crack = min([r["sets"][k]["frames"].get("crack", {}).get("frames", 0) for r in rows[:1] for k in r["sets"]]
                      or [0]) or None
        best, met, level = _choose(rows, budget, frame_budget, min_detection, n_crack)
        here = next((r for r in rows if r["gate"] == _rnd(cur["gate"]) and r["threshold"] == _rnd(cur["threshold"])
                     and r["max_side"] == cur["max_side"] and r["min_length"] == _rnd(cur["min_length"])), None)
        settings = {k: best[k] for k in ("gate", "threshold", "max_side", "min_length")}
        chosen[prof] = settings
        record_profiles[prof] = {"sets": [str(Path(d)) for d in sets], "before": cur, "chosen": settings,
                                 "constraints_met": met, "rule": level,
                                 "val_before": None if here is None else {k: here[k] for k in
                                                                          ("f1_mean", "detection", "frame_fa",
                                                                           "clean_rate")},
                                 "val_chosen": {k: best[k] for k in ("f1_mean", "detection", "frame_fa",
                                                                     "clean_rate")},
                                 "grid": [{k: r[k] for k in r if k != "sets"} for r in rows]}
        if prof == "default":
            top = apply_settings(new, settings)
            new.update({k: top[k] for k in ("survey", "threshold") if k in top})
            for k in ("postprocess", "refine"):
                if k in top:
                    new[k] = top[k]
        else:
            new["profiles"][prof] = apply_settings(new["profiles"][prof], settings)
        if isinstance(new.get("frame_pass"), dict) and prof == "default":
            new["frame_pass"]["gate"] = float(settings["gate"])
    record = {"model": str(model), "out": str(out), "split": "val", "chosen_on": sorted(frames), "limit": limit,
              "objective": "best mean pixel F1 (t = 0) on the validation images subject to clean tiles flagged "
                           f"<= {budget:g}, crack-free / sealed-only frames flagged <= {frame_budget:g}, crack frames "
                           f"detected >= {min_detection:g} (relaxed as crack-eval calibrate does when none meets it)",
              "profiles": record_profiles, "seconds": round(time.time() - t0, 1)}
    new["calibration"] = {"by": "crack-eval calibrate --model", "from": model.name, "split": "val",
                          "chosen_on": [names[d] for d in sorted(frames)], "limit": limit,
                          "profiles": {p: {"chosen": r["chosen"], "val": r["val_chosen"], "rule": r["rule"]}
                                       for p, r in record_profiles.items()}}
    md.write_with_metadata(model, out, new)
    rec_path = out.with_suffix(".calibration.json")
    rec_path.write_text(json.dumps(record, indent=1))
    for p, r in record_profiles.items():
        vb, vc = r["val_before"], r["val_chosen"]
        log(f"crack-eval calibrate --model: profile {p} ({', '.join(Path(s).name for s in r['sets'])}): "
            f"{r['before']} -> {r['chosen']}; val F1 {vb['f1_mean'] if vb else '?'} -> {vc['f1_mean']}, "
            f"detection {vc['detection']}, frame false alarms {vc['frame_fa']}, clean tiles {vc['clean_rate']} "
            f"({r['rule']})")
    log(f"crack-eval calibrate --model: wrote {out} and {rec_path}")
    return record
