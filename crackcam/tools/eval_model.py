"""``crack-eval --model FILE``: score an exported model (ONNX graph or TensorRT engine) — the packaged default, or
a graph from ``crack-export`` — exactly as ``crack-run`` runs it: the runtime's session and frame steps
(:class:`crackcam.runtime.steps.ModelSteps`: its metadata's survey settings, refinement, post-processing and camera
profiles, with the same overrides as crack-run), scored by crack-eval's loop.  No training run is needed.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from crackcam.runtime.cues import RefineConfig


class ModelVariant:
    """What crack-eval's loop reads of one frame size's settings (as a checkpoint's recipe variant gives it)."""

    def __init__(self, session, steps, meta, model: Path, threshold_given: bool = False):
        self.session, self.steps = session, steps
        self.pcfg = steps.post
        self.survey = steps.survey
        self.thr = steps.post.threshold
        self.source = "--threshold" if threshold_given else f"{model.name} metadata"
        self.spec = SimpleNamespace(learned=True, needs_checkpoint=True)
        self.ctx = SimpleNamespace(checkpoint=None, config={"model": meta.raw.get("model")},
                                   layers=meta.raw.get("target_layers"), mode="tiles",
                                   refine=steps.refine or RefineConfig())

    def fn(self, image_rgb: np.ndarray):
        """``(frame map, frame probability)`` of an RGB frame (crack-eval reads RGB; the runtime takes BGR): the
        runtime's plan, tiles, inference and frame map (``FrameSteps.run_model``, ``frame_map``); crack-eval's
        loop post-processes it as ``FrameSteps.finish`` does."""
        bgr = np.ascontiguousarray(image_rgb[..., ::-1])
        plan, probs, maps = self.steps.run_model(self.session, bgr)
        cmap, prob, _ = self.steps.frame_map(bgr, plan, probs, maps)
        return cmap, float(prob)


def open_model(model: Path, *, threshold=None, survey: dict | None = None, provider: str = "cpu"):
    """The session and ``ModelSteps`` crack-run would build for ``model`` with these overrides."""
    from crackcam.runtime.pipeline import build_model_steps
    from crackcam.runtime.sessions import open_session

    sess = open_session(model, provider=provider, log=lambda m: None)
    sv = dict(survey or {})
    steps = build_model_steps(sess, tile=sv.pop("tile", None), overlap=sv.pop("overlap", None),
                              max_side=sv.pop("max_side", None), survey=sv, threshold=threshold)
    return sess, steps


def model_key(model: Path, steps) -> dict:
    """What the scores depend on: the file's bytes and the effective settings of every camera profile."""
    from crackcam.runtime.pipeline import run_identity

    ident = run_identity(model, steps)
    return {"model_sha256": ident["model_sha256"], "settings": ident["settings"]}
