"""A frame-pass graph from a top-k (MIL) tile graph: the network once over the whole work image.

A top-k classifier's tile graph (``edge_mil``, the packaged default) computes per-position crack logits ``z`` over
its 128² tile, then ``prob = σ(mean of the top k of z)`` and ``map = bilinear-resize(σ(z))``.  Run tile by tile
with 32-px overlaps, a 1280×1080 survey frame costs 42 tile passes, twice its pixels.  The frame-pass graph is the
same network cut at ``z`` with a dynamic height and width: the runtime runs it once on the padded work image and
reads each tile of the usual plan out of that one pass (``crackcam.runtime.steps.infer_frame``): the tile's
probability from the top k of the logits in its window, its map from the crop of the upsampled whole-frame map.
On a single tile this is the tile graph exactly (checked here before writing, and in tests); on a frame the
logits see their true neighbours instead of each tile's zero padding, so maps and probabilities differ a little
(docs/survey.md has the validation figures).

The graph's metadata is the tile graph's (recipe, survey settings, profiles) with a dynamic input, the output
``logits`` and a ``frame_pass`` block — ``tile`` (the window, the tile graph's input size), ``stride`` (pixels per
logit) and ``k`` (top-k positions per window).

    python -m crackcam.export.frame_pass IN.onnx OUT.onnx      # e.g. default_tiles.onnx → default_frame.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from crackcam.runtime.sessions import frame_pass_tile_outputs

from . import metadata as md
from .graph_passes import const_value

__all__ = ["FramePassError", "frame_pass_model", "write_frame_pass", "main"]

RESHAPES = ("Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze")


class FramePassError(ValueError):
    """The graph is not a top-k tile graph this module can cut (one line, names what is missing)."""


def _find_cut(graph) -> tuple[str, int]:
    """``(name of the per-position crack-logit tensor N×h×w, k)``: the TopK's input traced back through reshapes
    to the head's N×C×h×w logits, then the Gather that picks the crack channel from them."""
    producer = {o: n for n in graph.node for o in n.output}
    topk = [n for n in graph.node if n.op_type == "TopK"]
    if len(topk) != 1:
        raise FramePassError(f"not a top-k (MIL) tile graph: {len(topk)} TopK nodes (a frame pass needs the "
                             f"per-position logits of a top-k head, e.g. edge_mil)")
    k = const_value(graph, topk[0].input[1])
    if k is None:
        raise FramePassError("the TopK's k is not a constant")
    src = topk[0].input[0]
    while src in producer and producer[src].op_type in RESHAPES:
        src = producer[src].input[0]
    picks = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == src
             and any(a.name == "axis" and a.i == 1 for a in n.attribute)]
    if len(picks) != 1:
        raise FramePassError(f"no single crack-channel Gather on the head's logits {src!r}")
    idx = const_value(graph, picks[0].input[1])
    if idx is None or np.asarray(idx).size != 1:
        raise FramePassError("the crack-channel index is not a scalar constant")
    return picks[0].output[0], int(np.asarray(k).reshape(-1)[0])


