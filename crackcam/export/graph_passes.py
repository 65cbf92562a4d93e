"""Exact rewrites of an exported ONNX graph that ONNX Runtime does not do itself.

:func:`fuse_pads` — EfficientNet-Lite's TF-"same" padding exports as an explicit ``Pad`` (zeros on the bottom /
right, from a chain of Shape/Gather/Concat/Cast nodes) before each stride-2 convolution.  ONNX Runtime's CPU
provider runs those Pads as separate nodes, and each one forces a layout change out of and back into its blocked
(NCHWc) convolution format: on the packaged 128² tile graph the three Pads and their reorders were a third of the
model's time.  A zero ``Pad`` on the spatial axes that feeds only a ``Conv`` is the same as the Conv's own ``pads``
attribute, so the pass moves the amounts there and deletes the Pad (and the nodes that only computed its amounts).
The outputs are bit-identical (tests/test_export.py).  Amounts the graph computes are read by running that part
of it, which is done only for graphs whose height and width are fixed (the fixed-tile exports of top-k models such
as the packaged default); with a dynamic size only constant amounts are folded.

    python -m crackcam.export.graph_passes IN.onnx [OUT.onnx]     # an already exported model (metadata kept)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

__all__ = ["fuse_pads", "main"]


def _used_names(graph) -> set:
    import onnx

    used = set()
    for n in graph.node:
        used.update(i for i in n.input if i)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _used_names(a.g)
            for sg in a.graphs:
                used |= _used_names(sg)
    return used


def _probe_values(proto, names: list[str]) -> dict | None:
    """The values of the tensors ``names`` (int64 pad amounts) computed by the graph, or None when they cannot be
    known for every input: only a dynamic *batch* is allowed (tried at 1 and 3; an amount that changes is
    dropped) — with a dynamic height or width, TF-"same" amounts depend on the size modulo the stride, which no
    finite probe proves constant, so those graphs keep their Pads."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    for nm in names:
        probe.graph.output.append(helper.make_tensor_value_info(nm, onnx.TensorProto.INT64, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - not computable on its own: leave the graph as it is
        return None
    feeds_a, feeds_b, same = {}, {}, True
    for inp in sess.get_inputs():
        dt = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32, "tensor(float16)": np.float16}.get(inp.type)
        if dt is None:
            return None
        if any(not isinstance(d, int) for d in inp.shape[1:]):
            return None
        sa = [d if isinstance(d, int) else 1 for d in inp.shape]
        sb = [d if isinstance(d, int) else 3 for d in inp.shape]
        feeds_a[inp.name], feeds_b[inp.name] = np.zeros(sa, dt), np.zeros(sb, dt)
        same = same and sa == sb
    try:
        va = sess.run(names, feeds_a)
        vb = va if same else sess.run(names, feeds_b)
    except Exception:  # noqa: BLE001
        return None
    out = {}
    for nm, a, b in zip(names, va, vb):
        a, b = np.asarray(a).reshape(-1).tolist(), np.asarray(b).reshape(-1).tolist()
        if a == b:
            out[nm] = [int(v) for v in a]
    return out


def const_value(graph, name: str):
    """An initializer's or Constant node's value, else None."""
    from onnx import numpy_helper

    for i in graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def fuse_pads(proto) -> int:
    """Fold every zero ``Pad`` that feeds only a ``Conv`` (NCHW, spatial axes only, constant amounts) into the
    Conv's ``pads``; delete what is left unused.  Returns how many Pads were folded.  In place."""
    from onnx import helper

    import onnx

    g = proto.graph
    consumers: dict[str, list] = {}
    in_subgraphs: set = set()  # names an If / Loop body reads from the outer graph
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        for a in n.attribute:
            for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else []) + list(a.graphs):
                in_subgraphs |= _used_names(sg)
    outputs = {o.name for o in g.output}

    def foldable(n) -> bool:
        if (n.op_type != "Pad" or len(n.input) < 2 or not n.input[1] or n.output[0] in outputs
                or n.output[0] in in_subgraphs):
            return False
        mode = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "mode"), b"constant")
        if mode not in (b"constant", "constant"):
            return False
        if len(n.input) > 3 and n.input[3]:  # explicit axes: not handled
            return False
        if len(n.input) > 2 and n.input[2]:
            v = const_value(g, n.input[2])
            if v is None or np.any(np.asarray(v) != 0):
                return False
        cons = consumers.get(n.output[0], [])
        if len(cons) != 1 or cons[0].op_type != "Conv":
            return False
        auto = next((helper.get_attribute_value(a) for a in cons[0].attribute if a.name == "auto_pad"), b"NOTSET")
        return auto in (b"NOTSET", "NOTSET") and cons[0].input[0] == n.output[0]

    pads = [n for n in g.node if foldable(n)]
    if not pads:
        return 0
    amounts = {}
    unknown = []
    for n in pads:
        v = const_value(g, n.input[1])
        if v is not None:
            amounts[n.input[1]] = [int(x) for x in np.asarray(v).reshape(-1)]
        else:
            unknown.append(n.input[1])
    if unknown:
        amounts.update(_probe_values(proto, sorted(set(unknown))) or {})
    done = 0
    for n in pads:
        v = amounts.get(n.input[1])
        if v is None or len(v) != 8 or any(x < 0 for x in v) or v[0] or v[1] or v[4] or v[5]:
            continue  # NCHW with zero batch/channel amounts only
        conv = consumers[n.output[0]][0]
        attr = next((a for a in conv.attribute if a.name == "pads"), None)
        old = list(attr.ints) if attr is not None else [0, 0, 0, 0]
        if len(old) != 4:
            continue
        if attr is not None:
            conv.attribute.remove(attr)
        conv.attribute.append(helper.make_attribute("pads", [old[0] + v[2], old[1] + v[3], old[2] + v[6],
                                                             old[3] + v[7]]))
        conv.input[0] = n.input[0]
        g.node.remove(n)
        done += 1
    if done:
        while True:  # the nodes that only computed the amounts
            used = _used_names(g) | outputs
            dead = [n for n in g.node if not any(o in used for o in n.output)]
            if not dead:
                break
            for n in dead:
                g.node.remove(n)
        used = _used_names(g) | outputs
        for init in [i for i in g.initializer if i.name not in used]:
            g.initializer.remove(init)
            for gi in [x for x in g.input if x.name == init.name]:  # IR < 4 lists initializers as inputs too
                g.input.remove(gi)
    return done


def main(argv=None) -> int:
    """Apply the passes to an exported model file (IN → OUT, default: IN in place); metadata is kept."""
    import onnx

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or len(args) > 2 or args[0].startswith("-"):
        print("usage: python -m crackcam.export.graph_passes IN.onnx [OUT.onnx]", file=sys.stderr)
        return 2
    src = Path(args[0])
    dst = Path(args[1]) if len(args) > 1 else src
    try:
        proto = onnx.load(str(src))
    except Exception as e:  # noqa: BLE001 - not a model: one line
        print(f"{src}: not a readable ONNX model ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})",
              file=sys.stderr)
        return 2
    n = fuse_pads(proto)
    onnx.checker.check_model(proto)
    tmp = dst.with_name(f".{dst.name}.tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(dst)
    print(f"{dst}: folded {n} Pad node(s) into their convolutions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
