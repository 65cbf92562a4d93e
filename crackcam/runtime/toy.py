"""Tiny contract-conformant ONNX models built in code (tests, benchmarks, smoke runs without an export).

``make_toy_model(path)`` writes a graph with the contract's interface (input ``image`` uint8 NHWC BGR, outputs
``prob`` [N] and ``map`` [N,H,W] on [0,1], gated) and the ``crackcam`` metadata JSON:

* ``convs=0`` — a pixel-wise "darkness" map: ``map = clip((1 − gray/255 − offset) · gain, 0, 1)``, ``prob = max(map)``;
  dark thin lines light up, so it finds the synthetic cracks of ``crackcam.train.synth``.
* ``convs=k`` — a CAM-like map: local darkness contrast pooled to stride 16, times the response of a small random
  CNN (k stride-2 3×3 convolutions, ``channels`` wide), bilinearly upsampled to H×W: a stand-in with a real
  model's compute and map shape, for benchmarks (frame sides should be multiples of 16).

Needs the ``onnx`` package (the ``train`` extra), imported only when called: the runtime itself does not need it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def toy_metadata(height=None, width=None, batch=None, threshold=0.5, gate=0.0, postprocess=None, **extra) -> dict:
    d = {"format": 1, "version": "toy", "kind": "cam", "model": "toy-darkness", "method": "none",
         "target_layers": [],
         "input": {"name": "image", "layout": "NHWC", "color": "BGR", "dtype": "uint8",
                   "height": height, "width": width, "batch": batch},
         "normalization": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
         "threshold": threshold, "gate": gate,
         "postprocess": postprocess if postprocess is not None else {"threshold": threshold, "min_area": 4},
         "class_names": ["background", "crack"], "data_card_sha256": None, "outputs": ["prob", "map"]}
    d.update(extra)
    return d


def make_toy_model(path, height: int | None = None, width: int | None = None, batch: int | None = None,
                   offset: float = 0.55, gain: float = 5.0, gate: float = 0.0, threshold: float | str = 0.5,
                   convs: int = 0, channels: int = 16, seed: int = 0, metadata: dict | None | bool = True,
                   postprocess: dict | None = None, opset: int = 17, kind: str = "cam",
                   channel_weights: tuple | None = None) -> Path:
    """Write the toy model to ``path``; ``metadata=False`` leaves the crackcam metadata out, a dict replaces it.

    ``channel_weights=(b, g, r)``: the grey level is this weighted sum of the input's B, G, R channels instead of
    their mean — e.g. ``(0, 0, 1)`` sees only red, so a colour-order slip anywhere before the graph shows.

    ``kind="restoration"``: outputs ``restored`` (the input, uint8 NHWC) and ``map``, no ``prob`` (UP-CrackNet style).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    N = batch if batch else "N"
    H = height if height else "H"
    W = width if width else "W"
    inp = helper.make_tensor_value_info("image", TensorProto.UINT8, [N, H, W, 3])
    out_prob = helper.make_tensor_value_info("prob", TensorProto.FLOAT, [N])
    out_map = helper.make_tensor_value_info("map", TensorProto.FLOAT, [N, H, W])
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
             (("c255", 1 / 255.0), ("one", 1.0), ("off", offset), ("gain", gain), ("zero", 0.0))]
    if channel_weights is not None:
        cw = np.asarray(channel_weights, np.float32).reshape(1, 1, 1, 3)
        inits += [numpy_helper.from_array(cw / max(float(cw.sum()), 1e-6), "cw"),
                  numpy_helper.from_array(np.array([3], np.int64), "ax3")]
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        *([] if channel_weights is None else [helper.make_node("Mul", ["xf", "cw"], ["xfw"])]),
        helper.make_node("ReduceMean", ["xf"], ["gray"], axes=[3], keepdims=0) if channel_weights is None else
        helper.make_node("ReduceSum", ["xfw", "ax3"], ["gray"], keepdims=0),
        helper.make_node("Mul", ["gray", "c255"], ["g01"]),
        helper.make_node("Sub", ["one", "g01"], ["dark"]),
        helper.make_node("Sub", ["dark", "off"], ["d0"]),
        helper.make_node("Mul", ["d0", "gain"], ["d1"]),
        helper.make_node("Clip", ["d1", "zero", "one"], ["raw"]),
    ]
    last = "raw"
    if convs > 0:
        rng = np.random.default_rng(seed)
        nodes += [helper.make_node("Transpose", ["xf"], ["nchw"], perm=[0, 3, 1, 2]),
                  helper.make_node("Mul", ["nchw", "c255"], ["x0"])]
        cin, cur = 3, "x0"
        for i in range(convs):
            w = rng.normal(0, np.sqrt(2.0 / (9 * cin)), (channels, cin, 3, 3)).astype(np.float32)
            b = np.zeros(channels, np.float32)
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes += [helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3],
                                       strides=[2, 2], pads=[1, 1, 1, 1]),
                      helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
            cin, cur = channels, f"r{i}"
        wl = (rng.normal(0, 0.1, (1, cin, 1, 1))).astype(np.float32)
        inits += [numpy_helper.from_array(wl, "wl"), numpy_helper.from_array(np.array([2.0], np.float32), "bl"),
                  numpy_helper.from_array(np.array(0.07, np.float32), "loc_off"),
                  numpy_helper.from_array(np.array(8.0, np.float32), "loc_gain"),
                  numpy_helper.from_array(np.array([0], np.int64), "i0"),
                  numpy_helper.from_array(np.array([1], np.int64), "i1"),
                  numpy_helper.from_array(np.array([3], np.int64), "i3")]
        # CAM-like map: local darkness contrast at stride 4, max-pooled to stride 16, times the CNN's response,
        # bilinearly upsampled to H×W (smooth blobs along the cracks, as a class activation map looks)
        nodes += [helper.make_node("Conv", [cur, "wl", "bl"], ["logit"], kernel_shape=[1, 1]),
                  helper.make_node("Sigmoid", ["logit"], ["sig"]),
                  helper.make_node("Unsqueeze", ["dark", "i1"], ["dark1"]),
                  helper.make_node("AveragePool", ["dark1"], ["d4"], kernel_shape=[4, 4], strides=[4, 4]),
                  helper.make_node("AveragePool", ["d4"], ["d4mean"], kernel_shape=[9, 9], pads=[4, 4, 4, 4],
                                   count_include_pad=0),
                  helper.make_node("Sub", ["d4", "d4mean"], ["loc"]),
                  helper.make_node("Sub", ["loc", "loc_off"], ["loc0"]),
                  helper.make_node("Mul", ["loc0", "loc_gain"], ["loc1"]),
                  helper.make_node("Clip", ["loc1", "zero", "one"], ["loc2"]),
                  helper.make_node("MaxPool", ["loc2"], ["loc16"], kernel_shape=[4, 4], strides=[4, 4]),
                  helper.make_node("Shape", ["loc16"], ["sizes16"]),
                  helper.make_node("Resize", ["sig", "", "", "sizes16"], ["sig16"], mode="linear"),
                  helper.make_node("Mul", ["loc16", "sig16"], ["coarse"]),
                  helper.make_node("Shape", ["image"], ["ishape"]),
                  helper.make_node("Slice", ["ishape", "i0", "i1"], ["dim_n"]),
                  helper.make_node("Slice", ["ishape", "i1", "i3"], ["dim_hw"]),
                  helper.make_node("Concat", ["dim_n", "i1", "dim_hw"], ["sizes"], axis=0),
                  helper.make_node("Resize", ["coarse", "", "", "sizes"], ["up"], mode="linear"),
                  helper.make_node("Squeeze", ["up", "i1"], ["rawc"])]
        last = "rawc"
    nodes += [helper.make_node("ReduceMax", [last], ["prob"], axes=[1, 2], keepdims=0)]
    if gate > 0:
        nodes += [helper.make_node("GreaterOrEqual", ["prob", "gate"], ["keep"]),
                  helper.make_node("Cast", ["keep"], ["keepf"], to=TensorProto.FLOAT),
                  helper.make_node("Unsqueeze", ["keepf", "ax12"], ["keep3"]),
                  helper.make_node("Mul", [last, "keep3"], ["map"])]
        inits += [numpy_helper.from_array(np.array([1, 2], np.int64), "ax12"),
                  numpy_helper.from_array(np.array(gate, np.float32), "gate")]
    else:
        nodes += [helper.make_node("Identity", [last], ["map"])]
    outputs = [out_prob, out_map]
    if kind == "restoration":
        nodes.append(helper.make_node("Identity", ["image"], ["restored"]))
        outputs = [helper.make_tensor_value_info("restored", TensorProto.UINT8, [N, H, W, 3]), out_map]
    graph = helper.make_graph(nodes, "crackcam_toy", [inp], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="crackcam-toy")
    model.ir_version = 8
    if metadata is not False:
        meta = metadata if isinstance(metadata, dict) else toy_metadata(height, width, batch, threshold, gate,
                                                                        postprocess)
        if kind == "restoration" and not isinstance(metadata, dict):
            meta.update(kind="restoration", model="toy-restoration", outputs=["restored", "map"])
        helper.set_model_props(model, {"crackcam": json.dumps(meta)})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
