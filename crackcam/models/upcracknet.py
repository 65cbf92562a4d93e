"""UP-CrackNet (Ma, Fan et al., IEEE T-ITS 2024, arXiv 2401.15647): unsupervised crack maps by adversarial
image restoration.

A pix2pix-style U-Net generator learns to restore crack-free pavement from a copy with 50 % of its pixels hidden
by a checkerboard mask; a PatchGAN discriminator judges (input, image) pairs.  At test time a crack is the
part the generator cannot reproduce: the map is the restoration error.

This module holds the networks, the six checkerboard masks, the reconstruction losses (SSIM, MSGMS, Gram/style)
and the test-time map.  Imports nothing from train/export/runtime (OpenCV is used for the bilateral filter).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Images enter the networks on [-1, 1] (pix2pix convention): x = (rgb/255 - 0.5) / 0.5.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
HIDDEN_VALUE = -1.0  # value of a hidden pixel on the [-1, 1] scale (black, as the official code's img * mask)
CELL_FRACTIONS = (2, 4, 8)  # checkerboard cell = 1/2, 1/4, 1/8 of the training tile side


# ------------------------------------------------------------------------------------------------- masks
def checkerboard_mask(h: int, w: int, cell: int, phase: int = 0) -> np.ndarray:
    """Bool H×W *keep* mask (True = visible): a checkerboard of ``cell``×``cell`` squares; ``phase`` 0 keeps the
    top-left square, phase 1 is the complement."""
    if cell < 1:
        raise ValueError(f"checkerboard cell must be >= 1 px, got {cell}")
    ys = (np.arange(h) // cell)[:, None]
    xs = (np.arange(w) // cell)[None, :]
    keep = ((ys + xs) % 2) == 0
    return keep if phase == 0 else ~keep


def checkerboard_masks(h: int, w: int | None = None, tile: int | None = None,
                       fractions=CELL_FRACTIONS) -> np.ndarray:
    """The six keep masks [6, H, W] (bool): cells of tile/2, tile/4, tile/8 (``tile`` defaults to the image
    side), each in two complementary phases (order: cell/2 phase 0, phase 1, cell/4 phase 0, …).
    On a square image whose side is a multiple of tile/4 … every mask hides exactly 50 % of the pixels."""
    w = h if w is None else w
    tile = min(h, w) if tile is None else tile
    out = []
    for f in fractions:
        cell = max(1, tile // f)
        for phase in (0, 1):
            out.append(checkerboard_mask(h, w, cell, phase))
    return np.stack(out)


def apply_mask(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Hide the pixels where ``keep`` is False: x [N,3,H,W] on [-1,1], keep [N,H,W] or [H,W] bool/float."""
    keep = keep.to(x.dtype)
    if keep.dim() == 2:
        keep = keep[None]
    keep = keep[:, None]
    return x * keep + HIDDEN_VALUE * (1 - keep)


# ---------------------------------------------------------------------------------------------- networks
def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "instance":
        return nn.InstanceNorm2d(ch, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r} (batch | instance | none)")


class _Down(nn.Module):
    """[LeakyReLU(0.2)] → Conv 4×4 stride 2 → [norm] (pix2pix pre-activation block)."""

    def __init__(self, cin, cout, act=True, norm="batch"):
        super().__init__()
        self.act = nn.LeakyReLU(0.2) if act else nn.Identity()
        self.conv = nn.Conv2d(cin, cout, 4, 2, 1, bias=norm != "batch")
        self.norm = _norm(norm, cout)

    def forward(self, x):
        return self.norm(self.conv(self.act(x)))


class _Up(nn.Module):
    """ReLU → ConvTranspose 4×4 stride 2 → [norm] → [dropout 0.5]."""

    def __init__(self, cin, cout, norm="batch", dropout=False):
        super().__init__()
        self.act = nn.ReLU()
        self.conv = nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=norm != "batch")
        self.norm = _norm(norm, cout)
        self.drop = nn.Dropout(0.5) if dropout else nn.Identity()

    def forward(self, x):
        return self.drop(self.norm(self.conv(self.act(x))))


