"""Verify an exported graph: ONNX Runtime vs the PyTorch CamModel on the same inputs.

Inputs: random uint8 images and a synthetic crack image (``crackcam.train.synth``), at the export size or, for a
dynamic graph, at two different sizes and two batch sizes.  The PyTorch reference gets the same pre-processing done
in NumPy (``preprocess_numpy``) and runs the CamModel on the float tensor, so the in-graph pre-processing is checked
too.  Tolerances (absolute): ``map`` (and ``map_<method>``) 1e-4, ``prob`` 1e-5; ``logits`` / ``activations_<i>`` /
``gradients_<i>`` 1e-4 relative to the largest reference magnitude; integer outputs (the ``restored`` image of a
restoration graph) one step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


class VerificationError(RuntimeError):
    """The exported graph does not match PyTorch (one line for the CLI)."""


@dataclass
class VerifyReport:
    tol_map: float
    tol_prob: float
    max_diff: dict = field(default_factory=dict)  # output name → max abs diff (relative for the raw tensors)
    tolerance: dict = field(default_factory=dict)
    cases: list = field(default_factory=list)  # "B×H×W" strings
    gated_off: int = 0  # images whose map is all zero (prob < gate) in the reference
    n_images: int = 0

    @property
    def ok(self) -> bool:
        return all(self.max_diff[k] <= self.tolerance[k] for k in self.max_diff)

    def worst(self) -> str:
        k = max(self.max_diff, key=lambda n: self.max_diff[n] / max(self.tolerance[n], 1e-30))
        return f"{k}: max diff {self.max_diff[k]:.3g} > {self.tolerance[k]:.0e}" if not self.ok else \
            f"{k}: max diff {self.max_diff[k]:.3g}"

    def summary(self) -> str:
        diffs = ", ".join(f"{k} {v:.2e} (tol {self.tolerance[k]:.0e})" for k, v in self.max_diff.items())
        gated = f"; {self.gated_off}/{self.n_images} reference maps gated off (prob < gate)" if self.gated_off else ""
        return (f"verification {'passed' if self.ok else 'FAILED'} on {', '.join(self.cases)} "
                f"(ONNX Runtime vs PyTorch): max diff {diffs}{gated}")


def default_images(batch, height, width, tile: int = 224, seed: int = 0) -> list[np.ndarray]:
    """Verification batches (uint8 NHWC BGR): random noise plus a synthetic crack image, at up to two sizes."""
    from crackcam.train.synth import draw_crack_image

    rng = np.random.default_rng(seed)
    sizes = [(height or tile, width or tile)]
    if height is None or width is None:
        sizes.append((height or max(32, tile - tile // 4 + 8), width or tile + tile // 4 + 8))
    batches = [batch] if batch else [1, 3]
    out = []
    for k, (h, w) in enumerate(sizes):
        b = batches[k % len(batches)]
        imgs = []
        for i in range(b):  # synthetic crack images (a trained model's map is not gated off) and noise, alternating
            if i % 2 == 0:
                crack, _ = draw_crack_image(rng, h, w, n_cracks=2)
                imgs.append(np.ascontiguousarray(crack[..., ::-1]))  # RGB → BGR, what OpenCV would decode
            else:
                imgs.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out.append(np.stack(imgs))
    return out


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def reference(graph, images: np.ndarray) -> dict:
    """PyTorch outputs of ``graph`` (a CamExportGraph) for uint8 NHWC BGR ``images``, pre-processed in NumPy."""
    from .onnx_export import preprocess_numpy

    mean = graph.mean.flatten().tolist()
    std = graph.std.flatten().tolist()
    x = torch.from_numpy(preprocess_numpy(images, mean, std))
    with torch.no_grad():
        outs = graph.forward_float(x)
    return {n: o.detach().cpu().numpy() for n, o in zip(graph.output_names, outs)}


def compare(ref: dict, got: dict, report: VerifyReport) -> None:
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:
            report.max_diff[name] = float("inf")
            report.tolerance[name] = 0.0
            continue
        diff = float(np.max(np.abs(g.astype(np.float64) - r.astype(np.float64)))) if r.size else 0.0
        if name == "prob":
            tol = report.tol_prob
        elif name == "map" or name.startswith("map_"):
            tol = report.tol_map
        elif np.issubdtype(r.dtype, np.integer):  # e.g. a uint8 restored image: one step of rounding
            tol = 1.0
        else:  # raw float tensors: relative to their scale
            diff = diff / max(float(np.max(np.abs(r))) if r.size else 0.0, 1e-6)
            tol = report.tol_map
        if not np.isfinite(diff):
            diff = float("inf")
        report.max_diff[name] = max(report.max_diff.get(name, 0.0), diff)
        report.tolerance[name] = tol


def verify_onnx(path, graph, *, tol_map: float = 1e-4, tol_prob: float = 1e-5, images=None, tile: int = 224,
                batch=None, height=None, width=None, session=None) -> VerifyReport:
    """Compare the ONNX file at ``path`` in ONNX Runtime with ``graph`` in PyTorch."""
    sess = session or _session(Path(path))
    names = [o.name for o in sess.get_outputs()]
    report = VerifyReport(tol_map, tol_prob)
    if images is None:
        images = default_images(batch, height, width, tile)
    for batch_imgs in images:
        ref = reference(graph, batch_imgs)
        missing = [n for n in ref if n not in names]
        if missing:
            raise VerificationError(f"{path}: the graph has no output {missing[0]!r}")
        try:
            got = dict(zip(names, sess.run(names, {"image": batch_imgs})))
        except Exception as exc:  # noqa: BLE001 - e.g. a size baked into the graph by tracing
            shape = "×".join(str(s) for s in batch_imgs.shape)
            raise VerificationError(f"{path}: ONNX Runtime fails on a {shape} input: "
                                    f"{' '.join(str(exc).split())[:200]}") from None
        compare(ref, got, report)
        report.cases.append("×".join(str(s) for s in batch_imgs.shape[:3]))
        report.n_images += batch_imgs.shape[0]
        if "map" in ref:
            report.gated_off += int(np.sum(ref["map"].reshape(len(batch_imgs), -1).max(1) == 0))
    return report
