"""crack-eval method ``segment``: a distilled segmenter run (``crack-train --model seg_* --teacher ...``), through
the survey frame steps crack-run runs (tiling, per-tile gate, ROI; no refinement: the map is the product).
Discovered by :mod:`crackcam.tools.methods`; ``crack-eval calibrate`` uses :class:`SegPredictor` for such runs."""

from __future__ import annotations

import numpy as np

from crackcam.tools.methods import MethodContext, register_method

METHOD = "segment"


class SegPredictor:
    """The :class:`crackcam.tools.methods.CamPredictor` interface for a segmenter: the tile maps and
    probabilities of a frame's survey tile plan (``maps[METHOD]``), and :meth:`frame`."""

    def __init__(self, ctx: MethodContext):
        from crackcam.models.student import StudentSession

        model, config = ctx.classifier()
        if config.get("kind") != "segmenter":
            raise ValueError(f"{ctx.checkpoint}: method {METHOD!r} needs a segmenter run (crack-train --model "
                             f"seg_tiny|seg_lite0 --teacher ...), this one is {config.get('model')!r}")
        self.session = StudentSession(model, config["mean"], config["std"])
        self.survey = ctx.survey_config()
        self.cams = {METHOD: None}

    def __call__(self, image: np.ndarray) -> dict:
        from crackcam.runtime import survey as S
        from crackcam.runtime.steps import infer_tiles

        bgr = np.ascontiguousarray(image[..., ::-1])
        plan = S.plan_frame(bgr.shape, self.survey, None)
        tiles = S.cut_tiles(bgr, plan)
        probs, maps, _ = infer_tiles(self.session, tiles, 8)
        return {"plan": plan, "bgr": bgr, "probs": probs, "maps": {METHOD: maps}}

    def frame(self, res: dict, method: str = METHOD, refine=None):
        from crackcam.runtime.postprocess import PostProcessConfig
        from crackcam.runtime.steps import FrameSteps

        steps = FrameSteps(self.survey, None, PostProcessConfig(skeleton=False))
        m, prob, _ = steps.frame_map(res["bgr"], res["plan"], res["probs"], res["maps"][METHOD])
        return m, prob


@register_method(METHOD, needs_checkpoint=True, help="distilled segmenter (crack-train --model seg_* --teacher): "
                 "its per-pixel map through the survey frame steps")
def _segment(ctx: MethodContext):
    pred = SegPredictor(ctx)
    return lambda image: pred.frame(pred(image))