def frame_pass_model(src, *, check: bool = True, gate: float | None = None):
    """The frame-pass ModelProto of the tile graph ``src`` (path or ModelProto) and its metadata; ``gate``
    replaces the per-tile gate of the survey settings and of every camera profile (a frame pass's tile
    probabilities differ a little from the tiles', so its gate is chosen on validation frames of its own)."""
    import onnx
    import onnx.utils

    proto = onnx.load(str(src)) if not isinstance(src, onnx.ModelProto) else src
    try:
        meta = md.get_metadata(proto)
    except ValueError as exc:
        raise FramePassError(f"no crackcam metadata ({exc})") from None
    if meta.get("frame_pass"):
        raise FramePassError("already a frame-pass graph")
    if meta.get("kind") != "cam":
        raise FramePassError(f"a frame pass is made from a tile graph of kind 'cam', not {meta.get('kind')!r}")
    th, tw = meta["input"]["height"], meta["input"]["width"]
    if not (th and tw):
        raise FramePassError("the tile graph has no fixed input size (top-k exports fix it)")
    cut, k = _find_cut(proto.graph)
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    if not any(v.name == cut for v in work.graph.value_info):  # the extractor reads the cut's type from there
        work.graph.value_info.append(onnx.helper.make_tensor_value_info(cut, onnx.TensorProto.FLOAT, None))
    body = onnx.utils.Extractor(work).extract_model(["image"], [cut])
    dims = body.graph.input[0].type.tensor_type.shape.dim
    for i, nm in ((0, "batch"), (1, "height"), (2, "width")):
        dims[i].Clear()
        dims[i].dim_param = nm
    out = body.graph.output[0]
    out_dims = out.type.tensor_type.shape.dim
    for i, d in enumerate(out_dims):
        d.Clear()
        d.dim_param = ("batch", "lh", "lw")[i] if i < 3 else f"d{i}"
    for n in body.graph.node:  # the output is called 'logits'
        n.output[:] = ["logits" if o == cut else o for o in n.output]
        n.input[:] = ["logits" if i == cut else i for i in n.input]
    out.name = "logits"
    del body.graph.value_info[:]
    del body.opset_import[:]
    body.opset_import.extend(proto.opset_import)
    body.ir_version = proto.ir_version
    if float(meta.get("gate") or 0.0) > 0 and not (meta.get("survey") or {}):
        raise FramePassError(f"the tile graph gates inside itself (metadata gate {meta['gate']:g}, no survey block): "
                             f"export it with a survey recipe, where the runtime gates each tile")
    stride, _ = _stride(body, th, tw)
    if k > (th // stride) * (tw // stride):
        raise FramePassError(f"top-k {k} exceeds the {th // stride}x{tw // stride} positions of a tile")
    fmeta = dict(meta)
    fmeta["input"] = {**meta["input"], "height": None, "width": None, "batch": None}
    fmeta["outputs"] = ["logits"]
    fmeta["frame_pass"] = {"tile": [int(th), int(tw)], "stride": int(stride), "k": int(k)}
    if gate is not None:
        if not 0.0 <= float(gate) <= 1.0:
            raise FramePassError(f"gate {gate!r} must lie in [0, 1]")
        fmeta["survey"] = {**(fmeta.get("survey") or {}), "gate": float(gate)}
        profs = {}
        for name, prof in (fmeta.get("profiles") or {}).items():
            prof = dict(prof)
            prof["survey"] = {**(prof.get("survey") or {}), "gate": float(gate)}
            profs[name] = prof
        if profs:
            fmeta["profiles"] = profs
        fmeta["frame_pass"]["gate"] = float(gate)
    md.set_metadata(body, fmeta)
    if check:
        _check_against(proto, body, fmeta["frame_pass"])
    return body, fmeta


def _session(proto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _stride(body, th: int, tw: int) -> tuple[int, int]:
    """Pixels per logit, from a tile and from a frame of 2 tiles × (1 tile + 1 stride): both axes must give the
    same whole stride at both sizes, else the cut graph has a size baked in (one line, nothing written)."""
    sess = _session(body)
    z = sess.run(["logits"], {"image": np.zeros((1, th, tw, 3), np.uint8)})[0]
    lh, lw = int(z.shape[-2]), int(z.shape[-1])
    st = th // max(1, lh)
    if st < 1 or lh * st != th or lw * st != tw:
        raise FramePassError(f"the logits of a {th}x{tw} tile ({lh}x{lw}) are not a whole stride grid")
    H, W = 2 * th, tw + st
    try:
        zf = sess.run(["logits"], {"image": np.zeros((1, H, W, 3), np.uint8)})[0]
    except Exception as exc:  # noqa: BLE001 - a size baked into the graph: ORT refuses other sizes
        raise FramePassError(f"the cut graph does not take a {H}x{W} frame "
                             f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
    if tuple(zf.shape[-2:]) != (H // st, W // st):
        raise FramePassError(f"a {H}x{W} frame gives {zf.shape[-2]}x{zf.shape[-1]} logits, not "
                             f"{H // st}x{W // st}: the graph does not scale with its input")
    return st, lh


def _check_against(tile_proto, body, fp: dict, n: int = 3, tol: float = 1e-4) -> None:
    """The frame-pass graph on tiles reproduces the tile graph's ``prob`` and ``map``."""
    th, tw = fp["tile"]
    x = np.random.default_rng(0).integers(0, 256, (n, th, tw, 3), dtype=np.uint8)
    ts = _session(tile_proto)
    names = [o.name for o in ts.get_outputs()]
    want = dict(zip(names, ts.run(None, {"image": x})))
    z = _session(body).run(["logits"], {"image": x})[0]
    prob, maps = frame_pass_tile_outputs(z, fp["k"], (th, tw))
    dp = float(np.abs(prob - np.asarray(want["prob"]).reshape(-1)).max())
    dm = float(np.abs(maps - np.asarray(want["map"]).reshape(maps.shape)).max())
    if dp > tol or dm > tol:
        raise FramePassError(f"the cut graph does not reproduce the tile graph (prob {dp:.2g}, map {dm:.2g})")


def write_frame_pass(src, dst, gate: float | None = None) -> dict:
    """Cut ``src`` into a frame-pass graph at ``dst`` (checked against ``src`` first); returns its metadata."""
    import onnx

    body, meta = frame_pass_model(src, gate=gate)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(body, str(dst))
    return meta


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m crackcam.export.frame_pass",
                                 description="Cut a top-k tile graph into a frame-pass graph (one pass per frame).")
    ap.add_argument("src", help="tile graph (.onnx) of a top-k model, e.g. crackcam/assets/default_tiles.onnx")
    ap.add_argument("dst", help="frame-pass graph to write (.onnx)")
    ap.add_argument("--gate", type=float, default=None, help="per-tile gate for the frame pass (default: the "
                    "tile graph's); choose it on validation frames")
    a = ap.parse_args(argv)
    src, dst = Path(a.src), Path(a.dst)
    if not src.is_file():
        print(f"{src}: model file not found")
        return 2
    try:
        meta = write_frame_pass(src, dst, gate=a.gate)
    except FramePassError as exc:
        print(f"{src}: {exc}")
        return 2
    except OSError as exc:
        print(f"{dst}: cannot write ({exc.strerror or exc})")
        return 3
    except Exception as exc:  # noqa: BLE001 - a corrupt file (protobuf DecodeError), a graph ORT cannot run
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        print(f"{src}: not a loadable tile graph ({type(exc).__name__}: {first})")
        return 2
    fp = meta["frame_pass"]
    print(f"{dst}: frame pass of {src.name} (windows {fp['tile'][0]}x{fp['tile'][1]}, stride {fp['stride']}, "
          f"top {fp['k']}" + (f", gate {fp['gate']:g}" if "gate" in fp else "") + "); checked against the tile "
          "graph")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