def levels_for(size: int) -> int:
    """U-Net depth for a square training tile: log2(size) (8 at 256², 7 at 128²: a 1×1 bottleneck)."""
    lv = int(round(math.log2(size)))
    if 2 ** lv != size or lv < 3:
        raise ValueError(f"UP-CrackNet tiles must be a power of two >= 8 px, got {size}")
    return lv


class UNetGenerator(nn.Module):
    """pix2pix U-Net: ``levels`` 4×4/2 conv blocks down (LeakyReLU, norm except first/innermost), as many
    transposed-conv blocks up (ReLU, norm, dropout 0.5 in the first ``dropout_blocks``), skip connections by
    concatenation, tanh output on [-1, 1].  Channels: width·(1, 2, 4, 8, 8, …).  Any input whose sides are
    multiples of 2**levels works (:func:`restore` pads)."""

    def __init__(self, width: int = 16, levels: int = 7, norm: str = "batch", dropout_blocks: int = 3,
                 in_ch: int = 3, out_ch: int = 3):
        super().__init__()
        if levels < 2:
            raise ValueError("a U-Net needs at least 2 levels")
        self.width, self.levels, self.norm_kind = width, levels, norm
        ch = [width * min(2 ** i, 8) for i in range(levels)]
        downs = [_Down(in_ch, ch[0], act=False, norm="none")]
        for i in range(1, levels):
            downs.append(_Down(ch[i - 1], ch[i], norm="none" if i == levels - 1 else norm))
        self.downs = nn.ModuleList(downs)
        ups = []
        for j in range(levels - 1):  # decoder block j produces the skip partner of encoder level levels-2-j
            i = levels - 2 - j
            cin = ch[levels - 1] if j == 0 else ch[i + 1] * 2
            ups.append(_Up(cin, ch[i], norm=norm, dropout=j < dropout_blocks))
        self.ups = nn.ModuleList(ups)
        self.out = _Up(ch[0] * 2, out_ch, norm="none")
        self.init_weights()

    def init_weights(self, std: float = 0.02):
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
                nn.init.normal_(m.weight, 1.0, std)
                nn.init.zeros_(m.bias)

    @property
    def multiple(self) -> int:
        return 2 ** self.levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for d in self.downs:
            x = d(x)
            skips.append(x)
        x = skips.pop()
        for u in self.ups:
            x = torch.cat([u(x), skips.pop()], 1)
        return torch.tanh(self.out(x))


