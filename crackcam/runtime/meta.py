"""Model metadata (``metadata_props["crackcam"]``, see docs/contracts.md) and its checks.

Torch-free and ``onnx``-free: ONNX metadata is read through ONNX Runtime's ``get_modelmeta()``; a TensorRT engine
carries none, so its metadata comes from a side-car file ``NAME.engine.json`` (or ``NAME.json``) holding the same JSON,
or from the ``NAME.onnx`` it was built from when that sits beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

META_KEY = "crackcam"
SUPPORTED_FORMATS = (1,)
KINDS = ("cam", "restoration", "segmenter")  # segmenter: a distilled student, prob + per-pixel map, no refinement


class ModelFileError(ValueError):
    """A model file that cannot be used; the message is one line ``"<path>: <problem>"``."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class BackendUnavailable(RuntimeError):
    """An inference backend (TensorRT, CUDA, a provider) that is not installed or cannot start: one line."""


@dataclass
class ModelMeta:
    """The fields of the crackcam metadata that the runtime uses (``raw`` keeps everything)."""

    kind: str
    model: str
    height: int | None
    width: int | None
    batch: int | None
    threshold: Any
    gate: float
    postprocess: dict
    version: str = ""
    method: str = ""
    outputs: list = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @property
    def frame_pass(self) -> dict | None:
        """``{"tile": [h, w], "stride": s, "k": k}`` for a frame-pass graph (a top-k tile graph cut at its
        per-position logits, ``crackcam.export.frame_pass``), else None."""
        fp = self.raw.get("frame_pass") if isinstance(self.raw, dict) else None
        return fp or None

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """The tile every frame is cut into: a fixed-size graph's input, or a frame-pass graph's window."""
        if self.height and self.width:
            return int(self.height), int(self.width)
        fp = self.frame_pass
        if fp:
            return int(fp["tile"][0]), int(fp["tile"][1])
        return None


