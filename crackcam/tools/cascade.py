"""``python -m crackcam.tools.cascade G.onnx --data D [--data D2] --out G2.onnx``: set up a frame-pass graph's
cascade — one pass over the frame proposes, the tiles near or above the gate are re-run as tiles — so that its
frames come out as the tile graph's at a fraction of the cost.

A frame-pass graph (:mod:`crackcam.export.frame_pass`) reads each tile's probability out of one pass over the work
image; those differ a little from the tile graph's (zero padding at every tile edge, receptive field ≈ 67 px), so
the one pass alone gates a few tiles differently.  The cascade (``survey.model_pass = "cascade"``,
:meth:`crackcam.runtime.steps.FrameSteps.infer`) re-runs as tiles, through the same graph, every tile whose one-pass
probability is at least ``gate - recheck``: those get the tile graph's probability and map exactly (within float
rounding), and a tile the tile graph would keep is only lost when the one pass underrated it by more than
``recheck``.

This measures, on the images given (train and validation frames: the criterion needs no label, only agreement with
the tile pass), for each candidate margin how many tiles a frame re-runs and how many tiles the tile pass keeps
that the cascade would drop; it chooses per camera profile the smallest margin with **no** such tile, and the
cascade only where it puts fewer pixels through the network than the tiles (else the profile runs tiles; the
measured model times are printed beside it, the choice does not depend on them).  The margin is recorded where
the tiles win too (a forced ``--pass cascade`` then uses a measured one); a camera profile no image reached runs
tiles.  With ``--out`` it writes a copy of the graph with those settings (weights untouched) and a ``cascade``
block saying on what they were chosen.

    python -m crackcam.export.frame_pass crackcam/assets/default_tiles.onnx runs/default/frame.onnx
    python -m crackcam.tools.cascade runs/default/frame.onnx \\
        --data ../shared/datasets/paveseg --data ../shared/datasets/deepcrack --out crackcam/assets/default.onnx
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["CascadeError", "agreement", "choose", "measure", "main"]

RECHECKS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)


class CascadeError(ValueError):
    """One line: what cannot be done and why."""


def agreement(pf, pt, gate: float, recheck: float) -> tuple[int, int]:
    """``(tiles re-run, tiles lost)`` of one frame: the tiles whose one-pass probability ``pf`` is at least
    ``gate - recheck``, and the tiles the tile pass keeps (``pt >= gate``) that are not among them."""
    pf, pt = np.asarray(pf, np.float64), np.asarray(pt, np.float64)
    rerun = pf >= float(gate) - float(recheck)
    return int(rerun.sum()), int(((pt >= float(gate)) & ~rerun).sum())


def _images(data: Path, splits: tuple[str, ...]) -> list[Path]:
    from crackcam.train.data import list_items

    return [it.image for s in splits for it in list_items(data, s)]


def measure(sess, steps, paths: list[Path], log=print) -> dict:
    """Per camera profile: every image's one-pass and tile-pass probabilities, and each pass's model seconds."""
    from crackcam.runtime.imageio import BadInputError, read_image
    from crackcam.runtime.progress import progress
    from crackcam.runtime.steps import frame_pass_input, infer_frame, infer_tiles

    out: dict = {}
    for p in progress(paths, desc="cascade", unit="img"):
        try:
            img = read_image(p, order="bgr")
        except BadInputError as exc:
            log(f"cascade: skipped {exc}")
            continue
        name = steps.profile_name(img.shape) or "default"
        st = steps.for_shape(img.shape)
        plan = st.plan(img)
        pf, _, tf = infer_frame(sess, img, plan)
        t = time.perf_counter()
        pt, _, _ = infer_tiles(sess, st.tiles(img, plan), 8)
        tt = time.perf_counter() - t
        rec = out.setdefault(name, {"gate": float(st.survey.gate), "frames": [], "frame_s": 0.0, "tiles_s": 0.0,
                                    "per_tile_s": [], "one_pass_px": []})
        rec["frames"].append((np.asarray(pf), np.asarray(pt)))
        work = frame_pass_input(img, plan, int(sess.meta.frame_pass["stride"]))
        rec["one_pass_px"].append(int(work.shape[1] * work.shape[2]))
        rec["frame_s"] += tf
        rec["tiles_s"] += tt
        rec["per_tile_s"].append(tt / max(1, len(pt)))
    return out


def choose(rec: dict, rechecks=RECHECKS, tile_px: int = 128 * 128) -> dict:
    """One profile's table and choice: the smallest margin that loses no tile, and the cascade only where it
    costs less than the tiles.  The cost is counted in pixels through the network, so that the choice does not
    depend on the machine's load: the tile pass n tiles × ``tile_px``, the one pass its padded work image, the
    cascade the one pass plus its re-run tiles (measured model times are reported beside it)."""
    gate, frames = rec["gate"], rec["frames"]
    n = len(frames)
    per_tile = float(np.median(rec["per_tile_s"])) if rec["per_tile_s"] else 0.0
    px = rec.get("one_pass_px") or [0] * n
    tiles_px = [len(pt) * tile_px for _, pt in frames]
    rows = []
    for m in sorted(rechecks):
        rr = [agreement(pf, pt, gate, m) for pf, pt in frames]
        rerun, lost = sum(r[0] for r in rr), sum(r[1] for r in rr)
        cost = float(np.mean([(px[i] + rr[i][0] * tile_px) / max(1, tiles_px[i]) for i in range(n)]))
        rows.append({"recheck": m, "rerun_per_frame": round(rerun / n, 2), "tiles_lost": lost,
                     "frames_with_a_loss": sum(int(r[1] > 0) for r in rr), "cost": round(cost, 3),
                     "model_ms": round(1000 * (rec["frame_s"] + rerun * per_tile) / n, 1)})
    ok = [r for r in rows if r["tiles_lost"] == 0]
    tiles_ms = round(1000 * rec["tiles_s"] / n, 1)
    pick = ok[0] if ok else None
    mode = "cascade" if pick is not None and pick["cost"] < 1.0 else "tiles"
    # the margin is kept where the tiles win too, so that a forced --pass cascade uses a measured one
    return {"gate": gate, "images": n, "tiles_per_frame": round(sum(len(f[1]) for f in frames) / n, 2),
            "tiles_ms": tiles_ms, "frame_ms": round(1000 * rec["frame_s"] / n, 1), "table": rows,
            "one_pass_cost": round(float(np.mean([px[i] / max(1, tiles_px[i]) for i in range(n)])), 3),
            "model_pass": mode, "recheck": pick["recheck"] if pick else max(rechecks),
            "why": ("the smallest margin that loses no tile the tile pass keeps, and fewer pixels than the tiles"
                    if mode == "cascade" else
                    "tiles: no margin in the grid loses no tile" if pick is None else
                    f"tiles: the cascade puts {pick['cost']:.2f}x the tiles' pixels through the network")}


def unmeasured(meta: dict, chosen: dict, gates: dict | None = None) -> dict:
    """The choice for every block of the graph's metadata (``"default"``: the top level, else a camera profile)
    that no measured image reached: the tiles (the exact computation) at its own gate (or ``gates[name]``)."""
    names = ["default"] + sorted((meta.get("profiles") or {}))
    out = {}
    for name in names:
        if name in chosen:
            continue
        block = meta if name == "default" else meta["profiles"][name]
        g = (gates or {}).get(name, (block.get("survey") or {}).get("gate", 0.0))
        out[name] = {"gate": float(g), "images": 0, "tiles_ms": None, "frame_ms": None, "model_pass": "tiles",
                     "recheck": 0.0, "why": "not measured (no image of this camera profile among the data): tiles"}
    return out


def write_graph(src: Path, dst: Path, chosen: dict, chosen_on: dict, gates: dict | None = None) -> dict:
    """A copy of the graph ``src`` whose top level and camera profiles carry the chosen pass, margin and gate;
    a block no image measured gets the tiles (:func:`unmeasured`)."""
    from crackcam.export import metadata as md

    meta = md.get_metadata(src)
    new = json.loads(json.dumps(meta))
    chosen = {**chosen, **unmeasured(meta, chosen, gates)}

    def put(block: dict, c: dict):
        sv = dict(block.get("survey") or {})
        sv.update(model_pass=c["model_pass"], recheck=c["recheck"], gate=c["gate"])
        block["survey"] = sv

    for name, c in chosen.items():
        if name == "default":
            put(new, c)
        else:
            put(new.setdefault("profiles", {})[name], c)
    new["cascade"] = {"chosen_on": chosen_on, "rule": "per profile: the smallest recheck margin losing no tile the "
                      "tile pass keeps on these images; the cascade only where it puts fewer pixels through the network than the tiles",
                      "profiles": {k: {kk: v[kk] for kk in ("model_pass", "recheck", "gate", "images",
                                                             "tiles_ms", "frame_ms", "why")} for k, v in chosen.items()}}
    md.write_with_metadata(src, dst, new)
    return new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crackcam.tools.cascade", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a frame-pass graph (python -m crackcam.export.frame_pass)")
    ap.add_argument("--data", type=Path, action="append", required=True, help="data set folder (repeat)")
    ap.add_argument("--splits", default="train,val", help="splits whose images are measured (never test)")
    ap.add_argument("--gate", type=float, default=None, help="the tile gate the cascade reproduces (default: the "
                    "graph's survey gate, per profile)")
    ap.add_argument("--rechecks", default=",".join(str(r) for r in RECHECKS), help="candidate margins")
    ap.add_argument("--limit", type=int, default=None, help="at most this many images per data set")
    ap.add_argument("--out", type=Path, default=None, help="write the graph with the chosen settings here")
    a = ap.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"cascade: {msg}", file=sys.stderr)
        return 2

    from crackcam.runtime.imageio import BadInputError
    from crackcam.runtime.meta import BackendUnavailable, ModelFileError
    from crackcam.runtime.pipeline import build_model_steps
    from crackcam.runtime.sessions import open_session

    if a.out is not None:
        try:
            import onnx  # noqa: F401 - write_graph needs it
        except ImportError:
            return fail("--out writes a graph: it needs the onnx package (pip install 'crackcam[train]')")
    splits = tuple(s.strip() for s in a.splits.split(",") if s.strip())
    if "test" in splits:
        return fail("--splits: the margin is chosen on training / validation images, never on test")
    try:
        rechecks = [float(v) for v in a.rechecks.split(",") if v.strip()]
    except ValueError:
        return fail(f"--rechecks {a.rechecks!r}: give comma-separated numbers")
    if not rechecks or not all(0 <= r <= 1 for r in rechecks):
        return fail(f"--rechecks {a.rechecks!r}: margins must lie in [0, 1]")
    try:
        sess = open_session(a.model, provider="cpu", log=lambda m: None)
        if not sess.meta.frame_pass:
            return fail(f"{a.model}: not a frame-pass graph (cut one with python -m crackcam.export.frame_pass)")
        steps = build_model_steps(sess, survey={"gate": a.gate} if a.gate is not None else None)
        paths = []
        for d in a.data:
            ps = _images(d, splits)
            paths += ps[:a.limit] if a.limit else ps
    except (ModelFileError, BackendUnavailable, BadInputError) as exc:
        return fail(str(exc))
    if not paths:
        return fail("no image to measure")
    recs = measure(sess, steps, paths, log=lambda m: print(m, file=sys.stderr))
    th, tw = sess.meta.frame_pass["tile"]
    chosen = {name: choose(rec, rechecks, int(th) * int(tw)) for name, rec in sorted(recs.items())}
    gates = {name or "default": float(st.survey.gate) for name, st in steps.profiles()}
    for name, c in unmeasured(sess.meta.raw, chosen, gates).items():
        print(f"profile {name}: no image of its size among the data; it runs tiles (gate {c['gate']:g})")
    for name, c in chosen.items():
        print(f"profile {name}: {c['images']} images, gate {c['gate']:g}, {c['tiles_per_frame']} tiles per frame; "
              f"model per frame: tiles {c['tiles_ms']} ms, one pass {c['frame_ms']} ms")
        print(f"  {'recheck':>7} {'re-run/frame':>12} {'tiles lost':>10} {'frames':>6} {'cost':>6} {'model ms':>8}"
              f"   (cost: pixels through the network / the tiles'; one pass alone {c['one_pass_cost']})")
        for r in c["table"]:
            print(f"  {r['recheck']:>7g} {r['rerun_per_frame']:>12} {r['tiles_lost']:>10} "
                  f"{r['frames_with_a_loss']:>6} {r['cost']:>6} {r['model_ms']:>8}")
        print(f"  chosen: {c['model_pass']}, recheck {c['recheck']:g} ({c['why']})")
    chosen_on = {"data": [str(d) for d in a.data], "splits": list(splits), "images": len(paths),
                 "limit": a.limit}
    print(json.dumps({"chosen_on": chosen_on,
                      "profiles": {k: {kk: v for kk, v in c.items() if kk != "table"} for k, c in chosen.items()}}))
    if a.out is not None:
        write_graph(a.model, a.out, chosen, chosen_on, gates)
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
