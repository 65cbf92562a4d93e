"""``crack-bench cam``: seconds per image of each CAM method — crackcam's explicit-gradient ``CamModel``
(no autograd, one forward graph) next to the ``grad-cam`` package (autograd backward + numpy/cv2) computing
the same map on the same model, input and target layer, in one run.  Also prints the max difference
between the two maps (both min-max normalised, upsampled to the input).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="crack-bench cam", description=__doc__)
    ap.add_argument("--model", default="simple_cnn,resnet50", help="comma-separated registered model names")
    ap.add_argument("--size", type=int, default=448, help="square input side (px)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per method (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--methods", default=",".join(METHODS))
    a = ap.parse_args(argv)

    import crackcam.models as M  # before pytorch_grad_cam (torchvision shim)
    from crackcam.models.cam import CamModel

    try:
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        print("crack-bench cam: the grad-cam package is not installed (pip install grad-cam)")
        return 2
    pkg = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM,
           "hirescam": HiResCAM}
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in pkg:
            print(f"crack-bench cam: unknown method {m!r}; choose from {', '.join(pkg)}")
            return 2
    print(f"CAM maps, {a.batch}×3×{a.size}×{a.size} float32, CPU, {torch.get_num_threads()} thread(s), "
          f"median of {a.repeat} runs; seconds per image (forward + gradients + map)")
    print(f"{'model':<20}{'layer':<16}{'method':<11}{'crackcam':>10}{'grad-cam':>10}{'speed-up':>10}{'max|Δmap|':>11}")
    for name in [n.strip() for n in a.model.split(",") if n.strip()]:
        torch.manual_seed(0)
        model = M.create_model(name).eval()
        layer = model.spec.default_target_layer
        target_module = dict(model.named_modules())[layer]
        x = torch.randn(a.batch, 3, a.size, a.size)
        targets = [ClassifierOutputTarget(0)] * a.batch
        for method in methods:
            ours = CamModel(model, method, layers=[layer], gate=None).eval()

            def run_ours():
                with torch.no_grad():
                    return ours(x)[1]

            cam = pkg[method](model=model, target_layers=[target_module])

            def run_pkg():
                return cam(input_tensor=x, targets=targets)

            t_ours = _median_time(run_ours, a.repeat) / a.batch
            t_pkg = _median_time(run_pkg, a.repeat) / a.batch
            diff = float(np.abs(run_ours().numpy() - run_pkg()).max())
            cam.activations_and_grads.release()
            print(f"{name:<20}{layer:<16}{method:<11}{t_ours:>10.4f}{t_pkg:>10.4f}{t_pkg / t_ours:>9.2f}×"
                  f"{diff:>11.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
