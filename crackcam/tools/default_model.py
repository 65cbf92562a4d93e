"""``python -m crackcam.tools.default_model``: (re)build the model that ships as ``crackcam/assets/default.onnx``.

The packaged model is made by the project's own commands only, and its provenance is written beside it:

1. ``crack-train --data A [--data B] --model edge_mil ... --out RUN`` (skipped when RUN holds a finished run),
2. ``crack-eval calibrate --checkpoint RUN ...`` (recipe chosen on RUN's *validation* images, under the
   false-alarm budget; skipped when present),
3. the export of ``crack-export --checkpoint RUN --out crackcam/assets/default_tiles.onnx`` (the top-k tile graph,
   verified against PyTorch),
4. ``python -m crackcam.export.frame_pass`` of it (the same weights cut at the per-position logits) and
   ``python -m crackcam.tools.cascade`` on the *training and validation* images of the same data: the cascade's
   margin and pass per camera profile, written into ``crackcam/assets/default.onnx`` — one pass proposes, the
   tiles near or above the gate are re-run as tiles, so its frames are the tile graph's at a fraction of the cost,
5. ``crackcam/assets/default_model.json``: the commands, the data card (counts, tile rule, digest), each data set's
   licence (its ``SOURCE.md``), the recipe, the cascade's choice and both graphs' sha256.

    python -m crackcam.tools.default_model          # the survey-capable default: PaveSeg train frames + DeepCrack

The PaveSeg *test* frames never reach it: training reads the train split, calibration the val split, the cascade
train + val.

The pure one-pass variant ``crackcam/assets/default_frame.onnx`` is cut from the tile graph afterwards by the
command in ``default_model.json["frame_pass"]`` (``python -m crackcam.export.frame_pass ... --gate G``, its gate
chosen on the same validation images); a rebuild drops that entry until it is re-run, and
tests/test_frame_pass.py fails while the files disagree.
"""

from __future__ import annotations

import argparse
import shlex
import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

from crackcam.runtime.sinks import file_sha256

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_TRAIN_ARGS = ("--tile 64 --min-crack-px 12 --border 4 --margin 8 --max-side 640 --epochs 8 --max-tiles 8000 "
                      "--topk 0.1")
# the PaveSeg camera's hood line: the bottom 12 % of its 1280x1080 frames (read off training frames)
DEFAULT_CALIBRATE_ARGS = "--tile 128 --roi '0,0 1,0 1,0.88 0,0.88' --roi-size 1280x1080"


