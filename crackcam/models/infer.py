"""Whole-image crack maps from a tile-trained classifier (PyTorch side; the ONNX runtime has its own loop).

``predict_map(cam_model, image, mean, std, mode=...) -> (prob, map H×W float32)``:

* ``mode="whole"``: the image (RGB uint8, any size) is padded at the bottom/right (reflect) to a multiple of
  the network's output stride, mapped in one pass, and the map cropped back.  Exactly ``CamModel`` on the
  padded image, except that the min-max normalisation is taken over the un-padded region.
* ``mode="sliding"``: overlapping ``tile``×``tile`` windows (step ``tile·(1−overlap)``, the last one flush with
  the border) run in batches of ``batch`` tiles; each tile's raw (ReLU'd, un-normalised) per-layer maps are
  upsampled to the tile and blended into full-size accumulators with a pyramid weight (1 at the tile
  centre, falling linearly to ``1/(tile/2)`` at the border), then normalised once for the whole image.
  Memory: one batch of tiles on the device plus (layers + 1) float32 H×W accumulators — independent of the
  image size otherwise.  The image probability is the **maximum over tiles** (a crack anywhere → crack);
  with ``tile_gate=True`` tiles whose own probability is below the gate contribute a zero map.
* ``mode="auto"``: whole if H·W ≤ ``max_whole_pixels``, else sliding.
* ``flips=True``: test-time augmentation, the average of the raw maps (and probabilities) of the image and
  its horizontal, vertical and horizontal+vertical flips (maps flipped back).

Normalisation / fusion / gate follow the ``CamModel`` settings (``normalize``, ``combine``, ``gate``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .cam import CamModel, minmax

def output_stride(model: torch.nn.Module) -> int:
    """Total down-sampling of ``model.body`` (probed once on a 64×64 input in eval mode; cached on the model)."""
    stride = getattr(model, "_crackcam_output_stride", None)
    if stride is None:
        p = next(model.parameters())
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model.body(torch.zeros(1, 3, 64, 64, dtype=p.dtype, device=p.device))
        finally:
            model.train(was_training)
        stride = max(1, int(round(64 / out.shape[-1])))
        model._crackcam_output_stride = stride
    return stride


def to_tensor(image: np.ndarray, mean, std, device, dtype=torch.float32) -> torch.Tensor:
    """RGB uint8 H×W×3 → normalised 1×3×H×W tensor."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 RGB image, got shape {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device=device, dtype=dtype).permute(2, 0, 1)[None] / 255.0
    m = torch.tensor(mean, dtype=dtype, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=device).view(1, 3, 1, 1)
    return (x - m) / s


def _pad_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    ph, pw = h - x.shape[2], w - x.shape[3]
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < x.shape[2] and pw < x.shape[3] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


@torch.no_grad()
def raw_maps(cam_model: CamModel, x: torch.Tensor, flips: bool = False):
    """Batch → (prob [N], raw per-layer maps [N, L, H, W] upsampled to the input size, ReLU'd, not normalised).
    With ``flips`` the average over identity, horizontal, vertical and both flips (a group: flipping the
    input flips the result exactly)."""
    views = [(), (3,), (2,), (2, 3)] if flips else [()]
    prob_sum, map_sum = 0.0, 0.0
    for dims in views:
        xi = torch.flip(x, dims) if dims else x
        outs = cam_model.head(xi)
        maps = [F.interpolate(m.unsqueeze(1), size=xi.shape[2:], mode="bilinear", align_corners=False)
                for m in cam_model.layer_maps(outs)]
        m = torch.cat(maps, dim=1)
        if dims:
            m = torch.flip(m, dims)
        prob_sum = prob_sum + torch.sigmoid(outs[0])
        map_sum = map_sum + m
    return prob_sum / len(views), map_sum / len(views)


def finish(cam_model: CamModel, maps: torch.Tensor, prob: float) -> np.ndarray:
    """Per-layer raw maps [L, H, W] → final map [H, W] (normalise per layer, combine, normalise, gate)."""
    m = maps
    if cam_model.normalize:
        m = minmax(m)
    if m.shape[0] > 1:
        m = m.amax(dim=0) if cam_model.combine == "max" else m.mean(dim=0)
    else:
        m = m[0]
    if cam_model.normalize:
        m = minmax(m[None])[0]
    if cam_model.gate > 0.0 and prob < cam_model.gate:
        m = torch.zeros_like(m)
    return m.float().cpu().numpy()


