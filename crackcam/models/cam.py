"""CAM heads: crack logit + target-layer activations and gradients by explicit forward math, and CAM maps.

* :class:`CamHead` ``(model, layers)``: normalised NCHW → ``(logit [N], [A_1, G_1, A_2, G_2, …])``.
* ``CAM_METHODS``: name → function ``(A, G) → raw map [N, h, w]`` (before ReLU), one per method, as in
  ``pytorch_grad_cam`` (same formulas and ε, see docs/cam.md and shared/design/cam-math.md).
* :class:`CamModel` ``(model, method, layers=None, normalize=True, gate=0.5, out_size=None, combine="mean")``:
  normalised NCHW float → ``(prob [N], map [N, H, W])``, the one module used by evaluation and ONNX export.

``cam`` is the original class activation map *with its bias*, through the sigmoid: the per-position crack logit of
the classifier's own linear layer (:meth:`CrackClassifier.logit_map`) on the body's output, an **absolute** map
(probability-like, nothing min–max stretched: an empty tile stays empty).  It needs no gradient, reads only the
last target layer (the body output) and is what the survey recipe of a ``topk`` (MIL) classifier uses.

The order of the map post-processing of the gradient methods is ``pytorch_grad_cam``'s: ReLU → per-image min-max (ε 1e-7) at the
target-layer resolution → bilinear resize (``align_corners=False``, = ``cv2.resize`` INTER_LINEAR) → mean
(or max) over target layers → per-image min-max again → gate (zero where prob < gate).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backward import logit_and_grads, resolve_layers

CamFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CAM_METHODS: dict[str, CamFn] = {}


def register_cam(name: str):
    def deco(fn: CamFn) -> CamFn:
        CAM_METHODS[name] = fn
        return fn

    return deco


def _hw_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=(2, 3), keepdim=True)


def _weighted(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k A_k (w [N,K,1,1] or [N,K,h,w])."""
    return (w * a).sum(dim=1)


