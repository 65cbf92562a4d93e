"""CAM heads: explicit gradients vs autograd, maps vs the grad-cam package, gating, fusion, ONNX, whole-image maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import crackcam.models as M  # before pytorch_grad_cam (it imports torchvision)
from crackcam.models.backward import UnsupportedModuleError, logit_and_grads
from crackcam.models.cam import ABSOLUTE_METHODS, CAM_METHODS, CamHead, CamModel, list_methods, minmax, parse_method
from crackcam.models.nets import CrackClassifier
from crackcam.train.synth import draw_crack_image

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny inputs: intra-op threads only add overhead (and stall badly on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MODELS = M.list_models(kind="classifier")
# every registered gradient method, from the registry: a new one is compared with pytorch-grad-cam without editing a
# list (and fails until it has a reference there); "cam" (absolute, no gradients) is checked in test_export/test_models
BASE_METHODS = tuple(sorted(m for m in CAM_METHODS if m not in ABSOLUTE_METHODS))


def _randomise_bn(model: nn.Module, seed: int) -> None:
    """Random running statistics and affine parameters, so the batch-norm backward scaling matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.4 * torch.rand(n, generator=g) - 0.2)


_CACHE: dict[str, nn.Module] = {}


def make_model(name: str) -> nn.Module:
    """Random-init fp64 model in eval mode (cached; tests must not modify it)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        model = M.create_model(name).double().eval()
        _randomise_bn(model, 1)
        _CACHE[name] = model
    return _CACHE[name]


def autograd_reference(model, x, layers):
    modules = dict(model.named_modules())
    acts = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n in layers]
    try:
        with torch.enable_grad():
            out = model(x)
            grads = torch.autograd.grad(out[:, 0].sum(), [acts[n] for n in layers])
    finally:
        for h in hooks:
            h.remove()
    return out[:, 0].detach(), {n: acts[n].detach() for n in layers}, dict(zip(layers, grads))


# ------------------------------------------------------------------------------------------ explicit gradients
@pytest.mark.parametrize("name", MODELS)
def test_explicit_gradients_match_autograd(name):
    """Both target layers, odd non-square input (exercises the conv-transpose crop, pads, overlapping pools)."""
    model = make_model(name)
    layers = list(model.spec.target_layers[:2])
    torch.manual_seed(2)
    x = torch.randn(2, 3, 70, 45, dtype=torch.float64)
    ref_logit, ref_a, ref_g = autograd_reference(model, x, layers)
    with torch.inference_mode():  # no autograd anywhere in the explicit path
        logit, acts, grads = logit_and_grads(model, x, layers)
    assert torch.allclose(logit, ref_logit, rtol=0, atol=1e-10)
    for n in layers:
        assert torch.equal(acts[n], ref_a[n])
        scale = ref_g[n].abs().max()
        assert scale > 0
        rel = ((grads[n] - ref_g[n]).abs().max() / scale).item()
        assert rel <= 1e-5, f"{name} {n}: max|dG|/max|G| = {rel:.2e}"


def test_generic_rules_basicblock_and_target_inside_a_branch():
    """An unregistered architecture built from supported modules (torchvision ResNet-18 BasicBlocks) works
    without new code, also with a target layer inside a residual branch."""
    from collections import OrderedDict

    from crackcam.models._torchvision import import_torchvision
    from crackcam.models.nets import RESNET_STAGES

    tv = import_torchvision()
    torch.manual_seed(8)
    net = tv.models.resnet18(weights=None)
    model = CrackClassifier(nn.Sequential(OrderedDict((n, getattr(net, n)) for n in RESNET_STAGES)), 512)
    model = model.double().eval()
    _randomise_bn(model, 4)
    layers = ["body.layer4", "body.layer3.1.conv2", "body.layer3.0.downsample"]
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    _, ref_a, ref_g = autograd_reference(model, x, layers)
    with torch.no_grad():
        _, acts, grads = logit_and_grads(model, x, layers)
    for n in layers:
        assert torch.equal(acts[n], ref_a[n])
        assert (grads[n] - ref_g[n]).abs().max() <= 1e-10 * ref_g[n].abs().max(), n


def test_camhead_outputs_and_single_target_order():
    model = make_model("simple_cnn")
    head = CamHead(model, ["body.19", "body.26"])
    x = torch.randn(1, 3, 32, 40, dtype=torch.float64)
    with torch.no_grad():
        out = head(x)
    assert len(out) == 5 and out[0].shape == (1,)
    c19, c26 = model.body[17].out_channels, model.fc.in_features
    assert out[1].shape == out[2].shape == (1, c19, 8, 10)  # stride 4
    assert out[3].shape == out[4].shape == (1, c26, 4, 5)  # stride 8
    with pytest.raises(ValueError, match="not a module"):
        CamHead(model, ["body.99"])


# ------------------------------------------------------------------------------------------ vs pytorch_grad_cam
def _package_cams():
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM

    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM,
            "hirescam": HiResCAM}


def _package_map(cls, model, layers, x):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    modules = dict(model.named_modules())
    with cls(model=model, target_layers=[modules[n] for n in layers]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * x.shape[0])


@pytest.mark.parametrize("name", MODELS)
def test_maps_match_grad_cam_package(name):
    model = make_model(name)
    pkg = _package_cams()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    default, second = model.spec.target_layers[:2]
    cases = [(m, default) for m in BASE_METHODS] + [("gradcam++", second), ("hirescam", second)]
    nonempty = 0
    for method, layer in cases:
        assert method in pkg, f"CAM method {method!r} is registered but has no pytorch-grad-cam reference here"
        with torch.no_grad():
            prob, ours = CamModel(model, method, layers=[layer], gate=None)(x)
        ref = _package_map(pkg[method], model, [layer], x)
        assert ours.shape == (2, 64, 96) and ref.shape == (2, 64, 96)
        assert float(ours.min()) >= 0.0 and float(ours.max()) <= 1.0
        diff = np.abs(ours.numpy() - ref).max()
        assert diff <= 1e-4, f"{name} {layer} {method}: max diff {diff:.2e}"
        nonempty += int((ref.reshape(2, -1).max(1) > 0.5).sum())
    assert nonempty >= len(cases)  # mostly real maps were compared (a map may be all zero: ReLU of Σ < 0)


def test_fusion_matches_grad_cam_package_mean_and_max():
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.image import scale_cam_image

    class MaxFusion(GradCAMPlusPlus):
        def aggregate_multi_layers(self, cam_per_target_layer):
            return scale_cam_image(np.maximum(np.concatenate(cam_per_target_layer, axis=1), 0).max(axis=1))

    model = make_model("simple_cnn")
    layers = list(model.spec.target_layers[:2])
    torch.manual_seed(4)
    x = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    with torch.no_grad():
        _, mean_map = CamModel(model, "gradcam++-fusion", gate=None)(x)
        _, mean_map2 = CamModel(model, "gradcam++", layers=layers, gate=None)(x)
        _, max_map = CamModel(model, "gradcam++", layers=layers, gate=None, combine="max")(x)
        _, single = CamModel(model, "gradcam++", gate=None)(x)
    assert torch.equal(mean_map, mean_map2)
    ref_mean = _package_map(GradCAMPlusPlus, model, layers, x)
    ref_max = _package_map(MaxFusion, model, layers, x)
    assert np.abs(mean_map.numpy() - ref_mean).max() <= 1e-4
    assert np.abs(max_map.numpy() - ref_max).max() <= 1e-4
    assert np.abs(mean_map.numpy() - single.numpy()).max() > 1e-2  # fusion really uses the second layer


def test_gate_zeroes_maps_per_image():
    model = make_model("simple_cnn")
    torch.manual_seed(5)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        prob, ungated = CamModel(model, "layercam", gate=None)(x)
    order = torch.argsort(prob)
    assert prob[order[1]] < prob[order[2]]
    gate = float(prob[order[1]] + prob[order[2]]) / 2
    with torch.no_grad():
        prob2, gated = CamModel(model, "layercam", gate=gate)(x)
    assert torch.equal(prob, prob2)
    for i in range(4):
        if prob[i] < gate:
            assert float(gated[i].abs().max()) == 0.0
        else:
            assert torch.equal(gated[i], ungated[i]) and float(gated[i].max()) > 0.5


def test_methods_registry_and_unnormalised_maps():
    assert {"gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "cam"} <= set(CAM_METHODS)
    assert "gradcam++-fusion" in list_methods() and parse_method("layercam-fusion") == ("layercam", True)
    with pytest.raises(ValueError, match="unknown CAM method"):
        CamModel(make_model("simple_cnn"), "scorecam")
    model = make_model("simple_cnn")
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        _, raw = CamModel(model, "hirescam", normalize=False, gate=None, out_size=(4, 4))(x)
        _, acts, grads = logit_and_grads(model, x, ["body.26"])
    a, g = acts["body.26"], grads["body.26"]
    assert torch.allclose(raw, torch.relu((a * g).sum(1)), atol=1e-12)  # 4×4 = target-layer size: no resize
    # after body.26 (a ReLU output) come GAP → dropout → linear: g = W[0] / (h·w) at every pixel (Grad-CAM = CAM)
    expected = (model.fc.weight[0] / 16).view(1, -1, 1, 1).expand_as(g)
    assert torch.allclose(g, expected, rtol=1e-12, atol=0)
    lo, hi = raw.min(), raw.max()
    assert torch.allclose(minmax(raw), (raw - lo) / (hi - lo + 1e-7), atol=1e-12)  # pytorch_grad_cam's ε


def test_unsupported_module_gives_clear_error():
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1))
    model = CrackClassifier(body, 8).eval()
    with pytest.raises(UnsupportedModuleError, match=r"'body\.1' of type GELU is not supported"):
        with torch.no_grad():
            CamModel(model, "gradcam", layers=["body.0"])(torch.randn(1, 3, 16, 16))


# ------------------------------------------------------------------------------------------ ONNX
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export_dynamic_shapes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(6)
    model = M.create_model("simple_cnn").eval()
    _randomise_bn(model, 2)
    cam = CamModel(model, "gradcam++-fusion", gate=None).eval()
    path = tmp_path / "cam.onnx"
    torch.onnx.export(cam, (torch.randn(1, 3, 64, 80),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["prob", "map"],
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "prob": {0: "n"}, "map": {0: "n", 1: "h", 2: "w"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 80), (2, 3, 90, 70)]:  # 90×70: odd sizes after pooling
        x = torch.randn(*shape)
        with torch.no_grad():
            prob, ref = cam(x)
        p, m = sess.run(None, {"x": x.numpy()})
        assert m.shape == (shape[0], shape[2], shape[3])
        assert np.abs(p - prob.numpy()).max() < 1e-5 and np.abs(m - ref.numpy()).max() < 1e-4


