"""crackcam.runtime.imageio: every input kind → uint8 RGB; bad files → one-line BadInputError naming the file."""

import subprocess
import sys

import cv2
import numpy as np
import pytest

from crackcam.runtime.imageio import BadInputError, list_images, read_image, read_mask, write_image


@pytest.fixture()
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)


def test_png_rgb_roundtrip_is_exact_and_rgb_ordered(tmp_path, rgb):
    p = tmp_path / "a.png"
    cv2.imwrite(str(p), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = read_image(p)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, rgb)


def test_gray_rgba_and_16bit(tmp_path, rgb):
    gray = rgb[..., 0]
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    g = read_image(tmp_path / "g.png")
    assert g.shape == (20, 30, 3)
    np.testing.assert_array_equal(g[..., 0], gray)
    np.testing.assert_array_equal(g[..., 2], gray)

    bgra = np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), np.full((20, 30), 7, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)  # alpha dropped, RGB order

    g16 = gray.astype(np.uint16) * 257  # 16-bit with the same brightness
    cv2.imwrite(str(tmp_path / "g16.png"), g16)
    out16 = read_image(tmp_path / "g16.png")
    assert out16.dtype == np.uint8
    np.testing.assert_array_equal(out16[..., 1], gray)


def test_jpeg_close_to_source(tmp_path, rgb):
    smooth = cv2.GaussianBlur(rgb, (7, 7), 3)
    p = tmp_path / "a.jpg"
    write_image(p, smooth, quality=98)
    out = read_image(p)
    assert out.shape == smooth.shape
    assert np.abs(out.astype(int) - smooth.astype(int)).mean() < 4


@pytest.mark.parametrize("kind", ["jpg", "png"])
def test_truncated_file_is_detected(tmp_path, rgb, kind):
    p = tmp_path / f"a.{kind}"
    write_image(p, rgb)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(BadInputError) as e:
        read_image(p)
    msg = str(e.value)
    assert msg.startswith(str(p) + ": ") and "truncated" in msg and "\n" not in msg


def test_unreadable_missing_and_empty(tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_text("this is not an image")
    with pytest.raises(BadInputError, match=r"x\.jpg: unreadable"):
        read_image(bad)
    with pytest.raises(BadInputError, match="file not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(BadInputError, match="empty file"):
        read_image(tmp_path / "e.png")
    with pytest.raises(BadInputError, match="folder not found"):
        list_images(tmp_path / "missing")


def test_read_mask_threshold_shape_and_01(tmp_path):
    m = np.zeros((10, 12), np.uint8)
    m[2, 3] = 255
    m[4, 5] = 127  # not crack (> 127 is)
    m[6, 7] = 128
    cv2.imwrite(str(tmp_path / "m.png"), m)
    out = read_mask(tmp_path / "m.png", shape=(10, 12, 3))
    assert out.dtype == bool and out.sum() == 2 and out[2, 3] and out[6, 7] and not out[4, 5]
    with pytest.raises(BadInputError, match=r"m\.png: mask size 12x10 differs from its image size 13x10"):
        read_mask(tmp_path / "m.png", shape=(10, 13))
    cv2.imwrite(str(tmp_path / "m01.png"), (m > 200).astype(np.uint8))  # a 0/1 mask
    assert read_mask(tmp_path / "m01.png").sum() == 1


def test_runtime_imageio_does_not_import_torch():
    code = "import sys, crackcam.runtime.imageio; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