def _licence_lines(data: Path) -> list[str]:
    """The licence / terms lines of the data set's SOURCE.md (where it has one)."""
    src = Path(data) / "SOURCE.md"
    if not src.is_file():
        return []
    lines = src.read_text(encoding="utf-8", errors="replace").splitlines()
    keep, on = [], False
    for ln in lines:
        low = ln.lower()
        if low.lstrip("-* ").startswith(("**license", "**licence", "license", "licence")):
            on = True
        elif on and ln.lstrip().startswith(("- **", "* **")):
            on = False
        if on:
            keep.append(ln.strip())
    return keep


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def provenance(run: Path, data, out: Path, commands: list[str]) -> dict:
    datas = list(data) if isinstance(data, (list, tuple)) else [data]
    cfg = json.loads((run / "config.json").read_text())
    card = json.loads((run / "data_card.json").read_text()) if (run / "data_card.json").is_file() else {}
    recipe = json.loads((run / "recipe.json").read_text()) if (run / "recipe.json").is_file() else {}
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    best = metrics.get("best_val") or {}
    return {
        "file": out.name,
        "sha256": file_sha256(out),
        "bytes": out.stat().st_size,
        "made": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commands": commands,
        "model": cfg.get("model"),
        "tile": cfg.get("tile"),
        "label_rule": cfg.get("label_rule"),
        "data": {"path": [str(d) for d in datas], "name": [Path(d).name for d in datas],
                 "card": card.get("splits") or card.get("counts"),
                 "sets": [{"data": c.get("data"), "layout": c.get("layout"), "splits": c.get("splits")}
                          for c in card.get("sets", [])] or None,
                 "data_card_sha256": cfg.get("data_card_sha256"),
                 "masks": "read only to derive one crack/crack-free bit per training tile (tile rule above)"},
        "licence_of_the_data": {Path(d).name: (_licence_lines(d) or ["see the data set's own terms"]) for d in datas},
        "licence_note": ("The weights were learned from these data sets; use the model under their terms "
                         "(DeepCrack and CFD: non-commercial research and education; PaveSeg: research and "
                         "evaluation, non-commercial for the full set). For other use, train your own with "
                         "crack-train on your images and rebuild with this command."),
        "validation_tiles": {"best_epoch": metrics.get("best_epoch"),
                             **{k: best.get(k) for k in ("n", "f1", "precision", "recall", "auc") if k in best}},
        "recipe": {k: recipe.get(k) for k in ("method", "threshold", "gate", "postprocess", "refine", "survey",
                                              "val_f1", "val", "budget", "chosen_on", "masks_used", "profiles",
                                              "val_images", "objective")
                   if k in recipe},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, action="append", default=None,
                    help="training data (repeat to mix; default: PaveSeg + DeepCrack from ../shared/datasets)")
    ap.add_argument("--run", type=Path, default=Path("runs/default"))
    ap.add_argument("--model", default="edge_mil")
    ap.add_argument("--train-args", default=DEFAULT_TRAIN_ARGS, help="further crack-train options")
    ap.add_argument("--calibrate-args", default=DEFAULT_CALIBRATE_ARGS, help="further crack-eval calibrate options")
    ap.add_argument("--out", type=Path, default=ASSETS / "default.onnx")
    a = ap.parse_args(argv)
    a.data = a.data or [Path("../shared/datasets/paveseg"), Path("../shared/datasets/deepcrack")]
    exe = Path(sys.executable).parent
    tiles = a.out.with_name(a.out.stem + "_tiles.onnx")
    frame = a.run / "frame.onnx"
    train = [str(exe / "crack-train"), *[x for d in a.data for x in ("--data", str(d))], "--model", a.model,
             *shlex.split(a.train_args), "--out", str(a.run)]
    calib = [str(exe / "crack-eval"), "calibrate", "--checkpoint", str(a.run), *shlex.split(a.calibrate_args)]
    export = [str(exe / "crack-export"), "--checkpoint", str(a.run), "--format", "onnx", "--out", str(tiles)]
    cut = [sys.executable, "-m", "crackcam.export.frame_pass", str(tiles), str(frame)]
    cascade = [sys.executable, "-m", "crackcam.tools.cascade", str(frame),
               *[x for d in a.data for x in ("--data", str(d))], "--out", str(a.out)]
    if not (a.run / "best.pt").is_file():
        _run(train)
    if not (a.run / "recipe.json").is_file():
        _run(calib)
    _run(export)
    _run(cut)
    _run(cascade)
    rel, rel_t = os.path.relpath(a.out), os.path.relpath(tiles)
    shown = [shlex.join(["crack-train", *train[1:]]), shlex.join(["crack-eval", *calib[1:]]),
             shlex.join(["crack-export", *export[1:-1], rel_t]), shlex.join(["python", *cut[1:]]),
             shlex.join(["python", *cascade[1:-1], rel])]
    prov = provenance(a.run, a.data, a.out, shown)
    from crackcam.export.metadata import get_metadata

    casc = get_metadata(a.out).get("cascade") or {}
    prov["tiles"] = {"file": tiles.name, "sha256": file_sha256(tiles), "bytes": tiles.stat().st_size,
                     "what": "the exported top-k tile graph (verified against PyTorch): the reference computation, "
                             "what TensorRT engines are built from, and what the default is cut from"}
    prov["cascade"] = {"command": shown[-1], **casc}
    side = a.out.with_name(a.out.stem + "_model.json")  # not NAME.json: that name is an engine's metadata side-car
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(prov, indent=2) + "\n")
    tmp.replace(side)
    print(f"wrote {a.out} ({prov['bytes'] / 1e3:.0f} kB), {tiles} and {side}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
