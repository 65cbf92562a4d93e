"""Crack data sets → (tile image, crack bit) pairs.

Two folder layouts are read:

* **kaggle** — the Kaggle "Crack Segmentation Dataset" layout: ``root/train/images``, ``root/train/masks``,
  ``root/test/images``, ``root/test/masks``.  A file whose name starts with ``noncrack`` is crack-free; every other
  file is a crack image.  Default label rule ``name``: one image = one sample, its bit from the file name (the
  image is resized to ``tile``×``tile``).  The tile rule below is available as an option (``label_rule="tiles"``).
* **flat** — ``root/images`` + ``root/masks`` (same stem), e.g. the shared DeepCrack and CFD sets.  Split: names
  starting with ``train_`` / ``test_`` carry it (DeepCrack's official split); otherwise the files sorted by name are
  cut at 72/118 of their number: the first ``round(n·72/118)`` are train, the rest test — for CFD exactly
  001–072 train and 073–118 test.  Every image of these sets holds cracks, so labels come from the tile rule.

Validation images are carved from the training images **by image** (never by tile): a seeded permutation
(``split_seed``, default 0) of the sorted training images, the first ``round(val_fraction·n)`` (default 20 %) go to
``val``.  ``split`` is one of ``train``, ``val``, ``test``, ``all``.

**Tile rule** (``TileRule``): images are cut into ``tile``×``tile`` tiles on a grid with step ``stride``
(default = tile; an image smaller than a tile is reflect-padded).  The mask is read only to decide one bit:

* crack (1) — at least ``min_crack_px`` crack pixels lie at least ``border`` px inside the tile;
* crack-free (0) — no crack pixel lies within the tile grown by ``margin`` px on every side;
* otherwise the tile is dropped (ambiguous: a crack only grazes the border).

Pixel positions never leave this module: datasets hold only uint8 tiles and their bits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from crackcam.runtime.imageio import BadInputError, list_images, read_image, read_mask

SPLITS = ("train", "val", "test", "all")
CFD_TRAIN_FRACTION = 72 / 118  # the CFD split: 001–072 train, 073–118 test


# ----------------------------------------------------------------------------------------------- label rule
@dataclass(frozen=True)
class TileRule:
    """How one bit per tile is derived from a mask (see the module docstring)."""

    tile: int = 128
    stride: int | None = None  # None → tile (no overlap)
    min_crack_px: int = 40  # N: crack pixels needed inside the tile shrunk by `border`
    border: int = 8  # B: those pixels must lie at least this far from the tile border
    margin: int = 16  # M: crack-free only if no crack pixel within the tile grown by this margin

    @property
    def step(self) -> int:
        return int(self.stride or self.tile)

    def describe(self) -> str:
        return (f"tiles {self.tile}px step {self.step}px: crack if >= {self.min_crack_px} crack px at >= "
                f"{self.border}px from the tile border; crack-free if no crack px within the tile grown by "
                f"{self.margin}px; otherwise dropped")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["stride"] = self.step
        return {"name": "tiles", **d, "text": self.describe()}


def name_rule_dict(tile: int) -> dict:
    return {"name": "name", "tile": int(tile),
            "text": f"image-level bit from the file name (noncrack* = 0, else 1); image resized to {tile}x{tile}"}


def tile_origins(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    return list(range(0, length - tile + 1, step))


def _pad_to(a: np.ndarray, tile: int) -> np.ndarray:
    h, w = a.shape[:2]
    if h >= tile and w >= tile:
        return a
    ph, pw = max(0, tile - h), max(0, tile - w)
    pad = ((0, ph), (0, pw)) + (((0, 0),) if a.ndim == 3 else ())
    mode = "reflect" if h > 1 and w > 1 and ph < h and pw < w else "edge"
    return np.pad(a, pad, mode=mode)


def tile_labels(mask: np.ndarray, rule: TileRule) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Tile origins (y, x) on the grid and their labels: 1 crack, 0 crack-free, -1 dropped."""
    m = _pad_to(np.asarray(mask, bool), rule.tile)
    h, w = m.shape
    t, b, g = rule.tile, rule.border, rule.margin
    integ = np.zeros((h + 1, w + 1), np.int64)  # summed-area table → any box count in O(1)
    integ[1:, 1:] = np.cumsum(np.cumsum(m, 0), 1)

    def box(y0, x0, y1, x1):
        y0, x0 = max(0, y0), max(0, x0)
        y1, x1 = min(h, y1), min(w, x1)
        if y1 <= y0 or x1 <= x0:
            return 0
        return int(integ[y1, x1] - integ[y0, x1] - integ[y1, x0] + integ[y0, x0])

    origins, labels = [], []
    for y in tile_origins(h, t, rule.step):
        for x in tile_origins(w, t, rule.step):
            inner = box(y + b, x + b, y + t - b, x + t - b)
            grown = box(y - g, x - g, y + t + g, x + t + g)
            lab = 1 if inner >= rule.min_crack_px else (0 if grown == 0 else -1)
            origins.append((y, x))
            labels.append(lab)
    return origins, np.asarray(labels, np.int64)


