"""Import torchvision on a CPU-only torch.

The PyPI torchvision wheel is a CUDA build.  Beside the CPU build of torch its C++ extension does not
register ``torchvision::nms``/``qnms`` and ``import torchvision`` fails with
``operator torchvision::nms does not exist`` (its ``_meta_registrations`` refer to them).  Defining the two
schemas with ``torch.library`` before the import lets the pure-Python model definitions load; the
operators themselves are never called by crackcam.  This is the only place that knows about the problem.
"""

from __future__ import annotations

import importlib

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB = None  # keep the Library object alive: dropping it would unregister the schemas


def _has_op(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def import_torchvision():
    """Return the ``torchvision`` module, registering missing operator schemas first if needed."""
    global _LIB
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:  # operator torchvision::nms does not exist
        if "torchvision::" not in str(exc):
            raise
    import sys

    import torch

    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]
    missing = [n for n in _SCHEMAS if not _has_op(n)]
    if missing:
        _LIB = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            _LIB.define(_SCHEMAS[name])
    return importlib.import_module("torchvision")
