"""Int8 graphs for CPU edge devices: ONNX Runtime static quantization (QDQ, per-channel int8 weights, uint8
activations), calibrated on **training** images cut into the very tiles the runtime feeds the graph (the model's
survey plan).  ``crack-export --int8 --calib DIR``.

The uint8 input, the in-graph pre-processing and the two outputs stay as they are; only the network's convolutions
(and what ONNX Runtime quantizes around them) run in int8.  The crackcam metadata is copied over, with an ``int8``
block saying what the calibration saw.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from crackcam.models.checkpoint import atomic_write_bytes

from . import metadata as md
from .onnx_export import ExportError


def training_images(root: Path) -> list[Path]:
    """The TRAINING split's images of a data-set folder crack-train reads (PaveSeg, Kaggle, flat, crack/ +
    no_crack/) — its whole frames, not its clean tiles, where it has both — or [] when ``root`` is a plain folder of
    images (then all of them are used)."""
    from crackcam.train.data import detect_layout, list_items

    try:
        detect_layout(root)
    except Exception:  # noqa: BLE001 - not a data-set layout
        return []
    try:
        items = list_items(root, "train")
    except Exception:  # noqa: BLE001
        return []
    frames = [it.image for it in items if not it.is_tile]  # whole frames: the tiles the runtime really cuts
    return frames or [it.image for it in items]


def calibration_tiles(meta_raw: dict, folder: Path, limit: int = 32, max_tiles: int = 256, seed: int = 0
                      ) -> list[np.ndarray]:
    """uint8 BGR tile batches (one frame's tiles each) of up to ``limit`` images of ``folder`` (seeded choice),
    cut by the model's own survey plan (``crackcam.runtime.survey``)."""
    from crackcam.runtime import survey as S
    from crackcam.runtime.imageio import BadInputError, list_images, read_image

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder}: --calib needs a folder of training images")
    files = training_images(folder)
    split = "train"
    if not files:
        files, split = list_images(folder), "every image of the folder"
    if not files:
        raise ExportError(f"{folder}: no images to calibrate the int8 graph on")
    rng = np.random.default_rng(seed)
    files = [files[i] for i in sorted(rng.permutation(len(files))[:limit])]
    cfg = S.SurveyConfig.from_dict(dict(meta_raw.get("survey") or {}))
    fixed = None
    inp = meta_raw.get("input") or {}
    if inp.get("height") and inp.get("width"):
        fixed = (int(inp["height"]), int(inp["width"]))
    batches, n = [], 0
    for f in files:
        try:
            bgr = np.ascontiguousarray(read_image(f)[..., ::-1])
        except BadInputError:
            continue
        plan = S.plan_frame(bgr.shape, cfg, fixed)
        tiles = S.cut_tiles(bgr, plan)
        batches.append(np.stack(tiles))
        n += len(tiles)
        if n >= max_tiles:
            break
    if not batches:
        raise ExportError(f"{folder}: none of its images could be read")
    return batches, split


FLOAT_HEAD = 3  # chosen on PaveSeg VALIDATION frames: all-int8 pixel F1 0.164 vs fp32 0.297; first 3 convs fp32: 0.297


def quantize_int8(fp32_path: Path, out: Path, calib: Path, limit: int = 32, float_head: int = FLOAT_HEAD,
                  log=print) -> dict:
    """Write the int8 graph of ``fp32_path`` to ``out``; returns the ``int8`` metadata block.  ``float_head``: keep
    the first N convolutions (the stem and first block, where a 2-px crack is still a few pixels wide) in fp32 —
    they carry the thin-crack signal that per-tensor uint8 activations lose."""
    try:
        import onnx
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quant_pre_process, quantize_static)
    except ImportError as exc:
        raise ExportError(f"int8 needs onnx and onnxruntime's quantization tools ({exc})") from None
    proto = onnx.load(str(fp32_path))
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        meta = md.get_metadata(proto)
    except ValueError as exc:
        raise ExportError(f"{fp32_path}: {exc}") from None
    batches, split = calibration_tiles(meta, calib, limit=limit)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"image": b}

    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    keep_float = convs[:int(float_head)] if float_head else []  # the first convolutions stay fp32

    with tempfile.TemporaryDirectory() as td:
        pre = Path(td) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation; quantize the graph as it is
            log(f"int8 pre-processing skipped ({type(exc).__name__})")
            pre = Path(fp32_path)
        tmp = Path(td) / "int8.onnx"
        quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv"],
                        nodes_to_exclude=keep_float)
        q = onnx.load(str(tmp))
        block = {"calibration": str(calib), "split": split, "images": len(batches), "tiles": int(sum(len(b) for b in batches)),
                 "format": "QDQ, per-channel int8 weights, uint8 activations (ONNX Runtime static quantization, "
                           "MinMax)", "fp32": Path(fp32_path).name, "float_convs": keep_float}
        meta = {**meta, "int8": block}
        del q.metadata_props[:]
        for k, v in props.items():  # the fp32 graph's entries, then ours with its int8 block
            if k != md.METADATA_KEY:
                e = q.metadata_props.add()
                e.key, e.value = k, v
        md.set_metadata(q, meta)
        out = Path(out)
        atomic_write_bytes(out, q.SerializeToString())
    log(f"int8 graph → {out} (calibrated on {block['tiles']} tiles of {block['images']} images of "
        f"{calib})")
    return block
