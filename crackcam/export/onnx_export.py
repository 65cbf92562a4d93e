"""Fold a CAM model into one self-contained ONNX graph.

The graph (see docs/export.md):

    image uint8 [N,H,W,3] BGR ──cast, BGR→RGB, /255, (x−mean)/std──▶ CamModel ──▶ prob [N], map [N,H,W]
                                                              └──▶ logits [N,1], activations_<i>, gradients_<i>

Pre-processing lives inside the graph so every consumer (ONNX Runtime, TensorRT, a C++ program) feeds exactly what
OpenCV decodes and cannot get the colour order or the normalisation wrong.  The CAM is computed by explicit forward
math (``crackcam.models.cam``), so the map is an ordinary graph output: no autograd at run time.

Two exporters are supported: the TorchScript-based one (``torch.onnx.export(..., dynamo=False)``, called "legacy"
here) and the ``torch.export``-based one (``dynamo=True``).  ``exporter="auto"`` tries legacy first (fast, dynamic
batch/height/width through ``dynamic_axes``) and falls back to dynamo when legacy cannot export an operator
(e.g. ``max_unpool2d``).  Either way the weights are stored inside the one ``.onnx`` file (no ``.onnx.data``), the file
passes ``onnx.checker.check_model``, is verified against PyTorch in ONNX Runtime (``crackcam.export.verify``) and
is written atomically (temp file + ``os.replace``) only when the verification passes.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from crackcam.models.preprocess import preprocess_torch  # the graphs' pre-processing (also imported from here)

from . import metadata as md
from .graph_passes import fuse_pads

EXPORTERS = ("auto", "legacy", "dynamo")
DEFAULT_OPSET = 18
OPTIONAL_OUTPUTS = ("logits", "activations", "gradients")


class ExportError(RuntimeError):
    """Export failed (one line for the CLI)."""


# --------------------------------------------------------------------------------------------- the graph
def preprocess_numpy(image_bgr: np.ndarray, mean, std) -> np.ndarray:
    """The same pre-processing in NumPy (the reference used to verify the graph), float32 NCHW."""
    x = np.ascontiguousarray(image_bgr[..., ::-1]).astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def cam_parts(cam: nn.Module, x: torch.Tensor, want: Sequence[str]) -> dict:
    """Run a CamModel on normalised ``x``; return ``prob``, ``map`` and whichever of ``logits`` [N,1],
    ``activations`` (list), ``gradients`` (list) are in ``want``.

    The raw terms are taken from the CamModel's own ``head`` (``CamHead``: ``(logit, A_1, G_1, …)``) by a forward
    hook during the same call, so the map and the raw outputs come from one computation (one graph, no copy
    of the CAM code)."""
    want = set(want)
    if not (want & set(OPTIONAL_OUTPUTS)):
        prob, cmap = cam(x)
        return {"prob": prob, "map": cmap}
    head = getattr(cam, "head", None)
    if head is None:
        raise ExportError(f"{type(cam).__name__} has no CamHead: cannot export logits/activations/gradients")
    seen = []
    hook = head.register_forward_hook(lambda _m, _inp, out: seen.append(out))
    try:
        prob, cmap = cam(x)
    finally:
        hook.remove()
    outs = seen[-1]
    n = (len(outs) - 1) // 2
    logit = outs[0]
    return {"prob": prob, "map": cmap, "logits": logit.reshape(-1, 1), "head": outs,
            "activations": [outs[1 + 2 * i] for i in range(n)], "gradients": [outs[2 + 2 * i] for i in range(n)]}


class _HeadOutputs(nn.Module):
    """Stands in for the CamHead of an extra-method CamModel: returns the primary head's outputs of the same
    call, so all methods share one forward/backward pass (in PyTorch and in the graph)."""

    def __init__(self):
        super().__init__()
        self.outs = None

    def forward(self, x):
        return self.outs


class CamExportGraph(nn.Module):
    """uint8 NHWC BGR image → the contract's outputs.

    ``cams``: one CamModel, or several on the same classifier and target layers (the first gives ``map``; the
    others give ``map_<method>``: extra maps computed from the same CamHead outputs, used by the tests and to
    compare methods).  ``outputs``: subset of ``prob, map, logits, activations, gradients``;
    ``activations``/``gradients`` expand to one output per target layer (``activations_0``, ...).
    """

    def __init__(self, cams, mean, std, outputs: Sequence[str] = ("prob", "map")):
        super().__init__()
        cams = list(cams) if isinstance(cams, (list, tuple)) else [cams]
        self.cam = cams[0]
        self.extra = nn.ModuleList()
        for c in cams[1:]:
            if list(getattr(c, "layers", [])) != list(getattr(self.cam, "layers", [])) or \
                    getattr(c, "head", None) is None:
                raise ExportError("extra CAM methods must use the same target layers as the first")
            c.head = _HeadOutputs()  # these CamModels are the caller's own: their heads are not used again
            self.extra.append(c)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        outputs = [o for o in outputs]
        bad = [o for o in outputs if o not in ("prob", "map") + OPTIONAL_OUTPUTS]
        if bad:
            raise ExportError(f"unknown output {bad[0]!r}; choose from prob, map, {', '.join(OPTIONAL_OUTPUTS)}")
        # prob and map always come first (the contract's two outputs), then the optional ones in the given order
        self.outputs = ["prob", "map"] + [o for o in dict.fromkeys(outputs) if o not in ("prob", "map")]
        self.n_layers = len(getattr(self.cam, "layers", None) or [None])
        self.extra_methods = [str(getattr(c, "method", f"m{i}")) for i, c in enumerate(self.extra, 1)]

    @property
    def output_names(self) -> list[str]:
        names = []
        for o in self.outputs:
            if o in ("activations", "gradients"):
                names += [f"{o}_{i}" for i in range(self.n_layers)]
            else:
                names.append(o)
        names += [f"map_{m}" for m in self.extra_methods]
        return names

    def forward_float(self, x: torch.Tensor) -> tuple:
        want = list(self.outputs) + (["activations"] if len(self.extra) else [])
        parts = cam_parts(self.cam, x, want)
        out = []
        for o in self.outputs:
            if o in ("activations", "gradients"):
                out += list(parts[o])
            else:
                out.append(parts[o])
        if len(self.extra):
            head_outs = parts["head"]
            for c in self.extra:
                c.head.outs = head_outs
                out.append(c(x)[1])
                c.head.outs = None
        return tuple(out)

    def forward(self, image: torch.Tensor) -> tuple:
        return self.forward_float(preprocess_torch(image, self.mean, self.std))


# --------------------------------------------------------------------------------------------- exporters
def _dummy(batch: int | None, height: int | None, width: int | None, tile: int) -> torch.Tensor:
    # Dynamic dims are traced at sizes that are neither 1 nor equal to each other, so nothing gets specialised.
    b = batch or 2
    h = height or tile
    w = width or (tile + 32)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=g)


def _export_legacy(graph: CamExportGraph, dummy, opset, batch, height, width):
    names = graph.output_names
    axes_in, axes_map = {}, {}
    if batch is None:
        axes_in[0] = "batch"
        axes_map[0] = "batch"
    if height is None:
        axes_in[1] = "height"
        axes_map[1] = "height"
    if width is None:
        axes_in[2] = "width"
        axes_map[2] = "width"
    dyn = {"image": axes_in}
    for n in names:
        if n == "map" or n.startswith("map_"):
            dyn[n] = axes_map
        elif batch is None:
            dyn[n] = {0: "batch"}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (dummy,), buf, dynamo=False, input_names=["image"], output_names=names,
                          opset_version=opset, dynamic_axes=dyn, do_constant_folding=True)
    import onnx

    return onnx.load_from_string(buf.getvalue())


def _export_dynamo(graph: CamExportGraph, dummy, opset, batch, height, width):
    from torch.export import Dim

    spec = {}
    if batch is None:
        spec[0] = Dim.DYNAMIC
    if height is None:
        spec[1] = Dim.DYNAMIC
    if width is None:
        spec[2] = Dim.DYNAMIC
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(graph, (dummy,), dynamo=True, input_names=["image"], output_names=graph.output_names,
                                 opset_version=opset, dynamic_shapes={"image": spec} if spec else None,
                                 optimize=True, external_data=False, verbose=False, report=False)
    proto = prog.model_proto  # weights are held in memory and serialised inline: one self-contained file
    _rename_dims(proto, batch, height, width)
    return proto


def _rename_dims(proto, batch, height, width) -> None:
    """Give the dynamo exporter's symbolic dims (s0, s1, ...) the contract's names on the input and the maps."""
    inp = proto.graph.input[0].type.tensor_type.shape.dim
    ren = {}
    for i, name in ((0, "batch"), (1, "height"), (2, "width")):
        if inp[i].dim_param:
            ren[inp[i].dim_param] = name
    for vi in list(proto.graph.input) + list(proto.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in ren:
                d.dim_param = ren[d.dim_param]


def export_graph(graph: CamExportGraph, *, exporter: str = "auto", opset: int = DEFAULT_OPSET,
                 batch: int | None = None, height: int | None = None, width: int | None = None, tile: int = 224):
    """Export ``graph`` to an ONNX ModelProto; returns ``(proto, exporter_used, notes)``."""
    import onnx

    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}")
    graph = graph.eval()
    dummy = _dummy(batch, height, width, tile)
    order = ["legacy", "dynamo"] if exporter == "auto" else [exporter]
    notes = []
    for name in order:
        fn = _export_legacy if name == "legacy" else _export_dynamo
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                proto = fn(graph, dummy, opset, batch, height, width)
            onnx.checker.check_model(proto)
        except Exception as exc:  # noqa: BLE001 - report and try the next exporter
            line = " ".join(str(exc).split())[:300]
            notes.append(f"{name} exporter failed: {type(exc).__name__}: {line}")
            continue
        try:  # exact: TF-"same" Pads into their Convs (crackcam.export.graph_passes); a failure keeps the graph
            folded = onnx.ModelProto()
            folded.CopyFrom(proto)
            n_fused = fuse_pads(folded)
            if n_fused:
                onnx.checker.check_model(folded)
                proto = folded
                notes.append(f"folded {n_fused} Pad node(s) into their convolutions")
        except Exception as exc:  # noqa: BLE001 - the unfolded graph is still a valid export
            notes.append(f"Pad folding skipped ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
        notes.append(f"{name} exporter: {time.perf_counter() - t0:.1f} s")
        return proto, name, notes
    raise ExportError("; ".join(notes))


def input_dims(proto) -> tuple:
    """``(batch, height, width)`` of the graph's ``image`` input: ints, or None where symbolic."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[:3])


