"""``crack-bench survey``: survey frames end to end — crack-run FPS on full-size frames next to the model alone,
with the per-frame cost of every step, in one run.

    crack-bench survey                                  # packaged model, ../shared/datasets/paveseg/images
    crack-bench survey --model m.onnx --frames DIR --batch 8 --repeats 3

Prints (side by side, same model, provider and frames): bare ONNX Runtime FPS on the frames' tiles (preloaded, the
model alone), crack-run FPS end to end (decode → tiles → model → gate/stitch → refine → post-processing →
results.jsonl, the threaded pipeline), and the per-frame breakdown of a sequential pass (decode, plan + cut, model,
merge + refine + ROI, post-processing + decision) so that throughput elsewhere can be planned from it.  With no
``--model``: the packaged default (``default.onnx``: the cascade — one pass proposes, the tiles near the gate are
re-run as tiles) and, after it on the same frames, the tile graph it reproduces (``default_tiles.onnx``, the
reference) and the pure one pass (``default_frame.onnx``).  Each model's block ends with a JSON line of its figures.  Without the shared frames, 1280×1080 frames are drawn in code.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from crackcam.runtime import survey as S
from crackcam.runtime.imageio import list_images, read_image
from crackcam.runtime.pipeline import Pipeline, RunConfig
from crackcam.runtime.sessions import open_session
from crackcam.runtime.sources import ImageListSource
from crackcam.runtime.steps import FrameSteps, frame_pass_input, infer_frame, pad_batch, proposed_tiles

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "default.onnx"
TILES_MODEL = DEFAULT_MODEL.with_name("default_tiles.onnx")  # the tile graph the default's cascade reproduces
FRAME_MODEL = DEFAULT_MODEL.with_name("default_frame.onnx")  # the pure one-pass variant (crackcam.export.frame_pass)
SHARED_FRAMES = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "paveseg" / "images"
TARGET_FPS = 10.0


def _frames(arg: str | None, n: int, workdir: Path) -> tuple[list[Path], str]:
    folder = Path(arg) if arg else (SHARED_FRAMES if SHARED_FRAMES.is_dir() else None)
    if folder is not None:
        paths = list_images(folder)[:n]
        if paths:
            return paths, str(folder)
    from crackcam.train.synth import draw_crack_image

    rng = np.random.default_rng(0)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = draw_crack_image(rng, 1080, 1280)[0]
        p = workdir / f"frame{i:03d}.jpg"
        cv2.imwrite(str(p), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        paths.append(p)
    return paths, f"{n} drawn 1280x1080 frames (shared PaveSeg frames absent)"


def tile_batches(sess, steps: FrameSteps, imgs: list, batch: int) -> list:
    """The tiles ``crack-run`` cuts from each BGR frame (the model's survey plan), preloaded as the uint8 batches
    it would feed the session (a fixed-batch graph's last batch zero-padded): the benchmarks' "model alone"."""
    tiles = [t for im in imgs for t in steps.tiles(im, steps.plan(im))]
    nb = sess.meta.batch or batch
    out = []
    for i in range(0, len(tiles), nb):
        b = np.stack(tiles[i:i + nb])
        if sess.meta.batch and len(b) < nb:
            b = np.concatenate([b, np.zeros((nb - len(b),) + b.shape[1:], b.dtype)])
        out.append(b)
    return out


def frame_batches(steps: FrameSteps, imgs: list, stride: int) -> list:
    """A frame-pass graph's "model alone": each frame's padded work image as ``infer_frame`` feeds it."""
    return [frame_pass_input(im, steps.plan(im), stride) for im in imgs]


def bench(model: Path, paths: list, where: str, a, work: Path) -> dict:
    """One model's figures on ``paths``: the model alone, crack-run end to end, the per-frame breakdown."""
    sess = open_session(model, provider=a.provider, log=print, threads=a.threads, spin=False)
    steps = FrameSteps.from_meta(sess.meta)
    imgs = [np.ascontiguousarray(read_image(p)[..., ::-1]) for p in paths]
    h, w = imgs[0].shape[:2]
    # 1. the model alone on every frame's tiles (or work image, and the tiles a cascade re-runs), preloaded
    nb = sess.meta.batch or a.batch
    mode = steps.pass_for(sess.meta)  # tiles / frame / cascade (crackcam.runtime.steps.FrameSteps.infer)
    fp = sess.meta.frame_pass  # a frame-pass graph: one call per frame on its padded work image
    plan = steps.plan(imgs[0])  # the plan of a frame of this size (reported below)
    if mode == "tiles":
        calls = [(sess.run, b) for b in tile_batches(sess, steps, imgs, a.batch)]
    else:
        calls = []
        for im, wk in zip(imgs, frame_batches(steps, imgs, fp["stride"])):
            calls.append((sess.run_logits, wk))
            if mode == "cascade":  # the tiles this frame's one pass proposes, as the cascade re-runs them
                pl = steps.plan(im)
                tl = proposed_tiles(im, pl, infer_frame(sess, im, pl)[0], steps.recheck_floor)[1]
                calls += [(sess.run, pad_batch(np.stack(tl[i:i + nb]), sess.meta.batch))
                          for i in range(0, len(tl), nb)]
    calls[0][0](calls[0][1])
    bare = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        for fn, b in calls:
            fn(b)
        bare.append(len(imgs) / (time.perf_counter() - t))
    # 2. crack-run end to end
    e2e, summ = [], None
    for r in range(a.repeats):
        out = work / f"run{r}"
        shutil.rmtree(out, ignore_errors=True)
        src = ImageListSource(paths, str(Path(paths[0]).parent), log=lambda m: None)
        summ = Pipeline(sess, src, RunConfig(out=out, batch=a.batch, progress=False, resume=False),
                        log=lambda m: None).run()
        records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
        e2e.append(summ["fps"])
    # 3. per-frame breakdown, sequential
    parts = {"decode": [], "plan_cut": [], "model": [], "merge_refine_roi": [], "post_decide": []}
    refined = 0  # frames with a tile above the gate: only those run the refinement (38 ms of a 640x540 frame)
    for p in paths:
        t0 = time.perf_counter()
        im = read_image(p, order="bgr")  # what the runtime's image source hands on
        t1 = time.perf_counter()
        pl = steps.plan(im)
        tl = steps.tiles(im, pl) if mode == "tiles" else None
        t2 = time.perf_counter()
        probs, maps, _ = steps.infer(sess, im, pl, nb, tiles=tl)
        t3 = time.perf_counter()
        cmap, prob, tprobs = steps.frame_map(im, pl, probs, maps)
        t4 = time.perf_counter()
        refined += int(steps.refine is not None and bool(np.any(np.asarray(tprobs) >= steps.survey.gate)))
        from crackcam.runtime.postprocess import postprocess

        res = postprocess(cmap, steps.post)
        S.decide_frame(float(res.measures.get("length_px", 0.0)), bool(res.mask.any()), steps.survey)
        t5 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[k].append(1000 * v)
    ms = {k: round(float(np.mean(v)), 2) for k, v in parts.items()}  # the mean: what throughput pays
    ms_median = {k: round(float(np.median(v)), 2) for k, v in parts.items()}
    best_e2e = max(e2e)
    print(f"crack-bench survey: {len(paths)} frames {w}x{h} from {where}; model {model.name} "
          f"({sess.provider}), {plan.n_tiles} tiles of {plan.tile[0]}x{plan.tile[1]} per frame at "
          f"work scale {plan.scale:g}, " + (f"batch {nb}" if mode == "tiles" else
                                             f"read out of one frame pass ({fp['stride']}-px logits)" +
                                             (f", re-run as tiles from {steps.recheck_floor:g}"
                                              f" (gate {steps.survey.gate:g} - recheck {steps.survey.recheck:g})"
                                              if mode == "cascade" else "")))
    what = {"tiles": "tiles", "frame": "work images", "cascade": "work images + re-run tiles"}[mode]
    print(f"  {f'bare ONNX Runtime (model alone, {what} preloaded)':<52} {max(bare):7.2f} FPS")
    print(f"  {'crack-run end to end':<52} {best_e2e:7.2f} FPS   (target >= {TARGET_FPS:g}; "
          f"{best_e2e / max(bare):.2f}x the model alone)")
    print(f"  per frame (sequential, mean ms over {len(paths)} frames): " + ", ".join(f"{k} {v}" for k, v in ms.items())
          + (f"; refinement on {refined} of {len(paths)} frames (the others: no tile above the gate)"
             if steps.refine is not None else ""))
    fig = {"frames": len(paths), "frame_size": [w, h], "source": where, "model": str(model),
                      "provider": sess.provider, "tiles_per_frame": plan.n_tiles, "frame_pass": bool(fp), "model_pass": mode,
                      "tile": list(plan.tile), "work_scale": plan.scale, "bare_fps": round(max(bare), 2),
                      "e2e_fps": round(best_e2e, 2), "e2e_all": e2e, "bare_all": [round(b, 2) for b in bare],
                      "ms_per_frame": ms, "ms_per_frame_median": ms_median, "refined_frames": refined,
                      "target_fps": TARGET_FPS, "cracked": summ["cracked"]}
    print(json.dumps(fig))
    fig["_records"] = records  # the last end-to-end run's records (compared across models by main)
    return fig


def compare_records(a: list, b: list) -> dict:
    """How two runs' records of the same frames agree: decisions, crack length and area (the mask's measures)
    per frame, and the largest difference of the frame probability."""
    ra, rb = {r["key"]: r for r in a}, {r["key"]: r for r in b}
    keys = sorted(set(ra) & set(rb))
    same = [k for k in keys if ra[k]["cracked"] == rb[k]["cracked"] and ra[k]["area_px"] == rb[k]["area_px"]
            and abs(ra[k]["length_px"] - rb[k]["length_px"]) < 1e-3]
    return {"frames": len(keys), "same_decision_length_area": len(same),
            "max_prob_diff": round(max((abs(ra[k]["prob"] - rb[k]["prob"]) for k in keys), default=0.0), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="crack-bench survey", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="ONNX model (default: the packaged one)")
    ap.add_argument("--frames", default=None, help="folder of frames (default: the shared PaveSeg frames)")
    ap.add_argument("--n", type=int, default=50, help="frames to use")
    ap.add_argument("--batch", type=int, default=8, help="tiles per inference call")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    ap.add_argument("--provider", default="cpu")
    a = ap.parse_args(argv)
    models = [Path(a.model)] if a.model else [DEFAULT_MODEL] + [m for m in (TILES_MODEL, FRAME_MODEL) if m.is_file()]
    work = Path(tempfile.mkdtemp(prefix="crackbench_survey_"))
    try:
        paths, where = _frames(a.frames, a.n, work / "frames")
        figs = {}
        for model in models:  # the packaged default and, next to it, the tile graph and the pure one pass
            figs[model] = bench(model, paths, where, a, work)
        if DEFAULT_MODEL in figs and TILES_MODEL in figs:  # what the default's cascade is for: the tiles' outputs
            for other in [m for m in figs if m != TILES_MODEL]:
                c = compare_records(figs[other]["_records"], figs[TILES_MODEL]["_records"])
                print(f"{other.name} vs {TILES_MODEL.name}: decision, crack length and area the same on "
                      f"{c['same_decision_length_area']} of {c['frames']} frames; frame probability within "
                      f"{c['max_prob_diff']:g}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