@register_cam("gradcam")
def gradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: w_k = mean_ij g_kij."""
    return _weighted(g.mean(dim=(2, 3), keepdim=True), a)


@register_cam("gradcam++")
def gradcam_pp(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ with the exponential trick (higher derivatives of exp(y) → g², g³):
    α = g² / (2g² + Σ_ab A_kab g³ + 1e-6), α = 0 where g = 0; w_k = Σ_ij α ReLU(g)."""
    g2 = g * g
    g3 = g2 * g
    alpha = g2 / (2.0 * g2 + _hw_sum(a) * g3 + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return _weighted(_hw_sum(F.relu(g) * alpha), a)


@register_cam("xgradcam")
def xgradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM: w_k = Σ_ij A g / (Σ_ij A + 1e-7)."""
    return _weighted(_hw_sum(g * a) / (_hw_sum(a) + 1e-7), a)


@register_cam("layercam")
def layercam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """LayerCAM: Σ_k ReLU(g_k) ⊙ A_k."""
    return (F.relu(g) * a).sum(dim=1)


@register_cam("hirescam")
def hirescam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """HiResCAM: Σ_k g_k ⊙ A_k."""
    return (g * a).sum(dim=1)


@register_cam("cam")
def cam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # pragma: no cover - computed in CamModel
    """Class activation map with bias (absolute, sigmoid): needs the classifier's weights, see CamModel."""
    raise RuntimeError("the 'cam' method reads the classifier's linear layer; use it through CamModel")


ABSOLUTE_METHODS = ("cam",)  # maps that are probabilities already: never min-max normalised, no fusion
FUSION_SUFFIX = "-fusion"


def list_methods() -> list[str]:
    """All method names CamModel accepts (each base method, and ``<method>-fusion`` = default two layers)."""
    return sorted(CAM_METHODS) + sorted(m + FUSION_SUFFIX for m in CAM_METHODS if m not in ABSOLUTE_METHODS)


def parse_method(method: str) -> tuple[str, bool]:
    """``"gradcam++-fusion"`` → ("gradcam++", True)."""
    fusion = method.endswith(FUSION_SUFFIX)
    base = method[: -len(FUSION_SUFFIX)] if fusion else method
    if base not in CAM_METHODS or (fusion and base in ABSOLUTE_METHODS):
        raise ValueError(f"unknown CAM method {method!r}; choose one of: {', '.join(list_methods())}")
    return base, fusion


def default_layers(model: nn.Module, fusion: bool = False) -> list[str]:
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ValueError("the model has no .spec (build it with crackcam.models.create_model) — pass layers=")
    return list(spec.target_layers[:2] if fusion else spec.target_layers[:1])


def minmax(m: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-image min-max normalisation of [N, h, w] maps, exactly as pytorch_grad_cam.scale_cam_image."""
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / (eps + m.amax(dim=(1, 2), keepdim=True))


class CamHead(nn.Module):
    """Normalised NCHW → (crack logit [N], A_1, G_1, …, A_L, G_L) by explicit forward math (no autograd)."""

    def __init__(self, model: nn.Module, layers: Sequence[str], class_index: int = 0):
        super().__init__()
        self.model = model
        self.layers = resolve_layers(model, list(layers))
        self.class_index = int(class_index)

    def forward(self, x: torch.Tensor):
        logit, acts, grads = logit_and_grads(self.model, x, self.layers, self.class_index)
        out = [logit]
        for n in self.layers:
            out += [acts[n], grads[n]]
        return tuple(out)


class CamModel(nn.Module):
    """Normalised NCHW float → ``(prob [N], map [N, H, W])``.

    ``method``: a name from ``CAM_METHODS`` or ``<name>-fusion`` (default = the spec's first two target
    layers).  ``layers``: target layers (default: the spec's first; several = fusion).  ``normalize``: per-image
    min-max as pytorch_grad_cam (else the ReLU'd raw map, upsampled; fusion then sums raw maps).
    ``gate``: the map is zero where prob < gate (``None`` or 0 disables).  ``out_size``: (H, W) of the map
    (default: the input size).  ``combine``: "mean" or "max" over layers.
    """

    def __init__(self, model: nn.Module, method: str = "gradcam", layers: Sequence[str] | None = None,
                 normalize: bool = True, gate: float | None = 0.5, out_size: tuple[int, int] | None = None,
                 combine: str = "mean", class_index: int = 0):
        super().__init__()
        base, fusion = parse_method(method)
        if layers is None:
            layers = default_layers(model, fusion)
        elif isinstance(layers, str):
            layers = [layers]
        if combine not in ("mean", "max"):
            raise ValueError(f"combine must be 'mean' or 'max', not {combine!r}")
        self.head = CamHead(model, list(layers), class_index)
        self.method = method
        self.base_method = base
        self.layers = list(self.head.layers)
        self.normalize = bool(normalize)
        self.gate = float(gate) if gate else 0.0
        self.out_size = tuple(out_size) if out_size is not None else None
        self.combine = combine
        self._fn = CAM_METHODS[base]
        self.absolute = base in ABSOLUTE_METHODS
        if self.absolute:
            body_out = _last_body_layer(model)
            if self.layers != [body_out]:
                raise ValueError(f"method {method!r} reads the classifier's linear layer, so its target layer is the "
                                 f"body output {body_out!r} (not {self.layers})")
            if not hasattr(model, "logit_map"):
                raise ValueError(f"method {method!r} needs a CrackClassifier (logit_map)")
            self.normalize = False

    @property
    def model(self) -> nn.Module:
        return self.head.model

    def layer_maps(self, outs) -> list[torch.Tensor]:
        """ReLU'd raw maps [N, h_l, w_l] per target layer from CamHead outputs (``cam``: the sigmoid of the
        per-position logit)."""
        if self.absolute:
            return [torch.sigmoid(self.model.logit_map(outs[1])[:, self.head.class_index])]
        return [F.relu(self._fn(outs[1 + 2 * i], outs[2 + 2 * i])) for i in range(len(self.layers))]

    def forward(self, x: torch.Tensor):
        outs = self.head(x)
        prob = torch.sigmoid(outs[0])
        size = self.out_size if self.out_size is not None else (x.shape[2], x.shape[3])
        maps = []
        for m in self.layer_maps(outs):
            if self.normalize:
                m = minmax(m)
            maps.append(F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False))
        if len(maps) == 1:
            cam = maps[0]
        else:
            st = torch.cat(maps, dim=1)
            cam = st.amax(dim=1, keepdim=True) if self.combine == "max" else st.mean(dim=1, keepdim=True)
        cam = cam.squeeze(1)
        if self.normalize:
            cam = minmax(cam)
        if self.gate > 0.0:
            cam = cam * (prob >= self.gate).to(cam.dtype).reshape(-1, 1, 1)
        return prob, cam


def _last_body_layer(model: nn.Module) -> str:
    """Dotted name of the module whose output is ``model.body``'s output (the last leaf of the body)."""
    body = getattr(model, "body", None)
    if body is None:
        raise ValueError("the model has no .body")
    name, mod = "body", body
    while isinstance(mod, nn.Sequential) and len(mod):
        idx = len(mod) - 1
        key = list(mod._modules.keys())[idx]
        name, mod = f"{name}.{key}", mod[idx]
    return name
