"""The training loop behind ``crack-train``: tiles in memory → classifier, validation every epoch, best/last
checkpoints, metrics.json / curves.png / config.json / data card, resumable after Ctrl-C.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from crackcam.models import create_model, get_spec
from crackcam.models.checkpoint import atomic_torch_save, atomic_write_bytes, save_state_dict, write_json
from crackcam.runtime.imageio import BadInputError
from crackcam.runtime.progress import mode as progress_mode

from . import data as D
from .metrics import binary_metrics


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C (or a ``stop_after`` hook) once everything finished so far is saved."""

    def __init__(self, msg: str, epochs_done: int):
        super().__init__(msg)
        self.epochs_done = epochs_done


@dataclass
class TrainConfig:
    data: str | list | None  # None → the embedded synthetic set, drawn into OUT/synthetic_data; a list = mixed sets
    out: str
    model: str = "simple_cnn"
    epochs: int = 0  # 0 → auto: about AUTO_TILE_STEPS tile presentations, clamped to [AUTO_MIN, AUTO_MAX]
    batch: int = 0  # 0 → auto: 64 from 1000 training tiles, 32 from 400, else 16
    lr: float = 0.0  # 0 → 3e-3 from scratch, 1e-3 with pretrained weights
    weight_decay: float = 1e-4
    tile: int = 128
    stride: int = 0  # 0 → tile (val/test tiles never overlap)
    train_stride: int = 0  # 0 → tile // 2 (training tiles overlap by half)
    min_crack_px: int = 40
    border: int = 8
    margin: int = 16
    label_rule: str = "auto"  # auto | tiles | name | folder
    scale: float = 1.0  # work scale: images are resized by this before tiling (survey frames: crack widths)
    max_side: int | None = None  # and further so that the longer side is at most this
    hard_repeat: int = 1  # hard-negative tiles (sealed cracks, patches, ...) appear this many times in training
    val_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0
    pretrained: bool | None = None  # None → True where the model has weights
    weights: str | None = None
    augment: bool = True
    photometric: bool = False  # brightness / contrast / gamma / blur / noise jitter of every training tile
    double: bool = False
    max_tiles: int | None = None
    workers: int = 0
    device: str = "auto"
    threads: int | None = None
    resume: bool = False
    overwrite: bool = False
    test: bool = True
    progress: bool = True
    model_kwargs: dict = field(default_factory=dict)


AUTO_TILE_STEPS = 24_000
AUTO_MIN, AUTO_MAX = 4, 40
SYNTH_PER_CLASS = 250  # the embedded default set (no --data): 250 crack + 250 crack-free images
SYNTH_EPOCHS = 8
SYNTH_PAINT = 0.35  # share of drawn images with a painted lane line (hard negatives, as on survey frames)

# values in a resumed run that must match the saved ones
_RESUME_KEYS = ("model", "tile", "stride", "train_stride", "min_crack_px", "border", "margin", "label_rule",
                "val_fraction", "split_seed", "seed", "batch", "augment", "double", "max_tiles", "scale", "max_side",
                "hard_repeat", "photometric")


