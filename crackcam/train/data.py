"""Crack data sets → (tile image, crack bit) pairs.

Four folder layouts are read:

* **kaggle** — the Kaggle "Crack Segmentation Dataset" layout: ``root/train/images``, ``root/train/masks``,
  ``root/test/images``, ``root/test/masks``.  A file whose name starts with ``noncrack`` is crack-free; every other
  file is a crack image.  Default label rule ``name``: one image = one sample, its bit from the file name (the
  image is resized to ``tile``×``tile``).  The tile rule below is available as an option (``label_rule="tiles"``).
* **flat** — ``root/images`` + ``root/masks`` (same stem), e.g. the shared DeepCrack and CFD sets.  Split: names
  starting with ``train_`` / ``test_`` carry it (DeepCrack's official split); otherwise the files sorted by name are
  cut at 72/118 of their number: the first ``round(n·72/118)`` are train, the rest test — for CFD exactly
  001–072 train and 073–118 test.  Every image of these sets holds cracks, so labels come from the tile rule.
* **paveseg** — road-survey frames: ``images/``, ``masks/`` (crack ∪ alligator), ``masks_multiclass/`` (0 background,
  30 crack, 60 pothole, 90 sealed crack, 120 patch, 150 alligator, 180 utility cover, 210 expansion joint),
  ``ignore/`` (areas pixel scores skip), ``labels.csv`` (frame class ``crack`` / ``sealed_crack_only`` /
  ``no_crack``) and ``clean_tiles/`` + ``clean_tiles.csv`` (crack-free tiles cut from the frames).  Split **by
  frame**, fixed (:func:`paveseg_split`): within each frame class, frames sorted by name, every 4th from the first
  is test, every 4th from the second is val, the rest train; a clean tile takes its source frame's split.
  Hard negatives (sealed cracks, patches, potholes, utility covers, joints) are crack-free tiles like any other
  (the mask holds only crack ∪ alligator); the data card counts the crack-free tiles that contain each class.
* **folders** — image-level labels only: ``root/crack/`` and ``root/no_crack/`` (also ``positive``/``negative``,
  ``cracked``/``uncracked`` …), optionally under ``train/``, ``val/``, ``test/``.  Label rule ``folder``: one
  image = one sample (resized to ``tile``×``tile``); without a ``test/`` folder, 20 % of the images (seeded, by
  image) are test, and val is carved as everywhere.

Validation images are carved from the training images **by image** (never by tile): a seeded permutation
(``split_seed``, default 0) of the sorted training images, the first ``round(val_fraction·n)`` (default 20 %) go to
``val``.  ``split`` is one of ``train``, ``val``, ``test``, ``all``.

**Tile rule** (``TileRule``): images are cut into ``tile``×``tile`` tiles on a grid with step ``stride``
(default = tile; an image smaller than a tile is reflect-padded).  The mask is read only to decide one bit:

* crack (1) — at least ``min_crack_px`` crack pixels lie at least ``border`` px inside the tile;
* crack-free (0) — no crack pixel lies within the tile grown by ``margin`` px on every side;
* otherwise the tile is dropped (ambiguous: a crack only grazes the border).

**Work scale.**  Images are resized before tiling by ``work_scale(h, w, scale, max_side)``
(:mod:`crackcam.runtime.survey`, the same rule ``crack-run`` and ``crack-eval`` apply to frames), so crack widths
in pixels match between training and inference; a clean tile is resized by its source frame's work scale.

Pixel positions never leave this module: datasets hold only uint8 tiles and their bits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import csv

import cv2
import numpy as np

from crackcam.runtime.imageio import BadInputError, list_images, read_image, read_mask
from crackcam.runtime.survey import work_scale

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
# PaveSeg multiclass values (masks_multiclass/); the hard negatives are the classes that are not cracks
PAVESEG_CLASSES = {30: "crack", 60: "pothole", 90: "sealed_crack", 120: "patch", 150: "alligator_crack",
                   180: "utility_cover", 210: "expansion_joint"}
HARD_NEGATIVES = ("pothole", "sealed_crack", "patch", "utility_cover", "expansion_joint")
FOLDER_POS = ("crack", "cracks", "cracked", "positive", "pos")
FOLDER_NEG = ("no_crack", "no-crack", "nocrack", "non_crack", "noncrack", "uncracked", "negative", "neg")


@dataclass
class Item:
    image: Path
    mask: Path | None
    split: str  # train / val / test
    name_label: int | None = None  # image-level bit (kaggle: file name; folders: folder; paveseg: frame class)
    ignore: Path | None = None  # paveseg: areas pixel scores skip
    multiclass: Path | None = None  # paveseg: the original multiclass label
    image_label: str | None = None  # paveseg: crack / sealed_crack_only / no_crack; clean_tile for clean tiles
    frame: str | None = None  # the source frame's stem (clean tiles), else the image's own stem
    frame_shape: tuple | None = None  # clean tiles: (H, W) of the source frame (its work scale applies)

    @property
    def stem(self) -> str:
        return self.image.stem

    @property
    def is_tile(self) -> bool:
        return self.image_label == "clean_tile"


def scored_pixels(it: Item, shape, survey) -> np.ndarray | None:
    """The pixels of ``it`` that pixel scores count: inside the ROI of ``survey`` (a ``SurveyConfig``) and outside
    its ``ignore/`` mask (None = every pixel).  Evaluation, calibration and the distillation's validation use it."""
    from crackcam.runtime.survey import roi_mask

    valid = roi_mask(shape, survey)
    if it.ignore is not None:
        ign = read_mask(it.ignore, shape)
        valid = ~ign if valid is None else (valid & ~ign)
    return valid


