"""Data sets: both layouts, splits, the tile-label rule on hand-made masks, augmentation invariants, data card."""

import json

import cv2
import numpy as np
import pytest

from crackcam.runtime.imageio import BadInputError
from crackcam.train import data as D
from crackcam.train.synth import write_synthetic_dataset


# ------------------------------------------------------------------------------------------------ layouts
def test_kaggle_layout_labels_from_names_and_splits(tmp_path):
    root = write_synthetic_dataset(tmp_path / "k", n_crack=12, n_free=12, size=(48, 64), layout="kaggle", seed=1)
    assert D.detect_layout(root) == "kaggle"
    items = D.list_items(root, "all")
    assert {it.split for it in items} == {"train", "val", "test"}
    for it in items:
        assert it.name_label == (0 if it.image.name.startswith("noncrack") else 1)
        assert (it.split == "test") == (it.image.parent.parent.name == "test")
    tr, va = D.list_items(root, "train"), D.list_items(root, "val")
    n_train_dir = len(list((root / "train" / "images").iterdir()))
    assert len(tr) + len(va) == n_train_dir and len(va) == round(0.2 * n_train_dir)
    assert not {it.image for it in tr} & {it.image for it in va}  # split by image
    # name rule: one resized sample per image, bit from the name
    ts = D.load_split(items, "train", "name", D.TileRule(tile=32))
    assert ts.images.shape == (len(tr), 32, 32, 3)
    assert ts.labels.tolist() == [it.name_label for it in tr]
    # the tile rule is available on this layout too (crack-free files need no mask)
    tt = D.load_split(items, "train", "tiles", D.TileRule(tile=32, min_crack_px=10, border=2, margin=2))
    assert tt.images.shape[1:] == (32, 32, 3) and len(tt) > len(tr)


def test_flat_layout_prefix_split(tmp_path):
    root = write_synthetic_dataset(tmp_path / "f", n_crack=10, size=(64, 96), layout="flat", seed=2)
    for i, p in enumerate(sorted((root / "images").iterdir())):
        pre = "test_" if i % 3 == 0 else "train_"
        p.rename(p.with_name(pre + p.name))
        m = root / "masks" / (p.stem + ".png")
        m.rename(m.with_name(pre + m.name))
    items = D.list_items(root, "all", val_fraction=0.25)
    by = {s: [it.image.name for it in items if it.split == s] for s in ("train", "val", "test")}
    assert all(n.startswith("test_") for n in by["test"]) and len(by["test"]) == 4
    assert all(n.startswith("train_") for n in by["train"] + by["val"]) and len(by["val"]) == round(0.25 * 6)
    # deterministic, seeded by split_seed
    assert [it.image.name for it in D.list_items(root, "val", val_fraction=0.25)] == by["val"]
    other = {tuple(it.image.name for it in D.list_items(root, "val", val_fraction=0.25, split_seed=s))
             for s in range(6)}
    assert len(other) > 1


