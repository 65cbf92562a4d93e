"""UP-CrackNet generators as restoration graphs (``kind: "restoration"`` in the metadata).

    image uint8 [N,H,W,3] BGR ──cast, BGR→RGB, (x/255 − 0.5)/0.5──▶ U-Net generator (reflect-padded to a multiple of
    2**levels, cropped back) ──▶ restored uint8 [N,H,W,3] BGR, map float32 [N,H,W] on [0, 1]

``map`` is the "full" variant of ``crackcam.models.upcracknet.restoration_map`` (restore the whole image; error
|gray(G(x)) − gray(x)| — or only the darker-than-restored part with ``polarity="dark"``, optionally with both grays
min-max scaled first, ``gray_minmax`` — then min-max scaled per image), with the run's ``recipe.json`` choices of
``polarity`` / ``gray_minmax``.  ``crack-export --method restoration-masked[-dark]`` exports the stronger "masked"
variant instead: the six checkerboard copies of every frame (cells of the training tile /2, /4, /8, both phases,
built in the graph for any H×W) go through the generator as one batch, the error is kept where each copy was
hidden and averaged — six generator passes per frame.  The official bilateral post-filter is an OpenCV step and is
not in the graph (the graph computes ``restoration_map(..., smooth=False)``); nor is the per-position de-biasing
(a median).
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
    def __init__(self, generator: nn.Module, polarity: str = "abs", gray_minmax: bool = False,
                 variant: str = "full", tile: int | None = None):
        super().__init__()
        if polarity not in ("abs", "dark"):
            raise ExportError(f"unknown restoration polarity {polarity!r} (abs | dark)")
        if variant not in ("full", "masked"):
            raise ExportError(f"unknown restoration variant {variant!r} (full | masked)")
        if variant == "masked" and gray_minmax:
            raise ExportError("gray_minmax applies to the full variant only")
        self.polarity, self.gray_minmax, self.variant = polarity, bool(gray_minmax), variant
        from crackcam.models import upcracknet as up

        tile = int(tile or getattr(generator, "multiple", 256))
        self.cells = [max(1, tile // f) for f in up.CELL_FRACTIONS]  # as upcracknet.checkerboard_masks

        self.generator = generator.eval()
        self._up = up
        self.register_buffer("mean", torch.tensor(up.MEAN, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(up.STD, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.output_names = ["restored", "map"]

    def _restore(self, x: torch.Tensor) -> torch.Tensor:
        m = int(getattr(self.generator, "multiple", 1))
        h, w = x.shape[2], x.shape[3]
        # always pad (by 0 when the size is already a multiple): no shape-dependent branch in the graph
        xp = F.pad(x, (0, (m - w % m) % m, 0, (m - h % m) % m), mode="reflect")
        return self.generator(xp)[:, :, :h, :w]

    def _keep_masks(self, h, w, like: torch.Tensor) -> torch.Tensor:
        """The six keep masks [6,H,W] (1 = visible) of ``upcracknet.checkerboard_masks``, built for this H×W."""
        ys = torch.arange(h, device=like.device)
        xs = torch.arange(w, device=like.device)
        out = []
        for c in self.cells:
            keep = (((ys // c)[:, None] + (xs // c)[None, :]) % 2 == 0).to(like.dtype)
            out += [keep, 1.0 - keep]
        return torch.stack(out)

    def _masked(self, x: torch.Tensor):
        up = self._up
        n, _, h, w = x.shape
        keep = self._keep_masks(h, w, x)  # [6,H,W]
        k = keep[None, :, None]  # [1,6,1,H,W]
        xm = (x[:, None] * k + up.HIDDEN_VALUE * (1.0 - k)).reshape(n * 6, 3, h, w)
        ys = self._restore(xm).reshape(n, 6, 3, h, w)
        hid = 1.0 - keep
        cnt = hid.sum(0).clamp(min=1.0)
        gx = up.gray(x)  # [N,H,W]
        gys = up.gray(ys.reshape(n * 6, 3, h, w)).reshape(n, 6, h, w)
        d = gys - gx[:, None]
        e = d.abs() if self.polarity == "abs" else d.clamp(min=0.0)
        err = (e * hid[None]).sum(1) / cnt
        y = (ys * hid[None, :, None]).sum(1) / cnt
        return y, err

    def forward_float(self, x: torch.Tensor):
        up = self._up
        if self.variant == "masked":
            y, err = self._masked(x)
            return self._outputs(y, err)
        y = self._restore(x)
        gx, gy = up.gray(x), up.gray(y)
        if self.gray_minmax:
            gx, gy = _scale01(gx), _scale01(gy)
        d = gy - gx
        err = d.abs() if self.polarity == "abs" else d.clamp(min=0.0)
        return self._outputs(y, err)

    def _outputs(self, y: torch.Tensor, err: torch.Tensor):
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
    if recipe.get("export"):  # crack-eval calibrate: the best map a graph can compute (no resize/stretch, no filter)
        recipe = {**recipe, **recipe["export"]}
    if settings.outputs and set(settings.outputs) - {"prob", "map", "restored"}:
        raise ExportError("a restoration graph has the outputs restored and map only")
    variant, polarity = recipe.get("variant", "full"), recipe.get("polarity", "abs")
    method = settings.method
    if method and method.startswith("restoration"):  # --method restoration[-masked][-dark]
        tokens = set(method.split("-")[1:])
        if tokens - {"masked", "dark", "full"}:
            raise ExportError(f"--method {method!r}: a restoration graph takes restoration[-masked][-dark] "
                              f"(debias and the bilateral filter are not in the graph)")
        variant = "masked" if "masked" in tokens else "full"
        polarity = "dark" if "dark" in tokens else "abs"
    elif method:
        raise ExportError(f"--method {method!r}: an UP-CrackNet run exports restoration[-masked][-dark]")
    if variant not in ("full", "masked"):
        raise ExportError(f"restoration variant {variant!r} is not exportable (full | masked)")
    tile = int(config.get("tile") or getattr(generator, "multiple", 256))
    test_norm = recipe.get("test_norm", "running")
    if test_norm == "image+dropout":
        raise ExportError("the recipe's test_norm 'image+dropout' (dropout on at test time) is random and not "
                          "exportable; choose 'image' (per-image statistics, deterministic) or 'running'")
    from crackcam.models.upcracknet import with_test_norm

    try:
        generator = with_test_norm(generator, test_norm)
    except ValueError as e:
        raise ExportError(f"recipe: {e}") from None
    graph = RestorationExportGraph(generator, polarity=polarity,
                                   gray_minmax=bool(recipe.get("gray_minmax", False)) and variant == "full",
                                   variant=variant, tile=tile)
    pp = dict(recipe.get("postprocess") or {})
    threshold = settings.threshold if settings.threshold is not None else recipe.get("threshold",
                                                                                     pp.get("threshold", "otsu"))
    gate = settings.gate if settings.gate is not None else recipe.get("gate", 0.0)
    meta = md.build_metadata(kind="restoration", model="upcracknet",
                             method=f"upcracknet-{graph.variant}-{graph.polarity}"
                             + ("-imagestats" if test_norm == "image" else ""),
                             target_layers=[],
                             mean=list(graph.mean.flatten().tolist()), std=list(graph.std.flatten().tolist()),
                             outputs=graph.output_names, height=settings.height, width=settings.width,
                             batch=settings.batch, threshold=threshold, gate=float(gate), postprocess=pp,
                             data_card_sha256=config.get("data_card_sha256"),
                             split=md.split_rule(config))
    return graph, meta, tile