def detect_layout(root: str | os.PathLike) -> str:
    root = Path(root)
    if not root.exists():
        raise BadInputError(root, "data folder not found")
    if not root.is_dir():
        raise BadInputError(root, "not a folder")
    if (root / "train" / "images").is_dir():
        return "kaggle"
    if (root / "images").is_dir():
        if (root / "labels.csv").is_file() or (root / "masks_multiclass").is_dir() or (root / "clean_tiles").is_dir():
            return "paveseg"
        return "flat"
    if _class_dirs(root) or any(_class_dirs(root / s) for s in ("train", "val", "test")):
        return "folders"
    raise BadInputError(root, "no data found: expected images/ + masks/ (flat layout), train/images + "
                              "test/images (Kaggle layout), or crack/ + no_crack/ folders (image labels)")


def _class_dirs(d: Path) -> tuple[Path, Path] | None:
    """(crack folder, crack-free folder) directly inside ``d``, or None."""
    if not d.is_dir():
        return None
    subs = {p.name.lower(): p for p in d.iterdir() if p.is_dir()}
    pos = next((subs[n] for n in FOLDER_POS if n in subs), None)
    neg = next((subs[n] for n in FOLDER_NEG if n in subs), None)
    return (pos, neg) if pos is not None and neg is not None else None


def paveseg_split(labels: dict[str, str]) -> dict[str, str]:
    """The fixed by-frame split of a PaveSeg folder: ``{frame stem: split}``.  Within each frame class
    (``labels.csv`` image_label), frames sorted by name: index % 4 == 0 → test, == 1 → val, else train."""
    out = {}
    by: dict[str, list[str]] = {}
    for stem, lab in labels.items():
        by.setdefault(lab, []).append(stem)
    for lab, stems in by.items():
        for i, stem in enumerate(sorted(stems)):
            out[stem] = "test" if i % 4 == 0 else "val" if i % 4 == 1 else "train"
    return out


PAVESEG_SPLIT_TEXT = ("by frame, fixed: within each labels.csv image class, frames sorted by name, every 4th from "
                      "the first is test, every 4th from the second is val, the rest train; clean tiles take "
                      "their source frame's split")


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise BadInputError(path, f"cannot read CSV ({exc})") from None


