"""``python -m crackcam.tools.false_alarms``: how often an exported model flags crack-free pavement.

The shared data sets have cracks in every image, so a crack map's false-alarm rate cannot be read off their
test splits.  Their tile labels can: this command cuts a split into tiles with the training tile rule (crack /
crack-free / dropped, one bit per tile from the mask), runs the model on every tile exactly as ``crack-run`` does
(ONNX Runtime session, the model's frame steps: survey tiling and gate, refinement, post-processing, frame
decision), and prints the share of tiles of each class
whose mask is non-empty.  ``--gate P`` additionally requires the tile's crack probability to reach P (the graph's
own gate is applied anyway).  The last line printed is a JSON object with the figures.

    python -m crackcam.tools.false_alarms --data ../shared/datasets/deepcrack --split val
    python -m crackcam.tools.false_alarms --data ../shared/datasets/deepcrack --split val --gate 0.5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from crackcam.runtime.sessions import open_session
from crackcam.runtime.steps import FrameSteps

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "default.onnx"


def flag_rates(model, tiles_rgb: np.ndarray, labels: np.ndarray, gate: float = 0.0, batch: int = 16) -> dict:
    """Per class (0 crack-free, 1 crack): tiles, flagged share (the frame decision of crack-run's steps on the tile
    as an image, and prob >= gate), mean prob."""
    sess = open_session(model, provider="cpu", log=lambda m: None)
    steps = FrameSteps.from_meta(sess.meta)
    flagged, probs = [], []
    for img in tiles_rgb:
        r = steps.process(sess, np.ascontiguousarray(img[..., ::-1]), batch=batch)
        flagged.append(bool(r.cracked) and r.prob >= gate)
        probs.append(float(r.prob))
    flagged, probs, labels = np.array(flagged), np.array(probs), np.asarray(labels)
    out = {}
    for lab, name in ((0, "crack_free"), (1, "crack")):
        sel = labels == lab
        out[name] = {"tiles": int(sel.sum()), "flagged": round(float(flagged[sel].mean()), 4) if sel.any() else None,
                     "mean_prob": round(float(probs[sel].mean()), 4) if sel.any() else None}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets/deepcrack"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--gate", type=float, default=0.0, help="also require crack probability >= this per tile")
    a = ap.parse_args(argv)
    from crackcam.runtime.imageio import BadInputError
    from crackcam.train.data import TileRule, list_items, load_split

    try:
        ts = load_split(list_items(a.data, a.split), a.split, "tiles", TileRule(tile=a.tile))
        r = flag_rates(a.model, ts.images, ts.labels, gate=a.gate)
    except (BadInputError, FileNotFoundError, ValueError) as e:
        print(f"false_alarms: {e}")
        return 2
    for name in ("crack_free", "crack"):
        c = r[name]
        if not c["tiles"]:
            print(f"{name:10s} tiles     0")
            continue
        print(f"{name:10s} tiles {c['tiles']:5d}  flagged {c['flagged']:.3f}  mean prob {c['mean_prob']:.3f}")
    print(json.dumps({"model": str(a.model), "data": str(a.data), "split": a.split, "tile": a.tile, "gate": a.gate,
                      **r}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
