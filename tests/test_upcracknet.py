"""UP-CrackNet: checkerboard masks, networks, losses, training with resume, the test-time map, fusion."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crackcam.models import upcracknet as up
from crackcam.train.synth import draw_crack_image, write_synthetic_dataset


# --------------------------------------------------------------------------------------------- masks
def test_six_checkerboard_masks_hide_half_and_pair_up():
    m = up.checkerboard_masks(64)
    assert m.shape == (6, 64, 64) and m.dtype == bool
    assert (m.reshape(6, -1).sum(1) == 64 * 64 // 2).all()  # exactly 50 % kept / hidden
    for k in range(3):
        a, b = m[2 * k], m[2 * k + 1]
        assert not (a & b).any() and (a | b).all()  # complementary: every pixel hidden exactly once per pair
    # cell sides 32, 16, 8 (1/2, 1/4, 1/8 of the side): the first row flips every `cell` px
    for k, cell in enumerate((32, 16, 8)):
        row = m[2 * k, 0].astype(int)
        flips = np.flatnonzero(np.diff(row)) + 1
        assert list(flips) == list(range(cell, 64, cell))
        assert (m[2 * k, :cell, :cell]).all() and not m[2 * k, cell:2 * cell, :cell].any()
    # all six are different; over the six masks every pixel is hidden exactly three times
    assert len({mm.tobytes() for mm in m}) == 6
    assert ((~m).sum(0) == 3).all()


def test_apply_mask_sets_hidden_pixels_black():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    keep = torch.from_numpy(up.checkerboard_masks(16))[:2]
    y = up.apply_mask(x, keep)
    assert torch.equal(y[keep[:, None].expand_as(y)], x[keep[:, None].expand_as(x)])
    assert (y[~keep[:, None].expand_as(y)] == up.HIDDEN_VALUE).all()


# ---------------------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("size", [64, 128])
def test_generator_and_discriminator_shapes(size):
    levels = up.levels_for(size)
    assert levels == {64: 6, 128: 7}[size]
    g = up.UNetGenerator(width=8, levels=levels)
    d = up.PatchDiscriminator(width=8)
    x = torch.rand(2, 3, size, size) * 2 - 1
    y = g(x)
    assert y.shape == x.shape and y.abs().max() <= 1  # tanh output
    p = d(x, y)
    assert p.shape == (2, 1, size // 8 - 2, size // 8 - 2)  # 3 stride-2 convs, two 4×4 stride-1 convs
    # the innermost level is a 1×1 bottleneck at the training size, dropout in the first three decoder blocks
    acts = []
    h = g.downs[-1].register_forward_hook(lambda m, i, o: acts.append(o.shape))
    g(x)
    h.remove()
    assert acts[0][-2:] == (1, 1)
    assert sum(isinstance(u.drop, nn.Dropout) for u in g.ups) == 3


def test_restore_pads_any_size_and_levels_check():
    g = up.UNetGenerator(width=4, levels=5).eval()
    x = torch.rand(1, 3, 70, 100) * 2 - 1
    assert up.restore(g, x).shape == x.shape
    with pytest.raises(ValueError):
        up.levels_for(100)


# ------------------------------------------------------------------------------------------------ losses
def test_ssim_known_values():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(up.ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(up.ssim_loss(x, x)) == pytest.approx(0.0, abs=1e-5)
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    s = float(up.ssim(x, y))
    assert s == pytest.approx(float(up.ssim(y, x)), abs=1e-6) and s < 0.2  # independent noise: ~0
    # more noise → lower SSIM
    n = torch.randn_like(x)
    vals = [float(up.ssim(x, x + a * n)) for a in (0.0, 0.05, 0.2, 0.8)]
    assert vals == sorted(vals, reverse=True) and vals[0] == pytest.approx(1.0, abs=1e-5)


def test_l1_msgms_and_gradient_magnitude_known_values():
    ramp = torch.arange(16, dtype=torch.float32).repeat(16, 1)[None, None] * 0.05  # slope 0.05 along x
    gm = up.gradient_magnitude(ramp)
    assert torch.allclose(gm[..., 1:-1, 1:-1], torch.full_like(gm[..., 1:-1, 1:-1], 2 * 0.05), atol=1e-5)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(up.msgms_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(up.msgms_loss(x, x + 0.3)) == pytest.approx(0.0, abs=1e-5)  # brightness shift: same gradients
    assert float(up.msgms_loss(x, torch.flip(x, [-1]))) > 0.1
    # GMS of flat images is (0 + c)/(0 + c) = 1 → loss 0; a flat vs a textured image → loss > 0
    assert float(up.msgms_loss(torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16))) == pytest.approx(0.0)
    style_off = up.StyleLoss(None)
    t = __import__("crackcam.train.upcracknet", fromlist=["x"]).reconstruction_terms(
        torch.full((1, 3, 16, 16), 0.5), torch.zeros(1, 3, 16, 16), style_off)
    assert float(t["l1"]) == pytest.approx(0.5)
    assert float(t["msgms"]) == pytest.approx(0.0)
    assert float(t["style"]) == 0.0
    assert float(t["rec"]) == pytest.approx(float(t["l1"] + t["ssim"]))


def test_gram_matrix_and_style_loss():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # N=1, C=2, H=1, W=2
    g = up.gram_matrix(f)
    assert torch.allclose(g, torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]) / 4)

    class Ident(nn.Module):  # a stand-in feature extractor: the image itself is the "feature map"
        def forward(self, x):
            return {"img": x}

    sl = up.StyleLoss(Ident())
    a, b = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    assert sl.enabled and float(sl(a, a)) == 0.0
    assert float(sl(a, b)) == pytest.approx(float(F.l1_loss(up.gram_matrix(a), up.gram_matrix(b))))


def test_style_loss_off_without_vgg_weights(monkeypatch):
    monkeypatch.setattr(up, "find_vgg19_weights", lambda: None)
    lines = []
    sl = up.make_style_loss(True, log=lines.append)
    assert not sl.enabled and len(lines) == 1 and "style loss off" in lines[0] and "vgg19" in lines[0]
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    assert float(sl(x, x * 0)) == 0.0
    assert not up.make_style_loss(False, log=lines.append).enabled and len(lines) == 1


# ---------------------------------------------------------------------------------------------- training
def test_two_step_training_with_interrupt_and_resume(tmp_path, monkeypatch):
    from crackcam.models.upcracknet import load_restoration
    from crackcam.train import upcracknet as tu

    data = write_synthetic_dataset(tmp_path / "data", n_crack=4, n_free=6, size=(64, 64), seed=1)
    out = tmp_path / "run"
    lines = []
    kw = dict(tile=64, width=4, batch=4, progress=False, log=lines.append, max_val=4)
    # Ctrl-C during the validation of epoch 2: epoch 1 stays saved
    real_validate = tu.validate
    calls = {"n": 0}

    def flaky_validate(*a):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_validate(*a)

    monkeypatch.setattr(tu, "validate", flaky_validate)
    m1 = tu.train_upcracknet(data, out, epochs=2, seed=0, **kw)
    assert m1["interrupted"] and m1["epochs_done"] == 1 and not m1["complete"]
    frag = [ln for ln in lines if ln.startswith("UP-CrackNet fragments")]
    assert frag, lines
    card = json.loads((out / "data_card.json").read_text())
    n_free = card["splits"]["train"]["crack_free"]
    assert card["upcracknet_fragments"]["train"] == n_free > 0
    assert f"train {n_free} " in frag[0]
    assert any(ln.startswith(f"warning: only {n_free} crack-free 64px training fragments") for ln in lines)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == 1e-3 and cfg["lr_d"] == 4e-3 and "0.99^epoch" in cfg["lr_schedule"]
    assert m1["history"][0]["lr"] == 1e-3 and m1["history"][0]["lr_d"] == 4e-3
    monkeypatch.setattr(tu, "validate", real_validate)
    m2 = tu.train_upcracknet(data, out, epochs=2, seed=0, resume=True, **kw)
    assert m2["epochs_done"] == 2 and m2["complete"] and not m2["interrupted"]
    assert m2["history"][0] == m1["history"][0]  # the first epoch is kept, not redone
    assert any("resuming" in ln for ln in lines)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "upcracknet" and cfg["tile"] == 64 and cfg["levels"] == 6
    for name in ("best.pt", "last.pt"):
        sd = torch.load(out / name, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert (out / "samples" / "epoch_001.png").is_file() and (out / "samples" / "epoch_002.png").is_file()
    assert (out / "curves.png").is_file()
    g, cfg2 = load_restoration(out)
    assert not g.training and cfg2["width"] == 4
    # the generator was trained: its weights differ from a fresh initialisation with the same seed
    torch.manual_seed(0)
    fresh = up.UNetGenerator(width=4, levels=6)
    assert not torch.equal(fresh.state_dict()["downs.0.conv.weight"], g.state_dict()["downs.0.conv.weight"])


# -------------------------------------------------------------------------------------------- test-time map
class BackgroundRestorer(nn.Module):
    """A stand-in generator that reproduces the background and not thin structures: a normalised Gaussian
    convolution over the visible pixels (hidden pixels carry the value -1 and are ignored)."""

    multiple = 1

    def __init__(self, sigma=3.0):
        super().__init__()
        r = int(3 * sigma)
        k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
        self.register_buffer("k", (k / k.sum()))
        self.r = r
        self.p = nn.Parameter(torch.zeros(()))  # restoration_map reads the device from a parameter

    def _blur(self, x):
        c = x.shape[1]
        kx = self.k.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
        ky = self.k.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
        x = F.conv2d(F.pad(x, (self.r, self.r, 0, 0), mode="reflect"), kx, groups=c)
        return F.conv2d(F.pad(x, (0, 0, self.r, self.r), mode="reflect"), ky, groups=c)

    def forward(self, x):
        vis = (x > up.HIDDEN_VALUE + 1e-4).any(1, keepdim=True).float()
        norm = self._blur(vis).clamp(min=1e-6)
        mean = self._blur(x * vis) / norm  # local mean of the visible pixels
        # robust background: dark outliers (thin dark lines) replaced by the local mean, blurred again
        x2 = torch.where(x < mean - 0.2, mean, x)
        return (self._blur(x2 * vis) / norm).clamp(-1, 1)


def test_mixed_sets_pool_their_crack_free_fragments_at_the_work_scale(tmp_path):
    """Two --data sets: each set's crack-free fragments (its own split) are pooled, the card lists both, the
    config keeps the first set as the run's evaluation set; --max-side shrinks large images before tiling."""
    from typer.testing import CliRunner

    from crackcam.train import upcracknet as tu
    from crackcam.train.cli import app

    a = write_synthetic_dataset(tmp_path / "a", n_crack=3, n_free=5, size=(64, 64), seed=1)
    b = write_synthetic_dataset(tmp_path / "b", n_crack=3, n_free=5, size=(128, 128), seed=2)
    fa = tu.load_fragments(a, 32, log=lambda *_: None)
    fb = tu.load_fragments(b, 32, log=lambda *_: None)
    fb_small = tu.load_fragments(b, 32, max_side=64, log=lambda *_: None)  # 128² images shrunk to 64²
    assert len(fb[0]) > len(fb_small[0]) > 0  # a quarter of the area: fewer 32px tiles
    lines = []
    mix = tu.load_fragments([a, b], 32, max_side=64, log=lines.append)
    assert len(mix[0]) == len(fa[0]) + len(fb_small[0]) and len(mix[1]) == len(fa[1]) + len(fb_small[1])
    assert np.array_equal(mix[0][:len(fa[0])], fa[0]) and np.array_equal(mix[0][len(fa[0]):], fb_small[0])
    card = mix[3]
    assert card["layout"] == "mixed" and [c["data"] for c in card["sets"]] == card["data"]
    assert card["upcracknet_fragments"]["per_set"]["b"]["train"] == len(fb_small[0])
    assert card["work_scale"] == {"max_side": 64}
    assert any("2 sets pooled" in ln for ln in lines)

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["--model", "upcracknet", "--data", str(a), "--data", str(b), "--max-side", "64",
                                 "--tile", "32", "--epochs", "1", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"] == str(a.resolve()) and cfg["training_sets"] == [str(a.resolve()), str(b.resolve())]
    assert cfg["max_side"] == 64 and cfg["fragments"]["train"] == len(mix[0])
    r = CliRunner().invoke(app, ["--model", "upcracknet", "--data", str(a), "--max-side", "8", "--out",
                                 str(tmp_path / "r2")])
    assert r.exit_code == 2 and "--max-side must be at least 16" in r.output


@pytest.mark.parametrize("variant", ["full", "masked"])
def test_restoration_map_is_high_on_the_crack(variant):
    rng = np.random.default_rng(3)
    img, mask = draw_crack_image(rng, 128, 128, n_cracks=1)
    g = BackgroundRestorer()
    m = up.restoration_map(g, img, variant, tile=64)
    assert m.shape == (128, 128) and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1
    on, off = m[mask].mean(), m[~mask].mean()
    assert on > 2.5 * off, (on, off)
    # most crack pixels lie above the Otsu threshold, few background ones do
    t = up.otsu_threshold(m)
    assert (m[mask] > t).mean() > 0.8 and (m[~mask] > t).mean() < 0.25
    # without the bilateral filter the contrast is there too (the filter is not what makes it)
    raw = up.restoration_map(g, img, variant, tile=64, smooth=False)
    assert raw[mask].mean() > 2.5 * raw[~mask].mean()


def test_restoration_map_identity_and_real_generator():
    class Identity(nn.Module):
        multiple = 1

        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return x

    img, _ = draw_crack_image(np.random.default_rng(0), 40, 56)
    assert not up.restoration_map(Identity(), img, "full").any()  # perfect restoration: no error anywhere
    g = up.UNetGenerator(width=4, levels=5)
    g.train()
    for v in ("full", "masked"):
        m, rest = up.restoration_map(g, img, v, return_restored=True)
        assert m.shape == (40, 56) and rest.shape == (40, 56, 3) and rest.dtype == np.uint8
    assert g.training  # the caller's mode is restored
    with pytest.raises(ValueError):
        up.restoration_map(g, img, "bogus")


def test_fuse_maps_known_values():
    cam = np.array([[1.0, 0.25, 0.0]], np.float32)
    rest = np.array([[0.25, 1.0, 1.0]], np.float32)
    assert np.allclose(up.fuse_maps(cam, rest, "product"), [[0.5, 0.5, 0.0]])
    assert np.allclose(up.fuse_maps(cam, rest, "gated", gate=0.5), [[0.625, 0.0, 0.0]])
    assert not up.fuse_maps(cam, rest, "product", prob=0.2, gate=0.5).any()  # classifier says crack-free
    with pytest.raises(ValueError):
        up.fuse_maps(cam, rest[:, :2])


# --------------------------------------------------------------------------------- CLI and crack-eval methods
def test_crack_train_cli_and_crack_eval_methods(tmp_path):
    """crack-train --model upcracknet (preset batch, explicit tile), bad data → exit 2, then the crack-eval
    methods restoration / restoration-masked-dark on that run equal restoration_map called directly."""
    from typer.testing import CliRunner

    from crackcam.runtime.imageio import read_image
    from crackcam.tools import methods as M
    from crackcam.train.cli import app

    data = write_synthetic_dataset(tmp_path / "data", n_crack=3, n_free=4, size=(64, 64), seed=2)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["--model", "upcracknet", "--data", str(data), "--out", str(out), "--epochs", "1",
                                 "--tile", "64", "--no-progress"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "upcracknet" and cfg["tile"] == 64 and cfg["batch"] == 8 and cfg["preset"] == "cpu"
    r = CliRunner().invoke(app, ["--model", "upcracknet", "--data", str(tmp_path / "missing"), "--out",
                                 str(tmp_path / "r2")])
    assert r.exit_code == 2 and "data folder not found" in r.output and "Traceback" not in r.output

    img = read_image(sorted((data / "test" / "images").glob("crack_*"))[0])
    gen, _ = up.load_restoration(out)
    for name, opts in (("restoration", {"variant": "full"}),
                       ("restoration-masked-dark", {"variant": "masked", "polarity": "dark"})):
        fn = M.resolve(name).factory(M.MethodContext(checkpoint=out))
        m, prob = fn(img)
        assert prob is None and m.shape == img.shape[:2]
        assert np.allclose(m, up.restoration_map(gen, img, tile=64, **opts))
    with pytest.raises(ValueError):
        M.resolve("restoration-bogus")
    # fusion without a restoration run folder: one clear error
    ctx = M.MethodContext(checkpoint=out)
    with pytest.raises(ValueError, match="restoration-checkpoint"):
        M.resolve("fusion").factory(ctx)
    # fusion with a (random-weight) classifier run folder: sqrt(CAM · restoration map), zero below the gate
    import crackcam.models as CM

    cls_dir = tmp_path / "cls"
    cls_dir.mkdir()
    model = CM.create_model("simple_cnn")
    torch.save(model.state_dict(), cls_dir / "best.pt")
    spec = CM.get_spec("simple_cnn")
    (cls_dir / "config.json").write_text(json.dumps({"model": "simple_cnn", "mean": list(spec.mean),
                                                      "std": list(spec.std), "tile": 64}))
    ctx = M.MethodContext(checkpoint=cls_dir, gate=0.0, options={"restoration_checkpoint": str(out)})
    fused, prob = M.resolve("fusion").factory(ctx)(img)
    cam, prob2 = M.resolve("gradcam").factory(M.MethodContext(checkpoint=cls_dir, gate=0.0))(img)
    rest = up.restoration_map(gen, img, "masked", tile=64, polarity="dark")
    assert prob == pytest.approx(prob2) and np.allclose(fused, np.sqrt(cam * rest), atol=1e-6)
    ctx_hi = M.MethodContext(checkpoint=cls_dir, gate=1.01, options={"restoration_checkpoint": str(out)})
    assert not M.resolve("fusion").factory(ctx_hi)(img)[0].any()
    # the same through crack-eval's --restoration-checkpoint flag
    from crackcam.tools.evaluate import app as eval_app

    r = CliRunner().invoke(eval_app, ["--checkpoint", str(cls_dir), "--method", "fusion", "--data", str(data),
                                      "--split", "test", "--gate", "0", "--threshold", "0.5",
                                      "--restoration-checkpoint", str(out), "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output.strip().splitlines()[-1])
    assert s["method"] == "fusion" and 0 <= s["f1"] <= 1
    assert s["n_images"] == len(list((data / "test" / "images").iterdir()))
    r = CliRunner().invoke(eval_app, ["--checkpoint", str(cls_dir), "--method", "fusion", "--data", str(data),
                                      "--out", str(tmp_path / "ev2")])
    assert r.exit_code == 2 and "--restoration-checkpoint" in r.output and "Traceback" not in r.output


def test_bilateral_is_the_official_three_channel_filter():
    """crackcam's filter == the official script's cv2.bilateralFilter(img, 25, 450, 15) on the uint8 error image read
    as 3 equal channels; on a drawn thin-line map it keeps the lines (Otsu F1 high), where the float filter with
    σ 450/255 (the earlier reading) smears them."""
    import cv2

    rng = np.random.default_rng(0)
    gt = np.zeros((128, 160), np.uint8)
    cv2.line(gt, (5, 20), (150, 100), 1, 2)
    cv2.line(gt, (30, 120), (140, 10), 1, 1)
    m = np.clip(0.15 * rng.random(gt.shape) + 0.8 * gt, 0, 1).astype(np.float32)
    u8 = (m * 255).astype(np.uint8)
    official = cv2.cvtColor(cv2.bilateralFilter(cv2.merge([u8, u8, u8]), 25, 450, 15), cv2.COLOR_BGR2GRAY)
    ours = up.bilateral(m)
    assert np.abs(ours * 255.0 - official.astype(np.float32)).max() <= 1.0

    def otsu_f1(f01):
        t = up.otsu_threshold(f01)
        pred = f01 > t
        tp = (pred & (gt > 0)).sum()
        return 2 * tp / max(1, pred.sum() + (gt > 0).sum())

    smeared = cv2.bilateralFilter(m, 25, 450 / 255.0, 15)
    assert otsu_f1(ours) > 0.9 and otsu_f1(smeared) < otsu_f1(ours) - 0.3, (otsu_f1(ours), otsu_f1(smeared))


def test_lr_schedule_is_the_released_codes():
    """G 1e-3·0.99^e and D 4e-3·0.99^e, reset every epoch (the released train.py); 'linear' kept as an option."""
    from crackcam.train.upcracknet import PRESETS, lr_at

    p = PRESETS["cpu"]
    assert (p["lr"], p["lr_d"], p["schedule"]) == (1e-3, 4e-3, "official")
    assert lr_at(0, 1e-3, 4e-3, "official", 20) == (1e-3, 4e-3)
    g, d = lr_at(10, 1e-3, 4e-3, "official", 20)
    assert g == pytest.approx(1e-3 * 0.99 ** 10) and d == pytest.approx(4e-3 * 0.99 ** 10)
    assert lr_at(10, 2e-4, 2e-4, "linear", 20) == pytest.approx((1e-4, 1e-4))
    with pytest.raises(ValueError):
        lr_at(0, 1e-3, 4e-3, "cosine", 20)


def test_ssim_constants_are_the_official_ones():
    """C1 = 0.01², C2 = 0.03² as in the released code (on its [-1, 1] images), not scaled by the data range."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 24, 24, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(1, 3, 24, 24, generator=g)).clamp(-1, 1)
    w = up._gaussian_window(11, 1.5, 3)
    mu_a, mu_b = (torch.nn.functional.conv2d(t, w, padding=5, groups=3) for t in (a, b))
    saa = torch.nn.functional.conv2d(a * a, w, padding=5, groups=3) - mu_a ** 2
    sbb = torch.nn.functional.conv2d(b * b, w, padding=5, groups=3) - mu_b ** 2
    sab = torch.nn.functional.conv2d(a * b, w, padding=5, groups=3) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ref = (((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))).mean()
    assert float(up.ssim(a, b)) == pytest.approx(float(ref), abs=1e-6)
    assert abs(float(up.ssim(a, b, data_range=2.0)) - float(ref)) > 1e-4  # the earlier constants differ


def _untrained_run(tmp_path, *, n_crack: int, seed: int, val_fraction: float):
    """A drawn Kaggle-layout set and an UP-CrackNet run folder on it (width 4, random weights, not trained)."""
    data = write_synthetic_dataset(tmp_path / "data", n_crack=n_crack, n_free=4, size=(64, 64), layout="kaggle",
                                   seed=seed)
    run = tmp_path / "up"
    run.mkdir()
    cfg = {"model": "upcracknet", "tile": 32, "width": 4, "data": str(data), "data_card_sha256": "ab" * 32,
           "train_config": {"val_fraction": val_fraction, "split_seed": 0}}
    torch.manual_seed(0)
    torch.save(up.build_generator(cfg).state_dict(), run / "best.pt")
    (run / "config.json").write_text(json.dumps(cfg))
    return data, run


def test_calibrate_an_upcracknet_run_then_eval_and_export_use_the_recipe(tmp_path):
    """crack-eval calibrate on a restoration run: a recipe chosen on the validation images (their stems written),
    crack-eval with no --method scores the chosen map at its threshold, crack-export builds the best exportable one
    and carries its threshold."""
    from typer.testing import CliRunner

    from crackcam.export import metadata as md
    from crackcam.export.cli import app as export_app
    from crackcam.tools.calibration import calibrate
    from crackcam.tools.evaluate import evaluate
    from crackcam.train.data import list_items

    data, run = _untrained_run(tmp_path, n_crack=6, seed=3, val_fraction=0.2)
    r = calibrate(checkpoint=run, methods=["restoration", "restoration-official", "restoration-raw"],
                  log=lambda m: None)
    val = [it.image.name for it in list_items(data, "val") if it.mask is not None]
    assert r["val_images"] == {"data": val} and r["masks_used"] == len(val) > 0
    assert set(r["candidates"]) == {"restoration", "restoration-official", "restoration-raw"}
    assert r["method"] == max(r["candidates"], key=lambda k: r["candidates"][k]["f1"])
    for name, c in r["candidates"].items():  # every candidate scores through crack-eval as calibrated
        s = evaluate(method=name, data=data, split="val", checkpoint=run, out=tmp_path / name, log=lambda m: None)
        assert s["f1"] == pytest.approx(c["f1"], abs=1e-3), name
    assert r["export"]["method"] == "restoration-raw"  # the only one a graph computes (no filter, no resize)
    s = evaluate(method=None, data=data, split="val", checkpoint=run, out=tmp_path / "ev", log=lambda m: None)
    assert s["method"] == r["method"] and s["threshold_source"].startswith("recipe")
    assert s["f1"] == pytest.approx(r["val"]["pixel_f1_t0"], abs=1e-3)  # the same figure through crack-eval
    res = CliRunner().invoke(export_app, ["--checkpoint", str(run), "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    meta = md.get_metadata(tmp_path / "m.onnx")
    assert meta["threshold"] == r["export"]["threshold"] and meta["postprocess"]["min_area"] == \
        r["export"]["postprocess"]["min_area"]


def test_mask_budget_and_mask_free_calibration_of_a_restoration_run(tmp_path):
    """--masks N uses exactly N seeded masked images (stems in the recipe, reproducible), the rest by their tile
    labels; --labels tiles uses no mask; a map that paints every tile loses against one that does not."""
    from crackcam.tools import calibration as cal

    data, run = _untrained_run(tmp_path, n_crack=8, seed=4, val_fraction=0.3)
    kw = dict(checkpoint=run, methods=["restoration-raw"], log=lambda m: None)
    a = cal.calibrate(masks=2, seed=1, out=tmp_path / "a.json", **kw)
    b = cal.calibrate(masks=2, seed=1, out=tmp_path / "b.json", **kw)
    others = [cal.calibrate(masks=2, seed=k, out=tmp_path / f"s{k}.json", **kw)["mask_images"] for k in (2, 3, 4)]
    assert a["masks_used"] == 2 and len(a["mask_images"]) == 2 and a["mask_images"] == b["mask_images"]
    assert set(a["mask_images"]) <= set(a["val_images"]["data"])
    assert "tile-decision F1" in a["objective"] and a["val"]["pixel_f1_t0"] is not None
    assert any(o != a["mask_images"] for o in others)  # the seed chooses
    z = cal.calibrate(labels="tiles", out=tmp_path / "z.json", **kw)
    assert z["masks_used"] == 0 and z["val"]["pixel_f1_t0"] is None and z["val"]["tile_f1"] is not None
    # the tile objective itself: painting every tile is punished by the crack-free tiles
    origins = [(0, 0), (0, 32), (32, 0), (32, 32)]
    labs = np.array([1, 0, 0, -1])
    paint = np.ones((64, 64), bool)
    right = np.zeros((64, 64), bool)
    right[5:20, 5:8] = True
    f1 = lambda tp, fp, fn: 2 * tp / max(1, 2 * tp + fp + fn)  # noqa: E731
    keep = labs >= 0
    ft = cal.FrameTiles(np.array([o[0] for o in origins])[keep], np.array([o[1] for o in origins])[keep], 32,
                        labs[keep], np.ones(int(keep.sum()), bool))
    assert f1(*cal.tile_counts(cal.tile_hits(right, ft), ft, False)) == 1.0
    assert f1(*cal.tile_counts(cal.tile_hits(paint, ft), ft, False)) == pytest.approx(0.5)
    with pytest.raises(cal.CalibrationError, match="masks or tiles"):
        cal.calibrate(labels="pixels", **kw)
