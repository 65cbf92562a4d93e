"""``python -m crackcam.tools.bench_export`` (``crack-bench export``): Grad-CAM++ per-image time of

  * ``folded``  the exported ONNX graph (uint8 BGR in → prob + gated map at input size out) in ONNX Runtime,
  * ``grad-cam`` the ``grad-cam`` package (``pytorch_grad_cam.GradCAMPlusPlus``, autograd hooks) on the same
    torch model, fed the same normalised tensor,
  * ``plain``   the same backbone's plain ONNX forward (same uint8 input and in-graph pre-processing, logits only)
    in ONNX Runtime,

for VGG-16 and ResNet-50 at 448×448, batch 1 and 8, on this CPU.  The three are run interleaved (round robin,
``--repeat`` rounds after one warm-up) so they see the same machine load; the median and the best (least disturbed
by other load) per-image time of the rounds are printed with the ratios grad-cam / folded (target ≥ 4.5) and
folded / plain (target ≤ 1.1).
Weights are random (timing does not depend on them); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _plain_graph(model, mean, std):
    import torch
    from torch import nn

    from crackcam.export.onnx_export import preprocess_torch

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        def forward(self, image):
            return self.model(preprocess_torch(image, self.mean, self.std))

    return Plain().eval()


def _export_plain(model, mean, std, path: Path):
    import torch

    g = _plain_graph(model, mean, std)
    dummy = torch.randint(0, 256, (2, 64, 96, 3), dtype=torch.uint8)
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.onnx.export(g, (dummy,), str(path), dynamo=False, input_names=["image"], output_names=["logits"],
                      opset_version=18, dynamic_axes={"image": {0: "batch", 1: "height", 2: "width"},
                                                      "logits": {0: "batch"}})


def _session(path, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="crack-bench export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vgg16,resnet50")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--repeat", type=int, default=2, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=0, help="threads for torch and ONNX Runtime (0 = all cores)")
    ap.add_argument("--method", default="gradcam++")
    ap.add_argument("--profile", action="store_true", help="write ONNX Runtime profiles of the folded graph")
    args = ap.parse_args(argv)

    import torch

    import crackcam.models  # noqa: F401  (registers torchvision op schemas before grad-cam imports torchvision)
    from crackcam.export.api import ExportSettings, build_cam_graph
    from crackcam.export.onnx_export import preprocess_numpy, write_verified_onnx
    from crackcam.models import create_model, get_spec

    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    batches = [int(b) for b in args.batches.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"crack-bench export: Grad-CAM++ at {args.size}×{args.size}, {threads} threads, torch {torch.__version__}, "
          f"load average at start {load:.2f} on {os.cpu_count()} cores; median of {args.repeat} interleaved rounds")
    rows = []
    with tempfile.TemporaryDirectory(prefix="crackcam-bench-") as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            model = create_model(name).eval()
            spec = get_spec(name)
            config = {"model": name, "mean": list(spec.mean), "std": list(spec.std), "tile": 64}
            graph, meta = build_cam_graph(model, config, ExportSettings(method=args.method, gate=0.0))
            folded_path = tmp / f"{name}_folded.onnx"
            res = write_verified_onnx(graph, folded_path, meta, tile=64, log=lambda s: print(f"  {name}: {s}"))
            plain_path = tmp / f"{name}_plain.onnx"
            _export_plain(model, spec.mean, spec.std, plain_path)
            folded = _session(folded_path, threads)
            if args.profile:
                import onnxruntime as ort

                so = ort.SessionOptions()
                so.enable_profiling = True
                so.profile_file_prefix = f"bench_export_{name}"
                folded_prof = ort.InferenceSession(str(folded_path), so, providers=["CPUExecutionProvider"])
            plain = _session(plain_path, threads)
            layer = dict(model.named_modules())[meta["target_layers"][0]]
            cam = GradCAMPlusPlus(model=model, target_layers=[layer])
            print(f"  {name}: folded graph {folded_path.stat().st_size / 1e6:.0f} MB via {res.exporter}; "
                  f"target layer {meta['target_layers'][0]}")
            for b in batches:
                imgs = rng.integers(0, 256, (b, args.size, args.size, 3), dtype=np.uint8)
                x = torch.from_numpy(preprocess_numpy(imgs, spec.mean, spec.std))
                targets = [ClassifierOutputTarget(0)] * b
                runs = {
                    "grad-cam": lambda: cam(input_tensor=x, targets=targets),
                    "folded": lambda: folded.run(["prob", "map"], {"image": imgs}),
                    "plain": lambda: plain.run(["logits"], {"image": imgs}),
                }
                times = {k: [] for k in runs}
                for r in range(args.repeat + 1):
                    for k, fn in runs.items():
                        t0 = time.perf_counter()
                        fn()
                        dt = (time.perf_counter() - t0) / b
                        if r > 0:
                            times[k].append(dt)
                med = {k: statistics.median(v) * 1000 for k, v in times.items()}
                best = {k: min(v) * 1000 for k, v in times.items()}
                rows.append((name, b, med["grad-cam"], med["folded"], med["plain"], best["grad-cam"], best["folded"],
                             best["plain"]))
                print(f"  {name} batch {b}: median (best) ms/img: grad-cam {med['grad-cam']:.0f} "
                      f"({best['grad-cam']:.0f}), folded ONNX {med['folded']:.0f} ({best['folded']:.0f}), "
                      f"plain ONNX forward {med['plain']:.0f} ({best['plain']:.0f})", flush=True)
                if args.profile and b == batches[0]:
                    folded_prof.run(["prob", "map"], {"image": imgs})
            if args.profile:
                print(f"  {name}: ONNX Runtime profile: {folded_prof.end_profiling()}")
            del cam
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print()
    print(f"{'model':<10} {'batch':>5} {'grad-cam ms/img':>16} {'folded ms/img':>14} {'plain ms/img':>13} "
          f"{'grad-cam/folded':>16} {'folded/plain':>13}   (median; best-of-rounds in brackets)")
    ok_med = ok_best = True
    for name, b, g, f, p, gb, fb, pb in rows:
        ok_med &= g / f >= 4.5 and f / p <= 1.1
        ok_best &= gb / fb >= 4.5 and fb / pb <= 1.1
        print(f"{name:<10} {b:>5} {g:>9.0f} ({gb:>4.0f}) {f:>7.0f} ({fb:>4.0f}) {p:>6.0f} ({pb:>4.0f}) "
              f"{g / f:>8.2f}x ({gb / fb:.2f}x) {f / p:>5.2f}x ({fb / pb:.2f}x)")
    print(f"targets grad-cam/folded >= 4.5x and folded/plain <= 1.1x: median {'met' if ok_med else 'NOT met'}, "
          f"best-of-rounds {'met' if ok_best else 'NOT met'} (load average at end {load:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
