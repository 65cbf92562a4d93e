"""The exported graphs' pre-processing: uint8 N×H×W×3 **BGR** (what OpenCV decodes) → normalised N×3×H×W RGB float.

One implementation: the ONNX graphs trace :func:`preprocess_torch` (``crackcam.export``), and every PyTorch path
that stands in for an exported graph (crack-eval's CAM predictor, the segmenter session of evaluation and
distillation) calls :func:`bgr_to_tensor` on its NumPy batch."""

from __future__ import annotations

import numpy as np
import torch


def preprocess_torch(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC BGR tensor → normalised float NCHW RGB (the in-graph pre-processing)."""
    x = image.permute(0, 3, 1, 2).to(torch.float32)
    x = torch.flip(x, dims=[1])  # BGR → RGB (a Slice with step −1 in ONNX)
    return (x / 255.0 - mean) / std


def bgr_to_tensor(batch_bgr, mean, std) -> torch.Tensor:
    """NumPy N×H×W×3 BGR (uint8) → :func:`preprocess_torch` of it; ``mean`` / ``std``: 3 values or tensors that
    broadcast to 1×3×1×1."""
    mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)
    arr = np.ascontiguousarray(batch_bgr)
    if not arr.flags.writeable:  # torch.from_numpy warns on read-only memory (a decoded frame may be one)
        arr = arr.copy()
    return preprocess_torch(torch.from_numpy(arr), mean, std)