def _paveseg_items(root: Path) -> list[Item]:
    imgs = list_images(root / "images")
    labels: dict[str, str] = {}
    if (root / "labels.csv").is_file():
        for r in _read_csv(root / "labels.csv"):
            name = (r.get("image") or "").strip()
            if not name or "image_label" not in r:
                raise BadInputError(root / "labels.csv", "needs the columns image and image_label")
            labels[Path(name).stem] = r["image_label"].strip()
    for p in imgs:  # frames missing from labels.csv: class from the mask (crack / no_crack)
        if p.stem not in labels:
            m = _mask_for(root / "masks", p)
            labels[p.stem] = "crack" if m is not None and read_mask(m).any() else "no_crack"
    split = paveseg_split({p.stem: labels[p.stem] for p in imgs})
    items = []
    shapes: dict[str, tuple] = {}
    for p in imgs:
        lab = labels[p.stem]
        items.append(Item(p, _mask_for(root / "masks", p), split[p.stem], int(lab == "crack"),
                          ignore=_mask_for(root / "ignore", p) if (root / "ignore").is_dir() else None,
                          multiclass=_mask_for(root / "masks_multiclass", p)
                          if (root / "masks_multiclass").is_dir() else None,
                          image_label=lab, frame=p.stem))
    tiles_dir = root / "clean_tiles"
    if tiles_dir.is_dir():
        src = {}
        if (root / "clean_tiles.csv").is_file():
            src = {Path(r.get("file", "")).stem: (r.get("source_image") or "").strip()
                   for r in _read_csv(root / "clean_tiles.csv")}
        frames = {p.stem: p for p in imgs}
        for t in list_images(tiles_dir):
            f = src.get(t.stem)
            if f is None or f not in frames:
                raise BadInputError(t, "clean tile without a source frame in clean_tiles.csv (needed to split "
                                       "by frame)")
            if f not in shapes:
                shapes[f] = read_image(frames[f]).shape[:2]
            items.append(Item(t, None, split[f], 0, image_label="clean_tile", frame=f, frame_shape=shapes[f]))
    return items


def _folder_items(root: Path, val_fraction: float, split_seed: int) -> tuple[list[Item], bool]:
    """Items of the crack/ + no_crack/ layout; returns (items, has_test_folder)."""
    items: list[Item] = []
    subs = [s for s in ("train", "val", "test") if _class_dirs(root / s)]
    roots = [(root / s, s) for s in subs] if subs else [(root, "train")]
    for d, sp in roots:
        pos, neg = _class_dirs(d)
        for folder, lab in ((pos, 1), (neg, 0)):
            for p in list_images(folder):
                items.append(Item(p, None, sp, lab, frame=p.stem))
    has_test = "test" in subs
    if not has_test:  # carve a test split by image: 20 %, seeded
        train = [it for it in items if it.split == "train"]
        order = np.random.default_rng([split_seed, 17]).permutation(len(train))
        for i in order[:int(round(0.2 * len(train)))] if len(train) >= 3 else []:
            train[int(i)].split = "test"
    return items, has_test


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
    carve = True
    if layout == "paveseg":
        items = _paveseg_items(root)
        carve = False
    elif layout == "folders":
        items, _ = _folder_items(root, val_fraction, split_seed)
        carve = not any(it.split == "val" for it in items)
    elif layout == "kaggle":
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
    if carve:
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
    hard: np.ndarray | None = None  # bool per tile: a crack-free tile holding a hard negative (paveseg)
    hard_counts: dict = field(default_factory=dict)  # crack-free tiles holding each hard-negative class

    def __len__(self) -> int:
        return int(len(self.labels))

    def counts(self) -> dict:
        pos = int((self.labels == 1).sum())
        neg = int((self.labels == 0).sum())
        out = {"images": self.n_images, "crack": pos, "crack_free": neg, "dropped": self.n_dropped,
               "total": pos + neg, "neg_per_pos": round(neg / pos, 4) if pos else None,
               "crack_fraction": round(pos / (pos + neg), 4) if pos + neg else None}
        if self.hard is not None:
            out["hard_negative_tiles"] = int(self.hard.sum())
            out["hard_negatives"] = dict(sorted(self.hard_counts.items()))
        return out


