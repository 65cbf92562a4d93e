"""The ``crackcam`` metadata entry of an exported ONNX graph (schema: docs/contracts.md, "ONNX models").

``metadata_props["crackcam"]`` holds one JSON object; the runtime reads everything it needs from there.  This module
builds that object from a checkpoint's ``config.json`` / ``recipe.json`` and writes / reads it on an ``onnx``
ModelProto.  (The runtime parses the JSON itself, without this module: it never imports torch or onnx.)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

METADATA_KEY = "crackcam"
FORMAT_VERSION = 1
CLASS_NAMES = ["background", "crack"]
DEFAULT_THRESHOLD = 0.5
DEFAULT_GATE = 0.5

# Keys and their order in the JSON object, exactly as docs/contracts.md lists them.
SCHEMA_KEYS = ("format", "version", "kind", "model", "method", "target_layers", "input", "normalization",
               "threshold", "gate", "postprocess", "class_names", "data_card_sha256", "outputs")
INPUT_KEYS = ("name", "layout", "color", "dtype", "height", "width", "batch")


def default_postprocess() -> dict:
    """The runtime's PostProcessConfig defaults as a plain dict ({} when the runtime module is not there yet)."""
    try:
        from crackcam.runtime.postprocess import PostProcessConfig  # torch-free; export may import runtime
    except Exception:  # pragma: no cover - only while the runtime is being written
        return {}
    try:
        cfg = PostProcessConfig()
        if dataclasses.is_dataclass(cfg):
            return _jsonable(dataclasses.asdict(cfg))
        if hasattr(cfg, "to_dict"):
            return _jsonable(cfg.to_dict())
    except Exception:  # pragma: no cover
        pass
    return {}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def build_metadata(*, kind: str = "cam", model: str, method: str | None, target_layers: Sequence[str],
                   mean: Sequence[float], std: Sequence[float], outputs: Sequence[str],
                   height: int | None = None, width: int | None = None, batch: int | None = None,
                   threshold: float | str | None = None, gate: float | None = None,
                   postprocess: dict | None = None, data_card_sha256: str | None = None,
                   version: str | None = None, split: dict | None = None) -> dict:
    """The metadata object for one exported graph (``None`` sizes mean dynamic).  ``split``: the training run's
    validation carve (:func:`split_rule`), so ``crack-eval --model`` scores the same validation images."""
    from crackcam.runtime.meta import KINDS

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if version is None:
        import crackcam

        version = crackcam.__version__
    pp = default_postprocess()
    pp.update(_jsonable(dict(postprocess or {})))
    if threshold is None:
        threshold = pp.get("threshold", DEFAULT_THRESHOLD)
    pp["threshold"] = threshold  # one source of truth: the top-level threshold is the one in postprocess too
    meta = {
        "format": FORMAT_VERSION,
        "version": str(version),
        "kind": kind,
        "model": str(model),
        "method": method,
        "target_layers": [str(t) for t in target_layers],
        "input": {"name": "image", "layout": "NHWC", "color": "BGR", "dtype": "uint8",
                  "height": _opt_int(height), "width": _opt_int(width), "batch": _opt_int(batch)},
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "threshold": _jsonable(threshold),
        "gate": float(DEFAULT_GATE if gate is None else gate),
        "postprocess": pp,
        "class_names": list(CLASS_NAMES),
        "data_card_sha256": data_card_sha256,
        "outputs": [str(o) for o in outputs],
    }
    if split:
        meta["split"] = {"val_fraction": float(split["val_fraction"]), "split_seed": int(split["split_seed"])}
    validate_metadata(meta)
    return meta


def split_rule(config: dict) -> dict | None:
    """The validation carve a run's ``config.json`` recorded (``train_config``: val_fraction, split_seed), or
    None for a config without one."""
    tc = (config or {}).get("train_config") or {}
    if "val_fraction" not in tc or "split_seed" not in tc:
        return None
    return {"val_fraction": float(tc["val_fraction"]), "split_seed": int(tc["split_seed"])}


def _opt_int(v):
    return None if v is None else int(v)


def validate_metadata(meta: dict) -> None:
    """Raise ValueError naming the first field that breaks the contract."""
    if not isinstance(meta, dict):
        raise ValueError("crackcam metadata is not a JSON object")
    missing = [k for k in SCHEMA_KEYS if k not in meta]
    if missing:
        raise ValueError(f"crackcam metadata lacks {', '.join(missing)}")
    if meta["format"] != FORMAT_VERSION:
        raise ValueError(f"crackcam metadata format {meta['format']!r} is not {FORMAT_VERSION}")
    from crackcam.runtime.meta import KINDS

    if meta["kind"] not in KINDS:
        raise ValueError(f"crackcam metadata kind {meta['kind']!r} is not one of {KINDS}")
    inp = meta["input"]
    if not isinstance(inp, dict) or [k for k in INPUT_KEYS if k not in inp]:
        raise ValueError(f"crackcam metadata input must have {', '.join(INPUT_KEYS)}")
    if (inp["name"], inp["layout"], inp["color"], inp["dtype"]) != ("image", "NHWC", "BGR", "uint8"):
        raise ValueError("crackcam metadata input must be image / NHWC / BGR / uint8")
    norm = meta["normalization"]
    if not (isinstance(norm, dict) and len(norm.get("mean", [])) == 3 and len(norm.get("std", [])) == 3):
        raise ValueError("crackcam metadata normalization needs mean and std of 3 values")
    outs = meta["outputs"]
    need = ("restored", "map") if meta["kind"] == "restoration" else ("prob", "map")
    if meta.get("frame_pass"):  # a top-k graph cut at its per-position logits (crackcam.export.frame_pass)
        from crackcam.runtime.meta import frame_pass_problem

        bad = frame_pass_problem(meta["frame_pass"], meta["kind"])
        if bad:
            raise ValueError(f"crackcam metadata {bad}")
        need = ("logits",)
    if not all(o in outs for o in need):
        raise ValueError(f"crackcam metadata outputs must include {' and '.join(need)}")


def dumps(meta: dict) -> str:
    return json.dumps(meta, separators=(", ", ": "))


def set_metadata(model_proto, meta: dict) -> None:
    """Write ``meta`` into ``model_proto.metadata_props`` under the key ``crackcam`` (replacing any old entry)."""
    validate_metadata(meta)
    keep = [(p.key, p.value) for p in model_proto.metadata_props if p.key != METADATA_KEY]
    del model_proto.metadata_props[:]
    for k, v in keep:
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = k, v
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, dumps(meta)


def write_with_metadata(src, dst, meta: dict) -> None:
    """Copy the ONNX graph ``src`` to ``dst`` with ``meta`` as its crackcam metadata (weights untouched), through
    a temporary file, so that an interrupted write never leaves a half-written graph at ``dst``."""
    import onnx
    from pathlib import Path

    dst = Path(dst)
    proto = onnx.load(str(src))
    set_metadata(proto, meta)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(dst)


def get_metadata(model_or_path) -> dict:
    """Read the crackcam metadata from an ONNX ModelProto or file path (ValueError when absent or broken)."""
    if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        import onnx

        model_proto = onnx.load(str(model_or_path), load_external_data=False)
    else:
        model_proto = model_or_path
    for p in model_proto.metadata_props:
        if p.key == METADATA_KEY:
            try:
                meta = json.loads(p.value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"crackcam metadata is not valid JSON: {exc}") from None
            validate_metadata(meta)
            return meta
    raise ValueError("the ONNX file has no 'crackcam' metadata entry")