class PatchDiscriminator(nn.Module):
    """PatchGAN on (input, image) pairs (6 channels): 4×4 convs, ``n_layers`` stride-2 blocks, one stride-1
    block, a 1-channel stride-1 conv: one *logit* per patch (70×70 receptive field at n_layers=3)."""

    def __init__(self, width: int = 16, n_layers: int = 3, norm: str = "batch", in_ch: int = 6):
        super().__init__()
        layers = [nn.Conv2d(in_ch, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, n_layers):
            nc = width * min(2 ** i, 8)
            layers += [nn.Conv2d(c, nc, 4, 2, 1, bias=norm != "batch"), _norm(norm, nc), nn.LeakyReLU(0.2)]
            c = nc
        nc = width * min(2 ** n_layers, 8)
        layers += [nn.Conv2d(c, nc, 4, 1, 1, bias=norm != "batch"), _norm(norm, nc), nn.LeakyReLU(0.2),
                   nn.Conv2d(nc, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, inp: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([inp, img], 1))


TEST_NORMS = ("running", "image", "image+dropout")


class ImageStatsNorm(nn.Module):
    """A BatchNorm2d evaluated with each image's own statistics (what the official test does: it never calls
    ``G.eval()``, so with batch 1 batch norm normalises by the image's per-channel mean and variance): instance
    normalisation with the batch norm's affine.  Exports to ONNX ``InstanceNormalization``."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps

    def forward(self, x):
        return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)


def with_test_norm(generator: nn.Module, mode: str = "running") -> nn.Module:
    """The generator as the test should run it: ``running`` = eval mode (batch norm with the running statistics
    gathered on half-masked training inputs), ``image`` = every BatchNorm2d replaced by :class:`ImageStatsNorm`
    (per-image statistics, dropout off: deterministic and exportable), ``image+dropout`` = the official test
    exactly (per-image statistics and dropout on: random, PyTorch only).  Returns a copy; the input is untouched."""
    import copy

    if mode not in TEST_NORMS:
        raise ValueError(f"unknown test norm {mode!r} ({' | '.join(TEST_NORMS)})")
    g = copy.deepcopy(generator).eval()
    if mode == "running":
        return g

    def swap(mod):
        for name, child in mod.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(mod, name, ImageStatsNorm(child))
            else:
                swap(child)

    swap(g)
    if mode == "image+dropout":
        for m in g.modules():
            if isinstance(m, nn.Dropout):
                m.train()
    g.test_norm = mode
    return g


def build_generator(cfg: dict) -> UNetGenerator:
    return UNetGenerator(width=int(cfg.get("width", 16)), levels=int(cfg.get("levels", levels_for(cfg["tile"]))),
                         norm=cfg.get("norm", "batch"), dropout_blocks=int(cfg.get("dropout_blocks", 3)))


def load_restoration(run_dir, which: str = "best", map_location="cpu"):
    """``(generator.eval(), config)`` from a ``crack-train --model upcracknet`` run folder."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no config.json (not a crack-train run folder)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model") != "upcracknet":
        raise ValueError(f"{cfg_path}: model is {cfg.get('model')!r}, not 'upcracknet'")
    weights = run_dir / f"{which}.pt"
    if not weights.is_file():
        weights = run_dir / "last.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{run_dir}: no {which}.pt / last.pt generator weights")
    g = build_generator(cfg)
    g.load_state_dict(torch.load(weights, map_location=map_location, weights_only=True))
    return g.eval(), cfg


# ------------------------------------------------------------------------------------------------ losses
def _gaussian_window(size: int = 11, sigma: float = 1.5, channels: int = 3, device=None, dtype=None):
    g = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(g ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).to(dtype or torch.float32)
    w = (g[:, None] * g[None, :])[None, None].repeat(channels, 1, 1, 1)
    return w.to(device)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, data_range: float = 1.0,
         reduce: bool = True) -> torch.Tensor:
    """SSIM (Gaussian window 11, σ 1.5, zero padding as in the official code); constants C1 = (0.01·data_range)²,
    C2 = (0.03·data_range)².  The official loss uses C1 = 0.01², C2 = 0.03² on its [-1, 1] images (data_range 1,
    the default here, although the data span 2); mean over pixels/channels (per image when ``reduce`` is
    False)."""
    c = a.shape[1]
    w = _gaussian_window(window, 1.5, c, a.device, a.dtype)
    p = window // 2
    mu_a, mu_b = F.conv2d(a, w, padding=p, groups=c), F.conv2d(b, w, padding=p, groups=c)
    saa = F.conv2d(a * a, w, padding=p, groups=c) - mu_a ** 2
    sbb = F.conv2d(b * b, w, padding=p, groups=c) - mu_b ** 2
    sab = F.conv2d(a * b, w, padding=p, groups=c) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return m.mean() if reduce else m.flatten(1).mean(1)


def ssim_loss(a, b):
    return 1.0 - ssim(a, b)


_PREWITT_X = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [1.0, 0.0, -1.0]]) / 3.0


def gradient_magnitude(gray: torch.Tensor) -> torch.Tensor:
    """Prewitt gradient magnitude of N×1×H×W (replicate padding)."""
    kx = _PREWITT_X.to(gray)[None, None]
    ky = kx.transpose(2, 3)
    g = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    return torch.sqrt(F.conv2d(g, kx) ** 2 + F.conv2d(g, ky) ** 2 + 1e-12)


def gms_map(a: torch.Tensor, b: torch.Tensor, c: float = 0.0026) -> torch.Tensor:
    """Gradient magnitude similarity (Xue et al.) of two gray N×1×H×W images: (2 g_a g_b + c)/(g_a²+g_b²+c)."""
    ga, gb = gradient_magnitude(a), gradient_magnitude(b)
    return (2 * ga * gb + c) / (ga ** 2 + gb ** 2 + c)