def concat_sets(sets: list[TileSet]) -> TileSet:
    """One TileSet from several (mixed data sets); hard-negative flags are kept where a set has them."""
    sets = [t for t in sets if t is not None]
    if len(sets) == 1:
        return sets[0]
    hard = None
    if any(t.hard is not None for t in sets):
        hard = np.concatenate([t.hard if t.hard is not None else np.zeros(len(t), bool) for t in sets])
    counts: dict = {}
    for t in sets:
        for k, v in t.hard_counts.items():
            counts[k] = counts.get(k, 0) + v
    tile = sets[0].images.shape[1:]
    imgs = [t.images for t in sets if len(t)]
    return TileSet(sets[0].split, np.concatenate(imgs) if imgs else np.zeros((0,) + tile, np.uint8),
                   np.concatenate([t.labels for t in sets]), sum(t.n_images for t in sets),
                   sum(t.n_dropped for t in sets), [n for t in sets for n in t.image_names], hard, counts)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _resize(a: np.ndarray, s: float, interp) -> np.ndarray:
    if s == 1.0:
        return a
    h, w = a.shape[:2]
    return cv2.resize(a, (max(1, round(w * s)), max(1, round(h * s))), interpolation=interp)


def scaled_mask(mask: np.ndarray, s: float) -> np.ndarray:
    """A bool mask at work scale ``s``: a pixel is crack when at least a quarter of its area was."""
    if s == 1.0:
        return np.asarray(mask, bool)
    return _resize(np.asarray(mask, np.uint8) * 255, s, cv2.INTER_AREA) >= 64


def load_split(items: list[Item], split: str, label_rule: str, rule: TileRule, *, max_tiles: int | None = None,
               seed: int = 0, skipped: list[str] | None = None, progress: bool = False, scale: float = 1.0,
               max_side: int | None = None) -> TileSet:
    """Read the images of ``split`` and make their tiles (or resized whole images for the name/folder rule).

    Before tiling, an image is resized by its work scale (``scale``, ``max_side``; a clean tile by its source
    frame's).  A single bad file (unreadable, truncated, missing mask, mask size mismatch) is skipped with a
    warning line (and its message appended to ``skipped``).
    """
    sel = [it for it in items if it.split == split]
    tiles: list[np.ndarray] = []
    labs: list[np.ndarray] = []
    hards: list[np.ndarray] = []
    hard_counts: dict[str, int] = {}
    names: list[str] = []
    dropped = 0
    any_multiclass = any(it.multiclass is not None for it in sel)
    it_iter = sel
    if progress and len(sel) > 20:
        from tqdm import tqdm

        it_iter = tqdm(sel, desc=f"reading {split}", unit="img", leave=False, disable=None)
    for it in it_iter:
        try:
            img = read_image(it.image)
            if label_rule in ("name", "folder"):
                if it.name_label is None:
                    raise BadInputError(it.image, f"the {label_rule} rule needs image-level labels (Kaggle "
                                                  f"noncrack* names or crack/ + no_crack/ folders)")
                t = rule.tile
                interp = cv2.INTER_AREA if min(img.shape[:2]) > t else cv2.INTER_LINEAR
                tiles.append(cv2.resize(img, (t, t), interpolation=interp)[None])
                labs.append(np.array([it.name_label], np.int64))
                hards.append(np.zeros(1, bool))
            else:
                if it.mask is None:
                    if it.name_label == 0:  # crack-free by name, folder or as a clean tile: no mask needed
                        mask = np.zeros(img.shape[:2], bool)
                    else:
                        raise BadInputError(it.image, "no mask with the same stem in masks/ (needed for tile labels)")
                else:
                    mask = read_mask(it.mask, img.shape)
                fh, fw = it.frame_shape or img.shape[:2]
                s = work_scale(fh, fw, scale, max_side)
                img = _resize(img, s, cv2.INTER_AREA)
                mask = scaled_mask(mask, s)
                origins, lab = tile_labels(mask, rule)
                keep = lab >= 0
                dropped += int((~keep).sum())
                kept = [o for o, k in zip(origins, keep) if k]
                tiles.append(cut_tiles(img, kept, rule.tile))
                labs.append(lab[keep])
                hards.append(_hard_flags(it, kept, lab[keep], rule.tile, s, img.shape[:2], hard_counts))
            names.append(it.image.name)
        except BadInputError as exc:
            warn(f"skipping {exc}")
            if skipped is not None:
                skipped.append(str(exc))
    t = rule.tile
    images = np.concatenate(tiles) if tiles else np.zeros((0, t, t, 3), np.uint8)
    labels = np.concatenate(labs) if labs else np.zeros((0,), np.int64)
    hard = np.concatenate(hards) if hards else np.zeros((0,), bool)
    if max_tiles is not None and len(labels) > max_tiles:
        keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:max_tiles])
        images, labels, hard = images[keep], labels[keep], hard[keep]
    return TileSet(split, np.ascontiguousarray(images), labels, len(names), dropped, names,
                   hard if any_multiclass else None, hard_counts)


