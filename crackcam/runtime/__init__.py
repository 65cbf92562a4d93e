"""Torch-free runtime: image IO, post-processing, sources, sessions, the crack-run pipeline.

Nothing in this package imports torch or crackcam.models/train/export (tests check it in a subprocess).
Importing the package itself is cheap: the sub-modules load on first use::

    from crackcam.runtime import open_session, open_source, Pipeline, RunConfig
"""

from __future__ import annotations

import importlib

_LAZY = {
    "open_session": "sessions", "OrtSession": "sessions", "TrtSession": "sessions",
    "open_source": "sources", "Frame": "sources", "CameraSource": "sources", "VideoSource": "sources",
    "ImageListSource": "sources",
    "Pipeline": "pipeline", "RunConfig": "pipeline",
    "ModelMeta": "meta", "ModelFileError": "meta", "BackendUnavailable": "meta",
    "read_gps": "geo", "GpsTrack": "geo",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'crackcam.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
