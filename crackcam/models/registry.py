"""A timm-style registry: ``@register_model`` builders behind ``create_model(name, ...)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of crackcam needs to know about a registered network (a classifier or a segmenter)."""

    name: str
    builder: Callable
    target_layers: tuple[str, ...]  # dotted module names; the first is the default CAM target layer
    mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB, on [0, 1] pixel values
    std: tuple[float, float, float] = IMAGENET_STD
    pretrained_hint: str = ""  # where pretrained weights are looked for, said when they are absent
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def default_target_layer(self) -> str:
        return self.target_layers[0]

    @property
    def kind(self) -> str:
        """classifier (CAM heads, tile bits) or segmenter (a distilled student, per-pixel logits)."""
        return str(self.extra.get("kind", "classifier"))


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, target_layers, mean=IMAGENET_MEAN, std=IMAGENET_STD, pretrained_hint="",
                   description="", **extra):
    """``extra``: facts other code keys on without building the model (``pool="topk"``: a MIL head whose graph is
    exported at a fixed tile size)."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, fn, tuple(target_layers), tuple(mean), tuple(std), pretrained_hint,
                                    description or (fn.__doc__ or "").strip().splitlines()[0], dict(extra))
        return fn

    return deco


def list_models(kind: str | None = None) -> list[str]:
    """Registered names (``kind``: only classifiers or only segmenters)."""
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}") from None


def create_model(name: str, *, pretrained: bool | str | None = False, num_classes: int = 1, **kwargs):
    """Build a registered classifier.

    ``pretrained``: False (random init), True (ImageNet weights from the local torch hub cache or the
    model's weights package; a clear message and random init when absent) or a path to a state dict.
    The returned module carries ``model.spec`` (its :class:`ModelSpec`) and ``model.pretrained_source``.
    """
    spec = get_spec(name)
    model = spec.builder(pretrained=pretrained, num_classes=num_classes, **kwargs)
    model.spec = spec
    return model
