"""``crack-bench ray``: the Ray engine's overhead, on the same folder of 1280×1080 frames, in one run.

    crack-bench ray                          # packaged model, the shared PaveSeg frames (or drawn ones)
    crack-bench ray --frames DIR --n 50 --workers 1,2

Prints side by side: local ``crack-run`` FPS (the threaded pipeline, ONNX Runtime with ``W`` threads) and
``--engine ray`` FPS with ``W`` inference actors (each a session with cores / W threads) for each ``W``, the ratio
ray / local at the same worker count (target ≥ 0.8 on 2 cores: the point is the overhead), and the per-frame cost
breakdown from the records (model, frame steps after the model, and what the rest costs: decode, transfer through
the object store, scheduling), so cluster throughput can be planned from it.  Ray is started once before the timed
runs (its start-up is printed separately); each Ray run includes its actors' start.  Needs ``crackcam[cluster]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from crackcam.runtime import sinks
from crackcam.runtime.pipeline import Pipeline, RunConfig
from crackcam.runtime.sessions import open_session
from crackcam.runtime.sources import ImageListSource
from crackcam.tools.bench_survey import DEFAULT_MODEL, _frames

TARGET = 0.8


def _breakdown(out: Path) -> dict:
    recs = list(sinks.iter_records(out / "results.jsonl"))
    return {"infer_ms": float(np.mean([r["infer_ms"] for r in recs])),
            "post_ms": float(np.mean([r["post_ms"] for r in recs])),
            "frame_ms": float(np.mean([r["ms"] for r in recs])), "n": len(recs)}


def _start_ray_data(ray) -> None:
    """One trivial Ray Data pipeline (a task map, then a one-actor pool; no crackcam code): Ray Data's first
    execution on a cluster creates its detached actors (stats, autoscaling coordinator, actor-location tracker),
    which live as long as the cluster — an existing cluster (``--address auto``) has them already.  Timed apart,
    so that the first timed run does not carry a once-per-cluster cost the others do not."""
    import numpy as np_

    def ident(b):
        return b

    class Ident:
        def __call__(self, b):
            return b

    ray.data.DataContext.get_current().enable_progress_bars = False  # as run_ray sets it
    ds = ray.data.from_items([{"i": np_.int64(i)} for i in range(4)], override_num_blocks=2)
    ds = ds.map_batches(ident, batch_size=2, num_cpus=0.25)
    ds = ds.map_batches(Ident, compute=ray.data.ActorPoolStrategy(size=1), batch_size=2, num_cpus=0.25)
    for _ in ds.iter_rows():
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="crack-bench ray", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="ONNX model (default: the packaged one)")
    ap.add_argument("--frames", default=None, help="folder of frames (default: the shared PaveSeg frames)")
    ap.add_argument("--n", type=int, default=50, help="frames to use")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare (comma list)")
    ap.add_argument("--batch", type=int, default=8, help="tiles per inference call")
    ap.add_argument("--copies", type=int, default=4, help="the long runs take the frames this many more times "
                    "(under other names): marginal FPS = n·copies / (t(long) − t(n))")
    ap.add_argument("--decode", default="actor,tasks", help="Ray runs: where frames are decoded, comma list of "
                    "tasks | actor (each is timed)")
    ap.add_argument("--calls", default="2", help="Ray runs: batches an actor holds at once, comma list (each is "
                    "timed)")
    a = ap.parse_args(argv)
    from crackcam.runtime.ray_engine import DECODE_MODES, RayJob, import_ray, run_ray

    try:
        ray = import_ray()
    except Exception as e:  # noqa: BLE001 - BackendUnavailable: one line
        print(f"crack-bench ray: {e}")
        return 2
    import os

    model = Path(a.model) if a.model else DEFAULT_MODEL
    counts = [int(x) for x in a.workers.split(",") if x.strip()]
    decodes = [x.strip() for x in a.decode.split(",") if x.strip()]
    try:
        calls = [int(x) for x in a.calls.split(",") if x.strip()]
    except ValueError:
        calls = []
    if not calls or min(calls) < 1:
        print(f"crack-bench ray: --calls {a.calls!r}: give whole numbers >= 1")
        return 2
    bad = [d for d in decodes if d not in DECODE_MODES]
    if bad or not decodes:
        print(f"crack-bench ray: --decode {a.decode!r}: choose from {', '.join(DECODE_MODES)}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="crackbench_ray_"))
    cores = os.cpu_count() or 1
    rows = []
    try:
        paths, where = _frames(a.frames, a.n, work / "frames")
        # copies of the frames under other names: the long runs give the marginal (steady-state) FPS,
        # n·copies / (t(long) − t(n)), without the fixed start-up (Ray actors, sessions)
        (work / "copy").mkdir()
        copies: list[Path] = []
        for k in range(max(1, a.copies)):
            for p in paths:
                q = work / "copy" / f"c{k}_{p.name}"
                q.symlink_to(p.resolve())
                copies.append(q)
        lists = {}
        for k, ps in (("n", paths), ("long", paths + copies)):
            lists[k] = work / f"list_{k}.txt"
            lists[k].write_text("\n".join(str(p) for p in ps) + "\n")
        t = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        ray_start = time.perf_counter() - t
        t = time.perf_counter()
        _start_ray_data(ray)
        ray_data_start = time.perf_counter() - t
        n = len(paths)

        def local(ps, out, w):
            sess = open_session(model, provider="cpu", log=lambda m: None, threads=cores, spin=False)
            t0 = time.perf_counter()
            Pipeline(sess, ImageListSource(ps, where, log=lambda m: None),
                     RunConfig(out=out, batch=a.batch, progress=False, post_workers=w), log=lambda m: None).run()
            return time.perf_counter() - t0

        def on_ray(lst, out, w, dec, calls):
            t0 = time.perf_counter()
            run_ray(RayJob(model=str(model), out=str(out), provider="cpu", threads=max(1, cores // w),
                           batch=a.batch), lst, workers=w, progress=False, log=lambda m: None, decode=dec,
                    calls_per_actor=calls)
            return time.perf_counter() - t0

        variants = [(d, c) for d in decodes for c in calls]
        for w in counts:
            tl1, tl2 = local(paths, work / f"l{w}a", w), local(paths + copies, work / f"l{w}b", w)  # the reference
            for dec, c in variants:
                tag = f"r{w}{dec}{c}"
                tr1 = on_ray(lists["n"], work / f"{tag}a", w, dec, c)
                tr2 = on_ray(lists["long"], work / f"{tag}b", w, dec, c)
                fl, fr = n / tl1, n / tr1
                extra = len(copies)
                ml, mr = extra / max(tl2 - tl1, 1e-9), extra / max(tr2 - tr1, 1e-9)
                rows.append({"workers": w, "decode": dec, "calls": c, "local_fps": round(fl, 2),
                             "ray_fps": round(fr, 2), "ratio": round(fr / fl, 3),
                             "local_marginal_fps": round(ml, 2), "ray_marginal_fps": round(mr, 2),
                             "marginal_ratio": round(mr / ml, 3), "ray_fixed_s": round(tr1 - n / mr, 2),
                             # end to end on the long run (n·(1+copies) frames, start-up included): an archive chunk
                             "long_frames": n + extra, "local_long_fps": round((n + extra) / tl2, 2),
                             "ray_long_fps": round((n + extra) / tr2, 2), "long_ratio": round(tl2 / tr2, 3),
                             "ray_actor_ready_s": json.loads((work / f"{tag}a" / "summary.json").read_text())
                             .get("ray_actor_ready_s"),
                             "local": _breakdown(work / f"l{w}a"), "ray": _breakdown(work / f"{tag}a")})
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"crack-bench ray: {len(paths)} frames ({where}), model {model.name}, {cores} cores, batch {a.batch}; "
          f"Ray start-up {ray_start:.1f} s + Ray Data's cluster actors {ray_data_start:.1f} s (once per cluster: "
          f"not in the figures; each Ray run includes its own actors, sessions and pipeline fill)")
    print(f"{'workers':>8} {'decode':>7} {'calls':>5} {'local FPS':>10} {'ray FPS':>8} {'ray/local':>10} | {'local marg.':>12} {'ray marg.':>10}"
          f" {'ray/local':>10} {'ray fixed s':>12} {'actors s':>9} | {'e2e long':>9} | per frame in an actor: model / steps after | local: model / steps")
    for r in rows:
        br, bl, w = r["ray"], r["local"], r["workers"]
        ok = "✓" if r["ratio"] >= TARGET else "✗"
        ok2 = "✓" if r["marginal_ratio"] >= TARGET else "✗"
        ok3 = "✓" if r["long_ratio"] >= TARGET else "✗"
        print(f"{w:>8} {r['decode']:>7} {r['calls']:>5} {r['local_fps']:>10.2f} {r['ray_fps']:>8.2f} {r['ratio']:>9.2f}{ok} | "
              f"{r['local_marginal_fps']:>12.2f} {r['ray_marginal_fps']:>10.2f} {r['marginal_ratio']:>9.2f}{ok2} "
              f"{r['ray_fixed_s']:>12.1f} {r['ray_actor_ready_s'] or float('nan'):>9.1f} | {r['long_ratio']:>8.2f}{ok3} | {br['infer_ms']:>5.0f} / {br['post_ms']:.0f} ms{'':>22}| "
              f"{bl['infer_ms']:.0f} / {bl['post_ms']:.0f} ms")
    print(f"target: ray ≥ {TARGET}× local at the same worker count. FPS = {n} frames end to end; 'marg.' = marginal "
          f"FPS from {n} to {n + len(copies)} frames (no start-up: what an archive of thousands of frames sees); "
          f"'ray fixed s' = the run's fixed cost (actors and sessions starting, pipeline filling), of which 'actors s' "
          f"until the first actor could take frames (its process started, Ray Data, crackcam and ONNX Runtime "
          f"imported, session open); 'e2e long' = "
          f"ray / local end to end on {n + len(copies)} frames, start-up included")
    print(json.dumps({"frames": len(paths), "where": where, "cores": cores, "ray_start_s": round(ray_start, 2),
                      "ray_data_start_s": round(ray_data_start, 2),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