class TileDataset(Dataset):
    """(tile uint8 H×W×3 tensor, bit float) pairs; optional random rot90 + flips, deterministic per (seed, epoch, i)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool = False, seed: int = 0,
                 photometric: bool = False):
        self.images, self.labels, self.augment, self.seed, self.epoch = images, labels, augment, seed, 0
        self.photometric = photometric

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        t = self.images[i]
        if self.augment or self.photometric:
            rng = np.random.default_rng([self.seed, self.epoch, int(i)])
            if self.augment:
                t = D.augment_tile(t, rng)
            if self.photometric:
                t = D.photometric_tile(t, rng)
        return torch.from_numpy(np.ascontiguousarray(t)), torch.tensor(float(self.labels[i]))


def to_input(batch_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device, channels_last: bool):
    """uint8 N×H×W×3 RGB → normalised float N×3×H×W on ``device``."""
    x = batch_u8.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError("--device", f"{name} requested but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].copy(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    random.setstate(st["python"])


def auto_batch(n_train: int) -> int:
    """Smaller batches for small sets: enough optimiser steps (and BatchNorm updates) per run."""
    return 64 if n_train >= 1000 else (32 if n_train >= 400 else 16)


def auto_epochs(n_train: int, pretrained: bool = False) -> int:
    """About AUTO_TILE_STEPS tile presentations (half with ImageNet weights), at least AUTO_MIN (2) epochs."""
    budget = AUTO_TILE_STEPS // 2 if pretrained else AUTO_TILE_STEPS
    lo = 2 if pretrained else AUTO_MIN
    return int(min(AUTO_MAX, max(lo, round(budget / max(1, n_train)))))


@torch.no_grad()
def predict(model, images: np.ndarray, mean, std, device, channels_last, batch: int = 128) -> np.ndarray:
    model.eval()
    out = []
    for s in range(0, len(images), batch):
        x = to_input(torch.from_numpy(images[s:s + batch]), mean, std, device, channels_last)
        out.append(torch.sigmoid(model(x).float()).squeeze(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _loss_of(prob: np.ndarray, y: np.ndarray, pos_weight: float) -> float:
    p = np.clip(prob.astype(np.float64), 1e-7, 1 - 1e-7)
    y = y.astype(np.float64)
    return float(np.mean(-(pos_weight * y * np.log(p) + (1 - y) * np.log(1 - p)))) if len(y) else float("nan")


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    ax[0].plot(ep, [h["val"]["loss"] for h in history], "o-", label="val loss")
    ax[0].set_xlabel("epoch"); ax[0].legend(); ax[0].set_title("loss (pos-weighted BCE)")
    for k in ("accuracy", "precision", "recall", "f1", "auc"):
        ax[1].plot(ep, [np.nan if h["val"][k] is None else h["val"][k] for h in history], "o-", label=k)
    ax[1].set_xlabel("epoch"); ax[1].legend(fontsize=8); ax[1].set_title("validation (tile labels)")
    ax[1].set_ylim(max(0.0, min([0.5] + [h["val"]["f1"] for h in history]) - 0.05), 1.0)
    ax[2].plot(ep, [h["lr"] for h in history], "o-")
    ax[2].set_xlabel("epoch"); ax[2].set_title("learning rate (end of epoch)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _pretrained_arg(cfg: TrainConfig):
    if cfg.weights:
        if not Path(cfg.weights).is_file():
            raise BadInputError(cfg.weights, "weights file not found")
        return str(cfg.weights)
    if cfg.pretrained is None:  # default: ImageNet weights where the model has a source for them
        return bool(get_spec(cfg.model).pretrained_hint)
    return bool(cfg.pretrained)


def _rule_for(layout: str, requested: str, root: Path) -> str:
    if requested == "auto":
        return {"kaggle": "name", "folders": "folder"}.get(layout, "tiles")
    if requested == "name" and layout != "kaggle":
        raise BadInputError(root, "label rule 'name' needs the Kaggle layout (noncrack* file names)")
    if requested == "folder" and layout != "folders":
        raise BadInputError(root, "label rule 'folder' needs crack/ + no_crack/ folders")
    if requested == "tiles" and layout == "folders":
        raise BadInputError(root, "label rule 'tiles' needs masks; crack/ + no_crack/ folders have image labels "
                                  "only (use --label-rule folder)")
    return requested


def data_roots(cfg: TrainConfig) -> list[str | None]:
    """The training data folders of ``cfg`` (``[None]`` = the embedded synthetic set)."""
    if cfg.data is None:
        return [None]
    return [cfg.data] if isinstance(cfg.data, str) else list(cfg.data)


def prepare_data(cfg: TrainConfig, out: Path, log=print):
    """Read the data set(s), make tiles/bits for train/val/test, write the data card.  Several sets (``cfg.data``
    a list) are read one by one (each with its own layout, label rule and split) and concatenated; the card
    reports each set.  Returns (sets, card, sha, info)."""
    per_set, cards, skipped = [], [], []
    stride = cfg.stride or cfg.tile
    base = dict(tile=cfg.tile, min_crack_px=cfg.min_crack_px, border=cfg.border, margin=cfg.margin)
    for spec in data_roots(cfg):
        if spec is None:
            from .synth import write_synthetic_dataset

            root = out / "synthetic_data"
            if not (root / "train" / "images").is_dir():
                log(f"no --data given: drawing the embedded synthetic crack set into {root}")
                write_synthetic_dataset(root, n_crack=SYNTH_PER_CLASS, n_free=SYNTH_PER_CLASS,
                                        size=(cfg.tile, cfg.tile), layout="kaggle", seed=1234, paint=SYNTH_PAINT)
        else:
            root = Path(spec)
        layout = D.detect_layout(root)
        items = D.list_items(root, "all", val_fraction=cfg.val_fraction, split_seed=cfg.split_seed, layout=layout)
        rule_name = _rule_for(layout, cfg.label_rule, root)
        train_stride = cfg.train_stride or (cfg.tile // 2 if rule_name == "tiles" else cfg.tile)
        rule_eval = D.TileRule(stride=stride, **base)
        rule_train = D.TileRule(stride=train_stride, **base)
        if rule_name == "tiles":
            label_rule = rule_eval.as_dict()
            label_rule["train_stride"] = train_stride
            label_rule["text"] += f" (training tiles step {train_stride}px)"
            if layout == "paveseg":
                label_rule["text"] += ("; the mask is crack + alligator crack: sealed cracks, patches, potholes, "
                                       "utility covers and joints (masks_multiclass/) are crack-free tiles")
        elif rule_name == "folder":
            label_rule = {"name": "folder", "tile": int(cfg.tile),
                          "text": f"image-level bit from the folder (crack/ = 1, no_crack/ = 0); image resized to "
                                  f"{cfg.tile}x{cfg.tile}"}
        else:
            label_rule = D.name_rule_dict(cfg.tile)
        if cfg.scale != 1.0 or cfg.max_side:
            label_rule["work_scale"] = {"scale": cfg.scale, "max_side": cfg.max_side}
            label_rule["text"] += (f"; images resized first by the work scale (scale {cfg.scale:g}"
                                   + (f", longer side at most {cfg.max_side}px" if cfg.max_side else "") + ")")
        sets = {}
        for split in ("train", "val", "test"):
            if split == "test" and not cfg.test:
                continue
            rule = rule_train if split == "train" else rule_eval
            sets[split] = D.load_split(items, split, rule_name, rule,
                                       max_tiles=cfg.max_tiles if split == "train" else None, seed=cfg.seed,
                                       skipped=skipped, progress=cfg.progress, scale=cfg.scale,
                                       max_side=cfg.max_side)
        split_info = D.split_rule_dict(layout, items, cfg.val_fraction, cfg.split_seed)
        card = D.build_card(root, layout, label_rule, sets, [], split_info)
        per_set.append({"root": root, "layout": layout, "rule_name": rule_name, "label_rule": label_rule,
                        "sets": sets, "items": items})
        cards.append(card)
    sets = {k: D.concat_sets([ps["sets"][k] for ps in per_set]) for k in per_set[0]["sets"]}
    roots = ", ".join(str(ps["root"]) for ps in per_set)
    n_good = sum(ts.n_images for ts in sets.values())
    if n_good == 0:
        raise BadInputError(roots, "no readable images (every file was skipped)")
    if len(sets["train"]) == 0:
        raise BadInputError(roots, "no training tiles (no readable training images, or every tile was dropped)")
    if len(set(sets["train"].labels.tolist())) < 2:
        raise BadInputError(roots, "training tiles hold only one class; adjust --tile/--min-crack-px/--margin")
    if len(sets["val"]) == 0:
        raise BadInputError(roots, "no validation tiles (too few training images to carve a validation split)")
    if len(cards) == 1:
        card = dict(cards[0])
        card["skipped_files"] = list(skipped)
    else:
        card = D.mixed_card(cards, skipped, splits={k: v.counts() for k, v in sets.items()})
    if cfg.max_tiles:
        card["max_train_tiles"] = cfg.max_tiles
    sha = D.card_sha256(card)
    atomic_write_bytes(out / "data_card.json", D.card_bytes(card))
    D.write_card_png(out / "data_card.png", sets["train"], seed=cfg.seed)
    first = per_set[0]
    info = {"root": str(first["root"]), "roots": [str(ps["root"]) for ps in per_set],
            "layout": first["layout"] if len(per_set) == 1 else "mixed",
            "label_rule": first["label_rule"] if len(per_set) == 1 else card["label_rule"],
            "rule_name": first["rule_name"], "sets": [
                {"data": str(Path(ps["root"]).resolve()), "layout": ps["layout"], "label_rule": ps["label_rule"],
                 "splits": {k: v.counts() for k, v in ps["sets"].items()}} for ps in per_set],
            "splits": {k: sorted({f"{Path(ps['root']).name}/{it.image.name}" if len(per_set) > 1 else it.image.name
                                  for ps in per_set for it in ps["items"] if it.split == k})
                       for k in ("train", "val", "test")}}
    return sets, card, sha, info


def repeat_hard(ts: D.TileSet, times: int) -> D.TileSet:
    """The training set with every hard-negative tile (crack-free tile holding a sealed crack, patch, …)
    present ``times`` times."""
    if times <= 1 or ts.hard is None or not ts.hard.any():
        return ts
    idx = np.flatnonzero(ts.hard)
    extra = np.repeat(idx, times - 1)
    keep = np.concatenate([np.arange(len(ts)), extra])
    return D.TileSet(ts.split, ts.images[keep], ts.labels[keep], ts.n_images, ts.n_dropped, ts.image_names,
                     ts.hard[keep], ts.hard_counts)


class Dist:
    """This process's place in a ``torchrun`` job (``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` from the environment);
    world 1 when not launched by torchrun.  NCCL on GPUs, gloo on CPU."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.on = self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> torch.device:
        if not self.on:
            return device
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device(f"cuda:{self.local_rank}")
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # rank 0 prepares the data (tiles, pseudo-masks) while the others wait at a barrier: allow hours
            from datetime import timedelta

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=3))
        return device

    @property
    def backend(self) -> str:
        import torch.distributed as dist

        return dist.get_backend() if self.on and dist.is_initialized() else "none"

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """What training calls: the model itself, or (under torchrun) its DistributedDataParallel wrapper —
        gradients all-reduced each step, every rank holding the same weights."""
        if not self.on:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def record(self, batch_per_process: int) -> dict:
        """The ``distributed`` block of metrics.json."""
        return {"world_size": self.world, "backend": self.backend, "batch_per_process": batch_per_process}

    def barrier(self) -> None:
        if self.on:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.on:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def run_distributed(body, log=print):
    """``body(log, dist)`` in this process's place of a torchrun job (world 1 without one): only rank 0 logs; the
    process group is closed and torch's thread count restored afterwards (``--threads`` applies to the call only)."""
    prev_threads = torch.get_num_threads()
    dist = Dist()
    try:
        return body(log if dist.main else (lambda m: None), dist)
    finally:
        dist.close()
        if torch.get_num_threads() != prev_threads:
            torch.set_num_threads(prev_threads)


