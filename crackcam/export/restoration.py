"""UP-CrackNet generators as restoration graphs (``kind: "restoration"`` in the metadata).

    image uint8 [N,H,W,3] BGR ──cast, BGR→RGB, (x/255 − 0.5)/0.5──▶ U-Net generator (reflect-padded to a multiple of
    2**levels, cropped back) ──▶ restored uint8 [N,H,W,3] BGR, map float32 [N,H,W] on [0, 1]

``map`` is the "full" variant of ``crackcam.models.upcracknet.restoration_map`` (restore the whole image; error
|gray(G(x)) − gray(x)| — or only the darker-than-restored part with ``polarity="dark"``, optionally with both grays
min-max scaled first, ``gray_minmax`` — then min-max scaled per image), with the run's ``recipe.json`` choices of
``polarity`` / ``gray_minmax``.  The official bilateral post-filter is an OpenCV step and is not in the graph (the
graph computes ``restoration_map(..., smooth=False)``); the masked six-checkerboard variant is not exported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import metadata as md
from .onnx_export import ExportError, preprocess_torch


def _minmax(m: torch.Tensor) -> torch.Tensor:
    """Per-image min-max of [N,H,W]; an all-constant map becomes all zero (as upcracknet._minmax)."""
    lo = m.amin(dim=(1, 2), keepdim=True)
    hi = m.amax(dim=(1, 2), keepdim=True)
    rng = hi - lo
    return torch.where(rng > 0, (m - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(m))


def _scale01(g: torch.Tensor) -> torch.Tensor:
    lo = g.amin(dim=(1, 2), keepdim=True)
    return (g - lo) / (g.amax(dim=(1, 2), keepdim=True) - lo).clamp(min=1e-12)


class RestorationExportGraph(nn.Module):
    def __init__(self, generator: nn.Module, polarity: str = "abs", gray_minmax: bool = False):
        super().__init__()
        if polarity not in ("abs", "dark"):
            raise ExportError(f"unknown restoration polarity {polarity!r} (abs | dark)")
        self.polarity, self.gray_minmax = polarity, bool(gray_minmax)
        from crackcam.models import upcracknet as up

        self.generator = generator.eval()
        self._up = up
        self.register_buffer("mean", torch.tensor(up.MEAN, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(up.STD, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.output_names = ["restored", "map"]

    def forward_float(self, x: torch.Tensor):
        up = self._up
        m = int(getattr(self.generator, "multiple", 1))
        h, w = x.shape[2], x.shape[3]
        # always pad (by 0 when the size is already a multiple): no shape-dependent branch in the graph
        xp = F.pad(x, (0, (m - w % m) % m, 0, (m - h % m) % m), mode="reflect")
        y = self.generator(xp)[:, :, :h, :w]
        gx, gy = up.gray(x), up.gray(y)
        if self.gray_minmax:
            gx, gy = _scale01(gx), _scale01(gy)
        d = gy - gx
        err = d.abs() if self.polarity == "abs" else d.clamp(min=0.0)
        cmap = _minmax(err)
        rgb = ((y.clamp(-1.0, 1.0) + 1.0) * 127.5).round()
        restored = torch.flip(rgb, dims=[1]).permute(0, 2, 3, 1).to(torch.uint8)  # BGR NHWC, like the input
        return restored, cmap

    def forward(self, image: torch.Tensor):
        return self.forward_float(preprocess_torch(image, self.mean, self.std))


def build_restoration_graph(run_dir, config: dict, recipe: dict, settings):
    """``(graph, metadata, tile)`` for an UP-CrackNet run folder."""
    from crackcam.models.upcracknet import load_restoration

    generator, config = load_restoration(run_dir, which=settings.which)
    if settings.outputs and set(settings.outputs) - {"prob", "map", "restored"}:
        raise ExportError("a restoration graph has the outputs restored and map only")
    variant = recipe.get("variant", "full")
    if variant != "full":
        print(f"[crack-export] note: the recipe's restoration variant {variant!r} is not exportable; "
              f"the graph computes the 'full' variant")
    graph = RestorationExportGraph(generator, polarity=recipe.get("polarity", "abs"),
                                   gray_minmax=bool(recipe.get("gray_minmax", False)))
    tile = int(config.get("tile") or getattr(generator, "multiple", 256))
    pp = dict(recipe.get("postprocess") or {})
    threshold = settings.threshold if settings.threshold is not None else recipe.get("threshold",
                                                                                     pp.get("threshold", "otsu"))
    gate = settings.gate if settings.gate is not None else recipe.get("gate", 0.0)
    meta = md.build_metadata(kind="restoration", model="upcracknet", method=f"upcracknet-full-{graph.polarity}",
                             target_layers=[],
                             mean=list(graph.mean.flatten().tolist()), std=list(graph.std.flatten().tolist()),
                             outputs=graph.output_names, height=settings.height, width=settings.width,
                             batch=settings.batch, threshold=threshold, gate=float(gate), postprocess=pp,
                             data_card_sha256=config.get("data_card_sha256"))
    return graph, meta, tile
