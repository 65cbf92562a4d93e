"""Optional dependencies (TensorRT, cuda-python, a GPU): *not installed* is not *installed but broken*.

A survey vehicle with a broken TensorRT install (a missing ``libnvinfer``, a driver that does not match) must not look
like a machine that simply has no TensorRT: the product says which one it is, and the tests skip only for the first
(``tests/test_optional.py``).
"""

from __future__ import annotations

import importlib
from pathlib import Path


class OptionalBroken(RuntimeError):
    """An optional package is installed but cannot be used (one line naming it and the error)."""

    def __init__(self, name: str, exc: BaseException):
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        super().__init__(f"'{name}' is installed but not loadable ({type(exc).__name__}: {first})".replace(": )", ")"))
        self.name, self.exc = name, exc


def import_optional(name: str):
    """The module, ``None`` when it (or its parent package) is not installed, :class:`OptionalBroken` when it is
    installed and importing it fails for any other reason."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            return None
        raise OptionalBroken(name, exc) from None  # the package is there, one of *its* imports is not
    except Exception as exc:  # noqa: BLE001 - ImportError (a missing .so), OSError, a version check ...
        raise OptionalBroken(name, exc) from None


def import_cudart():
    """cuda-python's runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6); ``None`` when
    cuda-python is not installed; :class:`OptionalBroken` when it is but does not load."""
    mod = import_optional("cuda.bindings.runtime")
    if mod is None:
        mod = import_optional("cuda.cudart")
    return mod


def nvidia_driver_present() -> bool:
    """An NVIDIA kernel driver is loaded on this machine (then a CUDA error is breakage, not absence)."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def cuda_device_count(cudart) -> int:
    """GPUs CUDA can see. 0 when this machine has no NVIDIA driver; :class:`OptionalBroken` when the driver is there
    and CUDA still fails (a version mismatch, a broken runtime)."""
    try:
        err, n = cudart.cudaGetDeviceCount()
    except Exception as exc:  # noqa: BLE001
        raise OptionalBroken("cuda-python", exc) from None
    if int(err) == 0:
        return int(n)
    if not nvidia_driver_present():
        return 0
    raise OptionalBroken("cuda-python", RuntimeError(f"cudaGetDeviceCount returned {err} with an NVIDIA driver loaded"))
