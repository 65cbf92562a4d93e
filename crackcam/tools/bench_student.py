"""``crack-bench student``: the distilled segmenter next to today's packaged model, in one run.

Per model (the packaged CAM default, the student's fp32 graph, its int8 graph when given):

* bare ONNX Runtime FPS on preloaded 448² uint8 batches (batch 4) vs ``crack-run`` end to end on the same frames
  as JPEGs (decode + frame steps + post-processing + results.jsonl) and their ratio (target ≥ 0.9×); the last row
  runs the student with ``--tile 448`` (one pass per frame: the same pixels as the bare run);
* pixel F1 (t=0 and t=2) on the **validation** frames of ``--data`` (never the test split) through each model's own
  frame steps at its own calibrated threshold — the int8 graph's F1 change is read here.

Usage: ``crack-bench student --student runs/st/export/seg_lite0_segment.onnx [--int8 X.int8.onnx] --data
../shared/datasets/paveseg --data ../shared/datasets/deepcrack``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from crackcam.runtime.imageio import BadInputError, read_image, read_mask
from crackcam.runtime.sessions import open_session
from crackcam.runtime.steps import ModelSteps

from .bench_runtime import DEFAULT_MODEL, bench_fps
from .metrics import BinaryScorer


def val_f1(model: Path, roots: list[str], limit: int | None = None) -> dict:
    """Pixel F1 at t=0 / t=2 per data set on the validation split, through the model's frame steps."""
    from crackcam.train.data import list_items, scored_pixels

    sess = open_session(model, log=lambda s: None)
    steps = ModelSteps(sess.meta)
    out = {}
    for root in roots:
        items = [it for it in list_items(root, "val") if it.mask is not None and not it.is_tile][:limit]
        sc = BinaryScorer((0, 2))
        for it in items:
            try:
                rgb = read_image(it.image)
                gt = read_mask(it.mask, rgb.shape)
            except BadInputError:
                continue
            bgr = np.ascontiguousarray(rgb[..., ::-1])
            st = steps.for_shape(bgr.shape)
            res = st.process(sess, bgr)
            sc.add(res.post.mask, gt, it.image.name, scored_pixels(it, gt.shape, st.survey))
        out[Path(root).name] = {"f1_t0": round(sc.figures(0)["f1"], 4), "f1_t2": round(sc.figures(2)["f1"], 4),
                                "images": len(sc.per_image)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="crack-bench student", description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", required=True, help="the student's exported fp32 graph")
    ap.add_argument("--int8", help="its int8 graph (crack-export --int8)")
    ap.add_argument("--teacher", default=str(DEFAULT_MODEL), help="reference model (default: the packaged one)")
    ap.add_argument("--data", action="append", default=[], help="data sets whose VALIDATION frames are scored")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="validation images per set")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args(argv)
    models = [("packaged default (teacher)", Path(a.teacher), None), ("student fp32", Path(a.student), None)]
    if a.int8:
        models.append(("student int8", Path(a.int8), None))
    # the same graph with one pass per frame (--tile = the frame): crack-run's own overhead, on the same pixels
    models.append((f"student fp32, --tile {a.size}", Path(a.student), {"tile": a.size}))
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for k, (name, path, run_kw) in enumerate(models):
            if not path.is_file():
                print(f"crack-bench student: {path}: not found")
                return 2
            f = bench_fps(path, a.images, a.size, a.batch, "cpu", None, Path(td) / f"m{k}", a.repeats, run_kw)
            r = {"model": name, "file": str(path), "bare_fps": round(f["bare_fps"], 2) if f["bare_fps"] else None,
                 "crack_run_fps": round(f["e2e_fps"], 2)}  # bare None: a fixed-size graph (crack-run tiles frames)
            r["ratio"] = round(r["crack_run_fps"] / r["bare_fps"], 3) if r["bare_fps"] else None
            if a.data and run_kw is None:
                r["val"] = val_f1(path, a.data, a.limit)
            rows.append(r)
    print(f"{a.size}x{a.size} frames, batch {a.batch}, CPU, best of {a.repeats}; F1 on the validation frames of "
          f"{', '.join(Path(d).name for d in a.data) or '-'} at each model's own threshold")
    sets = sorted({s for r in rows for s in r.get("val", {})})
    head = f"{'model':<28} {'bare ORT FPS':>12} {'crack-run FPS':>13} {'ratio':>6}" + "".join(
        f" {s + ' F1 t0/t2':>22}" for s in sets)
    print(head)
    for r in rows:
        v = r.get("val", {})
        bare = f"{r['bare_fps']:>12.2f}" if r["bare_fps"] else f"{'fixed input':>12}"
        ratio = f"{r['ratio']:>6.3f}" if r["ratio"] else f"{'-':>6}"
        print(f"{r['model']:<28} {bare} {r['crack_run_fps']:>13.2f} {ratio}" + "".join(
            f" {v[s]['f1_t0']:>11.3f} / {v[s]['f1_t2']:.3f}" if s in v else f" {'-':>22}" for s in sets))
    t, s = rows[0], rows[1]
    print(f"student vs packaged default, crack-run FPS: {s['crack_run_fps'] / max(t['crack_run_fps'], 1e-9):.2f}x")
    if a.int8:
        q = rows[2]
        print(f"int8 vs fp32 student, bare FPS: {(q['bare_fps'] or 0) / max(s['bare_fps'] or 0, 1e-9):.2f}x, crack-run FPS: "
              f"{q['crack_run_fps'] / max(s['crack_run_fps'], 1e-9):.2f}x" + "".join(
                  f"; {k} F1 change {q['val'][k]['f1_t0'] - s['val'][k]['f1_t0']:+.4f}" for k in sets))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
