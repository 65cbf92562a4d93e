"""``crack-eval mask-budget``: what pixel masks are worth to the recipe.

One validation search (:func:`crackcam.tools.calibration.calibrate` with several mask budgets: the maps are made
once) chooses a recipe with 0 masks (mask-free: the tile labels only), 1, 5, 20 and every masked validation image;
each recipe is then scored by ``crack-eval`` on the test sets (what ``crack-run`` runs), next to the same CAM method
with no recipe at all (per-image Otsu, default refinement and post-processing: what a user without any calibration
gets).  Writes ``OUT/table.md`` and ``OUT/table.json`` and prints the table.  Every step is resumable: the search
is cached in the run folder and each evaluation resumes from its own state.
"""

from __future__ import annotations

import json
from pathlib import Path

from crackcam.tools.calibration import _budget_key, _write

BUDGETS = (0, 1, 5, 20, None)


def parse_test(spec: str) -> tuple[Path, str]:
    """``DATA[:SPLIT]`` (split default ``test``) → (path, split)."""
    path, _, split = str(spec).rpartition(":") if ":" in str(spec) else (str(spec), "", "test")
    return Path(path), (split or "test")


def mask_budget(*, checkpoint: Path, tests: list[tuple[Path, str]], budgets=BUDGETS, seed: int = 0,
                out: Path | None = None, limit: int | None = None, calibrate_kw: dict | None = None,
                log=print) -> dict:
    from crackcam.tools.evaluate import calibrate, evaluate  # calibration errors → one-line EvalError

    checkpoint = Path(checkpoint)
    out = Path(out or checkpoint / "mask_budget")
    recipes = calibrate(checkpoint=checkpoint, budgets=list(budgets), seed=seed, out=out, log=log,
                        **(calibrate_kw or {}))
    method = recipes[_budget_key(None)]["method"] if _budget_key(None) in recipes else \
        recipes[next(iter(recipes))]["method"]
    plain = out / "recipe_defaults.json"  # the method alone: Otsu, default refinement / post-processing / survey
    _write(plain, {"method": method, "chosen_on": "nothing (no calibration): per-image Otsu and the defaults",
                   "masks_used": 0})
    runs = [(bk, out / f"recipe_m{bk}.json", r) for bk, r in recipes.items()] + \
        [("otsu", plain, {"method": method, "masks_used": 0})]
    table = []
    for bk, path, rec in runs:
        row = {"budget": bk, "masks_used": rec.get("masks_used"), "method": rec.get("method"),
               "threshold": rec.get("threshold", "otsu"), "labels": rec.get("labels", "none"), "sets": {}}
        for data, split in tests:
            s = evaluate(method=None, data=Path(data), split=split, checkpoint=checkpoint, recipe_path=path,
                         out=out / f"eval_{bk}" / f"{Path(data).name}_{split}", limit=limit, log=log)
            fr = s.get("frames") or {}
            row["sets"][f"{Path(data).name} [{split}]"] = {
                "f1_t0": s.get("f1"), "f1_t2": s.get("f1_t2"), "detection": fr.get("detection_rate"),
                "false_alarm_frames": fr.get("false_alarm_rate"),
                "clean_tiles_flagged": (fr.get("clean_tiles") or {}).get("rate")}
        table.append(row)
    res = {"checkpoint": str(checkpoint), "seed": seed, "rows": table,
           "note": "recipes chosen on the validation split only; figures from crack-eval on the test sets"}
    md = markdown(table)
    if {"0", "all"} <= set(recipes):  # which mask-free objective chooses best (validation masks judge it)
        res["objective_study"] = objective_study(checkpoint)
        md += "\n\n" + study_markdown(res["objective_study"])
    _write(out / "table.json", res)
    (out / "table.md").write_text(md + "\n")
    figure(table, out / "mask_budget.png")
    log(md)
    return res


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def markdown(table: list[dict]) -> str:
    sets = list(table[0]["sets"]) if table else []
    head = "| recipe | masks | method | " + " | ".join(f"{s} F1 t0 / t2" for s in sets) + " |"
    lines = [head, "|" + "---|" * (3 + len(sets))]
    for r in table:
        name = "Otsu, defaults (no calibration)" if r["budget"] == "otsu" else \
            ("mask-free (tile labels)" if r["masks_used"] == 0 else f"{r['budget']} masks")
        cells = []
        for s in sets:
            v = r["sets"][s]
            extra = ""
            if v.get("detection") is not None:
                extra = f" (det {_f(v['detection'])}, FA {_f(v['false_alarm_frames'])}, clean {_f(v['clean_tiles_flagged'])})"
            cells.append(f"{_f(v['f1_t0'])} / {_f(v['f1_t2'])}{extra}")
        lines.append(f"| {name} | {r['masks_used']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(table: list[dict], path: Path) -> Path:
    """Test F1 (t = 0) per set against the masks the recipe was chosen with; Otsu with defaults dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table if r["budget"] != "otsu"]
    otsu = next((r for r in table if r["budget"] == "otsu"), None)
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for k, s in enumerate(rows[0]["sets"] if rows else []):
        col = f"C{k}"
        ax.plot(xs, [r["sets"][s]["f1_t0"] for r in rows], "o-", color=col, label=s)
        if otsu is not None and otsu["sets"][s]["f1_t0"] is not None:
            ax.axhline(otsu["sets"][s]["f1_t0"], color=col, ls="--", lw=1)
    ax.set_xticks(xs, [("0 (mask-free)" if r["masks_used"] == 0 else f"{r['masks_used']}") for r in rows])
    ax.set_xlabel("masked validation images the recipe was chosen with")
    ax.set_ylabel("test pixel F1 (t = 0)")
    ax.set_title("What masks are worth (dashed: Otsu, no calibration)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def study_markdown(study: list[dict]) -> str:
    lines = ["| mask-free objective (validation) | chosen | val pixel F1 with every mask (mean; per set) |",
             "|---|---|---|"]
    for r in study:
        per = ", ".join(f"{k} {v:.3f}" for k, v in r["val_pixel_f1"].items())
        lines.append(f"| {r['objective']} | {r['method']} gate {r['gate']} thr {r['threshold']} min area "
                     f"{r['min_area']} hyst {r['hysteresis']} | {r['val_pixel_f1_mean']:.3f}; {per} |")
    return "\n".join(lines)


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def objective_study(checkpoint: Path, budget: str = "0", clean_budget: float = 0.05, frame_budget: float = 0.20,
                    min_detection: float = 0.90) -> list[dict]:
    """How each mask-free objective (tile-decision F1; the estimated pixel F1 at each crack share) would choose
    on a cached validation search, and the *validation* pixel F1 (every mask) of what it chooses: the study that
    fixed ``calibration.MASK_FREE`` (masks are used here to choose the objective, on validation images only)."""
    from crackcam.tools.calibration import CRACK_SHARES, _budget_rows, _BudgetView, _choose, _n_crack, read_search

    s = read_search(checkpoint)
    if "all" not in s["selections"] or budget not in s["selections"]:
        raise ValueError(f"the cached search of {checkpoint} lacks the 'all' or {budget!r} budget "
                         f"(it has {', '.join(s['selections'])})")
    items, gt_pos = s["items"], s["gt_pos"]
    full = _BudgetView(items, gt_pos, s["selections"]["all"])
    out = []
    for proxy in (None,) + tuple(CRACK_SHARES):
        v = _BudgetView(items, gt_pos, s["selections"][budget], proxy)
        _, rows = _budget_rows(s["rows"], v, budget)
        best, met, _ = _choose(rows, clean_budget, frame_budget, min_detection, _n_crack(items) or None)
        true = full.row(best)
        c = best["cand"]
        out.append({"objective": "tile-decision F1" if proxy is None else f"estimated pixel F1, share {proxy:g}",
                    "share": proxy, "method": ("refine-" + c["method"]) if c["refine"] else c["method"],
                    "gate": c["gate"], "threshold": best["threshold"], "min_area": best["min_area"],
                    "hysteresis": best["hysteresis"], "max_width": best["max_width"],
                    "val_pixel_f1": true["f1"], "val_pixel_f1_mean": true["f1_mean"], "budget_met": met})
    return out
