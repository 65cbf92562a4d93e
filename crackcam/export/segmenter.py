"""Distilled segmenters as one graph (``kind: "segmenter"`` in the metadata).

    image uint8 [N,H,W,3] BGR ──cast, BGR→RGB, (x/255 − mean)/std──▶ segmenter ──sigmoid──▶ map float32 [N,H,W]
                                                                                  └─ largest 3×3 mean ──▶ prob [N]

The same outputs as a CAM graph, so ``crack-run`` runs it through the same frame steps (tiling, per-tile gate, ROI,
post-processing, frame decision) — with no host-side refinement: the map is the product.
"""

from __future__ import annotations

import torch
from torch import nn

from . import metadata as md
from .onnx_export import preprocess_torch


class SegmenterExportGraph(nn.Module):
    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.output_names = ["prob", "map"]

    def forward_float(self, x: torch.Tensor) -> tuple:
        from crackcam.models.student import tile_prob

        p = torch.sigmoid(self.model(x))
        return tile_prob(p), p[:, 0]

    def forward(self, image: torch.Tensor) -> tuple:
        return self.forward_float(preprocess_torch(image, self.mean, self.std))


def build_segmenter_graph(model, config: dict, recipe: dict, settings) -> tuple:
    """The graph and metadata of a segmenter run (its ``recipe.json`` from ``crack-eval calibrate``: threshold,
    post-processing, survey block; without one, threshold 0.5 and the run's own survey block)."""
    mean, std = config["mean"], config["std"]
    graph = SegmenterExportGraph(model, mean, std)
    survey = dict(recipe.get("survey") or config.get("survey") or {})
    pp = dict(recipe.get("postprocess") or {})
    thr = settings.threshold if settings.threshold is not None else recipe.get("threshold", md.DEFAULT_THRESHOLD)
    meta = md.build_metadata(kind="segmenter", model=config["model"], method="segment", target_layers=[],
                             mean=mean, std=std, outputs=graph.output_names, height=settings.height,
                             width=settings.width, batch=settings.batch, threshold=thr, gate=0.0, postprocess=pp,
                             data_card_sha256=config.get("data_card_sha256"),
                             split=md.split_rule(config))
    if survey:
        meta["survey"] = survey
    profiles = {}
    for size, e in (recipe.get("profiles") or {}).items():
        if e.get("method") == "segment":
            profiles[size] = {"method": "segment", "survey": dict(e.get("survey") or {}),
                              "threshold": e.get("threshold"), "postprocess": dict(e.get("postprocess") or {}),
                              "refine": None}
    if profiles:
        meta["profiles"] = profiles
    meta["teacher"] = config.get("teacher")
    return graph, meta