def test_flat_layout_cfd_number_split(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(1, 119):
        (tmp_path / "images" / f"{i:03d}.jpg").write_bytes(b"x")
        (tmp_path / "masks" / f"{i:03d}.png").write_bytes(b"x")
    items = D.list_items(tmp_path, "all")
    train_val = sorted(it.stem for it in items if it.split in ("train", "val"))
    test = sorted(it.stem for it in items if it.split == "test")
    assert train_val == [f"{i:03d}" for i in range(1, 73)]
    assert test == [f"{i:03d}" for i in range(73, 119)]
    assert sum(it.split == "val" for it in items) == round(0.2 * 72)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(BadInputError, match="data folder not found"):
        D.list_items(tmp_path / "nope")
    with pytest.raises(BadInputError, match="no data found"):
        D.list_items(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(BadInputError, match=r"no images found"):
        D.list_items(tmp_path)


# ------------------------------------------------------------------------------------------------ tile rule
def _labels(mask, **kw):
    rule = D.TileRule(**{"tile": 32, "min_crack_px": 5, "border": 4, "margin": 4, **kw})
    origins, lab = D.tile_labels(mask, rule)
    return dict(zip(origins, lab.tolist()))


def test_tile_rule_known_answers():
    m = np.zeros((64, 64), bool)
    m[10:13, 10:13] = True  # 9 px well inside tile (0, 0)
    assert _labels(m) == {(0, 0): 1, (0, 32): 0, (32, 0): 0, (32, 32): 0}

    m = np.zeros((64, 64), bool)
    m[30:32, 5:7] = True  # 4 px inside tile (0,0) but within 4 px of its lower border
    lab = _labels(m)
    assert lab[(0, 0)] == -1  # not enough px away from the border, not crack-free either → dropped
    assert lab[(32, 0)] == -1  # no crack inside, but within the 4-px margin → dropped
    assert lab[(0, 32)] == 0 and lab[(32, 32)] == 0  # > 4 px away in x (x = 5..6 vs 28..)


def test_tile_rule_count_threshold_border_and_margin():
    m = np.zeros((32, 64), bool)
    m[15, 10:14] = True  # 4 px (N-1) inside tile (0, 0)
    assert _labels(m)[(0, 0)] == -1
    m[15, 14] = True  # now N = 5
    assert _labels(m)[(0, 0)] == 1
    assert _labels(m, min_crack_px=6)[(0, 0)] == -1
    m2 = np.zeros((32, 64), bool)
    m2[10:20, 29] = True  # 10 px at distance 2 from the right border of tile (0, 0)
    assert _labels(m2)[(0, 0)] == -1 and _labels(m2, border=2)[(0, 0)] == 1
    # tile (0, 32) starts 3 px right of the crack: dropped with margin 4, crack-free with margin 2
    assert _labels(m2)[(0, 32)] == -1 and _labels(m2, margin=2)[(0, 32)] == 0


def test_tile_grid_stride_and_small_images():
    m = np.zeros((64, 96), bool)
    origins, lab = D.tile_labels(m, D.TileRule(tile=32, stride=16))
    assert len(origins) == 3 * 5 and set(lab.tolist()) == {0}
    small = np.zeros((20, 20), bool)
    small[8:12, 8:12] = True  # padded to 32 px (reflect) → one tile
    origins, lab = D.tile_labels(small, D.TileRule(tile=32, min_crack_px=5, border=2, margin=2))
    assert origins == [(0, 0)] and lab.tolist() == [1]
    tiles = D.cut_tiles(np.zeros((20, 20, 3), np.uint8), origins, 32)
    assert tiles.shape == (1, 32, 32, 3)


def test_load_split_tiles_match_masks_and_skip_bad_files(tmp_path, capsys):
    root = write_synthetic_dataset(tmp_path / "f", n_crack=6, size=(64, 64), layout="flat", seed=3)
    imgs = sorted((root / "images").iterdir())
    # a truncated image, and a mask of the wrong size
    data = imgs[0].read_bytes()
    imgs[0].write_bytes(data[: len(data) // 2])
    cv2.imwrite(str(root / "masks" / (imgs[1].stem + ".png")), np.zeros((10, 10), np.uint8))
    items = D.list_items(root, "all", val_fraction=0.0)
    skipped = []
    rule = D.TileRule(tile=32, min_crack_px=10, border=2, margin=2)
    ts = D.load_split(items, "train", "tiles", rule, skipped=skipped)
    err = capsys.readouterr().err
    assert f"skipping {imgs[0]}: truncated JPEG" in err
    assert "mask size 10x10 differs from its image size 64x64" in err
    assert len(skipped) == 2
    # counts agree with the rule applied directly; tiles are the image's pixels
    n_train = sum(it.split == "train" for it in items)
    assert ts.n_images == n_train - 2
    assert set(np.unique(ts.labels)) <= {0, 1}
    assert ts.images.dtype == np.uint8 and ts.images.shape[1:] == (32, 32, 3)


# ------------------------------------------------------------------------------------------------ augmentation
def test_augment_invariants():
    rng0 = np.random.default_rng(0)
    tile = rng0.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    seen = set()
    for s in range(64):
        a = D.augment_tile(tile, np.random.default_rng(s))
        b = D.augment_tile(tile, np.random.default_rng(s))
        np.testing.assert_array_equal(a, b)  # deterministic with the seed
        assert a.shape == tile.shape
        np.testing.assert_array_equal(np.sort(a, axis=None), np.sort(tile, axis=None))  # same pixel multiset
        # a dihedral transform: each pixel keeps its RGB triple
        assert {tuple(p) for p in a.reshape(-1, 3)} == {tuple(p) for p in tile.reshape(-1, 3)}
        seen.add(a.tobytes())
    assert len(seen) == 8  # all rotations x flips are reached


def test_double_keeps_labels_and_doubles():
    rng = np.random.default_rng(1)
    ts = D.TileSet("train", rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8), np.array([1, 0, 1, 1, 0]), 5)
    d = D.double_with_augmented(ts, seed=3)
    assert len(d) == 10 and d.labels.tolist() == ts.labels.tolist() * 2
    np.testing.assert_array_equal(d.images[:5], ts.images)
    for a, b in zip(d.images[5:], ts.images):
        np.testing.assert_array_equal(np.sort(a, axis=None), np.sort(b, axis=None))
    np.testing.assert_array_equal(D.double_with_augmented(ts, seed=3).images, d.images)


def test_tile_dataset_yields_only_tile_and_bit():
    from crackcam.train.loop import TileDataset

    imgs = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    ds = TileDataset(imgs, np.array([0, 1, 1, 0]), augment=True, seed=5)
    ds.set_epoch(2)
    sample = ds[1]
    assert len(sample) == 2 and sample[0].shape == (8, 8, 3) and float(sample[1]) == 1.0
    assert np.array_equal(ds[1][0].numpy(), sample[0].numpy())  # deterministic per (seed, epoch, index)


# ------------------------------------------------------------------------------------------------ card
def test_card_digest_and_png(tmp_path):
    ts = D.TileSet("train", np.zeros((4, 16, 16, 3), np.uint8), np.array([0, 1, 1, 0]), 2, 1, ["a", "b"])
    card = D.build_card(tmp_path, "flat", D.TileRule(tile=16).as_dict(), {"train": ts}, [], {"text": "x"})
    assert card["splits"]["train"] == {"images": 2, "crack": 2, "crack_free": 2, "dropped": 1, "total": 4,
                                       "neg_per_pos": 1.0, "crack_fraction": 0.5}
    D.atomic_write_bytes(tmp_path / "card.json", D.card_bytes(card))
    import hashlib

    assert hashlib.sha256((tmp_path / "card.json").read_bytes()).hexdigest() == D.card_sha256(card)
    assert json.loads((tmp_path / "card.json").read_text()) == card
    D.write_card_png(tmp_path / "card.png", ts)
    assert cv2.imread(str(tmp_path / "card.png")).shape[0] > 32
    assert "crack if >= 40 crack px" in D.format_card(card)