def _hard_flags(it: Item, origins, labels, tile: int, s: float, shape, counts: dict) -> np.ndarray:
    """Per kept tile: a crack-free tile holding a hard-negative class of the multiclass mask (counted by class)."""
    flags = np.zeros(len(origins), bool)
    if it.multiclass is None or not len(origins):
        return flags
    mc = read_mask_values(it.multiclass)
    mc = _resize(mc, s, cv2.INTER_NEAREST)
    if mc.shape[:2] != tuple(shape):
        raise BadInputError(it.multiclass, f"size {mc.shape[1]}x{mc.shape[0]} differs from the image's")
    mc = _pad_to(mc, tile)
    hard_vals = {v: n for v, n in PAVESEG_CLASSES.items() if n in HARD_NEGATIVES}
    for i, ((y, x), lab) in enumerate(zip(origins, labels)):
        if lab != 0:
            continue
        present = set(np.unique(mc[y:y + tile, x:x + tile]).tolist()) & set(hard_vals)
        if present:
            flags[i] = True
            for v in present:
                counts[hard_vals[v]] = counts.get(hard_vals[v], 0) + 1
    return flags


def read_mask_values(path: Path) -> np.ndarray:
    """A single-channel label image as uint8 values (multiclass masks)."""
    data = np.fromfile(str(path), np.uint8) if Path(path).is_file() else None
    if data is None or not data.size:
        raise BadInputError(path, "file not found or empty")
    m = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if m is None:
        raise BadInputError(path, "not a readable image")
    if m.ndim == 3:
        m = m[..., 0]
    return m.astype(np.uint8, copy=False)


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


def photometric_tile(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random brightness (×0.6–1.4), contrast (×0.7–1.3 about the mean), gamma (0.7–1.4) and, half the time, a
    light blur or sensor noise: survey frames range from dark wet asphalt to sun-bleached concrete, and a crack is
    a crack in all of them.  Pixels move, the label does not."""
    x = tile.astype(np.float32)
    m = float(x.mean())
    x = (x - m) * rng.uniform(0.7, 1.3) + m * rng.uniform(0.6, 1.4)
    x = np.clip(x, 0, 255)
    g = rng.uniform(0.7, 1.4)
    x = 255.0 * (x / 255.0) ** g
    r = rng.random()
    if r < 0.25:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.5, 1.0))
    elif r < 0.5:
        x = x + rng.normal(0, rng.uniform(2, 6), x.shape).astype(np.float32)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


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


def mixed_card(cards: list[dict], skipped: list[str], splits: dict | None = None) -> dict:
    """The data card of several sets mixed in one run: each set's own card under ``sets`` (each split by its
    own rule), ``splits`` the pooled counts where the caller has them."""
    card = {"format": 1, "data": [c["data"] for c in cards], "layout": "mixed",
            "label_rule": {"name": "mixed", "text": "; ".join(f"{Path(c['data']).name}: {c['label_rule']['name']}"
                                                             for c in cards)},
            "split_rule": {"text": "each set split by its own rule (see sets)"}}
    if splits is not None:
        card["splits"] = splits
    card.update({"class_names": ["crack_free", "crack"], "sets": cards, "skipped_files": list(skipped)})
    return card


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
