"""``export_checkpoint``: a crack-train run folder → a verified ONNX graph (and optionally a TensorRT engine).

Used by ``crack-export`` and the export benchmark.  Defaults come from the run: the method, target layers,
threshold, gate and post-processing from ``DIR/recipe.json`` when calibration wrote one, else Grad-CAM++ on the
model's default target layer, threshold 0.5 and gate 0.5.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import metadata as md
from .onnx_export import DEFAULT_OPSET, CamExportGraph, ExportError, write_verified_onnx

DEFAULT_METHOD = "gradcam++"
DEFAULT_RUNS = Path("runs")


def find_latest_run(root: Path = DEFAULT_RUNS) -> Path | None:
    """The newest run folder under ``root`` (``root/*/`` or ``root/*/*/`` holding config.json and best.pt)."""
    root = Path(root)
    if not root.is_dir():
        return None
    cands = [p.parent for pat in ("*/config.json", "*/*/config.json") for p in root.glob(pat)
             if (p.parent / "best.pt").is_file()]
    if not cands:
        return None
    return max(cands, key=lambda d: (d / "best.pt").stat().st_mtime)


def read_recipe(run_dir: Path) -> dict:
    p = Path(run_dir) / "recipe.json"
    if not p.is_file():
        return {}
    try:
        r = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(r, dict):
        raise ValueError(f"{p}: not a JSON object")
    return r


@dataclass
class ExportSettings:
    method: str | None = None  # None: recipe.json's, else gradcam++
    layers: Sequence[str] | None = None  # None: recipe.json's, else the model's default target layer
    outputs: Sequence[str] = ("prob", "map")
    batch: int | None = None  # None = dynamic
    height: int | None = None
    width: int | None = None
    opset: int = DEFAULT_OPSET
    exporter: str = "auto"
    prefer_dynamo: bool = False  # auto: try dynamo first (cleaner graphs for TensorRT: no If nodes)
    gate: float | None = None  # None: recipe.json's, else 0.5
    threshold: float | str | None = None
    which: str = "best"
    verify: bool = True
    tol_map: float = 1e-4
    tol_prob: float = 1e-5


def build_cam_graph(model, config: dict, settings: ExportSettings, recipe: dict | None = None,
                    extra_methods: Sequence[str] = ()):
    """The CamExportGraph and the metadata for a loaded classifier."""
    from crackcam.models.cam import CamModel

    recipe = resolve_recipe(recipe or {}, settings.method)
    method = settings.method or recipe.get("method") or DEFAULT_METHOD
    refine = recipe.get("_refine")
    if method.startswith("refine-"):  # asked on the command line: the graph holds the CAM, refinement is runtime work
        refine = refine or {"method": method}
        method = method[len("refine-"):]
    layers = settings.layers or recipe.get("layers") or None
    if isinstance(layers, str):
        layers = [layers]
    gate = settings.gate if settings.gate is not None else recipe.get("gate", md.DEFAULT_GATE)
    spec = getattr(model, "spec", None)
    mean = config.get("mean") or (spec.mean if spec else None)
    std = config.get("std") or (spec.std if spec else None)
    if mean is None or std is None:
        raise ExportError("the run's config.json has no mean/std and the model has no spec")
    try:
        cams = [CamModel(model, m, layers=layers, normalize=True, gate=float(gate))
                for m in [method, *extra_methods]]
    except (KeyError, ValueError) as exc:
        raise ExportError(str(exc).strip("'\"")) from None
    graph = CamExportGraph(cams, mean, std, settings.outputs)
    used_layers = list(getattr(cams[0], "layers", None) or layers or (config.get("target_layers") or
                                                                       (spec.target_layers if spec else []))[:1])
    pp = dict(recipe.get("postprocess") or {})
    threshold = settings.threshold if settings.threshold is not None else recipe.get("threshold",
                                                                                     pp.get("threshold"))
    meta = md.build_metadata(kind="cam", model=config.get("model", getattr(spec, "name", "?")), method=method,
                             target_layers=used_layers, mean=mean, std=std, outputs=graph.output_names,
                             height=settings.height, width=settings.width, batch=settings.batch,
                             threshold=threshold, gate=float(gate), postprocess=pp,
                             data_card_sha256=config.get("data_card_sha256"),
                             split=md.split_rule(config))
    if refine:
        meta["refine"] = refine  # an addition to the contract's keys (docs/export.md): the recipe's pixel-cue step
    if recipe.get("survey"):
        meta["survey"] = dict(recipe["survey"])  # frame geometry, per-tile gate, ROI, minimum crack length
    if recipe.get("_profiles"):
        meta["profiles"] = recipe["_profiles"]  # per camera (frame size): survey, refinement, post-processing
    return graph, meta


def resolve_recipe(recipe: dict, method_override: str | None = None) -> dict:
    """The recipe entry for the graph's map.

    ``crack-eval`` calibration may choose ``refine-<cam>``: the CAM as region prior times a pixel cue
    (``crackcam.runtime.cues.refine``), a NumPy/OpenCV step after the network.  The graph then computes the plain
    ``<cam>`` map, so threshold / gate / post-processing come from the recipe's ``candidates[<cam>]`` entry (chosen
    for the raw map), and the refinement with its own threshold and post-processing goes to ``_refine``.
    """
    if not recipe:
        return {}
    if recipe.get("survey") is not None:
        return _resolve_survey_recipe(recipe, method_override)
    method = method_override or recipe.get("method") or ""
    cands = recipe.get("candidates") or {}
    if method_override and method_override in cands:
        entry = dict(cands[method_override])
        entry["method"] = method_override
        recipe = entry
        method = method_override
    elif method_override and method_override != recipe.get("method"):
        # another method than the calibrated one: its threshold/post-processing were not chosen for this map
        return {k: recipe[k] for k in ("gate", "layers") if recipe.get(k) is not None}
    if not str(method).startswith("refine-"):
        return recipe
    base = method[len("refine-"):]
    out = dict(cands.get(base) or {})
    out["method"] = base
    out.setdefault("gate", recipe.get("gate"))
    out.setdefault("layers", recipe.get("layers"))
    if not cands.get(base):  # no raw-map calibration: keep the gate, let threshold/post-processing default
        out = {k: v for k, v in out.items() if v is not None}
    src = recipe if recipe.get("refine") is not None else (cands.get(method) or recipe)
    out["_refine"] = {"method": method, **dict(src.get("refine") or {}),
                      "threshold": src.get("threshold"), "postprocess": dict(src.get("postprocess") or {})}
    return out


def _resolve_survey_recipe(recipe: dict, method_override: str | None) -> dict:
    """A recipe from the survey calibration (``crackcam.tools.calibration``): the gate lives in its ``survey``
    block and is applied per tile by the runtime (the graph itself does not gate); a ``refine-<cam>`` method puts
    its cue step, threshold and post-processing into ``_refine``."""
    entry = dict(recipe)
    method = method_override or recipe.get("method") or ""
    if method_override and method_override != recipe.get("method"):
        cand = (recipe.get("candidates") or {}).get(method_override)
        if not cand or cand.get("threshold") is None:
            return {"gate": 0.0, "survey": recipe.get("survey"), "layers": recipe.get("layers")}
        entry = {**cand, "layers": recipe.get("layers")}
    survey = dict(entry.get("survey") or recipe.get("survey"))
    out = {"method": method, "layers": entry.get("layers"), "gate": 0.0, "survey": survey,
           "threshold": entry.get("threshold"), "postprocess": dict(entry.get("postprocess") or {})}
    if str(method).startswith("refine-"):
        out["method"] = method[len("refine-"):]
        out["_refine"] = {"method": method, **dict(entry.get("refine") or {}), "threshold": entry.get("threshold"),
                          "postprocess": dict(entry.get("postprocess") or {})}
    profiles = {}
    for size, e in (recipe.get("profiles") or {}).items() if not method_override else ():
        base = str(e.get("method", ""))
        if base.replace("refine-", "") != str(method).replace("refine-", ""):
            continue  # the graph computes one CAM method; a profile can only change what follows it
        profiles[size] = {"method": base, "survey": dict(e.get("survey") or {}), "threshold": e.get("threshold"),
                          "postprocess": dict(e.get("postprocess") or {}),
                          "refine": ({"method": base, **dict(e.get("refine") or {}), "threshold": e.get("threshold"),
                                      "postprocess": dict(e.get("postprocess") or {})}
                                     if base.startswith("refine-") else None)}
    if profiles:
        out["_profiles"] = profiles
    return out


def default_out(run_dir: Path, meta: dict, fmt: str) -> Path:
    m = "restoration" if meta["kind"] == "restoration" else str(meta.get("method") or meta["kind"])
    m = m.replace("+", "p")  # gradcam++ → gradcampp
    return Path(run_dir) / "export" / f"{meta['model']}_{m}.{'engine' if fmt == 'trt' else 'onnx'}"


def export_checkpoint(run_dir, out=None, settings: ExportSettings | None = None, log=print):
    """Load the run's classifier (or UP-CrackNet generator), export, verify, write; returns an ExportResult."""
    from crackcam.models.checkpoint import load_classifier, read_config

    settings = settings or ExportSettings()
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    recipe = read_recipe(run_dir)
    tile = int(config.get("tile") or 224)
    if str(config.get("model", "")).lower().startswith("upcracknet"):
        from .restoration import build_restoration_graph

        graph, meta, tile = build_restoration_graph(run_dir, config, recipe, settings)
    elif config.get("kind") == "segmenter":
        from .segmenter import build_segmenter_graph

        model, config = load_classifier(run_dir, which=settings.which)
        graph, meta = build_segmenter_graph(model, config, recipe, settings)
    else:
        model, config = load_classifier(run_dir, which=settings.which)
        if getattr(model, "pool_kind", "avg") == "topk" and (settings.height is None or settings.width is None):
            # the top-k pool's k is a function of the tile size: such graphs take a fixed tile (the survey tile)
            t = (resolve_recipe(recipe, settings.method).get("survey") or {}).get("tile") or tile
            settings = ExportSettings(**{**settings.__dict__, "height": settings.height or int(t),
                                         "width": settings.width or int(t)})
            log(f"crack-export: {config.get('model')} pools the top-k positions (k depends on the size): fixed "
                f"input {settings.height}x{settings.width}")
        graph, meta = build_cam_graph(model, config, settings, recipe)
    if recipe.get("masks_used") is not None:  # how many masked validation images the recipe was chosen on
        meta["masks_used"] = int(recipe["masks_used"])
    out = Path(out) if out else default_out(run_dir, meta, "onnx")
    return write_verified_onnx(graph, out, meta, exporter=settings.exporter, opset=settings.opset,
                               batch=settings.batch, height=settings.height, width=settings.width, tile=tile,
                               verify=settings.verify, tol_map=settings.tol_map, tol_prob=settings.tol_prob,
                               prefer_dynamo=settings.prefer_dynamo, log=log)