def tile_positions(n: int, tile: int, step: int) -> list[int]:
    if n <= tile:
        return [0]
    pos = list(range(0, n - tile + 1, step))
    if pos[-1] != n - tile:
        pos.append(n - tile)
    return pos


def blend_weight(tile: int) -> np.ndarray:
    half = tile / 2.0
    w = np.minimum(np.arange(tile) + 1.0, tile - np.arange(tile)) / half
    w = np.clip(w, 1.0 / half, 1.0)
    return np.outer(w, w).astype(np.float32)


@torch.no_grad()
def predict_map(cam_model: CamModel, image: np.ndarray, mean=None, std=None, mode: str = "whole",
                tile: int = 224, overlap: float = 0.25, flips: bool = False, batch: int = 8,
                tile_gate: bool = False, max_whole_pixels: int = 2048 * 2048) -> tuple[float, np.ndarray]:
    """Crack probability and crack map (H×W float32, [0, 1] when normalising; zero when prob < gate) of one
    RGB uint8 image of any size.  ``mean``/``std`` default to the model spec's."""
    model = cam_model.model
    spec = getattr(model, "spec", None)
    if (mean is None or std is None) and spec is None:
        raise ValueError("predict_map: the model has no .spec; pass mean= and std=")
    mean = mean if mean is not None else spec.mean
    std = std if std is not None else spec.std
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        h, w = image.shape[:2]
        if mode == "auto":
            mode = "whole" if h * w <= max_whole_pixels else "sliding"
        x = to_tensor(image, mean, std, p.device, p.dtype)
        s = output_stride(model)
        if mode == "whole":
            xp = _pad_to(x, math.ceil(h / s) * s, math.ceil(w / s) * s)
            prob, maps = raw_maps(cam_model, xp, flips)
            prob = float(prob[0])
            return prob, finish(cam_model, maps[0, :, :h, :w], prob)
        if mode != "sliding":
            raise ValueError(f"mode must be 'whole', 'sliding' or 'auto', not {mode!r}")
        return _sliding(cam_model, x, tile, overlap, flips, batch, tile_gate, s)
    finally:
        model.train(was_training)


def _sliding(cam_model, x, tile, overlap, flips, batch, tile_gate, s):
    h, w = x.shape[2:]
    tile = max(s, int(math.ceil(tile / s) * s))
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    step = max(s, int(round(tile * (1.0 - overlap))))
    xp = _pad_to(x, max(h, tile), max(w, tile))  # images smaller than one tile
    H, W = xp.shape[2:]
    boxes = [(y0, x0) for y0 in tile_positions(H, tile, step) for x0 in tile_positions(W, tile, step)]
    L = len(cam_model.layers)
    acc = np.zeros((L, H, W), np.float32)
    wsum = np.zeros((H, W), np.float32)
    wt = blend_weight(tile)
    prob_max = 0.0
    for i in range(0, len(boxes), batch):
        chunk = boxes[i: i + batch]
        xb = torch.cat([xp[:, :, y0: y0 + tile, x0: x0 + tile] for y0, x0 in chunk])
        prob, maps = raw_maps(cam_model, xb, flips)
        prob = prob.float().cpu().numpy()
        maps = maps.float().cpu().numpy()
        prob_max = max(prob_max, float(prob.max()))
        for j, (y0, x0) in enumerate(chunk):
            keep = 0.0 if (tile_gate and cam_model.gate > 0.0 and prob[j] < cam_model.gate) else 1.0
            acc[:, y0: y0 + tile, x0: x0 + tile] += (keep * wt) * maps[j]
            wsum[y0: y0 + tile, x0: x0 + tile] += wt
    maps = torch.from_numpy(acc[:, :h, :w] / wsum[None, :h, :w])
    return prob_max, finish(cam_model, maps, prob_max)
