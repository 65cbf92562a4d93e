"""Optional dependencies in tests: skip only when a package is *not installed*; an installed but broken one (a
TensorRT wheel without its libnvinfer, cuda-python with a mismatched driver) is a failure."""

from __future__ import annotations

import pytest

from crackcam.runtime.optional import OptionalBroken, cuda_device_count, import_cudart, import_optional


def require(name: str):
    """The module; skip when not installed; fail when installed and broken."""
    try:
        mod = import_optional(name)
    except OptionalBroken as exc:
        pytest.fail(f"{exc}: installed but broken is a failure, not a skip")
    if mod is None:
        pytest.skip(f"'{name}' is not installed here")
    return mod


def require_gpu() -> int:
    """GPUs CUDA sees; skip when cuda-python is not installed or the machine has no NVIDIA driver; fail when the
    driver is there and CUDA does not work."""
    try:
        cudart = import_cudart()
    except OptionalBroken as exc:
        pytest.fail(f"{exc}: installed but broken is a failure, not a skip")
    if cudart is None:
        pytest.skip("'cuda-python' is not installed here")
    try:
        n = cuda_device_count(cudart)
    except OptionalBroken as exc:
        pytest.fail(f"{exc}: an NVIDIA driver is loaded but CUDA fails")
    if n < 1:
        pytest.skip("no NVIDIA GPU here (no driver loaded)")
    return n


def usable(name: str) -> bool:
    """Installed and importable (a broken install raises OptionalBroken, so callers cannot mistake it)."""
    return import_optional(name) is not None
