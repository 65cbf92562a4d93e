"""``python -m crackcam.tools.bench_runtime`` (``crack-bench runtime``): crack-run throughput and memory.

One run prints, side by side:

1. bare ONNX Runtime FPS on preloaded uint8 tensors (the reference: the model alone) vs ``crack-run`` end-to-end
   FPS on a folder of 448×448 JPEGs (decode + inference + post-processing + results.jsonl; same model, same batch,
   same provider), and their ratio (target ≥ 0.9×);
2. post-processing ms per 448×448 frame: the shared implementation (``crackcam.runtime.postprocess``) next to a
   scikit-image-only pipeline doing the same steps (threshold, closing/opening, small-object removal,
   skeleton, length/area/width/segments).

``--long``: a 10,000-frame video through the pipeline, printing resident memory (RSS) at the start, every 1,000
frames and at the end — memory must stay flat.

Model: ``--model FILE.onnx``; default ``crackcam/assets/default_tiles.onnx`` (the packaged tile graph) if present, else a small CNN built in code
(``crackcam.runtime.toy``, 4 stride-2 convolutions) so the command works anywhere.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from crackcam.runtime.pipeline import Pipeline, RunConfig, model_refine_block, refine_frame, rss_mb
from crackcam.runtime.postprocess import PostProcessConfig, postprocess
from crackcam.runtime.sessions import open_session
from crackcam.runtime.imageio import read_image
from crackcam.runtime.sources import ImageListSource, VideoSource
from crackcam.runtime.steps import FrameSteps

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "default_tiles.onnx"  # the tile graph (default.onnx: its cascade)


def _model(arg: str | None, workdir: Path, convs: int, channels: int, size: int | None) -> tuple[Path, str]:
    if arg:
        return Path(arg), Path(arg).name
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL, "crackcam/assets/default_tiles.onnx"
    from crackcam.runtime.toy import make_toy_model

    p = make_toy_model(workdir / "toy_cnn.onnx", convs=convs, channels=channels, height=size, width=size)
    return p, f"toy CNN built in code ({convs} stride-2 3x3 convs, {channels} ch; default_tiles.onnx absent)"


def _synth_frames(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    from crackcam.train.synth import draw_crack_image

    rng = np.random.default_rng(seed)
    return [draw_crack_image(rng, size, size)[0][..., ::-1].copy() for _ in range(n)]  # BGR


def bench_fps(model: Path, n_images: int, size: int, batch: int, provider: str, threads: int | None,
              workdir: Path, repeats: int, run_kw: dict | None = None) -> dict:
    """``run_kw``: extra RunConfig settings of the crack-run side (e.g. ``{"tile": size}``: one pass per frame)."""
    folder = workdir / "jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    frames = _synth_frames(min(n_images, 32), size)
    paths = []
    for i in range(n_images):
        p = folder / f"f{i:05d}.jpg"
        cv2.imwrite(str(p), frames[i % len(frames)], [cv2.IMWRITE_JPEG_QUALITY, 92])
        paths.append(p)
    quiet = lambda m: None  # noqa: E731
    sess = open_session(model, provider=provider, log=print, threads=threads, spin=False)  # as crack-run opens it
    if sess.meta.frame_pass:
        raise SystemExit(f"crack-bench runtime: {Path(model).name} is a frame-pass graph (one pass per frame); "
                         f"measure it with crack-bench survey --model {model}")
    fixed = sess.meta.fixed_size
    tiled = bool(fixed and fixed != (size, size))
    if tiled:
        print(f"note: model input is fixed at {fixed[0]}x{fixed[1]}; frames of {size}x{size} are tiled")
    # bare ONNX Runtime: the same decoded frames, preloaded as uint8 NHWC batches
    imgs = [cv2.imread(str(p)) for p in paths]
    if tiled:  # the model alone on the tiles crack-run cuts from these frames (as crack-bench survey measures it)
        from crackcam.tools.bench_survey import tile_batches

        steps = FrameSteps.from_meta(sess.meta)
        batches = tile_batches(sess, steps, imgs, batch)
    else:
        batches = [np.stack(imgs[i:i + batch]) for i in range(0, len(imgs), batch)]
        if sess.meta.batch:  # fixed-batch graphs
            batches = [b if len(b) == sess.meta.batch else
                       np.concatenate([b, np.zeros((sess.meta.batch - len(b),) + b.shape[1:], b.dtype)])
                       for b in batches]
    for b in batches[:2]:
        sess.run(b)  # warm-up
    t = time.perf_counter()
    for p in paths:
        cv2.cvtColor(read_image(p), cv2.COLOR_RGB2BGR)
    decode_ms = 1000 * (time.perf_counter() - t) / len(paths)
    bare, e2e, e2e_stats, maps, e2e_plain = [], [], None, [], []
    refine_block = model_refine_block(sess.meta)
    has_refine = refine_block is not None
    for r in range(repeats):
        t = time.perf_counter()
        for b in batches:
            out = sess.run(b)
            if r == 0 and not tiled:
                maps.extend(out[1][:len(b)])
        bare.append(len(imgs) / (time.perf_counter() - t))
        out = workdir / f"run{r}"
        shutil.rmtree(out, ignore_errors=True)
        src = ImageListSource(paths, str(folder), log=quiet)
        cfg = RunConfig(out=out, batch=batch, progress=False, resume=False, **(run_kw or {}))
        s = Pipeline(sess, src, cfg, log=quiet).run()
        e2e.append(s["fps"])
        e2e_stats = s
        if has_refine:  # the same run without the recipe's refinement step (the pixel cue on every frame)
            shutil.rmtree(out, ignore_errors=True)
            src = ImageListSource(paths, str(folder), log=quiet)
            cfg = RunConfig(out=out, batch=batch, progress=False, resume=False, no_refine=True)
            e2e_plain.append(Pipeline(sess, src, cfg, log=quiet).run()["fps"])
    refine_ms = 0.0
    if has_refine and tiled:  # the frame steps with and without the refinement, on the tiles' own maps
        plain = FrameSteps(steps.survey, None, steps.post, steps.fixed_size)
        ts = []
        for img in imgs[:10]:
            pl = steps.plan(img)
            probs, tmaps = [], []
            for b in tile_batches(sess, steps, [img], batch):
                pr, mp = sess.run(b)[:2]
                probs += list(pr)
                tmaps += list(mp)
            probs, tmaps = probs[:pl.n_tiles], tmaps[:pl.n_tiles]
            t = time.perf_counter()
            steps.frame_map(img, pl, probs, tmaps)
            t1 = time.perf_counter()
            plain.frame_map(img, pl, probs, tmaps)
            ts.append((t1 - t) - (time.perf_counter() - t1))
        refine_ms = 1000 * max(0.0, float(np.median(ts)))
    elif has_refine and maps:
        from crackcam.runtime.cues import RefineConfig

        rcfg = RefineConfig.from_dict(refine_block)
        ts = []
        for img, m in list(zip(imgs, maps))[:10]:
            t = time.perf_counter()
            refine_frame(img, m, rcfg)
            ts.append(time.perf_counter() - t)
        refine_ms = 1000 * float(np.median(ts))
    return {"decode_ms": decode_ms, "refine_ms": refine_ms, "maps": maps[:len(paths)],
            "bare_fps": max(bare) if bare else None, "e2e_fps": max(e2e), "provider": sess.provider,
            "frames": len(paths), "summary": e2e_stats, "pp_cfg": Pipeline(sess, ImageListSource([], ""), RunConfig(
                out=workdir / "x", progress=False), log=quiet).pp_cfg, "bare_all": bare, "e2e_all": e2e,
            "e2e_plain_fps": max(e2e_plain) if e2e_plain else None, "e2e_plain_all": e2e_plain}


# ---------------------------------------------------------------------------------------- post-processing
def skimage_postprocess(cmap: np.ndarray, cfg: PostProcessConfig, t: float) -> dict:
    """The same steps with scikit-image / SciPy only: the reference of the post-processing timings (``crack-bench
    runtime`` and ``crack-bench postprocess``): threshold, hysteresis, closing/opening, small components, wide
    components, skeleton and measures (the skeletons differ in detail: scikit-image's vs crackcam's Zhang–Suen)."""
    from scipy import ndimage as ndi
    from skimage import measure, morphology

    mask = (cmap >= t) & (cmap > 0)
    if cfg.hysteresis > 0 and mask.any():  # weak 8-connected pieces (>= f·t) that hold a strong pixel
        weak = measure.label((cmap >= cfg.hysteresis * t) & (cmap > 0), connectivity=2)
        keep = np.zeros(int(weak.max()) + 1, bool)
        keep[np.unique(weak[mask])] = True
        keep[0] = False
        mask = keep[weak] | mask
    if cfg.close_radius > 0:
        mask = morphology.closing(mask, morphology.disk(cfg.close_radius))
    if cfg.open_radius > 0:
        mask = morphology.opening(mask, morphology.disk(cfg.open_radius))
    if cfg.min_area > 1:
        mask = morphology.remove_small_objects(mask, max_size=cfg.min_area - 1, connectivity=2)
    if not cfg.skeleton and cfg.max_width <= 0:  # crackcam's mask-only path: no skeleton, no measures
        return {"area_px": int(mask.sum())}
    sk = morphology.skeletonize(mask)
    if cfg.max_width > 0 and mask.any():  # components wider on average than max_width: area / skeleton pixels
        lab = measure.label(mask, connectivity=2)
        area = np.bincount(lab.ravel())
        skl = np.bincount(lab[sk], minlength=len(area))
        wide = area > cfg.max_width * np.maximum(skl, 1)
        wide[0] = False
        mask = mask & ~wide[lab]
        sk = sk & ~wide[lab]
    area = int(mask.sum())
    # length: orthogonal steps 1, diagonal √2 (counted once per pixel pair)
    p = np.pad(sk, 1)
    c = p[1:-1, 1:-1]
    n_orth = np.count_nonzero(c & p[1:-1, 2:]) + np.count_nonzero(c & p[2:, 1:-1])
    n_diag = (np.count_nonzero(c & p[2:, 2:] & ~p[1:-1, 2:] & ~p[2:, 1:-1])
              + np.count_nonzero(c & p[2:, :-2] & ~p[1:-1, :-2] & ~p[2:, 1:-1]))
    length = n_orth + np.sqrt(2) * n_diag
    dt = ndi.distance_transform_edt(mask)
    maxw = 2 * float(dt[sk].max()) - 1 if sk.any() else 0.0
    nb = ndi.convolve(sk.astype(np.uint8), np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], np.uint8), mode="constant")
    segs = int(measure.label(sk & ~(nb >= 3), connectivity=2).max())
    return {"length_px": length, "area_px": area, "mean_width_px": area / length if length else 0.0,
            "max_width_px": maxw, "segments": segs, "components": int(measure.label(mask, connectivity=2).max())}


def crack_maps(n: int, size: int, seed: int = 1) -> list[np.ndarray]:
    """CAM-like crack maps: each synthetic crack mask blurred (σ 3 px) and scaled, over a faint noise floor."""
    from crackcam.train.synth import draw_crack

    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        m = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(1, 3))):
            m = np.maximum(m, draw_crack(rng, size, size).astype(np.float32))
        m = cv2.GaussianBlur(m, (0, 0), 3.0)
        m = m / max(float(m.max()), 1e-6) * rng.uniform(0.7, 1.0)
        m += rng.uniform(0, 0.15, m.shape).astype(np.float32) * (m > 0.02)
        maps.append(np.clip(m, 0, 1).astype(np.float32))
    return maps


def bench_post(cfg: PostProcessConfig, maps: list[np.ndarray]) -> dict:
    out = {}
    for name in ("crackcam", "skimage"):
        ts = []
        for m in maps:
            t = time.perf_counter()
            if name == "crackcam":
                postprocess(m, cfg)
            else:
                from crackcam.runtime.postprocess import resolve_threshold

                skimage_postprocess(m, cfg, resolve_threshold(m, cfg.threshold))
            ts.append(time.perf_counter() - t)
        out[name] = 1000 * float(np.median(ts))
    # the two agree on the measures (same steps)
    a = postprocess(maps[0], cfg).measures
    from crackcam.runtime.postprocess import resolve_threshold

    b = skimage_postprocess(maps[0], cfg, resolve_threshold(maps[0], cfg.threshold))
    out["area_same"] = a["area_px"] == b["area_px"]
    out["length"] = (a["length_px"], b["length_px"])
    return out


# ---------------------------------------------------------------------------------------- long run
def bench_long(model: Path, n_frames: int, size: int, batch: int, provider: str, threads: int | None,
               workdir: Path, video: Path | None) -> dict:
    vid = video or workdir / "long.avi"
    if video is None:
        frames = _synth_frames(16, size, seed=2)
        vw = cv2.VideoWriter(str(vid), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (size, size))
        t = time.perf_counter()
        for i in range(n_frames):
            vw.write(frames[i % len(frames)])
        vw.release()
        print(f"wrote {n_frames}-frame {size}x{size} MJPG video in {time.perf_counter() - t:.1f} s: {vid}")
    sess = open_session(model, provider=provider, log=print, threads=threads, spin=False)  # as crack-run opens it
    src = VideoSource(vid, log=lambda m: None)
    out = workdir / "long_out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = RunConfig(out=out, batch=batch, progress=False, resume=False)
    pipe = Pipeline(sess, src, cfg, log=print)
    samples = []
    done = threading.Event()

    def sampler():
        nxt = 0
        while not done.is_set():
            f = pipe.stats["frames"]
            if f >= nxt:
                samples.append((f, rss_mb()))
                print(f"  frame {f:6d}: RSS {samples[-1][1]:.1f} MiB", flush=True)
                nxt = (f // 1000 + 1) * 1000
            time.sleep(0.05)

    rss0 = rss_mb()
    print(f"start RSS {rss0:.1f} MiB (model loaded, before the first frame)")
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    s = pipe.run()
    done.set()
    th.join()
    rss1 = rss_mb()
    print(f"end RSS {rss1:.1f} MiB after {s['frames']} frames ({s['fps']:.1f} FPS); max sampled "
          f"{max(r for _, r in samples):.1f} MiB")
    after1k = [r for f, r in samples if f >= 1000]
    return {"frames": s["frames"], "fps": s["fps"], "rss_start": rss0, "rss_end": rss1,
            "rss_at_1000": after1k[0] if after1k else None, "rss_max": max(r for _, r in samples)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="crack-bench runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="ONNX model (default: crackcam/assets/default_tiles.onnx, else a toy CNN)")
    ap.add_argument("--images", type=int, default=64, help="448x448 JPEGs in the folder")
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--provider", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for both FPS figures")
    ap.add_argument("--post-frames", type=int, default=30)
    ap.add_argument("--convs", type=int, default=4, help="toy CNN depth (when no model is given)")
    ap.add_argument("--channels", type=int, default=32, help="toy CNN width")
    ap.add_argument("--long", action="store_true", help="also the 10,000-frame video run with RSS figures")
    ap.add_argument("--long-frames", type=int, default=10_000)
    ap.add_argument("--long-size", type=int, default=224)
    ap.add_argument("--long-model", help="model for --long (default: a small toy CNN, 8 channels, fast)")
    ap.add_argument("--video", help="--long: use this video instead of writing one")
    ap.add_argument("--skip-fps", action="store_true", help="only --long")
    ap.add_argument("--workdir", help="keep the files here (default: a temp folder, removed)")
    a = ap.parse_args(argv)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="crackbench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"crack-bench runtime: {os.cpu_count()} CPU cores, python {sys.version.split()[0]}")
        if not a.skip_fps:
            model, desc = _model(a.model, work, a.convs, a.channels, None)
            print(f"model: {desc}")
            r = bench_fps(model, a.images, a.size, a.batch, a.provider, a.threads, work, a.repeats)
            print(f"\n{'':34s}{'FPS':>10s}")
            if r["bare_fps"]:
                runs = [round(x, 2) for x in r["bare_all"]]
                print(f"{'bare ONNX Runtime (preloaded)':34s}{r['bare_fps']:10.1f}   runs {runs}")
            print(f"{'crack-run end-to-end (JPEG folder)':34s}{r['e2e_fps']:10.1f}   runs {r['e2e_all']}")
            if r["bare_fps"]:
                ratio = r["e2e_fps"] / r["bare_fps"]
                print(f"{'ratio end-to-end / bare':34s}{ratio:10.2f}x  (target >= 0.90x; {r['frames']} frames "
                      f"{a.size}x{a.size}, batch {a.batch}, provider {r['provider']})")
            if r["e2e_plain_fps"]:
                print(f"{'crack-run --no-refine':34s}{r['e2e_plain_fps']:10.1f}   runs {r['e2e_plain_all']}   "
                      f"(the model's recipe adds a pixel-cue refinement per frame; without it)")
                if r["bare_fps"]:
                    print(f"{'ratio --no-refine / bare':34s}{r['e2e_plain_fps'] / r['bare_fps']:10.2f}x")
            bare_ms = 1000 / r["bare_fps"] if r["bare_fps"] else float("nan")
            sets = [("CAM-like synthetic maps", crack_maps(a.post_frames, a.size))]
            if r["maps"]:
                sets.append(("this model's maps of the frames", r["maps"][:a.post_frames]))
            pp_ms = None
            for label, maps in sets:
                pp = bench_post(r["pp_cfg"], maps)
                pp_ms = pp["crackcam"]
                print(f"\npost-processing per {a.size}x{a.size} frame, median over {len(maps)} {label} "
                      f"(config {r['pp_cfg'].to_dict()}):")
                print(f"{'crackcam.runtime.postprocess':34s}{pp['crackcam']:10.2f} ms")
                print(f"{'scikit-image only':34s}{pp['skimage']:10.2f} ms   (x{pp['skimage'] / pp['crackcam']:.1f} the "
                      f"shared code's time; same area: {pp['area_same']}, length {pp['length'][0]:.1f} vs "
                      f"{pp['length'][1]:.1f} px)")
            rf = r["refine_ms"]
            print(f"\nCPU work per frame: decode {r['decode_ms']:.1f} ms, inference {bare_ms:.1f} ms (bare, all "
                  f"threads), refinement {rf:.1f} ms, post-processing {pp_ms:.1f} ms.  When inference runs on the "
                  f"same saturated CPU the end-to-end ratio is bounded by about inference / (inference + decode + "
                  f"refinement + post) = {bare_ms / (bare_ms + r['decode_ms'] + rf + pp_ms):.2f}; with a GPU, or a "
                  f"free core for the reader/post threads, decode and post-processing overlap inference.")
        if a.long:
            if a.long_model:
                lm = Path(a.long_model)
            else:
                from crackcam.runtime.toy import make_toy_model

                lm = make_toy_model(work / "toy_small.onnx", convs=4, channels=8)
            print(f"\nlong run: {a.long_frames} frames, model {lm.name}")
            bench_long(lm, a.long_frames, a.long_size, a.batch, a.provider, a.threads, work,
                       Path(a.video) if a.video else None)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