def msgms_loss(a: torch.Tensor, b: torch.Tensor, scales: int = 4) -> torch.Tensor:
    """Multi-scale GMS loss (RIAD, Zavrtanik et al.; used by UP-CrackNet): mean over ``scales`` of
    mean(1 − GMS) on the channel-mean images, halving the resolution (2×2 average pooling) at each scale."""
    a, b = a.mean(1, keepdim=True), b.mean(1, keepdim=True)
    total = a.new_zeros(())
    n = 0
    for s in range(scales):
        if s:
            if min(a.shape[-2:]) < 4:
                break
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        total = total + (1 - gms_map(a, b)).mean()
        n += 1
    return total / n


def gram_matrix(f: torch.Tensor) -> torch.Tensor:
    """Gram matrix of N×C×H×W features, normalised by C·H·W (as the official style loss): N×C×C."""
    n, c, h, w = f.shape
    f = f.reshape(n, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


STYLE_LAYERS = {"relu2_2": 8, "relu3_4": 17, "relu4_4": 26, "relu5_2": 31}  # index in vgg19.features (inclusive)


def find_vgg19_weights() -> Path | None:
    """A local ImageNet VGG-19 file ``vgg19-*.pth`` in the torch hub cache, or None (never downloads)."""
    from .nets import find_hub_checkpoint

    return find_hub_checkpoint("vgg19-")


class VGGFeatures(nn.Module):
    """VGG-19 ``features`` up to relu5_2, returning the style layers; input on [-1, 1] (converted to ImageNet
    normalisation inside).  Frozen."""

    def __init__(self, weights_path=None):
        super().__init__()
        from ._torchvision import import_torchvision

        tv = import_torchvision()
        feats = tv.models.vgg19(weights=None).features
        if weights_path is not None:
            sd = torch.load(weights_path, map_location="cpu", weights_only=True)
            sd = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
            feats.load_state_dict(sd)
        self.features = feats[: max(STYLE_LAYERS.values()) + 1]
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, x):
        x = ((x + 1) / 2 - self.mean) / self.std
        out, want = {}, {v: k for k, v in STYLE_LAYERS.items()}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in want:
                out[want[i]] = x
        return out


class StyleLoss(nn.Module):
    """Σ over feature layers of L1(Gram(φ(a)), Gram(φ(b))).  ``extractor`` maps an image batch to a dict of
    feature maps; None turns the loss off (it then returns 0 and ``enabled`` is False)."""

    def __init__(self, extractor: nn.Module | None):
        super().__init__()
        self.extractor = extractor

    @property
    def enabled(self) -> bool:
        return self.extractor is not None

    def forward(self, a, b):
        if self.extractor is None:
            return a.new_zeros(())
        fa, fb = self.extractor(a), self.extractor(b)
        return sum(F.l1_loss(gram_matrix(fa[k]), gram_matrix(fb[k])) for k in fa)


def make_style_loss(enabled: bool = True, weights_path=None, log=print) -> StyleLoss:
    """The style loss on ImageNet VGG-19 when its weights are on disk; otherwise one clear line and the
    term off (documented substitute for the paper's loss)."""
    if not enabled:
        return StyleLoss(None)
    path = Path(weights_path) if weights_path else find_vgg19_weights()
    if path is None or not path.is_file():
        from .nets import hub_checkpoint_dir

        log(f"style loss off: no ImageNet VGG-19 weights (vgg19-*.pth) in {hub_checkpoint_dir()} "
            "(nothing is downloaded); training uses adversarial + L1 + SSIM + MSGMS only")
        return StyleLoss(None)
    return StyleLoss(VGGFeatures(path))


# --------------------------------------------------------------------------------------- test-time map
def to_tensor(image_rgb_uint8: np.ndarray) -> torch.Tensor:
    """uint8 H×W×3 RGB → 1×3×H×W float on [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(image_rgb_uint8)).permute(2, 0, 1).float() / 255.0
    return ((x - 0.5) / 0.5)[None]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """1×3×H×W (or 3×H×W) on [-1, 1] → uint8 H×W×3 RGB."""
    if x.dim() == 4:
        x = x[0]
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of N×3×H×W RGB → N×H×W (same scale)."""
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


