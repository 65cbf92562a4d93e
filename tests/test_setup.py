"""The install-level facts crackcam relies on: torchvision loads beside the CPU torch, OpenCV contrib wins."""

import subprocess
import sys


def test_torchvision_imports_through_the_shim_in_a_fresh_interpreter():
    code = ("from crackcam.models._torchvision import import_torchvision as f; tv = f(); tv2 = f(); "
            "m = tv.models.resnet18(weights=None); print(tv is tv2, type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "ResNet"]


def test_grad_cam_package_imports_after_crackcam_models():
    code = "import crackcam.models, pytorch_grad_cam; print(pytorch_grad_cam.GradCAMPlusPlus.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "GradCAMPlusPlus"


def test_doctor_reports_and_opencv_contrib_is_present():
    from crackcam.tools import doctor

    lines = doctor.report()
    assert any(line.startswith("opencv") for line in lines)
    assert doctor.has_ximgproc(), "cv2.ximgproc missing: run python -m crackcam.tools.doctor --fix"
