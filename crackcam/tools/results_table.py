"""``python -m crackcam.tools.results_table DIR [DIR ...] [--png FILE]``: crack-eval results as one table and figure.

Collects every ``metrics.json`` written by ``crack-eval`` under the given folders (one per method and data split;
a multi-method run writes one per method) and prints a Markdown table: data [split], model, method, threshold and
where it came from, P / R / F1 / IoU at t = 0, F1 at t = 2, ODS / OIS.  ``--png`` draws the F1 (t = 0) of every
method per data split as a bar chart, the learning-free floor (``blackhat``) as a dashed line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def collect(folders: list[Path]) -> list[dict]:
    rows = []
    for folder in folders:
        for p in sorted(Path(folder).rglob("metrics.json")):
            try:
                m = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if not isinstance(m, dict) or "f1" not in m or "method" not in m:
                continue
            m["_path"] = str(p)
            rows.append(m)
    return rows


def _f(x, nd=3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def markdown(rows: list[dict]) -> str:
    head = ("| data [split] | model | method | threshold (source) | P | R | **F1** | IoU | F1 t=2 | ODS F1 | OIS F1 |"
            " s/img |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = [head]
    for m in rows:
        src = str(m.get("threshold_source") or "")
        src = "val" if src.startswith("recipe") or "val" in src else (src or "–")
        thr = m.get("threshold")
        thr = thr if isinstance(thr, str) else _f(thr, 2)
        out.append(f"| {Path(str(m.get('data'))).name} [{m.get('split')}] | {m.get('model') or '–'} | "
                   f"{m['method']} | {thr} ({src}) | {_f(m.get('precision'))} | {_f(m.get('recall'))} | "
                   f"**{_f(m.get('f1'))}** | {_f(m.get('iou'))} | {_f(m.get('f1_t2'))} | {_f(m.get('ods_f1'))} | "
                   f"{_f(m.get('ois_f1'))} | {_f(m.get('seconds_per_image'), 4)} |")
    return "\n".join(out)


def figure(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for m in rows:
        groups.setdefault(f"{Path(str(m.get('data'))).name} [{m.get('split')}]", []).append(m)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (name, ms) in zip(axes[0], groups.items()):
        ms = sorted(ms, key=lambda m: m["f1"])
        colors = ["#999999" if not m.get("learned", m.get("model")) else
                  ("#d62728" if str(m["method"]).startswith("refine") else "#1f77b4") for m in ms]
        ax.barh([m["method"] for m in ms], [m["f1"] for m in ms], color=colors)
        floor = next((m["f1"] for m in ms if m["method"] == "blackhat"), None)
        if floor is not None:
            ax.axvline(floor, ls="--", c="k", lw=1)
            ax.text(floor, -0.9, f" black-hat floor {floor:.3f}", fontsize=8, va="bottom")
        for i, m in enumerate(ms):
            ax.text(m["f1"] + 0.005, i, f"{m['f1']:.3f}", va="center", fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_title(name)
        ax.set_xlabel("crack F1 (t = 0) at the validation-chosen threshold")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--png", type=Path, default=None, help="write the F1 bar chart here")
    a = ap.parse_args(argv)
    rows = collect(a.folders)
    if not rows:
        print(f"results_table: no crack-eval metrics.json under {', '.join(map(str, a.folders))}")
        return 2
    print(markdown(rows))
    if a.png:
        print(f"wrote {figure(rows, a.png)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
