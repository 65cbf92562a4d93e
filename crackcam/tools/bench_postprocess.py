"""``python -m crackcam.tools.bench_postprocess`` (``crack-bench postprocess``): per-frame milliseconds of the
shared post-processing (crackcam.runtime.postprocess: OpenCV + sparse NumPy thinning) next to a scikit-image-only
pipeline doing the same steps, on synthetic 448×448 crack maps.  Targets: ≤ 1 ms threshold + morphology +
components, ≤ 4 ms with skeleton and measures (per frame, one thread)."""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from crackcam.runtime.postprocess import PostProcessConfig, postprocess, skeletonize
from crackcam.tools.bench_runtime import skimage_postprocess
from crackcam.train.synth import draw_crack


def _maps(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = np.zeros((size, size), bool)
        for _ in range(int(rng.integers(1, 4))):
            m |= draw_crack(rng, size, size, width=(2, 6))
        soft = cv2.GaussianBlur(m.astype(np.float32), (0, 0), 1.2)
        noise = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 1.5)
        out.append(np.clip(0.8 * soft / max(soft.max(), 1e-6) + 0.5 * noise, 0, 1).astype(np.float32))
    return out


def _time(fn, maps, repeat: int) -> float:
    fn(maps[0])
    best = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for m in maps:
            fn(m)
        best.append((time.perf_counter() - t0) / len(maps) * 1000)
    return float(np.median(best))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="crack-bench postprocess", description=__doc__)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--min-area", type=int, default=30)
    ap.add_argument("--close-radius", type=int, default=1)
    a = ap.parse_args(argv)
    cv2.setNumThreads(1)
    maps = _maps(a.frames, a.size)
    base = dict(threshold=a.threshold, min_area=a.min_area, close_radius=a.close_radius)
    c0 = PostProcessConfig(**base, skeleton=False)
    c1 = PostProcessConfig(**base, skeleton=True)
    rows = [("threshold + morphology + components", _time(lambda m: postprocess(m, c0), maps, a.repeat), 1.0,
             lambda m: skimage_postprocess(m, c0, a.threshold)),
            ("... + skeleton + measures", _time(lambda m: postprocess(m, c1), maps, a.repeat), 4.0,
             lambda m: skimage_postprocess(m, c1, a.threshold))]
    try:
        import skimage  # noqa: F401

        ref = [_time(r[3], maps, a.repeat) for r in rows]
    except ImportError:
        ref = [float("nan")] * len(rows)
    masks = [postprocess(m, c0).mask for m in maps]
    sk_fast = _time(lambda i: skeletonize(masks[i]), list(range(len(masks))), a.repeat)
    sk_cv = _time(lambda i: skeletonize(masks[i], "opencv"), list(range(len(masks))), a.repeat)
    try:
        sk_sk = _time(lambda i: skeletonize(masks[i], "skimage"), list(range(len(masks))), a.repeat)
    except ImportError:
        sk_sk = float("nan")
    cover = np.mean([mk.mean() for mk in masks]) * 100
    print(f"post-processing, {a.frames} synthetic {a.size}×{a.size} crack maps ({cover:.1f} % crack pixels), "
          f"1 thread, median of {a.repeat} runs, ms per frame")
    print(f"{'step':<40}{'crackcam':>10}{'scikit-image':>14}{'target':>9}")
    for (name, t, target, _), r in zip(rows, ref):
        ok = "ok" if t <= target else "MISSED"
        print(f"{name:<40}{t:>10.2f}{r:>14.2f}{target:>7.1f} {ok}")
    print(f"{'skeleton only: sparse Zhang-Suen':<40}{sk_fast:>10.2f}{sk_sk:>14.2f}   (cv2.ximgproc.thinning {sk_cv:.2f})")
    res = postprocess(maps[0], c1)
    ref0 = skimage_postprocess(maps[0], c1, a.threshold)
    print(f"frame 0 measures: crackcam length {res.measures['length_px']:.1f} px, components "
          f"{res.measures['components']}, max width {res.measures['max_width_px']:.1f} | scikit-image length "
          f"{ref0['length_px']:.1f}, components {ref0['components']}, max width {ref0['max_width_px']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