def cut_tiles(image: np.ndarray, origins, tile: int) -> np.ndarray:
    img = _pad_to(image, tile)
    if not origins:
        return np.zeros((0, tile, tile, 3), np.uint8)
    return np.stack([img[y:y + tile, x:x + tile] for y, x in origins])


# ----------------------------------------------------------------------------------------------- file lists
@dataclass
class Item:
    image: Path
    mask: Path | None
    split: str  # train / val / test
    name_label: int | None = None  # kaggle layout: bit from the file name

    @property
    def stem(self) -> str:
        return self.image.stem


def detect_layout(root: str | os.PathLike) -> str:
    root = Path(root)
    if not root.exists():
        raise BadInputError(root, "data folder not found")
    if not root.is_dir():
        raise BadInputError(root, "not a folder")
    if (root / "train" / "images").is_dir():
        return "kaggle"
    if (root / "images").is_dir():
        return "flat"
    raise BadInputError(root, "no data found: expected images/ + masks/ (flat layout) or train/images + "
                              "test/images (Kaggle layout)")


def _mask_for(masks_dir: Path, image: Path) -> Path | None:
    for suf in (".png", ".bmp", ".tif", ".jpg", image.suffix):
        p = masks_dir / (image.stem + suf)
        if p.is_file():
            return p
    return None


def _carve_val(train: list[Item], val_fraction: float, split_seed: int) -> None:
    n = len(train)
    n_val = int(round(val_fraction * n))
    if n >= 2:
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), n - 1)
    else:
        n_val = 0
    order = np.random.default_rng(split_seed).permutation(n)
    for i in order[:n_val]:
        train[int(i)].split = "val"


