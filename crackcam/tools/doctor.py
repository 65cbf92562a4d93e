"""``python -m crackcam.tools.doctor [--fix]``: what crackcam can use on this machine, one line each.

``--fix`` repairs the one known install clash: ``grad-cam`` (a test-only dependency) pulls in
``opencv-python-headless``, which shares the ``cv2`` package folder with ``opencv-contrib-python-headless``; when the
plain wheel is unpacked last, ``cv2.ximgproc`` (fast thinning) disappears.  Re-installing the contrib wheel makes
it win again.
"""

from __future__ import annotations

import importlib
import subprocess
import sys


def _version(mod: str) -> str | None:
    try:
        m = importlib.import_module(mod)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None
    return getattr(m, "__version__", "present")


def has_ximgproc() -> bool:
    try:
        import cv2
    except ImportError:
        return False
    return hasattr(cv2, "ximgproc") and hasattr(cv2.ximgproc, "thinning")


def report() -> list[str]:
    lines = []
    import numpy

    lines.append(f"numpy {numpy.__version__}")
    cv = _version("cv2")
    lines.append(f"opencv {cv} ({'with' if has_ximgproc() else 'WITHOUT'} cv2.ximgproc)" if cv else "opencv: missing")
    ort = _version("onnxruntime")
    if ort:
        import onnxruntime

        lines.append(f"onnxruntime {ort}, providers: {', '.join(onnxruntime.get_available_providers())}")
    else:
        lines.append("onnxruntime: missing (pip install crackcam)")
    trt = _version("tensorrt")
    lines.append(f"tensorrt {trt}" if trt else "tensorrt: not installed (pip install 'crackcam[trt]' on an NVIDIA GPU machine)")
    tv = _version("torch")
    if tv:
        import torch

        lines.append(f"torch {tv} (cuda available: {torch.cuda.is_available()})")
    else:
        lines.append("torch: not installed (training/export need pip install 'crackcam[train]'; the runtime does not)")
    return lines


def fix_opencv() -> bool:
    """Re-install the contrib OpenCV wheel if ``cv2.ximgproc`` is missing; True when it is present afterwards."""
    if has_ximgproc():
        return True
    from importlib import metadata

    try:
        ver = metadata.version("opencv-contrib-python-headless")
        spec = f"opencv-contrib-python-headless=={ver}"
    except metadata.PackageNotFoundError:
        spec = "opencv-contrib-python-headless"
    print(f"[crackcam] cv2.ximgproc missing: re-installing {spec} so the contrib wheel wins")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", spec], check=True)
    out = subprocess.run([sys.executable, "-c", "import cv2; cv2.ximgproc.thinning"], capture_output=True)
    return out.returncode == 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--fix" in argv:
        ok = fix_opencv()
        if not ok:
            print("[crackcam] cv2.ximgproc still missing; skeletons fall back to scikit-image")
    for line in report():
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