@torch.no_grad()
def restore(generator: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the generator on N×3×H×W (any H, W): reflect-pad to a multiple of 2**levels, crop back."""
    m = getattr(generator, "multiple", 1)
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        xp = F.pad(x, (0, pw, 0, ph), mode=mode)
    else:
        xp = x
    return generator(xp)[..., :h, :w]


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def bilateral(map01: np.ndarray, d: int = 25, sigma_color: float = 450.0, sigma_space: float = 15.0) -> np.ndarray:
    """The official post-filter, as it really acts.  img_bilater_Otsu_parallel.py reads the saved uint8 error
    image as **3 equal channels** and calls ``cv2.bilateralFilter(img, 25, 450, 15)``; OpenCV's colour distance
    on 8-bit images is the L1 sum over the channels, 3·|Δ|, so that is a 1-channel filter on the uint8 map with
    σ_colour 450 / 3 = 150 — an edge-preserving filter, not the near-Gaussian a float map with σ 450/255 gives.
    Here: the map on [0, 1] → uint8 (floor of ×255, as the official ``astype(np.uint8)``) → 1-channel
    ``bilateralFilter(d, sigma_color / 3, sigma_space)`` → float on [0, 1] (tested equal to the 3-channel call)."""
    u8 = np.clip(np.asarray(map01, np.float32) * 255.0, 0, 255).astype(np.uint8)
    return bilateral_u8(u8, d, sigma_color, sigma_space).astype(np.float32) / 255.0


def bilateral_u8(u8: np.ndarray, d: int = 25, sigma_color: float = 450.0, sigma_space: float = 15.0) -> np.ndarray:
    """:func:`bilateral` on a uint8 map (the official error image itself)."""
    return cv2.bilateralFilter(np.ascontiguousarray(u8, np.uint8), d, sigma_color / 3.0, sigma_space)


@torch.no_grad()
def restoration_errors(generator: nn.Module, image_rgb_uint8: np.ndarray, variants=("full", "masked"), *,
                       tile: int | None = None, device=None, batch: int = 6) -> dict:
    """The generator passes behind :func:`restoration_map`, done once so that several maps can be derived:
    ``{"x": gray image 1×H×W, "full": restored 1×3×H×W, "masked": (restored 6×3×H×W, keep masks 6×H×W,
    cells [6])}`` (tensors on ``device``)."""
    if image_rgb_uint8.ndim != 3 or image_rgb_uint8.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 RGB image, got shape {image_rgb_uint8.shape}")
    for v in variants:
        if v not in ("full", "masked"):
            raise ValueError(f"unknown restoration variant {v!r} (full | masked)")
    was_training = generator.training
    keep_modes = getattr(generator, "test_norm", "running") == "image+dropout"  # its dropout stays on
    if not keep_modes:
        generator.eval()
    dev = device or next(generator.parameters()).device
    x = to_tensor(image_rgb_uint8).to(dev)
    h, w = x.shape[-2:]
    out = {"image": x}
    try:
        if "full" in variants:
            out["full"] = restore(generator, x)
        if "masked" in variants:
            tile = tile or getattr(generator, "multiple", min(h, w))
            keeps = torch.from_numpy(checkerboard_masks(h, w, tile=tile)).to(dev)
            cells = [max(1, tile // f) for f in CELL_FRACTIONS for _ in (0, 1)]
            ys = [restore(generator, apply_mask(x.expand(len(keeps[i:i + batch]), -1, -1, -1), keeps[i:i + batch]))
                  for i in range(0, len(keeps), batch)]
            out["masked"] = (torch.cat(ys), keeps, cells)
    finally:
        if not keep_modes:
            generator.train(was_training)
    return out


def map_from_errors(errs: dict, variant: str = "full", *, smooth: bool = True, gray_minmax: bool = False,
                    polarity: str = "abs", debias: bool = False, return_restored: bool = False):
    """One crack map from :func:`restoration_errors` (see :func:`restoration_map` for the options)."""
    x = errs["image"]
    gx = gray(x)[0]
    if variant == "full":
        y = errs["full"]
        gy = gray(y)[0]
        if gray_minmax:
            gx, gy = (gx - gx.min()) / (gx.max() - gx.min()).clamp(min=1e-12), \
                (gy - gy.min()) / (gy.max() - gy.min()).clamp(min=1e-12)
        err = _polar(gy - gx, polarity)
        restored = y
    elif variant == "masked":
        ys, keeps, cells = errs["masked"]
        hid = (~keeps).float()
        e = _polar(gray(ys) - gx[None], polarity)
        if debias:
            e = torch.stack([(e[j] - _periodic_baseline(e[j], ~keeps[j], 2 * cells[j])).clamp(min=0)
                             for j in range(len(keeps))])
        cnt = hid.sum(0).clamp(min=1)
        err = (e * hid).sum(0) / cnt
        restored = (ys * hid[:, None]).sum(0, keepdim=True) / cnt
    else:
        raise ValueError(f"unknown restoration variant {variant!r} (full | masked)")
    m = _minmax(err.cpu().numpy().astype(np.float32))
    if smooth:
        m = _minmax(bilateral(m))
    m = m.astype(np.float32)
    return (m, to_uint8(restored)) if return_restored else m


def restoration_map(generator: nn.Module, image_rgb_uint8: np.ndarray, variant: str = "full", *,
                    tile: int | None = None, smooth: bool = True, device=None, batch: int = 6,
                    gray_minmax: bool = False, polarity: str = "abs", debias: bool = False,
                    return_restored: bool = False):
    """Crack map H×W float32 on [0, 1] of one RGB uint8 image.

    ``variant="full"`` (the paper): restore the whole image, error = |gray(x) − gray(G(x))|, min-max scaled
    (``gray_minmax``: first min-max scale each gray image, as the official code does — that shifts the error
    wherever the restoration's range differs from the input's, so it is off by default).
    ``variant="masked"``: restore six copies, each with one checkerboard mask (cells tile/2, tile/4, tile/8,
    two complementary phases), keep the error only where that mask hid the pixels, average over the masks
    (every pixel is hidden by three of them), min-max scale.
    Beyond the paper (choose on validation images): ``polarity="dark"`` counts only pixels darker than their
    restoration (cracks are dark), ``debias`` (masked) subtracts, per mask, the median error at each position
    of the checkerboard period over the image (the error grows with the distance to visible pixels; without
    this the cell grid shows in the map).
    ``smooth``: the official bilateral filter.  ``tile``: the training tile side (sets the mask cells;
    default: the generator's 2**levels).  With ``return_restored`` also returns the restored uint8 image
    (``full``) or the masked-average restoration (``masked``)."""
    errs = restoration_errors(generator, image_rgb_uint8, (variant,) if variant in ("full", "masked") else (),
                              tile=tile, device=device, batch=batch)
    return map_from_errors(errs, variant, smooth=smooth, gray_minmax=gray_minmax, polarity=polarity,
                           debias=debias, return_restored=return_restored)


def _gray_bgr_of_rgb(x: torch.Tensor) -> torch.Tensor:
    """What the official test's ``cv.cvtColor(rgb, COLOR_BGR2GRAY)`` computes on its RGB tensors (B and R weights
    swapped relative to luma)."""
    return 0.114 * x[:, 0] + 0.587 * x[:, 1] + 0.299 * x[:, 2]


@torch.no_grad()
def official_protocol_map(generator: nn.Module, image_rgb_uint8: np.ndarray, size: int = 256) -> np.ndarray:
    """The released test.py + img_bilater_Otsu_parallel.py, step by step: resize so the shorter side is ``size``
    (``transforms.Scale(256)``, bilinear); stretch the image to 0–255 (min–max over all channels, uint8); restore;
    both grey images (its ``COLOR_BGR2GRAY`` of RGB data) min–max stretched; |difference| min–max stretched, ×255
    to uint8; the bilateral filter as it acts (:func:`bilateral`).  Returned at the image's own size (bilinear),
    on [0, 1].  Test-time normalisation is the generator's (see :func:`with_test_norm`)."""
    h, w = image_rgb_uint8.shape[:2]
    s = size / min(h, w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    small = cv2.resize(image_rgb_uint8, (nw, nh), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    lo, hi = float(small.min()), float(small.max())
    stretched = ((small - lo) * 255.0 / max(hi - lo, 1e-12)).astype(np.uint8)
    dev = next(generator.parameters()).device
    x = to_tensor(stretched).to(dev)
    keep = getattr(generator, "test_norm", "running") == "image+dropout"
    if not keep:
        generator.eval()
    y = restore(generator, x)

    def mm(t):
        return (t - t.min()) / (t.max() - t.min()).clamp(min=1e-12)

    err = mm((mm(_gray_bgr_of_rgb(x)[0]) - mm(_gray_bgr_of_rgb(y)[0])).abs())
    u8 = (err.cpu().numpy() * 255.0).astype(np.uint8)
    filt = bilateral_u8(u8).astype(np.float32) / 255.0
    return np.clip(cv2.resize(filt, (w, h), interpolation=cv2.INTER_LINEAR), 0, 1).astype(np.float32)


def _polar(d: torch.Tensor, polarity: str) -> torch.Tensor:
    """Error from d = gray(restored) − gray(image): |d| ("abs") or max(d, 0) ("dark": darker than restored)."""
    if polarity == "abs":
        return d.abs()
    if polarity == "dark":
        return d.clamp(min=0)
    raise ValueError(f"unknown polarity {polarity!r} (abs | dark)")


def _periodic_baseline(err: torch.Tensor, hidden: torch.Tensor, period: int) -> torch.Tensor:
    """Median of ``err`` over the hidden pixels at each position (y mod period, x mod period), tiled back to
    H×W (0 where a position is never hidden)."""
    h, w = err.shape
    ph, pw = (-h) % period, (-w) % period
    e = torch.where(hidden, err, torch.full_like(err, float("nan")))
    e = F.pad(e[None, None], (0, pw, 0, ph), value=float("nan"))[0, 0]
    ny, nx = e.shape[0] // period, e.shape[1] // period
    e = e.view(ny, period, nx, period).permute(1, 3, 0, 2).reshape(period, period, ny * nx)
    base = torch.nan_to_num(torch.nanmedian(e, dim=-1).values, nan=0.0)
    return base.repeat(ny, nx)[:h, :w]


def otsu_threshold(map01: np.ndarray) -> float:
    """Otsu's threshold of a [0, 1] map on 256 bins (the paper's binarisation), as a float on [0, 1]."""
    u8 = np.clip(map01 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    t, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t) / 255.0


def fuse_maps(cam: np.ndarray, restoration: np.ndarray, mode: str = "product", prob: float | None = None,
              gate: float = 0.5, alpha: float = 0.5) -> np.ndarray:
    """Combine a classifier CAM (on [0, 1], already gated or not) with a restoration-error map (on [0, 1]).

    ``product``: sqrt(cam · restoration) (geometric mean: high only where both agree — the CAM says *where*
    roughly, the restoration error gives the thin crack shape).  ``gated``: alpha·cam + (1−alpha)·restoration,
    kept only where the CAM is above ``gate`` times its maximum.  If ``prob`` is given and below ``gate`` the
    image is called crack-free (all zeros)."""
    cam = np.asarray(cam, np.float32)
    rest = np.asarray(restoration, np.float32)
    if cam.shape != rest.shape:
        raise ValueError(f"map shapes differ: CAM {cam.shape} vs restoration {rest.shape}")
    if prob is not None and prob < gate:
        return np.zeros_like(rest)
    if mode == "product":
        out = np.sqrt(np.clip(cam, 0, None) * np.clip(rest, 0, None))
    elif mode == "gated":
        cmax = float(cam.max())
        support = cam >= gate * cmax if cmax > 0 else np.zeros_like(cam, bool)
        out = (alpha * cam + (1 - alpha) * rest) * support
    else:
        raise ValueError(f"unknown fusion mode {mode!r} (product | gated)")
    return out.astype(np.float32)
