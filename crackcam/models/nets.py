"""Crack classifiers.  Every one is a :class:`CrackClassifier`: ``body`` (an ``nn.Sequential`` whose output is
an N×C×h×w feature map) → pooling → one crack logit (sigmoid → probability), so any input size works and a model
trained on tiles maps a whole image in one pass.

Two heads (``pool``):

* ``"avg"`` — global average pooling → dropout → linear (the classic CAM network);
* ``"topk"`` — multiple-instance learning: the linear layer applied at every position (the per-position crack
  logit, :meth:`CrackClassifier.logit_map`, = the class activation map with its bias), then the mean of the
  largest ``topk`` fraction of positions.  A tile is crack when a few positions are; a crack-free tile teaches
  that none is, so the per-position logit is an absolute, pixel-scale crack score (the ``cam`` method of
  :mod:`crackcam.models.cam` reads it out).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class TopKMeanPool(nn.Module):
    """N×C×h×w → N×C: the mean of the ``fraction`` largest positions of each channel (at least one)."""

    def __init__(self, fraction: float = 0.03):
        super().__init__()
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"top-k fraction must lie in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def k_of(self, n_positions: int) -> int:
        return max(1, min(int(n_positions), int(round(self.fraction * n_positions))))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        k = self.k_of(int(z.shape[2]) * int(z.shape[3]))
        return z.flatten(2).topk(k, dim=2).values.mean(dim=2)

    def extra_repr(self) -> str:
        return f"fraction={self.fraction}"


class CrackClassifier(nn.Module):
    def __init__(self, body: nn.Sequential, num_features: int, num_classes: int = 1, dropout: float = 0.2,
                 pool: str = "avg", topk: float = 0.03):
        super().__init__()
        if pool not in ("avg", "topk"):
            raise ValueError(f"pool must be 'avg' or 'topk', not {pool!r}")
        self.body = body
        self.pool_kind = pool
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "avg" else TopKMeanPool(topk)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_features, num_classes)
        self.pretrained_source: str | None = None

    def logit_map(self, features: torch.Tensor) -> torch.Tensor:
        """The per-position crack logits N×classes×h×w of body features (the linear layer at every position)."""
        return F.conv2d(features, self.fc.weight[:, :, None, None], self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        if self.pool_kind == "topk":
            return self.pool(self.logit_map(self.dropout(f)))
        return self.fc(self.dropout(self.pool(f).flatten(1)))


# ----------------------------------------------------------------------------------------------- weights
def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_hub_checkpoint(prefix: str) -> Path | None:
    """A file ``<prefix>*.pth`` in the torch hub cache (``$TORCH_HOME/hub/checkpoints``), if any."""
    d = hub_checkpoint_dir()
    if not d.is_dir():
        return None
    hits = sorted(d.glob(prefix + "*.pth"))
    return hits[0] if hits else None


def load_pretrained(model: CrackClassifier, pretrained, *, hub_prefix: str | None, key_map, name: str,
                    default_file: Path | None = None) -> None:
    """Load ImageNet weights into ``model.body`` (the classifier layer is always new).

    ``pretrained`` is False, True (look in ``default_file`` then the torch hub cache) or a path.
    ``key_map(key) -> body key or None`` maps the original state-dict keys.  Nothing is ever downloaded.
    """
    if not pretrained:
        model.pretrained_source = None
        return
    if isinstance(pretrained, (str, os.PathLike)):
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: pretrained weights file not found")
    else:
        path = default_file if default_file is not None and default_file.is_file() else None
        if path is None and hub_prefix:
            path = find_hub_checkpoint(hub_prefix)
        if path is None:
            where = f"{hub_checkpoint_dir()}/{hub_prefix}*.pth" if hub_prefix else "its weights package"
            print(f"[crackcam] {name}: no pretrained ImageNet weights found (looked in {where}); "
                  f"training from scratch. Pass --weights PATH to use a local file.")
            model.pretrained_source = None
            return
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    body_state = {}
    if any(k.startswith("body.") for k in state):  # a crackcam checkpoint of the same model: take its body
        body_state = {k[len("body."):]: v for k, v in state.items() if k.startswith("body.")}
    else:  # the original (ImageNet) layout
        for k, v in state.items():
            nk = key_map(k)
            if nk is not None:
                body_state[nk] = v
    missing, unexpected = model.body.load_state_dict(body_state, strict=False)
    if unexpected or len(missing) > 0:
        raise ValueError(f"{path}: does not fit {name} (missing {len(missing)} keys e.g. {missing[:3]}, "
                         f"unexpected {len(unexpected)} e.g. {unexpected[:3]})")
    model.pretrained_source = str(path)


# ----------------------------------------------------------------------------------------------- simple_cnn
def _cbr(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


SIMPLE_WIDTHS = (8, 16, 32, 64)


def simple_body(widths=SIMPLE_WIDTHS) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for i, w in enumerate(widths):
        layers += _cbr(cin, w) + _cbr(w, w)
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        cin = w
    return nn.Sequential(*layers)


# body indices: stage i = 7 modules (2×conv-bn-relu + pool), last stage 6 → last ReLU is index 26;
# the ReLU before the third pool (output stride 4) is index 19.
@register_model("simple_cnn", target_layers=("body.26", "body.19"),
                description="small CNN (4 stages, output stride 8), trains in minutes on 2 CPU cores")
def simple_cnn(pretrained=False, num_classes=1, widths=SIMPLE_WIDTHS, dropout=0.2, pool="avg", topk=0.03):
    """small CNN (4 stages, output stride 8), trains in minutes on 2 CPU cores"""
    if pretrained and not isinstance(pretrained, (str, os.PathLike)):
        print("[crackcam] simple_cnn has no ImageNet weights; training from scratch.")
        pretrained = False
    model = CrackClassifier(simple_body(widths), widths[-1], num_classes, dropout, pool, topk)
    load_pretrained(model, pretrained, hub_prefix=None, key_map=lambda k: k[5:] if k.startswith("body.") else None,
                    name="simple_cnn")
    return model


# ----------------------------------------------------------------------------------------------- vgg16
@register_model("vgg16", target_layers=("body.29", "body.22"),
                pretrained_hint="torch hub cache checkpoints/vgg16-*.pth",
                description="VGG-16 features (torchvision) + global average pooling + linear")
def vgg16(pretrained=False, num_classes=1, dropout=0.5):
    """VGG-16 features (torchvision) + global average pooling + linear"""
    from ._torchvision import import_torchvision

    tv = import_torchvision()
    body = tv.models.vgg16(weights=None).features  # 31 modules; 29 = last ReLU (stride 16), 30 = final max pool
    model = CrackClassifier(body, 512, num_classes, dropout)
    load_pretrained(model, pretrained, hub_prefix="vgg16-", name="vgg16",
                    key_map=lambda k: k[len("features."):] if k.startswith("features.") else None)
    return model


# ----------------------------------------------------------------------------------------------- resnet50
RESNET_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


@register_model("resnet50", target_layers=("body.layer4", "body.layer3"),
                pretrained_hint="torch hub cache checkpoints/resnet50-*.pth",
                description="ResNet-50 (torchvision) + global average pooling + linear")
def resnet50(pretrained=False, num_classes=1, dropout=0.2):
    """ResNet-50 (torchvision) + global average pooling + linear"""
    from ._torchvision import import_torchvision

    tv = import_torchvision()
    net = tv.models.resnet50(weights=None)
    body = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in RESNET_STAGES))
    model = CrackClassifier(body, 2048, num_classes, dropout)
    load_pretrained(model, pretrained, hub_prefix="resnet50-", name="resnet50",
                    key_map=lambda k: None if k.startswith("fc.") else k)
    return model