def list_items(root: str | os.PathLike, split: str = "all", *, val_fraction: float = 0.2, split_seed: int = 0,
               layout: str | None = None) -> list[Item]:
    """The image files of ``split`` (sorted by split then name).  Missing/empty folder → BadInputError."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    layout = layout or detect_layout(root)
    items: list[Item] = []
    if layout == "kaggle":
        for sub in ("train", "test"):
            d = root / sub / "images"
            if not d.is_dir():
                continue
            for p in list_images(d):
                lab = 0 if p.name.lower().startswith("noncrack") else 1
                items.append(Item(p, _mask_for(root / sub / "masks", p), sub, lab))
    else:
        imgs = list_images(root / "images")
        prefixed = any(p.name.startswith(("train_", "test_")) for p in imgs)
        if prefixed:
            for p in imgs:
                sp = "test" if p.name.startswith("test_") else "train"
                items.append(Item(p, _mask_for(root / "masks", p), sp))
        else:
            n_train = int(round(len(imgs) * CFD_TRAIN_FRACTION))
            for i, p in enumerate(imgs):
                items.append(Item(p, _mask_for(root / "masks", p), "train" if i < n_train else "test"))
    if not items:
        raise BadInputError(root, "no images found (empty data folder)")
    _carve_val([it for it in items if it.split == "train"], val_fraction, split_seed)
    order = {"train": 0, "val": 1, "test": 2}
    items.sort(key=lambda it: (order[it.split], it.image.name))
    return items if split == "all" else [it for it in items if it.split == split]


# ----------------------------------------------------------------------------------------------- tile sets
@dataclass
class TileSet:
    """Tiles of one split held in memory: uint8 N×T×T×3 RGB and one bit each (no positions)."""

    split: str
    images: np.ndarray
    labels: np.ndarray
    n_images: int = 0
    n_dropped: int = 0
    image_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(len(self.labels))

    def counts(self) -> dict:
        pos = int((self.labels == 1).sum())
        neg = int((self.labels == 0).sum())
        return {"images": self.n_images, "crack": pos, "crack_free": neg, "dropped": self.n_dropped,
                "total": pos + neg, "neg_per_pos": round(neg / pos, 4) if pos else None,
                "crack_fraction": round(pos / (pos + neg), 4) if pos + neg else None}


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def load_split(items: list[Item], split: str, label_rule: str, rule: TileRule, *, max_tiles: int | None = None,
               seed: int = 0, skipped: list[str] | None = None, progress: bool = False) -> TileSet:
    """Read the images of ``split`` and make their tiles (or resized whole images for the name rule).

    A single bad file (unreadable, truncated, missing mask, mask size mismatch) is skipped with a warning line
    (and its message appended to ``skipped``).
    """
    sel = [it for it in items if it.split == split]
    tiles: list[np.ndarray] = []
    labs: list[np.ndarray] = []
    names: list[str] = []
    dropped = 0
    it_iter = sel
    if progress and len(sel) > 20:
        from tqdm import tqdm

        it_iter = tqdm(sel, desc=f"reading {split}", unit="img", leave=False)
    for it in it_iter:
        try:
            img = read_image(it.image)
            if label_rule == "name":
                if it.name_label is None:
                    raise BadInputError(it.image, "the name rule needs the Kaggle layout (noncrack* names)")
                t = rule.tile
                interp = cv2.INTER_AREA if min(img.shape[:2]) > t else cv2.INTER_LINEAR
                tiles.append(cv2.resize(img, (t, t), interpolation=interp)[None])
                labs.append(np.array([it.name_label], np.int64))
            else:
                if it.mask is None:
                    if it.name_label == 0:  # crack-free by name, no mask needed
                        mask = np.zeros(img.shape[:2], bool)
                    else:
                        raise BadInputError(it.image, "no mask with the same stem in masks/ (needed for tile labels)")
                else:
                    mask = read_mask(it.mask, img.shape)
                origins, lab = tile_labels(mask, rule)
                keep = lab >= 0
                dropped += int((~keep).sum())
                tiles.append(cut_tiles(img, [o for o, k in zip(origins, keep) if k], rule.tile))
                labs.append(lab[keep])
            names.append(it.image.name)
        except BadInputError as exc:
            warn(f"skipping {exc}")
            if skipped is not None:
                skipped.append(str(exc))
    t = rule.tile
    images = np.concatenate(tiles) if tiles else np.zeros((0, t, t, 3), np.uint8)
    labels = np.concatenate(labs) if labs else np.zeros((0,), np.int64)
    if max_tiles is not None and len(labels) > max_tiles:
        keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:max_tiles])
        images, labels = images[keep], labels[keep]
    return TileSet(split, np.ascontiguousarray(images), labels, len(names), dropped, names)


# ----------------------------------------------------------------------------------------------- augmentation
def augment_tile(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 90° rotation (k = 0..3), then an optional horizontal flip and an optional vertical flip.

    Only rearranges pixels: the label and the pixel multiset are unchanged.
    """
    out = np.rot90(tile, int(rng.integers(4)), axes=(0, 1))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    return np.ascontiguousarray(out)


