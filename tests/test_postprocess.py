"""Post-processing and pixel cues (crackcam.runtime.postprocess / cues): known shapes, known answers."""

import math

import cv2
import numpy as np
import pytest

from crackcam.runtime import cues
from crackcam.runtime.postprocess import (PostProcessConfig, binarize, clean, measure, postprocess,
                                          remove_small, resolve_threshold, skeleton_length, skeletonize)
from crackcam.train.synth import draw_crack, noise_texture


def test_threshold_kinds():
    m = np.linspace(0, 1, 101, dtype=np.float32).reshape(1, -1).repeat(3, 0)
    assert binarize(m, 0.5).sum() == 3 * 51  # >= 0.5
    assert resolve_threshold(m, "p90") == pytest.approx(0.9)
    assert binarize(m, "p90").sum() == 3 * 11
    # two clusters: Otsu splits between them
    two = np.r_[np.full(50, 0.2), np.full(50, 0.8)].astype(np.float32).reshape(10, 10)
    t = resolve_threshold(two, "otsu")
    assert 0.2 < t <= 0.8
    assert binarize(two, "otsu").sum() == 50
    # zero never counts as crack, even at threshold 0 / a percentile that resolves to 0
    z = np.zeros((5, 5), np.float32)
    assert not binarize(z, 0.0).any() and not binarize(z, "p50").any() and not binarize(z, "otsu").any()
    with pytest.raises(ValueError):
        resolve_threshold(m, "bogus")
    with pytest.raises(ValueError):
        PostProcessConfig.from_dict({"threshold": "p200"})
    assert PostProcessConfig.from_dict(PostProcessConfig(threshold="otsu", min_area=5).to_dict()).min_area == 5


def test_component_removal_and_morphology():
    m = np.zeros((60, 60), bool)
    m[10, 5:55] = True  # a 50 px line
    m[40:42, 40:42] = True  # a 4 px speck
    m[30, 30] = True  # a lone pixel
    out = remove_small(m, 10)
    assert out[10].sum() == 50 and not out[40:42, 40:42].any() and not out[30, 30]
    many = np.zeros((100, 100), bool)  # many specks: the vectorised path
    many[::4, ::4] = True
    many[50, 10:90] = True
    out = remove_small(many, 5)
    assert out.sum() == 80
    # closing bridges a 1 px gap; opening with r=1 removes a 1 px line
    g = np.zeros((20, 40), bool)
    g[9:12, 5:18] = True
    g[9:12, 19:35] = True
    assert not g[10, 18] and clean(g, close_radius=1)[10, 18]
    thin = np.zeros((20, 40), bool)
    thin[10, 5:35] = True
    assert not clean(thin, open_radius=1).any() and clean(g, open_radius=1)[10, 10]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_skeleton_equals_opencv_thinning(seed):
    rng = np.random.default_rng(seed)
    m = np.zeros((160, 160), bool)
    for _ in range(2):
        m |= draw_crack(rng, 160, 160, width=(2, 7))
    m[:1] = m[-1:] = False
    m[:, :1] = m[:, -1:] = False  # OpenCV leaves the frame border untouched
    assert (skeletonize(m) == skeletonize(m, "opencv")).all()


@pytest.mark.parametrize("seed", [0, 2, 4, 7])
def test_skeleton_at_the_frame_border_differs_from_opencv_as_documented(seed):
    """Masks touching the border (the claim as it stands in the docs): OpenCV keeps every border pixel, crackcam
    thins them; all differences lie within 4 px of the border, and the skeleton is one pixel wide there."""
    rng = np.random.default_rng(seed)
    m = np.zeros((160, 160), bool)
    for _ in range(2):
        m |= draw_crack(rng, 160, 160, width=(2, 7))
    border = np.zeros_like(m)
    border[0] = border[-1] = border[:, 0] = border[:, -1] = True
    assert (m & border).sum() > 5  # the drawn cracks do reach the border
    ours, cv = skeletonize(m), skeletonize(m, "opencv")
    diff = ours != cv
    assert diff.any() and not diff[4:-4, 4:-4].any()
    assert (cv[border] == m[border]).all()  # OpenCV: border pixels untouched
    assert (ours & border).sum() < (m & border).sum()  # crackcam: thinned there too
    assert ours.sum() < cv.sum()


def test_skeleton_and_measures_of_a_drawn_line():
    m = np.zeros((100, 200), np.uint8)
    m[48:53, 20:181] = 1  # a bar 161 px long, 5 px wide
    res = postprocess(m.astype(np.float32), PostProcessConfig(threshold=0.5))
    meas = res.measures
    assert res.skeleton.sum() > 100
    assert 154 <= meas["length_px"] <= 161
    assert meas["max_width_px"] == pytest.approx(5, abs=1.0)
    assert meas["mean_width_px"] == pytest.approx(5, abs=0.6)
    assert meas["components"] == 1 and meas["segments"] == 1 and meas["end_points"] == 2
    assert meas["area_px"] == int(m.sum())
    mm = measure(m.astype(bool), res.skeleton, mm_per_px=0.5)
    assert mm["length_mm"] == pytest.approx(meas["length_px"] * 0.5)
    # a diagonal line: length counts √2 per step
    d = np.zeros((120, 120), np.uint8)
    cv2.line(d, (10, 10), (110, 110), 1, 3)
    sk = skeletonize(d.astype(bool))
    assert skeleton_length(sk) == pytest.approx(100 * math.sqrt(2), rel=0.06)
    # a T junction: 3 segments, 1 branch point
    t = np.zeros((100, 100), np.uint8)
    cv2.line(t, (10, 30), (90, 30), 1, 1)
    cv2.line(t, (50, 30), (50, 90), 1, 1)
    mt = measure(t.astype(bool))
    assert mt["segments"] == 3 and mt["branch_points"] == 1 and mt["end_points"] == 3
    # empty
    e = postprocess(np.zeros((10, 10), np.float32))
    assert e.measures["length_px"] == 0 and e.measures["area_px"] == 0