def train(cfg: TrainConfig, stop_after: int | None = None, log=print) -> dict:
    """Run (or resume) a training.  Returns the metrics dict.  Raises TrainingInterrupted on Ctrl-C / stop hook,
    BadInputError for bad data (nothing already written is lost).  ``cfg.threads`` applies to this call only."""
    return run_distributed(lambda lg, dist: _train(cfg, stop_after, lg, dist), log)


def _train(cfg: TrainConfig, stop_after: int | None, log, dist: Dist | None = None) -> dict:
    dist = dist or Dist()
    out = Path(cfg.out)
    spec = get_spec(cfg.model)  # unknown model → ValueError before anything is written
    state_path = out / "train_state.pt"
    if cfg.resume:
        if not state_path.is_file():
            raise BadInputError(state_path, "nothing to resume (no train_state.pt in the output folder)")
        saved = json.loads((out / "config.json").read_text())["train_config"]
        for k in _RESUME_KEYS:
            v = getattr(cfg, k)
            if k in saved and saved[k] != v:
                if not (v is None or v == "auto" or (type(v) is int and v == 0)):
                    log(f"resume: using the saved {k}={saved[k]!r} (not {v!r})")
                setattr(cfg, k, saved[k])
        for k in ("epochs", "lr", "data", "weight_decay", "model_kwargs"):
            setattr(cfg, k, saved[k])
    elif dist.main and ((out / "metrics.json").exists() or state_path.exists()):
        if not cfg.overwrite:
            raise BadInputError(out, "already holds a training run; pass --resume to continue it or "
                                     "--overwrite to start again (or choose another --out)")
        for name in ("best.pt", "last.pt", "train_state.pt", "metrics.json", "curves.png", "config.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = dist.init(resolve_device(cfg.device))
    seed_everything(cfg.seed)

    t0 = time.time()
    if dist.on and not dist.main:
        dist.barrier()  # rank 0 prepares (and, for the default set, draws) the data first
    sets, card, sha, info = prepare_data(cfg, out, log)
    if dist.on and dist.main:
        dist.barrier()
    log(D.format_card(card))
    log(f"label rule: {info['label_rule']['name']} — {info['label_rule']['text']}")
    tr, va = sets["train"], sets["val"]
    if cfg.hard_repeat > 1:
        tr = repeat_hard(tr, cfg.hard_repeat)
        log(f"--hard-repeat {cfg.hard_repeat}: hard-negative tiles repeated → {len(tr)} training tiles")
    if cfg.double:
        tr = D.double_with_augmented(tr, cfg.seed)
        log(f"--double: training set doubled with rotated/flipped copies → {len(tr)} tiles")
    n_pos, n_neg = int((tr.labels == 1).sum()), int((tr.labels == 0).sum())
    pos_weight = n_neg / max(1, n_pos)
    pre = _pretrained_arg(cfg)
    if cfg.model == "simple_cnn" and "widths" not in cfg.model_kwargs:  # record the widths in config.json
        from crackcam.models.nets import SIMPLE_WIDTHS

        cfg.model_kwargs = {**cfg.model_kwargs, "widths": list(SIMPLE_WIDTHS)}
    model = create_model(cfg.model, pretrained=pre, **cfg.model_kwargs)
    pretrained_source = getattr(model, "pretrained_source", None)
    epochs = cfg.epochs or (SYNTH_EPOCHS if cfg.data is None else auto_epochs(len(tr), bool(pretrained_source)))
    cfg.epochs = epochs
    lr = cfg.lr or (1e-3 if pretrained_source else 3e-3)
    cfg.lr = lr
    channels_last = device.type == "cpu"
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)

    cfg.batch = cfg.batch or auto_batch(len(tr))
    ds = TileDataset(tr.images, tr.labels, augment=cfg.augment, seed=cfg.seed, photometric=cfg.photometric)
    # torchrun: each process takes batch / world tiles per step (the global batch, the steps per epoch and the
    # learning-rate schedule stay those of one process)
    proc_batch = max(1, cfg.batch // dist.world)
    steps_per_epoch = ((len(ds) + dist.world - 1) // dist.world + proc_batch - 1) // proc_batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
    crit = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight], device=device))

    history: list[dict] = []
    best = {"epoch": 0, "f1": -1.0}
    start_epoch = 1
    if cfg.resume:
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        _set_rng_state(st["rng"])
        history, best = st["history"], st["best"]
        start_epoch = st["epoch"] + 1
        log(f"resuming {out} after epoch {st['epoch']} of {epochs}")

    tc = asdict(cfg)
    config = {
        "model": cfg.model, "model_kwargs": cfg.model_kwargs, "tile": cfg.tile, "stride": cfg.stride or cfg.tile,
        "mean": list(spec.mean), "std": list(spec.std), "target_layers": list(spec.target_layers),
        "label_rule": info["label_rule"], "data": str(Path(info["root"]).resolve()), "layout": info["layout"],
        "datasets": info["sets"], "work_scale": {"scale": cfg.scale, "max_side": cfg.max_side},
        "splits": {"rule": card["split_rule"], **{k: v.counts() for k, v in sets.items()}},
        "val_images": info["splits"]["val"],
        "seed": cfg.seed, "epochs": epochs, "batch": cfg.batch, "lr": lr, "optimizer": "AdamW + OneCycleLR",
        "pos_weight": pos_weight, "augment": ("rot90 + hflip + vflip" if cfg.augment else "none")
        + (" + photometric (brightness, contrast, gamma, blur/noise)" if cfg.photometric else ""),
        "double": cfg.double, "data_card_sha256": sha, "pretrained_source": pretrained_source,
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "class_names": ["crack_free", "crack"], "train_config": tc,
    }
    if dist.main:
        write_json(out / "config.json", config)
        write_json(out / "splits.json", info["splits"])
    log(f"model {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, pretrained: "
        f"{pretrained_source or 'none'}), {len(tr)} train tiles ({n_pos} crack / {n_neg} crack-free, pos_weight "
        f"{pos_weight:.2f}), {len(va)} val tiles, {epochs} epochs, batch {cfg.batch}, lr {lr:g}, device {device}")

    train_model = dist.wrap(model, device)
    if dist.on:
        log(f"distributed: {dist.world} processes ({'NCCL' if device.type == 'cuda' else 'gloo'}), "
            f"{proc_batch} tiles per step per process (global batch {proc_batch * dist.world}); rank 0 writes")

    def save_epoch_state(epoch: int) -> None:
        if not dist.main:
            return
        atomic_torch_save({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "rng": _rng_state(), "history": history, "best": best},
                          state_path)

    def write_metrics(extra: dict | None = None) -> dict:
        m = {"model": cfg.model, "epochs": epochs, "best_epoch": best["epoch"], "best_val_f1": best["f1"],
             "best_val": next((h["val"] for h in history if h["epoch"] == best["epoch"]), None),
             "label_rule": info["label_rule"]["name"], "history": history, **(extra or {})}
        if dist.on:
            m["distributed"] = dist.record(proc_batch)
        if dist.main:
            write_json(out / "metrics.json", m)
        return m

    from tqdm import tqdm

    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, epochs + 1):
            te = time.time()
            model.train()
            ds.set_epoch(epoch)
            g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            if dist.on:  # each process a disjoint 1/world share of the epoch, reshuffled per epoch
                from torch.utils.data.distributed import DistributedSampler

                sampler = DistributedSampler(ds, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                             seed=cfg.seed, drop_last=False)
                sampler.set_epoch(epoch)
                loader = DataLoader(ds, batch_size=proc_batch, sampler=sampler, num_workers=cfg.workers,
                                    drop_last=len(ds) > cfg.batch, pin_memory=device.type == "cuda")
            else:
                loader = DataLoader(ds, batch_size=cfg.batch, shuffle=True, generator=g, num_workers=cfg.workers,
                                    drop_last=len(ds) > cfg.batch, pin_memory=device.type == "cuda")
            tot, n = 0.0, 0
            bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, disable=not (cfg.progress and progress_mode() == "bar"),
                       file=sys.stderr)
            for xb, yb in bar:
                x = to_input(xb, mean, std, device, channels_last)
                y = yb.to(device).view(-1, 1)
                loss = crit(train_model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched.last_epoch < sched.total_steps - 1:
                    sched.step()
                tot += float(loss.detach()) * len(y)
                n += len(y)
                bar.set_postfix(loss=f"{tot / n:.4f}")
            bar.close()
            prob = predict(model, va.images, mean, std, device, channels_last)
            vm = binary_metrics(va.labels, prob)
            vm["loss"] = _loss_of(prob, va.labels, pos_weight)
            rec = {"epoch": epoch, "train_loss": tot / max(1, n), "val": vm, "lr": opt.param_groups[0]["lr"],
                   "seconds": round(time.time() - te, 2), "tiles_seen": n}  # by this process (rank 0 under DDP)
            history.append(rec)
            is_best = vm["f1"] > best["f1"]
            if is_best:
                best = {"epoch": epoch, "f1": vm["f1"]}
                if dist.main:
                    save_state_dict(model, out / "best.pt")
            if dist.main:
                save_state_dict(model, out / "last.pt")
            save_epoch_state(epoch)
            write_metrics()
            if dist.main:
                plot_curves(history, out / "curves.png")
            dist.barrier()  # best.pt is written before any rank reads it
            auc = "-" if vm["auc"] is None else f"{vm['auc']:.4f}"
            log(f"epoch {epoch}/{epochs}  loss {rec['train_loss']:.4f}  val loss {vm['loss']:.4f}  acc "
                f"{vm['accuracy']:.4f}  P {vm['precision']:.4f}  R {vm['recall']:.4f}  F1 {vm['f1']:.4f}  AUC {auc}"
                f"  {rec['seconds']:.0f}s{'  *best' if is_best else ''}")
            if stop_after is not None and epoch - start_epoch + 1 >= stop_after and epoch < epochs:
                raise TrainingInterrupted(f"stopped after epoch {epoch} (stop hook); finished epochs are saved in "
                                          f"{out}; continue with --resume", epoch)
    except KeyboardInterrupt:
        done = history[-1]["epoch"] if history else 0
        raise TrainingInterrupted(f"interrupted during epoch {epoch}; epochs 1..{done} are saved in {out}; "
                                  f"continue with: crack-train --out {out} --resume", done) from None

    extra = {"train_seconds": round(sum(h["seconds"] for h in history), 1)}
    if "test" in sets and len(sets["test"]):
        model.load_state_dict(torch.load(out / "best.pt", map_location=device, weights_only=True))
        prob = predict(model, sets["test"].images, mean, std, device, channels_last)
        extra["test"] = binary_metrics(sets["test"].labels, prob)
        extra["test"]["note"] = "best.pt on the test split (reported only; nothing is chosen on it)"
    m = write_metrics(extra)
    log(f"best epoch {best['epoch']}: val F1 {best['f1']:.4f}" +
        (f"; test F1 {extra['test']['f1']:.4f} AUC {extra['test']['auc'] or float('nan'):.4f}" if "test" in extra else "") +
        f"; wall {time.time() - t0:.0f}s this call; outputs in {out}")
    return m
