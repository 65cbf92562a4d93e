"""The crack-map method registry of ``crack-eval``.

A *method* turns one RGB uint8 image into a crack map (float32 H×W on [0, 1]) plus, for classifier-based
methods, the crack probability.  Built in:

* ``blackhat``, ``ridge``, ``bh+ridge`` — learning-free pixel cues (``crackcam.runtime.cues``), no checkpoint;
* every CAM method of ``crackcam.models.cam`` (``gradcam``, ``gradcam++``, ``xgradcam``, ``layercam``,
  ``hirescam`` and their ``-fusion`` two-layer variants) — need ``--checkpoint``;
* ``refine-<cam method>`` — the CAM as region prior × a pixel cue as boundary (``crackcam.runtime.cues.refine``).

Adding a method (e.g. helper code for UP-CrackNet ``restoration`` or a fusion):  create a module
``crackcam/tools/methods_<anything>.py`` (discovered automatically) with::

    from crackcam.tools.methods import register_method, MethodContext

    @register_method("restoration", needs_checkpoint=True, help="UP-CrackNet restoration difference map")
    def _restoration(ctx: MethodContext):
        gen = load_my_generator(ctx.checkpoint)          # once per run
        def fn(image):                                   # RGB uint8 H×W×3 → (map float32 H×W on [0,1], prob|None)
            return my_map(gen, image), None
        return fn

``ctx`` carries the checkpoint folder, its config, the parsed options (layers, mode, tile, flips, gate, refine
config) and a lazily loaded classifier (``ctx.classifier()``).  The factory runs once per evaluation; the
returned function runs once per image.  Names are matched exactly; :func:`resolve` also accepts dynamic names
through registered *families* (``register_family(prefix, factory_maker)``), used for ``refine-<cam>``.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from crackcam.runtime import cues as C

MapFn = Callable[[np.ndarray], "tuple[np.ndarray, float | None]"]
Factory = Callable[["MethodContext"], MapFn]


@dataclass
class MethodSpec:
    name: str
    factory: Factory
    needs_checkpoint: bool
    help: str = ""
    learned: bool = True  # uses a trained model (the default recipe is the best learned method)


@dataclass
class MethodContext:
    checkpoint: Path | None = None
    config: dict = field(default_factory=dict)
    layers: list[str] | None = None
    mode: str = "whole"  # whole | sliding
    tile: int | None = None
    flips: bool = False
    gate: float = 0.5
    refine: C.RefineConfig = field(default_factory=C.RefineConfig)
    options: dict = field(default_factory=dict)
    survey: Any = None  # crackcam.runtime.survey.SurveyConfig: the frame geometry (None: from mode/tile/gate)
    _model: Any = None
    _cache: dict = field(default_factory=dict)

    def classifier(self):
        """(model.eval(), config) of ``checkpoint`` (loaded once)."""
        if self._model is None:
            if self.checkpoint is None:
                raise ValueError("this method needs --checkpoint DIR (a crack-train run folder)")
            from crackcam.models.checkpoint import load_classifier

            self._model, self.config = load_classifier(self.checkpoint)
        return self._model, self.config

    def survey_config(self):
        """The frame geometry of the learned methods: ``survey`` when given, else whole frames (``mode=whole``)
        or the training tile (``mode=sliding``), gated per tile at ``gate``."""
        from crackcam.runtime.survey import SurveyConfig

        if self.survey is not None:
            return self.survey
        tile = None
        if self.mode == "sliding":
            tile = int(self.tile or self.config.get("tile") or 224)
        return SurveyConfig(tile=tile, overlap=max(0, (tile or 0) // 4), gate=float(self.gate or 0.0))


_METHODS: dict[str, MethodSpec] = {}
_FAMILIES: list[tuple[str, Callable[[str], MethodSpec | None]]] = []
_PLUGINS_LOADED = False


def register_method(name: str, *, needs_checkpoint: bool, help: str = "", learned: bool | None = None):
    """Decorator registering ``factory(ctx) -> fn(image) -> (map, prob | None)`` under ``name``."""

    def deco(factory: Factory) -> Factory:
        if name in _METHODS:
            raise ValueError(f"crack-eval method {name!r} is registered twice")
        _METHODS[name] = MethodSpec(name, factory, needs_checkpoint, help,
                                    needs_checkpoint if learned is None else learned)
        return factory

    return deco


def register_family(prefix: str, make: Callable[[str], MethodSpec | None]) -> None:
    """Dynamic names ``<prefix><rest>``: ``make(full_name)`` returns a MethodSpec or None (unknown)."""
    _FAMILIES.append((prefix, make))


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    pkg = Path(__file__).parent
    for m in pkgutil.iter_modules([str(pkg)]):
        if m.name.startswith("methods_"):
            importlib.import_module(f"crackcam.tools.{m.name}")


def cam_method_names() -> list[str]:
    try:
        from crackcam.models.cam import list_methods
    except ImportError:  # torch-free install
        return []
    return list_methods()


def list_method_names() -> list[str]:
    _load_plugins()
    names = list(_METHODS)
    cams = cam_method_names()
    names += [n for n in cams if n not in names]
    names += ["refine-" + n for n in cams]
    return names


def resolve(name: str) -> MethodSpec:
    _load_plugins()
    if name in _METHODS:
        return _METHODS[name]
    for prefix, make in sorted(_FAMILIES, key=lambda f: -len(f[0])):
        if name.startswith(prefix):
            spec = make(name)
            if spec is not None:
                return spec
    raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(list_method_names())}")


# ----------------------------------------------------------------------------------------------- built-ins
for _cue in C.CUES:
    def _make(cue_name):
        def factory(ctx: MethodContext) -> MapFn:
            return lambda image: (C.cue(image, cue_name), None)

        return factory

    register_method(_cue, needs_checkpoint=False, learned=False,
                    help=f"learning-free pixel cue '{_cue}' (crackcam.runtime.cues)")(_make(_cue))


class CamPredictor:
    """Runs the checkpoint's classifier on the survey tile plan of a frame (:mod:`crackcam.runtime.survey`, the
    plan crack-run uses) and returns, per CAM method, the tile maps and probabilities — several methods from one
    forward + explicit-backward pass per batch of tiles (they share the target layers' activations and
    gradients).  Maps come out un-gated; :meth:`frame` gates, stitches, refines and resizes them exactly as
    ``crack-run`` does (``crackcam.runtime.steps.FrameSteps``)."""

    def __init__(self, ctx: MethodContext, methods: list[str], batch: int = 16):
        import torch

        from crackcam.models.cam import CamModel

        if ctx.flips:
            raise ValueError("--flips is not supported: crack-eval runs the frame steps crack-run runs "
                             "(flip averaging gave no gain on validation, docs/evaluation.md)")
        self.torch = torch
        model, config = ctx.classifier()
        self.ctx = ctx
        self.batch = int(batch)
        self.mean = torch.tensor(config.get("mean", model.spec.mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(config.get("std", model.spec.std), dtype=torch.float32).view(1, 3, 1, 1)
        self.cams: dict[str, Any] = {}
        heads: dict[tuple, Any] = {}
        for m in methods:
            layers = ctx.layers
            if m == "cam":
                layers = None  # the body output: the classifier's own per-position logit
            cm = CamModel(model, m, layers=layers, normalize=True, gate=0.0)
            key = tuple(cm.layers)
            if key not in heads:
                heads[key] = _cached_head(cm.head)
            cm.head = heads[key]
            self.cams[m] = cm
        self.survey = ctx.survey_config()

    def tensor(self, tiles_bgr: np.ndarray):
        """uint8 N×H×W×3 BGR → normalised N×3×H×W RGB (the exported graph's own pre-processing)."""
        from crackcam.models.preprocess import bgr_to_tensor

        return bgr_to_tensor(tiles_bgr, self.mean, self.std)

    def __call__(self, image: np.ndarray) -> dict:
        """RGB uint8 frame → ``{"plan", "bgr", "probs", "maps": {method: [tile maps]}}``."""
        from crackcam.runtime import survey as S

        bgr = np.ascontiguousarray(image[..., ::-1])
        plan = S.plan_frame(bgr.shape, self.survey, None)
        tiles = S.cut_tiles(bgr, plan)
        probs: list[float] = []
        maps: dict[str, list] = {m: [] for m in self.cams}
        with self.torch.no_grad():
            for i in range(0, len(tiles), self.batch):
                x = self.tensor(np.stack(tiles[i:i + self.batch]))
                p = None
                for m, cm in self.cams.items():
                    p, cam = cm(x)
                    maps[m] += list(cam.numpy().astype(np.float32))
                probs += [float(v) for v in p]
        return {"plan": plan, "bgr": bgr, "probs": probs, "maps": maps}

    def frame(self, res: dict, method: str, refine: C.RefineConfig | None):
        """(map at frame size, frame prob) of ``method`` from :meth:`__call__`'s result."""
        from crackcam.runtime.postprocess import PostProcessConfig
        from crackcam.runtime.steps import FrameSteps

        steps = FrameSteps(self.survey, refine, PostProcessConfig(skeleton=False))
        m, prob, _ = steps.frame_map(res["bgr"], res["plan"], res["probs"], res["maps"][method])
        return m, prob


_CACHED_HEAD = None


def _cached_head(head):
    """Wrap a CamHead (an nn.Module) so that several CamModels on the same input reuse one forward pass."""
    global _CACHED_HEAD
    if _CACHED_HEAD is None:
        from torch import nn

        class CachedHead(nn.Module):
            def __init__(self, head):
                super().__init__()
                self.inner = head
                self.layers = head.layers
                self.class_index = head.class_index
                self._x = None
                self._out = None

            @property
            def model(self):
                return self.inner.model

            def forward(self, x):
                if self._x is not x:
                    self._out = self.inner(x)
                    self._x = x
                return self._out

        _CACHED_HEAD = CachedHead
    return _CACHED_HEAD(head)


_SHARED: dict = {}


class _Memo:
    """Remembers the last image's results (all CAM methods of one layer group from one pass)."""

    def __init__(self, pred: CamPredictor):
        self.pred = pred
        self._img = None
        self._res = None

    def __call__(self, image):
        if self._img is not image:
            self._res = self.pred(image)
            self._img = image
        return self._res


def run_digest(run_dir) -> str | None:
    """sha256 of a run folder's ``config.json`` and ``best.pt`` (what every learned map loads; ``last.pt`` when a
    run has no ``best.pt``); None for no run.  Keys what is cached or resumed per run (crack-eval's scoring state,
    the CAM predictors): a re-trained run in the same folder is another run."""
    if not run_dir:
        return None
    from crackcam.runtime.sinks import file_sha256

    d = Path(run_dir)
    names = ("config.json", "best.pt") if (d / "best.pt").is_file() else ("config.json", "last.pt")
    return file_sha256(*[d / n for n in names if (d / n).is_file()])


def shared_cam(ctx: MethodContext, name: str, refine: C.RefineConfig | None = None
               ) -> Callable[[np.ndarray], tuple[np.ndarray, float]]:
    """image → (frame map, prob) of CAM method ``name`` (``refine``: refined with that pixel cue) through the
    survey frame steps; every method of the same target-layer group and frame geometry shares one
    forward + explicit-backward pass per tile batch (several methods scored in one run)."""
    from crackcam.models.cam import parse_method

    _, fusion = parse_method(name)
    group = [m for m in cam_method_names() if parse_method(m)[1] == fusion and (m != "cam" or name == "cam")]
    sv = ctx.survey_config()
    key = (str(ctx.checkpoint), run_digest(ctx.checkpoint), tuple(ctx.layers or ()), fusion, name == "cam",
           json_key(sv.to_dict()))
    if key not in _SHARED:
        if len(_SHARED) > 8:
            _SHARED.clear()
        _SHARED[key] = _Memo(CamPredictor(ctx, group))
    memo = _SHARED[key]
    return lambda image: memo.pred.frame(memo(image), name, refine)


def json_key(d: dict) -> str:
    import json

    return json.dumps(d, sort_keys=True, default=str)


def _cam_spec(name: str) -> MethodSpec | None:
    if name not in cam_method_names():
        return None

    def factory(ctx: MethodContext) -> MapFn:
        return shared_cam(ctx, name)

    return MethodSpec(name, factory, True, f"CAM method {name} of crackcam.models.cam")


def _refine_spec(name: str) -> MethodSpec | None:
    base = name[len("refine-"):]
    if base not in cam_method_names():
        return None

    def factory(ctx: MethodContext) -> MapFn:
        return shared_cam(ctx, base, ctx.refine)

    return MethodSpec(name, factory, True, f"{base} CAM refined with a pixel cue (crackcam.runtime.cues.refine)")


register_family("", _cam_spec)
register_family("refine-", _refine_spec)
