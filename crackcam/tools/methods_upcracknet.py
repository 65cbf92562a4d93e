"""crack-eval methods for UP-CrackNet (discovered by :mod:`crackcam.tools.methods`).

* ``restoration`` — the paper's map: |gray(x) − gray(G(x))|, min-max, bilateral filter (``--checkpoint`` = a
  ``crack-train --model upcracknet`` run folder).
* ``restoration-masked`` — restore with each of the six checkerboard masks, error only where hidden, averaged.
* ``restoration-<tokens>`` — any combination of the tokens ``masked``, ``dark`` (only pixels darker than their
  restoration), ``debias`` (masked: subtract the per-position median error of the checkerboard period) and
  ``raw`` (no bilateral filter), ``imagestats`` (batch norm with each image's statistics, as the official test, which
  never calls ``G.eval()``; dropout off), ``dropout`` (that and dropout on: the official test exactly), e.g.
  ``restoration-masked-dark``, ``restoration-imagestats``.
* ``restoration-official[-imagestats|-dropout]`` — the released test protocol (256-px shorter side, min–max
  stretched input, both grey images stretched, the bilateral filter, at the image's size).
* ``fusion`` / ``fusion-<cam method>`` — a classifier CAM (``--checkpoint`` = classifier run folder) fused with the
  restoration map of the run folder given by ``--restoration-checkpoint DIR`` (or the environment variable
  ``CRACKCAM_RESTORATION_CHECKPOINT``): the geometric mean sqrt(CAM · restoration), zero where the crack
  probability is below the gate.  The restoration variant of the fusion: ``masked-dark`` unless the option
  ``restoration_variant`` says otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

from crackcam.tools.methods import MethodContext, MethodSpec, register_family, register_method

_TOKENS = {"masked", "dark", "debias", "raw", "official", "imagestats", "dropout"}


def parse_restoration(name: str) -> dict | None:
    """``restoration[-tokens]`` → restoration_map options, or None for an unknown name."""
    if name == "restoration":
        return {"variant": "full"}
    if not name.startswith("restoration-"):
        return None
    toks = name[len("restoration-"):].split("-")
    if not toks or any(t not in _TOKENS for t in toks) or len(set(toks)) != len(toks):
        return None
    if "official" in toks:  # the released test protocol; only the test-time normalisation may be chosen with it
        if set(toks) - {"official", "imagestats", "dropout"}:
            return None
        return {"variant": "official", "test_norm": _norm_of(toks)}
    opts = {"variant": "masked" if "masked" in toks else "full", "test_norm": _norm_of(toks)}
    if "dark" in toks:
        opts["polarity"] = "dark"
    if "debias" in toks:
        if opts["variant"] != "masked":
            return None
        opts["debias"] = True
    if "raw" in toks:
        opts["smooth"] = False
    return opts


def _norm_of(toks) -> str:
    if "dropout" in toks:
        return "image+dropout"
    return "image" if "imagestats" in toks else "running"


def _restoration_fn(run_dir, opts: dict):
    from crackcam.models.upcracknet import load_restoration, official_protocol_map, restoration_map, with_test_norm

    try:
        gen, cfg = load_restoration(run_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    opts = dict(opts)
    gen = with_test_norm(gen, opts.pop("test_norm", "running"))
    if opts.get("variant") == "official":
        return lambda image: official_protocol_map(gen, image)
    tile = int(cfg["tile"])
    return lambda image: restoration_map(gen, image, tile=tile, **opts)


def _restoration_spec(name: str) -> MethodSpec | None:
    opts = parse_restoration(name)
    if opts is None:
        return None

    def factory(ctx: MethodContext):
        fn = _restoration_fn(ctx.checkpoint, opts)
        return lambda image: (fn(image), None)

    return MethodSpec(name, factory, True, f"UP-CrackNet restoration error map {opts}")


register_method("restoration", needs_checkpoint=True,
                help="UP-CrackNet: |gray(x) - gray(G(x))|, min-max, bilateral (the paper's map)")(
    _restoration_spec("restoration").factory)
register_method("restoration-masked", needs_checkpoint=True,
                help="UP-CrackNet: error of the 6 checkerboard-masked restorations where hidden, averaged")(
    _restoration_spec("restoration-masked").factory)
register_family("restoration-", _restoration_spec)


def _restoration_dir(ctx: MethodContext) -> Path:
    d = ctx.options.get("restoration_checkpoint") or os.environ.get("CRACKCAM_RESTORATION_CHECKPOINT")
    if not d:
        raise ValueError("fusion needs the UP-CrackNet run folder: --restoration-checkpoint DIR "
                         "(or CRACKCAM_RESTORATION_CHECKPOINT=DIR)")
    return Path(d)


def _fusion_factory(cam: str):
    def factory(ctx: MethodContext):
        from crackcam.models.upcracknet import fuse_maps
        from crackcam.tools.methods import shared_cam

        variant = ctx.options.get("restoration_variant", "masked-dark")
        opts = parse_restoration(f"restoration-{variant}")
        if opts is None:
            raise ValueError(f"bad restoration_variant {variant!r}")
        rest = _restoration_fn(_restoration_dir(ctx), opts)
        pred = shared_cam(ctx, cam)  # the survey frame steps (per-tile gate at ctx.gate)
        mode = ctx.options.get("fusion_mode", "product")

        def fn(image):
            m, prob = pred(image)
            return fuse_maps(m, rest(image), mode, prob=prob, gate=ctx.gate), prob

        return fn

    return factory


def _fusion_spec(name: str) -> MethodSpec | None:
    from crackcam.tools.methods import cam_method_names

    cam = name[len("fusion-"):]
    if cam not in cam_method_names():
        return None
    return MethodSpec(name, _fusion_factory(cam), True,
                      f"{cam} CAM x UP-CrackNet restoration map (geometric mean, gated)")


register_method("fusion", needs_checkpoint=True,
                help="Grad-CAM x UP-CrackNet restoration (--restoration-checkpoint DIR)")(_fusion_factory("gradcam"))
register_family("fusion-", _fusion_spec)
