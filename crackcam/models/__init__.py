"""Networks, ``create_model`` and CAM heads.  Imports nothing from train/export/runtime."""

from . import nets  # noqa: F401  (registers the models)
from .registry import ModelSpec, create_model, get_spec, list_models, register_model

__all__ = ["ModelSpec", "create_model", "get_spec", "list_models", "register_model"]