def test_blackhat_prefers_a_dark_line_over_flat_texture():
    rng = np.random.default_rng(0)
    img = noise_texture(rng, 128, 128).astype(np.float32)
    line = np.zeros((128, 128), np.uint8)
    cv2.line(line, (10, 64), (118, 70), 1, 3)
    img[line.astype(bool)] -= 60
    img = np.clip(img, 0, 255).astype(np.uint8)
    for name in ("blackhat", "ridge", "bh+ridge"):
        c = cues.cue(img, name)
        assert c.shape == (128, 128) and c.dtype == np.float32 and 0 <= c.min() and c.max() <= 1
        on, off = c[line.astype(bool)].mean(), c[cv2.dilate(line, np.ones((15, 15))) == 0].mean()
        assert on > 3 * off, name
    # a bright line gives (almost) no black-hat response
    bright = np.clip(noise_texture(rng, 128, 128).astype(np.float32) + 60 * line[..., None], 0, 255).astype(np.uint8)
    bh = cues.blackhat(bright, normalize=False)
    assert bh[line.astype(bool)].mean() < 10


def test_blackhat_fixed_point_closing_is_the_float_one_within_a_256th_grey_level():
    """The black-hat's closings run on 1/256-grey uint16 (max / min commute with the monotone rounding), so the
    cue is the float32 black-hat to within 1/256 grey level before normalisation — for each element size."""
    rng = np.random.default_rng(3)
    img = noise_texture(rng, 160, 200)
    cv2.line(img, (10, 30), (190, 120), (40, 40, 40), 2)
    g = cv2.GaussianBlur(cues.to_gray(img), (0, 0), 1.0)
    for sizes in ((7,), (11, 15), (7, 11, 15)):
        ref = np.max([cv2.morphologyEx(g, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (s, s)))
                      for s in sizes], axis=0)
        got = cues.blackhat(img, sizes=sizes, blur=1.0, normalize=False, scale=1.0)
        assert got.dtype == np.float32 and ref.max() > 50
        assert np.abs(got - ref).max() <= 1.0 / 256 + 1e-4, sizes


def test_refine_keeps_gating_and_sharpens():
    rng = np.random.default_rng(1)
    img = noise_texture(rng, 96, 96).astype(np.float32)
    line = np.zeros((96, 96), np.uint8)
    cv2.line(line, (5, 48), (90, 48), 1, 2)
    img = np.clip(img - 60 * line[..., None], 0, 255).astype(np.uint8)
    coarse = cv2.resize(cv2.resize(line.astype(np.float32), (12, 12), interpolation=cv2.INTER_AREA), (96, 96))
    coarse /= coarse.max()
    for mode in ("product", "component", "guided", "gate"):
        r = cues.refine(img, coarse, cues.RefineConfig(mode=mode))
        assert r.shape == (96, 96) and r.max() <= 1
        assert r[line.astype(bool)].mean() > 3 * r[~cv2.dilate(line, np.ones((5, 5))).astype(bool)].mean(), mode
        assert not cues.refine(img, np.zeros((96, 96), np.float32), cues.RefineConfig(mode=mode)).any()


def test_region_prior_half_resolution_dilation_matches_the_disk():
    """The refinement's prior (CAM dilated by a disk) is computed at half resolution for radii >= 16 px; on
    CAM-like maps (stride-8 maps upsampled bilinearly) it stays within a few hundredths of the exact disk."""
    rng = np.random.default_rng(0)
    for h, w in ((384, 544), (321, 479)):
        small = rng.random((h // 8 + 1, w // 8 + 1)).astype(np.float32) ** 2
        cam = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        cam /= cam.max()
        for d in (4, 8, 16, 32):
            exact = cv2.dilate(cam, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * d + 1, 2 * d + 1)))
            fast = cues._prior(cam, d)
            assert fast.shape == (h, w) and fast.dtype == np.float32
            err = np.abs(fast - exact)
            if d < 16:
                assert err.max() <= 0.5 / 65535 + 1e-7  # small radii: the exact disk (in 1/65535 fixed point)
            else:
                assert err.mean() < 0.01 and np.percentile(err, 99) < 0.08, (h, w, d, err.mean())
    assert not cues._prior(np.zeros((50, 60), np.float32), 16).any()


@pytest.mark.parametrize("cfg", [dict(threshold=0.5, min_area=30, close_radius=1),
                                 dict(threshold=0.329, min_area=50, hysteresis=0.5, max_width=32.0),
                                 dict(threshold=0.329, min_area=50, hysteresis=0.5, max_width=4.0)])
def test_the_benchmarks_scikit_image_reference_does_the_same_steps(cfg):
    """crack-bench compares the shared post-processing with a scikit-image-only pipeline: it must keep the same
    pixels (hysteresis and the width filter included), or the timing compares different work."""
    pytest.importorskip("skimage")
    from crackcam.tools.bench_runtime import crack_maps, skimage_postprocess

    for skeleton in (False, True):
        c = PostProcessConfig(**cfg, skeleton=skeleton)
        kept = 0
        for m in crack_maps(6, 160, seed=3):
            a = postprocess(m, c).mask
            b = skimage_postprocess(m, c, c.threshold)
            assert int(a.sum()) == b["area_px"]
            kept += b["area_px"]
        assert kept > 0 or cfg.get("max_width", 0) < 5  # not all removed (the narrow width filter may)