def double_with_augmented(ts: TileSet, seed: int) -> TileSet:
    """The set plus one augmented (rotated/flipped) copy of every tile — twice the tiles, same labels."""
    rng = np.random.default_rng([seed, 7919])
    extra = np.stack([augment_tile(t, rng) for t in ts.images]) if len(ts) else ts.images
    return TileSet(ts.split, np.concatenate([ts.images, extra]), np.concatenate([ts.labels, ts.labels]),
                   ts.n_images, ts.n_dropped, ts.image_names)


# ----------------------------------------------------------------------------------------------- data card
def build_card(root, layout: str, label_rule: dict, sets: dict[str, TileSet], skipped: list[str], split_info: dict) -> dict:
    splits = {k: v.counts() for k, v in sets.items()}
    return {
        "format": 1,
        "data": str(Path(root).resolve()),
        "layout": layout,
        "label_rule": label_rule,
        "split_rule": split_info,
        "splits": splits,
        "class_names": ["crack_free", "crack"],
        "skipped_files": list(skipped),
    }


def card_bytes(card: dict) -> bytes:
    return (json.dumps(card, indent=2, sort_keys=True) + "\n").encode()


def card_sha256(card: dict) -> str:
    return hashlib.sha256(card_bytes(card)).hexdigest()


def format_card(card: dict) -> str:
    lines = [f"data card: {card['data']} ({card['layout']} layout)",
             f"  label rule: {card['label_rule']['name']} — {card['label_rule']['text']}",
             f"  split rule: {card['split_rule']['text']}",
             f"  {'split':<6} {'images':>7} {'crack':>7} {'free':>7} {'dropped':>8} {'free/crack':>11}"]
    for name, c in card["splits"].items():
        ratio = "-" if c["neg_per_pos"] is None else f"{c['neg_per_pos']:.2f}"
        lines.append(f"  {name:<6} {c['images']:>7} {c['crack']:>7} {c['crack_free']:>7} {c['dropped']:>8} {ratio:>11}")
    if card["skipped_files"]:
        lines.append(f"  skipped files: {len(card['skipped_files'])}")
    return "\n".join(lines)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_card_png(path: Path, ts: TileSet, n_per_class: int = 8, seed: int = 0) -> None:
    """A grid of sample tiles: one row of crack tiles, one row of crack-free tiles."""
    rng = np.random.default_rng(seed)
    t = ts.images.shape[1] if len(ts) else 64
    pad = 4
    rows = []
    for lab in (1, 0):
        idx = np.flatnonzero(ts.labels == lab)
        pick = rng.permutation(idx)[:n_per_class] if len(idx) else []
        row = np.full((t + 2 * pad, n_per_class * (t + pad) + pad, 3), 255, np.uint8)
        for j, i in enumerate(pick):
            row[pad:pad + t, pad + j * (t + pad):pad + j * (t + pad) + t] = ts.images[i]
        label = "crack (1)" if lab == 1 else "crack-free (0)"
        head = np.full((24, row.shape[1], 3), 255, np.uint8)
        cv2.putText(head, f"{label}: {len(idx)} tiles in {ts.split}", (pad, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
        rows += [head, row]
    grid = np.concatenate(rows)
    ok, enc = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    atomic_write_bytes(path, enc.tobytes())


def split_rule_dict(layout: str, items: list[Item], val_fraction: float, split_seed: int) -> dict:
    if layout == "kaggle":
        text = "train/ and test/ folders"
    elif any(it.image.name.startswith(("train_", "test_")) for it in items):
        text = "file-name prefix train_/test_ (official split)"
    else:
        text = "files sorted by name: first round(n*72/118) train, rest test (CFD: 001-072 train, 073-118 test)"
    text += f"; val = {val_fraction:.0%} of the training images by image (seeded permutation, split_seed={split_seed})"
    return {"text": text, "val_fraction": val_fraction, "split_seed": split_seed}
