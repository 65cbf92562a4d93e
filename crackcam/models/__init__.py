"""Networks, ``create_model`` and CAM heads.  Imports nothing from train/export/runtime."""

from ._torchvision import import_torchvision

import_torchvision()  # makes a plain `import torchvision` (grad-cam does one) work after crackcam.models

from . import nets  # noqa: E402,F401  (registers the models)
from . import efficientnet_lite  # noqa: E402,F401  (registers efficientnet_lite0)
from . import student  # noqa: E402,F401  (registers the segmenters)
from .registry import ModelSpec, create_model, get_spec, list_models, register_model

__all__ = ["ModelSpec", "create_model", "get_spec", "list_models", "register_model"]