def frame_pass_problem(fp, kind: str) -> str | None:
    """What is wrong with a ``frame_pass`` metadata block (None when it is sound): a cam graph's
    ``{tile: [h, w], stride, k}`` with the tile a whole number of strides and k within a tile's positions.  One
    rule for the exporter (``crackcam.export.metadata``) and the runtime."""
    if kind != "cam":
        return f"frame_pass belongs to a cam graph, not {kind!r}"
    try:
        th, tw = (int(v) for v in fp["tile"])
        st, k = int(fp["stride"]), int(fp["k"])
        ok = (isinstance(fp["tile"], list) and len(fp["tile"]) == 2 and min(th, tw, st, k) > 0
              and th % st == 0 and tw % st == 0 and k <= (th // st) * (tw // st))
    except (TypeError, ValueError, KeyError):
        ok = False
    return None if ok else f"frame_pass {fp!r} is not {{tile: [h, w], stride, k}} (tile in whole strides, k within it)"


def parse_meta(text: str | dict, path) -> ModelMeta:
    """Parse and check the crackcam metadata JSON; any problem → :class:`ModelFileError` naming ``path``."""
    if isinstance(text, dict):
        d = text
    else:
        try:
            d = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise ModelFileError(path, f"metadata_props['crackcam'] is not valid JSON ({e.msg if hasattr(e, 'msg') else e})")
    if not isinstance(d, dict):
        raise ModelFileError(path, "metadata_props['crackcam'] is not a JSON object")
    fmt = d.get("format")
    if fmt not in SUPPORTED_FORMATS:
        raise ModelFileError(path, f"crackcam metadata format {fmt!r} is not supported (this runtime reads format 1)")
    kind = d.get("kind")
    if kind not in KINDS:
        raise ModelFileError(path, f"crackcam metadata kind {kind!r} is not one of {', '.join(map(repr, KINDS))}")
    inp = d.get("input")
    if not isinstance(inp, dict):
        raise ModelFileError(path, "crackcam metadata has no 'input' object")
    expect = {"name": "image", "layout": "NHWC", "color": "BGR", "dtype": "uint8"}
    for k, v in expect.items():
        if inp.get(k) != v:
            raise ModelFileError(path, f"crackcam metadata input.{k} is {inp.get(k)!r}, the runtime needs {v!r}")

    def _dim(name):
        v = inp.get(name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ModelFileError(path, f"crackcam metadata input.{name} is {v!r}, not a positive integer or null")
        return v

    h, w, b = _dim("height"), _dim("width"), _dim("batch")
    if (h is None) != (w is None):
        raise ModelFileError(path, "crackcam metadata input.height and input.width must both be set or both be null")
    thr = d.get("threshold", 0.5)
    if thr is None:
        thr = 0.5
    gate = d.get("gate", 0.0)
    try:
        gate = float(gate if gate is not None else 0.0)
    except (TypeError, ValueError):
        raise ModelFileError(path, f"crackcam metadata gate {gate!r} is not a number")
    pp = d.get("postprocess") or {}
    if not isinstance(pp, dict):
        raise ModelFileError(path, "crackcam metadata 'postprocess' is not an object")
    fp = d.get("frame_pass")
    if fp is not None:
        bad = frame_pass_problem(fp, kind)
        if bad:
            raise ModelFileError(path, f"crackcam metadata {bad}")
    return ModelMeta(kind=kind, model=str(d.get("model", "")), height=h, width=w, batch=b, threshold=thr, gate=gate,
                     postprocess=dict(pp), version=str(d.get("version", "")), method=str(d.get("method", "")),
                     outputs=list(d.get("outputs") or []), raw=d)


def meta_from_map(custom: dict, path) -> ModelMeta:
    """From an ONNX ``custom_metadata_map`` (``{key: str}``)."""
    if META_KEY not in custom:
        raise ModelFileError(path, "no crackcam metadata (metadata_props['crackcam'] missing); export it with crack-export")
    return parse_meta(custom[META_KEY], path)


def check_io(meta: ModelMeta, inputs: list[tuple[str, str, list]], outputs: list[str], path) -> None:
    """Check the graph's real inputs/outputs against the metadata.

    ``inputs``: ``[(name, dtype_str, shape)]`` with dtype like ``"tensor(uint8)"`` or ``"uint8"`` and shape entries
    int or str/None for symbolic dims.
    """
    names = [i[0] for i in inputs]
    if len(inputs) != 1 or names[0] != "image":
        raise ModelFileError(path, f"model inputs are {names}, the runtime needs one input 'image'")
    _, dtype, shape = inputs[0]
    if "uint8" not in str(dtype):
        raise ModelFileError(path, f"model input 'image' has type {dtype}, the contract says uint8")
    if len(shape) != 4:
        raise ModelFileError(path, f"model input 'image' has rank {len(shape)}, the contract says NHWC (rank 4)")
    c = shape[3]
    if isinstance(c, int) and c != 3:
        raise ModelFileError(path, f"model input 'image' has {c} channels in NHWC position, metadata says BGR (3)")

    def _fixed(v):
        return v if isinstance(v, int) and v > 0 else None

    gh, gw, gb = _fixed(shape[1]), _fixed(shape[2]), _fixed(shape[0])
    if (gh, gw) != (meta.height, meta.width):
        raise ModelFileError(path, f"metadata input size {meta.height}x{meta.width} does not match the graph's "
                                   f"{shape[1]}x{shape[2]}")
    if meta.batch is not None and gb is not None and gb != meta.batch:
        raise ModelFileError(path, f"metadata batch {meta.batch} does not match the graph's {gb}")
    if gb is not None and meta.batch is None:
        meta.batch = gb
    need = ["map"] if meta.kind == "restoration" else ["logits"] if meta.frame_pass else ["prob", "map"]
    missing = [n for n in need if n not in outputs]
    if missing:
        raise ModelFileError(path, f"model has no output {missing[0]!r} (outputs: {outputs})")


ENGINE_SUFFIXES = (".engine", ".plan", ".trt")  # TensorRT engines (their metadata: a side-car, see below)


def is_engine_path(path) -> bool:
    return Path(path).suffix.lower() in ENGINE_SUFFIXES


def sidecar_meta(engine_path: Path) -> ModelMeta:
    """Metadata for a TensorRT engine: ``X.engine.json`` / ``X.json`` side-car, or ``X.onnx`` beside it."""
    engine_path = Path(engine_path)
    for cand in (engine_path.with_name(engine_path.name + ".json"), engine_path.with_suffix(".json")):
        if cand.is_file():
            try:
                return parse_meta(cand.read_text(), cand)
            except OSError as e:
                raise ModelFileError(cand, f"cannot read ({e.strerror})")
    onnx_path = engine_path.with_suffix(".onnx")
    if onnx_path.is_file():
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:
            sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - any ORT load failure is a bad file
            raise ModelFileError(onnx_path, f"not a loadable ONNX model ({str(e).splitlines()[0][:160]})")
        return meta_from_map(sess.get_modelmeta().custom_metadata_map, onnx_path)
    raise ModelFileError(engine_path, f"no crackcam metadata: put the export's JSON beside it as "
                                      f"{engine_path.name}.json (or the source {onnx_path.name})")