# --------------------------------------------------------------------------------------------- verified write
@dataclass
class ExportResult:
    path: Path
    exporter: str
    metadata: dict
    report: object  # verify.VerifyReport
    notes: list = field(default_factory=list)
    seconds: float = 0.0


def write_verified_onnx(graph: CamExportGraph, out: Path, meta: dict, *, exporter="auto", opset=DEFAULT_OPSET,
                        batch=None, height=None, width=None, tile=224, verify=True, tol_map=1e-4, tol_prob=1e-5,
                        verify_images=None, prefer_dynamo=False, log=print) -> ExportResult:
    """Export ``graph``, add the metadata, verify it in ONNX Runtime against PyTorch, then write ``out``.

    ``exporter="auto"`` tries legacy then dynamo (``prefer_dynamo``: the other way round), moving on when an
    exporter fails or its graph fails the verification.  The model goes to a temp file beside ``out`` first;
    ``out`` appears (``os.replace``) only when the verification passes, otherwise the temp file is deleted and
    :class:`crackcam.export.verify.VerificationError` is raised.
    """
    from . import verify as vf

    t0 = time.perf_counter()
    out = Path(out)
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}")
    order = (["dynamo", "legacy"] if prefer_dynamo else ["legacy", "dynamo"]) if exporter == "auto" else [exporter]
    notes: list[str] = []
    for k, name in enumerate(order):
        last = k == len(order) - 1
        try:
            proto, used, more = export_graph(graph, exporter=name, opset=opset, batch=batch, height=height,
                                             width=width, tile=tile)
        except ExportError as exc:
            notes.append(str(exc))
            if last:
                raise ExportError("; ".join(notes)) from None
            continue
        notes += more
        try:
            report, meta_out = _write_checked(proto, graph, out, meta, verify=verify, tol_map=tol_map,
                                              tol_prob=tol_prob, images=verify_images, tile=tile, log=log)
        except vf.VerificationError as exc:
            if last:
                raise
            notes.append(f"{used} export failed verification ({exc}); trying the next exporter")
            log(notes[-1])
            continue
        return ExportResult(out, used, meta_out, report, notes, time.perf_counter() - t0)
    raise AssertionError("unreachable")


def _write_checked(proto, graph, out: Path, meta: dict, *, verify, tol_map, tol_prob, images, tile, log):
    from . import verify as vf

    ib, ih, iw = input_dims(proto)
    meta = dict(meta)
    meta["outputs"] = [o.name for o in proto.graph.output]
    meta["input"] = dict(meta["input"], batch=ib, height=ih, width=iw)
    md.set_metadata(proto, meta)
    data = proto.SerializeToString()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp.onnx", dir=str(out.parent))
    tmp = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        report = None
        if verify:
            report = vf.verify_onnx(tmp, graph, tol_map=tol_map, tol_prob=tol_prob, images=images,
                                    tile=tile, batch=ib, height=ih, width=iw)
            log(report.summary())
            if not report.ok:
                raise vf.VerificationError(f"{out}: not written: the ONNX graph differs from PyTorch beyond tolerance "
                                           f"({report.worst()})")
        os.replace(tmp, out)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out, 0o666 & ~umask)  # mkstemp made it private; a model file is for everyone who runs it
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return report, meta
