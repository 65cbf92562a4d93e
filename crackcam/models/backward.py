"""Explicit (autograd-free) gradients of a classifier logit with respect to chosen layer outputs.

"Record forward, then explicit backward": :func:`record_forward` runs the network *functionally* module by
module (never calling a module's own ``forward``, so ``ReLU(inplace=True)`` cannot overwrite a tensor we
keep) and appends to a *tape*, for each layer, a small closure that is that layer's backward written as
ordinary forward ops; after each target layer it appends a marker.  :func:`run_backward` walks the tape from
the logit back to the earliest target, recording ``G = d logit / d A`` at every marker.  The resulting graph
contains only conv / conv-transpose / mul / add / slice / scatter / reshape ops, so it traces to ONNX.

Backward rules (eval-mode network: batch norm uses running statistics, dropout is the identity):

==========================  =======================================================================
module                      backward of the output gradient ``g``
==========================  =======================================================================
Linear                      ``g @ W`` (for the crack logit alone: the row ``W[c]``)
ReLU / ReLU6                ``g · (y > 0)`` / ``g · (0 < y < 6)`` (y = layer output, same mask as x)
AdaptiveAvgPool2d(1)        broadcast ``g / (H·W)``
MaxPool2d                   scatter-add ``g`` to the arg-max positions (pooling indices; no max_unpool)
Conv2d                      ``conv_transpose2d`` with the same weight / stride / padding / dilation /
                            groups, ``output_padding = stride − 1`` then cropped to the input size
BatchNorm2d (running stats) ``g · γ / sqrt(running_var + ε)``
ZeroPad2d                   crop
Dropout, Identity           identity;  Flatten: reshape
Sequential                  the children's rules in reverse
torchvision Bottleneck /    ``relu-mask`` then sum of the main-branch and shortcut (downsample or
BasicBlock, MBConv          identity) backwards
==========================  =======================================================================

Anything else raises :class:`UnsupportedModuleError` naming the module; new module types are added with
:func:`register_rule`.  Rules match the exact class (a subclass may override ``forward``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._torchvision import import_torchvision
from .efficientnet_lite import MBConv
from .nets import CrackClassifier, TopKMeanPool


class UnsupportedModuleError(TypeError):
    """The explicit backward has no rule for a module type."""


Tape = list  # entries: str (marker = target layer name) or Callable[[Tensor, dict], Tensor] (backward step)


class Recorder:
    """Forward state: the tape, the target layers (id(module) → name), their activations."""

    def __init__(self, names: dict[int, str], targets: dict[int, str], record_all: bool):
        self.names = names  # id(module) → qualified name (error messages)
        self.targets = targets
        self.acts: dict[str, torch.Tensor] = {}
        self.tape: Tape = []
        self.recording = record_all  # before the first target nothing needs a backward step

    def sub(self) -> "Recorder":
        """A recorder for one branch of a block: its own tape, shared targets/activations."""
        r = Recorder(self.names, self.targets, True)
        r.acts = self.acts
        return r

    def push(self, step: Callable) -> None:
        if self.recording:
            self.tape.append(step)


_RULES: dict[type, Callable] = {}


def register_rule(*classes: type):
    """Decorator: ``rule(module, x, rec) -> y`` computes the module's (eval) output functionally and pushes
    its backward step ``step(g, grads) -> g_in`` with ``rec.push``."""

    def deco(fn):
        for c in classes:
            _RULES[c] = fn
        return fn

    return deco


def supported_module_types() -> list[str]:
    return sorted(c.__name__ for c in _RULES)


def run_module(module: nn.Module, x: torch.Tensor, rec: Recorder) -> torch.Tensor:
    rule = _RULES.get(type(module))
    if rule is None:
        where = rec.names.get(id(module), "?")
        raise UnsupportedModuleError(
            f"explicit CAM backward: module '{where}' of type {type(module).__name__} is not supported "
            f"(supported: {', '.join(supported_module_types())}); add a rule with "
            f"crackcam.models.backward.register_rule")
    y = rule(module, x, rec)
    name = rec.targets.get(id(module))
    if name is not None:
        rec.acts[name] = y
        rec.recording = True
        rec.tape.append(name)
    return y


def run_backward(tape: Tape, g: torch.Tensor, grads: dict, needed: set | None = None) -> torch.Tensor:
    """Walk ``tape`` backwards from output gradient ``g``; stores ``grads[marker] = g`` at markers and stops
    once every name in ``needed`` is stored (``needed=None``: walk the whole tape)."""
    for step in reversed(tape):
        if isinstance(step, str):
            grads[step] = g
            if needed is not None and needed.issubset(grads):
                return g
            continue
        g = step(g, grads)
    return g


# ----------------------------------------------------------------------------------------------- containers
@register_rule(nn.Sequential)
def _sequential(m: nn.Sequential, x, rec):
    for child in m:
        x = run_module(child, x, rec)
    return x


@register_rule(CrackClassifier)
def _classifier(m: CrackClassifier, x, rec):
    x = run_module(m.body, x, rec)
    if m.pool_kind == "topk":  # per-position linear (a 1×1 convolution with the fc weights), then top-k mean
        x = run_module(m.dropout, x, rec)
        w = m.fc.weight
        rec.push(lambda g, grads: F.conv2d(g, w.t()[:, :, None, None]))  # transposed 1×1 conv: Wᵀ g per position
        z = m.logit_map(x)
        return run_module(m.pool, z, rec)
    x = run_module(m.pool, x, rec)
    shape = x.shape
    rec.push(lambda g, grads: g.reshape(shape))
    x = x.flatten(1)
    x = run_module(m.dropout, x, rec)
    return run_module(m.fc, x, rec)


def _residual(x, rec, main: list[nn.Module], shortcut: nn.Module | None, skip: bool, post_relu: bool):
    """y = [relu](main(x) + shortcut(x)); shortcut None and skip → identity; skip False → no shortcut."""
    mrec = rec.sub()
    y = x
    for mod in main:
        y = run_module(mod, y, mrec)
    srec = None
    if shortcut is not None:
        srec = rec.sub()
        y = y + run_module(shortcut, x, srec)
    elif skip:
        y = y + x
    if post_relu:
        y = F.relu(y)
    mtape, stape, out = mrec.tape, (srec.tape if srec is not None else None), y

    def step(g, grads):
        if post_relu:
            g = g * (out > 0).to(g.dtype)
        gi = run_backward(mtape, g, grads)
        if stape is not None:
            gi = gi + run_backward(stape, g, grads)
        elif skip:
            gi = gi + g
        return gi

    rec.push(step)
    return y


@register_rule(MBConv)
def _mbconv(m: MBConv, x, rec):
    return _residual(x, rec, [m.conv], None, m.has_skip, post_relu=False)


def _register_torchvision() -> None:
    import_torchvision()  # registers the op schemas a CPU-only torch lacks
    from torchvision.models.resnet import BasicBlock, Bottleneck

    @register_rule(Bottleneck)
    def _bottleneck(m, x, rec):
        main = [m.conv1, m.bn1, m.relu, m.conv2, m.bn2, m.relu, m.conv3, m.bn3]
        return _residual(x, rec, main, m.downsample, True, post_relu=True)

    @register_rule(BasicBlock)
    def _basic(m, x, rec):
        return _residual(x, rec, [m.conv1, m.bn1, m.relu, m.conv2, m.bn2], m.downsample, True, post_relu=True)


_register_torchvision()


# ----------------------------------------------------------------------------------------------- leaves
@register_rule(nn.Identity, nn.Dropout, nn.Dropout2d)
def _identity(m, x, rec):
    rec.push(lambda g, grads: g)
    return x


@register_rule(nn.Flatten)
def _flatten(m: nn.Flatten, x, rec):
    shape = x.shape
    rec.push(lambda g, grads: g.reshape(shape))
    return x.flatten(m.start_dim, m.end_dim)


@register_rule(nn.Linear)
def _linear(m: nn.Linear, x, rec):
    w = m.weight
    rec.push(lambda g, grads: g @ w)
    return F.linear(x, m.weight, m.bias)


@register_rule(nn.ReLU)
def _relu(m, x, rec):
    y = F.relu(x)  # never in place
    rec.push(lambda g, grads: g * (y > 0).to(g.dtype))
    return y


@register_rule(nn.ReLU6)
def _relu6(m, x, rec):
    y = F.hardtanh(x, 0.0, 6.0)
    rec.push(lambda g, grads: g * ((y > 0) & (y < 6)).to(g.dtype))
    return y


@register_rule(nn.BatchNorm2d)
def _batchnorm(m: nn.BatchNorm2d, x, rec):
    if m.running_mean is None or m.running_var is None:
        raise UnsupportedModuleError("explicit CAM backward: BatchNorm2d without running statistics "
                                     f"('{rec.names.get(id(m), '?')}') is not supported")
    y = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    def step(g, grads):
        scale = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight
        return g * scale.to(g.dtype).reshape(1, -1, 1, 1)

    rec.push(step)
    return y


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@register_rule(nn.Conv2d)
def _conv2d(m: nn.Conv2d, x, rec):
    if m.padding_mode != "zeros":
        raise UnsupportedModuleError(f"explicit CAM backward: Conv2d '{rec.names.get(id(m), '?')}' with "
                                     f"padding_mode={m.padding_mode!r} is not supported")
    k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
    pad = m.padding
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0, 0)
        elif all(kk % 2 == 1 for kk in k) and s == (1, 1):  # 'same'
            pad = tuple(dd * (kk - 1) // 2 for kk, dd in zip(k, d))
        else:
            raise UnsupportedModuleError(f"explicit CAM backward: Conv2d '{rec.names.get(id(m), '?')}' with "
                                         f"padding='same' and an even kernel is not supported")
    pad = _pair(pad)
    y = F.conv2d(x, m.weight, m.bias, s, pad, d, m.groups)
    xs = x  # kept for its (possibly symbolic) shape only; it is the previous layer's output anyway
    out_pad = tuple(ss - 1 for ss in s)  # largest; the crop below recovers the exact input size

    def step(g, grads):
        gi = F.conv_transpose2d(g, m.weight.to(g.dtype), None, s, pad, out_pad, m.groups, d)
        if out_pad != (0, 0):
            gi = gi[:, :, : xs.shape[2], : xs.shape[3]]
        return gi

    rec.push(step)
    return y


@register_rule(nn.ZeroPad2d)
def _zeropad(m: nn.ZeroPad2d, x, rec):
    left, right, top, bottom = m.padding
    if min(m.padding) < 0:
        raise UnsupportedModuleError("explicit CAM backward: negative ZeroPad2d is not supported")
    y = F.pad(x, (left, right, top, bottom))
    xs = x

    def step(g, grads):
        return g[:, :, top: top + xs.shape[2], left: left + xs.shape[3]]

    rec.push(step)
    return y


@register_rule(nn.MaxPool2d)
def _maxpool(m: nn.MaxPool2d, x, rec):
    y, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode,
                          return_indices=True)
    xs = x

    def step(g, grads):
        # indices are flat positions in each input plane: scatter-add (windows may overlap)
        z = torch.zeros_like(xs, dtype=g.dtype).flatten(2)
        z = z.scatter_add(2, idx.flatten(2), g.flatten(2))
        return z.reshape(xs.shape)

    rec.push(step)
    return y


@register_rule(nn.AdaptiveAvgPool2d)
def _gap(m: nn.AdaptiveAvgPool2d, x, rec):
    if _pair(m.output_size) != (1, 1):
        raise UnsupportedModuleError("explicit CAM backward: only AdaptiveAvgPool2d(1) is supported")
    y = x.mean((2, 3), keepdim=True)
    xs = x

    def step(g, grads):
        return g.expand_as(xs) / (xs.shape[2] * xs.shape[3])

    rec.push(step)
    return y


@register_rule(TopKMeanPool)
def _topk(m: TopKMeanPool, z, rec):
    """Top-k mean over positions: the gradient is 1/k at the k largest positions, 0 elsewhere (the k-th largest
    value as the threshold: a TopK node in ONNX; ties at the threshold are improbable for float logits)."""
    flat = z.flatten(2)
    k = m.k_of(int(z.shape[2]) * int(z.shape[3]))
    top = flat.topk(k, dim=2).values
    y = top.mean(dim=2)
    kth = top[:, :, -1:]
    zs = z

    def step(g, grads):
        mask = (flat >= kth).to(g.dtype)
        return (mask * (g.unsqueeze(2) / k)).reshape(zs.shape)

    rec.push(step)
    return y


# ----------------------------------------------------------------------------------------------- entry point
_BRANCHING = (MBConv,)


def _branching_types() -> tuple[type, ...]:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return _BRANCHING + (Bottleneck, BasicBlock)


def resolve_layers(model: nn.Module, layers) -> list[str]:
    modules = dict(model.named_modules())
    out = []
    for name in layers:
        if name not in modules:
            raise ValueError(f"target layer {name!r} is not a module of {type(model).__name__}")
        out.append(name)
    return out


def logit_and_grads(model: nn.Module, x: torch.Tensor, layers: list[str], class_index: int = 0):
    """Eval-mode forward of ``model`` on ``x`` → (logit [N] of ``class_index``, {layer: A}, {layer: G}),
    G = d logit / d A by the explicit backward (no autograd; the result is detached from nothing in
    particular and works under ``torch.no_grad``)."""
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    targets = {id(modules[n]): n for n in layers}
    # a target inside a residual branch needs the whole tape (its block's other branch must be recorded)
    branching = _branching_types()
    inside = any(isinstance(modules[p], branching) for n in layers
                 for p in [".".join(n.split(".")[:i]) for i in range(1, n.count(".") + 1)])
    rec = Recorder(names, targets, record_all=inside)
    logits = run_module(model, x, rec)
    missing = [n for n in layers if n not in rec.acts]
    if missing:
        raise ValueError(f"target layers {missing} were not reached by the forward pass")
    onehot = (torch.arange(logits.shape[1], device=logits.device) == class_index).to(logits.dtype)
    seed = onehot.expand_as(logits)
    grads: dict[str, torch.Tensor] = {}
    run_backward(rec.tape, seed, grads, set(layers))
    return logits[:, class_index], {n: rec.acts[n] for n in layers}, {n: grads[n] for n in layers}
