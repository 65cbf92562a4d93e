"""Training of UP-CrackNet (unsupervised crack maps by adversarial image restoration) on crack-free fragments.

Data: tiles cut from the training images whose one-bit tile label (the classifier's rule,
:class:`crackcam.train.data.TileRule`) says crack-free, plus every tile of ``noncrack*`` images.  Nothing else of
the masks is used.  Each sample: resize (tile·286/256) → random crop (tile) → random horizontal flip → one of the
six checkerboard masks hides 50 % of the pixels; the generator restores the tile, a PatchGAN judges
(masked input, image) pairs.

Loss of the generator: BCE adversarial + λ·(L1 + (1 − SSIM) + MSGMS + 10·style), λ = 100 (the paper's).  The style
term needs ImageNet VGG-19 weights on disk; without them it is off (one line says so).

Entry point: :func:`train_upcracknet` (``crack-train --model upcracknet``; also ``python -m
crackcam.train.upcracknet``).  Run folder: ``best.pt`` / ``last.pt`` (generator state dicts), ``config.json``
(model "upcracknet"), ``metrics.json``, ``train_state.pt`` (for ``--resume``), ``data_card.json``, ``curves.png``,
``samples/epoch_NNN.png`` (restorations of validation fragments and error maps of validation crack tiles).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from crackcam.models import upcracknet as up
from crackcam.train import data as D

PRESETS = {
    # CPU-feasible: narrow networks, 128-px tiles (7-level U-Net), a few epochs.
    # Learning rates: the released code's (train.py resets them every epoch to G 1e-3·0.99^e, D 4e-3·0.99^e with
    # Adam β (0.5, 0.999); its argparse lrG / lrD are never used) -- see lr_at().
    "cpu": {"width": 16, "tile": 128, "epochs": 20, "batch": 8, "lr": 1e-3, "lr_d": 4e-3, "schedule": "official"},
    # The paper's settings (for a GPU): ngf = ndf = 64, 256² crops (8-level U-Net), 300 epochs, batch 8.
    "official": {"width": 64, "tile": 256, "epochs": 300, "batch": 8, "lr": 1e-3, "lr_d": 4e-3,
                 "schedule": "official"},
}
LAMBDA_REC = 100.0
STYLE_WEIGHT = 10.0
RESIZE_RATIO = 286 / 256  # pix2pix: resize to 286 then random-crop 256


# ---------------------------------------------------------------------------------------------------- data
class FragmentSet(torch.utils.data.Dataset):
    """Crack-free uint8 tiles → (masked input, target) on [-1, 1], with the official augmentation."""

    def __init__(self, tiles: np.ndarray, tile: int, train: bool = True, seed: int = 0):
        self.tiles = tiles
        self.tile = tile
        self.train = train
        self.masks = torch.from_numpy(up.checkerboard_masks(tile))
        self.set_epoch(0, seed)

    def set_epoch(self, epoch: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng([seed, epoch, 17])

    def __len__(self):
        return len(self.tiles)

    def __getitem__(self, i):
        t = self.tiles[i]
        if t.shape[0] != self.tile or t.shape[1] != self.tile:
            t = cv2.resize(t, (self.tile, self.tile), interpolation=cv2.INTER_AREA)
        if self.train:
            big = int(round(self.tile * RESIZE_RATIO))
            t = cv2.resize(t, (big, big), interpolation=cv2.INTER_LINEAR)
            y0, x0 = self.rng.integers(0, big - self.tile + 1, 2)
            t = t[y0:y0 + self.tile, x0:x0 + self.tile]
            if self.rng.random() < 0.5:
                t = t[:, ::-1]
            k = int(self.rng.integers(len(self.masks)))
        else:
            k = i % len(self.masks)
        target = up.to_tensor(np.ascontiguousarray(t))[0]
        inp = up.apply_mask(target[None], self.masks[k])[0]
        return inp, target


def load_fragments(data, tile: int, *, val_fraction: float = 0.2, split_seed: int = 0,
                   max_tiles: int | None = None, seed: int = 0, max_side: int | None = None, log=print):
    """Crack-free tiles of the train and val splits (val images are carved by image, as for the classifiers),
    a few val crack tiles for the sample figure, and the data card.

    ``data``: one folder or a list of them (mixed sets: each is split by its own rule, its crack-free tiles
    pooled; ``max_tiles`` caps each set's share).  ``max_side``: the work scale, images whose longer side
    exceeds it are shrunk before tiling (as ``crack-train --max-side`` does for the classifiers)."""
    roots = [Path(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
    parts = [_fragments_of(r, tile, val_fraction=val_fraction, split_seed=split_seed, max_tiles=max_tiles,
                           seed=seed, max_side=max_side, log=log) for r in roots]
    if len(parts) == 1:
        free_train, free_val, crack_val, card = parts[0]
    else:
        def cat(k):
            arrs = [p[k] for p in parts if len(p[k])]
            return np.concatenate(arrs) if arrs else parts[0][k]

        free_train, free_val, crack_val = cat(0), cat(1), cat(2)
        cards = [p[3] for p in parts]
        card = D.mixed_card(cards, [f for c in cards for f in c["skipped_files"]])
        card["upcracknet_fragments"] = {"train": int(len(free_train)), "val": int(len(free_val)),
                                        "max_tiles": max_tiles,
                                        "per_set": {Path(c["data"]).name: c["upcracknet_fragments"] for c in cards}}
        log(f"UP-CrackNet fragments, {len(roots)} sets pooled: train {len(free_train)}, val {len(free_val)}")
    if max_side:
        card["work_scale"] = {"max_side": int(max_side)}
    if len(free_train) < MIN_FRAGMENTS:
        log(f"warning: only {len(free_train)} crack-free {tile}px training fragments — too few to train the "
            f"generator (the official run uses about 1,900 crack-free 256² patches of Crack500); use a smaller "
            f"--tile or add crack-free images")
    return free_train, free_val, crack_val, card


def _fragments_of(data, tile: int, *, val_fraction: float, split_seed: int, max_tiles: int | None, seed: int,
                  max_side: int | None, log):
    layout = D.detect_layout(data)
    items = D.list_items(data, "all", val_fraction=val_fraction, split_seed=split_seed, layout=layout)
    rule = D.TileRule(tile=tile)
    skipped: list[str] = []
    sets = {}
    for split in ("train", "val"):
        sets[split] = D.load_split(items, split, "tiles", rule, seed=seed, skipped=skipped, progress=True,
                                   max_side=max_side)
    if len(sets["train"]) == 0:
        raise D.BadInputError(data, "no training images")
    free = {k: v.images[v.labels == 0] for k, v in sets.items()}
    if max_tiles is not None:
        for k in free:
            if len(free[k]) > max_tiles:
                pick = np.sort(np.random.default_rng(seed).permutation(len(free[k]))[:max_tiles])
                free[k] = free[k][pick]
    crack_val = sets["val"].images[sets["val"].labels == 1]
    label_rule = rule.as_dict()
    label_rule["text"] += "; UP-CrackNet trains on the crack-free (0) tiles only"
    if max_side:
        label_rule["text"] += f"; images first shrunk to a longer side of at most {max_side}px (work scale)"
    card = D.build_card(data, layout, label_rule, sets, skipped,
                        D.split_rule_dict(layout, items, val_fraction, split_seed))
    card["upcracknet_fragments"] = {"train": int(len(free["train"])), "val": int(len(free["val"])),
                                    "max_tiles": max_tiles}
    log(f"UP-CrackNet fragments (crack-free {tile}px tiles) of {Path(data).name}: train {len(free['train'])} "
        f"(of {len(sets['train'])} labelled tiles from {sets['train'].n_images} images), "
        f"val {len(free['val'])} (of {len(sets['val'])} from {sets['val'].n_images} images)")
    if len(free["train"]) == 0:
        raise D.BadInputError(data, f"no crack-free {tile}px tiles in the training images")
    return free["train"], free["val"], crack_val, card


MIN_FRAGMENTS = 200  # below this many crack-free training fragments a warning says the set is too small


def lr_at(epoch: int, lr_g: float, lr_d: float, schedule: str, epochs: int) -> tuple[float, float]:
    """Learning rates of epoch ``epoch`` (0-based): ``official`` = the released train.py (lr · 0.99^epoch for G
    and D, reset at the start of every epoch); ``linear`` = decayed linearly to 0 over ``epochs`` (crackcam's
    earlier schedule)."""
    if schedule == "official":
        f = 0.99 ** epoch
    elif schedule == "linear":
        f = 1.0 - epoch / epochs
    else:
        raise ValueError(f"unknown lr schedule {schedule!r} (official | linear)")
    return lr_g * f, lr_d * f


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_json(obj, path: Path) -> None:
    D.atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _png(path: Path, rgb: np.ndarray) -> None:
    ok, enc = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    D.atomic_write_bytes(path, enc.tobytes())


def _label(img: np.ndarray, text: str) -> np.ndarray:
    head = np.full((18, img.shape[1], 3), 255, np.uint8)
    cv2.putText(head, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([head, img])


def _heat(m: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.applyColorMap((np.clip(m, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_INFERNO),
                        cv2.COLOR_BGR2RGB)


def sample_figure(G, val_free: np.ndarray, crack_tiles: np.ndarray, tile: int, epoch: int, n: int = 4) -> np.ndarray:
    """Rows: masked input | restoration | original (crack-free val fragments), then for val crack tiles:
    image | restoration | error map (full) | error map (masked)."""
    G.eval()
    pad = 4
    rows = []
    masks = torch.from_numpy(up.checkerboard_masks(tile))
    with torch.no_grad():
        for i in range(min(n, len(val_free))):
            x = up.to_tensor(val_free[i])
            xin = up.apply_mask(x, masks[(i * 2 + epoch) % 6])
            y = up.restore(G, xin)
            rows.append([up.to_uint8(xin), up.to_uint8(y), val_free[i], np.full_like(val_free[i], 255)])
        for t in crack_tiles[:n]:
            mf, rest = up.restoration_map(G, t, "full", return_restored=True)
            mm = up.restoration_map(G, t, "masked")
            rows.append([t, rest, _heat(mf), _heat(mm)])
    if not rows:
        return np.full((32, 32, 3), 255, np.uint8)
    h, w = rows[0][0].shape[:2]
    canvas = np.full((pad + len(rows) * (h + pad), pad + 4 * (w + pad), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            im = cv2.resize(im, (w, h)) if im.shape[:2] != (h, w) else im
            canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = im
    title = (f"epoch {epoch + 1}: masked input | restored | original ; crack tiles: image | restored | "
             f"error (full) | error (masked)")
    return _label(canvas, title)


def plot_curves(history: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - matplotlib is in the train extra
        return
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in ("l1", "ssim", "msgms", "style"):
        if any(h.get(k) for h in history):
            ax[0].plot(ep, [h[k] for h in history], label=k + (" (1-SSIM)" if k == "ssim" else ""))
    ax[0].plot(ep, [h["val_rec"] for h in history], "k--", label="val reconstruction")
    ax[0].set_xlabel("epoch"), ax[0].set_title("reconstruction terms (train, mean)"), ax[0].legend()
    ax[1].plot(ep, [h["d_loss"] for h in history], label="D")
    ax[1].plot(ep, [h["g_adv"] for h in history], label="G adversarial")
    ax[1].set_xlabel("epoch"), ax[1].set_title("adversarial terms"), ax[1].legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ training
def reconstruction_terms(gen, target, style_loss) -> dict:
    terms = {"l1": F.l1_loss(gen, target), "ssim": up.ssim_loss(gen, target), "msgms": up.msgms_loss(gen, target)}
    terms["style"] = style_loss(gen, target) if style_loss.enabled else gen.new_zeros(())
    terms["rec"] = terms["l1"] + terms["ssim"] + terms["msgms"] + STYLE_WEIGHT * terms["style"]
    return terms


@torch.no_grad()
def validate(G, loader, style_loss) -> float:
    G.eval()
    tot, n = 0.0, 0
    for inp, target in loader:
        t = reconstruction_terms(up.restore(G, inp), target, style_loss)
        tot += float(t["rec"]) * len(inp)
        n += len(inp)
    return tot / max(n, 1)


def train_upcracknet(data, out, epochs: int | None = None, batch: int | None = None, lr: float | None = None,
                     tile: int | None = None, seed: int = 0, resume: bool = False, *, preset: str = "cpu",
                     width: int | None = None, norm: str = "batch", val_fraction: float = 0.2, split_seed: int = 0,
                     max_tiles: int | None = None, max_val: int = 256, max_minutes: float | None = None,
                     threads: int | None = None, style: bool = True, device: str | None = None,
                     progress: bool = True, lr_d: float | None = None, schedule: str | None = None,
                     max_side: int | None = None, log=print) -> dict:
    """Train UP-CrackNet; returns the metrics dict (also written to ``out/metrics.json``).

    ``preset`` "cpu" (default) or "official" fills whatever of epochs/batch/lr/tile/width is not given.
    ``max_minutes``: stop after the epoch that passes this wall time (the state is saved: ``resume`` goes on).
    ``data`` None: a small synthetic Kaggle-layout set is written under ``out/_synthetic``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    epochs = int(epochs or p["epochs"])
    batch = int(batch or p["batch"])
    lr = float(lr or p["lr"])
    lr_d = float(lr_d or (p["lr_d"] * lr / p["lr"]))  # D keeps the preset's ratio to G (4x) unless given
    schedule = schedule or p["schedule"]
    tile = int(tile or p["tile"])
    width = int(width or p["width"])
    levels = up.levels_for(tile)
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        from crackcam.train.synth import write_synthetic_dataset

        data = write_synthetic_dataset(out / "_synthetic", n_crack=8, n_free=16, size=(tile, tile), seed=seed)
        log(f"no --data: using a synthetic crack-free set written to {data}")
    roots = [Path(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
    data = roots[0]  # the first set is the run's default evaluation set (config "data")
    torch.manual_seed(seed)

    free_train, free_val, crack_val, card = load_fragments(roots, tile,
                                                           val_fraction=val_fraction, split_seed=split_seed,
                                                           max_tiles=max_tiles, seed=seed, max_side=max_side,
                                                           log=log)
    if len(free_val) == 0:  # tiny sets: validate on (a copy of) a few training fragments
        free_val = free_train[: max(1, min(len(free_train), 8))]
        log("no crack-free validation fragments: validating on a few training fragments")
    if len(roots) > 1 and len(free_val) > max_val:  # mixed sets: every set's share, evenly spaced
        free_val = free_val[np.linspace(0, len(free_val) - 1, max_val).round().astype(int)]
    free_val = free_val[:max_val]
    card_b = D.card_bytes(card)
    D.atomic_write_bytes(out / "data_card.json", card_b)
    card_sha = D.card_sha256(card)

    G = up.UNetGenerator(width=width, levels=levels, norm=norm).to(dev)
    Dnet = up.PatchDiscriminator(width=width, norm=norm).to(dev)
    style_loss = up.make_style_loss(style, log=log).to(dev)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(Dnet.parameters(), lr=lr_d, betas=(0.5, 0.999))

    config = {
        "model": "upcracknet", "kind": "restoration", "preset": preset, "tile": tile, "width": width,
        "levels": levels, "norm": norm, "dropout_blocks": 3, "mean": list(up.MEAN), "std": list(up.STD),
        "target_layers": [], "label_rule": card["label_rule"], "data": str(data.resolve()),
        "training_sets": [str(r.resolve()) for r in roots], "max_side": max_side,
        "data_card_sha256": card_sha, "epochs": epochs, "batch": batch, "lr": lr, "lr_d": lr_d,
        "lr_schedule": {"official": "G lr·0.99^epoch, D lr_d·0.99^epoch (the released train.py)",
                        "linear": "linear to 0"}[schedule],
        "betas": [0.5, 0.999], "lambda_rec": LAMBDA_REC, "style_weight": STYLE_WEIGHT,
        "style_loss": bool(style_loss.enabled), "seed": seed, "val_fraction": val_fraction,
        "split_seed": split_seed, "fragments": card["upcracknet_fragments"],
        "masks": "checkerboard, cells tile/2, tile/4, tile/8, two complementary phases (6), 50 % hidden",
        "augmentation": f"resize {int(round(tile * RESIZE_RATIO))} + random crop {tile} + horizontal flip",
        "variants": ["full", "masked"], "hidden_value": up.HIDDEN_VALUE,
        "train_config": {"val_fraction": val_fraction, "split_seed": split_seed},
    }
    _atomic_json(config, out / "config.json")

    train_set = FragmentSet(free_train, tile, train=True, seed=seed)
    val_loader = torch.utils.data.DataLoader(FragmentSet(free_val, tile, train=False), batch_size=batch)
    state_path = out / "train_state.pt"
    start_epoch, best, best_epoch, history = 0, math.inf, None, []
    elapsed_before = 0.0
    if resume and state_path.is_file():
        st = torch.load(state_path, map_location=dev, weights_only=False)
        G.load_state_dict(st["G"]), Dnet.load_state_dict(st["D"])
        opt_g.load_state_dict(st["opt_g"]), opt_d.load_state_dict(st["opt_d"])
        start_epoch, best, best_epoch = st["epoch"], st["best"], st.get("best_epoch")
        history, elapsed_before = st["history"], st.get("elapsed_s", 0.0)
        torch.set_rng_state(st["torch_rng"])
        log(f"resuming {out} after epoch {start_epoch} (best val reconstruction {best:.4f})")
    elif resume:
        log(f"--resume: no {state_path.name} in {out}; starting from scratch")

    bce = torch.nn.BCEWithLogitsLoss()
    t0 = time.time()
    interrupted = False
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, epochs):
            cur_lr, cur_lr_d = lr_at(epoch, lr, lr_d, schedule, epochs)
            for o, v in ((opt_g, cur_lr), (opt_d, cur_lr_d)):
                for g in o.param_groups:
                    g["lr"] = v
            train_set.set_epoch(epoch, seed)
            gen_t = torch.Generator().manual_seed(seed * 1000 + epoch)
            loader = torch.utils.data.DataLoader(train_set, batch_size=batch, shuffle=True, generator=gen_t,
                                                 drop_last=len(train_set) > batch)
            G.train(), Dnet.train()
            sums = {k: 0.0 for k in ("d_loss", "g_adv", "l1", "ssim", "msgms", "style")}
            nb = 0
            it = loader
            if progress:
                from tqdm import tqdm

                it = tqdm(loader, desc=f"upcracknet epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                          file=sys.stderr)
            for inp, target in it:
                inp, target = inp.to(dev), target.to(dev)
                gen = G(inp)
                # discriminator: real (input, original) vs fake (input, restoration)
                d_real = Dnet(inp, target)
                d_fake = Dnet(inp, gen.detach())
                d_loss = 0.5 * (bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake)))
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                # generator: fool D + restore
                d_fake = Dnet(inp, gen)
                g_adv = bce(d_fake, torch.ones_like(d_fake))
                terms = reconstruction_terms(gen, target, style_loss)
                g_loss = g_adv + LAMBDA_REC * terms["rec"]
                opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
                opt_g.step()
                nb += 1
                sums["d_loss"] += d_loss.item()
                sums["g_adv"] += g_adv.item()
                for k in ("l1", "ssim", "msgms", "style"):
                    sums[k] += terms[k].item()
                if progress:
                    it.set_postfix(D=f"{d_loss.item():.3f}", rec=f"{terms['rec'].item():.3f}")
            val_rec = validate(G, val_loader, style_loss)
            rec = {"epoch": epoch + 1, "lr": cur_lr, "lr_d": cur_lr_d, **{k: v / max(nb, 1) for k, v in sums.items()},
                   "val_rec": val_rec, "elapsed_s": round(elapsed_before + time.time() - t0, 1)}
            history.append(rec)
            sd = {k: v.detach().cpu() for k, v in G.state_dict().items()}
            _atomic_torch_save(sd, out / "last.pt")
            if val_rec < best:
                best, best_epoch = val_rec, epoch + 1
                _atomic_torch_save(sd, out / "best.pt")
            _atomic_torch_save({"epoch": epoch + 1, "G": G.state_dict(), "D": Dnet.state_dict(),
                                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "best": best,
                                "best_epoch": best_epoch, "history": history,
                                "elapsed_s": elapsed_before + time.time() - t0,
                                "torch_rng": torch.get_rng_state()}, state_path)
            (out / "samples").mkdir(exist_ok=True)
            _png(out / "samples" / f"epoch_{epoch + 1:03d}.png",
                 sample_figure(G, free_val, crack_val, tile, epoch))
            plot_curves(history, out / "curves.png")
            _atomic_json(_metrics(history, best, best_epoch, config, epochs, done=False), out / "metrics.json")
            log(f"epoch {epoch + 1}/{epochs}: D {rec['d_loss']:.3f}  G_adv {rec['g_adv']:.3f}  L1 {rec['l1']:.4f}  "
                f"1-SSIM {rec['ssim']:.4f}  MSGMS {rec['msgms']:.4f}  val_rec {val_rec:.4f}"
                f"{' (best)' if best_epoch == epoch + 1 else ''}  [{rec['elapsed_s']:.0f}s]")
            if max_minutes is not None and (time.time() - t0) / 60.0 >= max_minutes and epoch + 1 < epochs:
                log(f"time limit {max_minutes} min reached after epoch {epoch + 1}; continue with --resume")
                break
    except KeyboardInterrupt:
        interrupted = True
        log(f"interrupted during epoch {epoch + 1}: {out} holds the state after epoch "
            f"{history[-1]['epoch'] if history else 0}; continue with --resume")
    done = bool(history) and history[-1]["epoch"] >= epochs
    metrics = _metrics(history, best, best_epoch, config, epochs, done=done)
    metrics["interrupted"] = interrupted
    _atomic_json(metrics, out / "metrics.json")
    return metrics


def _metrics(history, best, best_epoch, config, epochs, done) -> dict:
    return {"model": "upcracknet", "epochs_done": history[-1]["epoch"] if history else 0, "epochs": epochs,
            "complete": done, "best_epoch": best_epoch, "best_val_rec": None if math.isinf(best) else best,
            "fragments": config["fragments"], "style_loss": config["style_loss"],
            "train_time_s": history[-1]["elapsed_s"] if history else 0.0, "history": history}


# ------------------------------------------------------------------------------------------------ CLI
def main(argv=None) -> None:
    """``python -m crackcam.train.upcracknet --data PATH --out DIR`` (same as ``crack-train --model upcracknet``)."""
    import typer

    app = typer.Typer(add_completion=False)

    @app.command()
    def run(data: Path = typer.Option(None, help="data folder (flat images/+masks/ or Kaggle layout)"),
            out: Path = typer.Option(Path("runs/upcracknet"), help="run folder"),
            preset: str = typer.Option("cpu", help="cpu | official"),
            epochs: int = typer.Option(None), batch: int = typer.Option(None), lr: float = typer.Option(None),
            tile: int = typer.Option(None), width: int = typer.Option(None), seed: int = typer.Option(0),
            resume: bool = typer.Option(False, "--resume"), max_tiles: int = typer.Option(None),
            max_minutes: float = typer.Option(None), threads: int = typer.Option(None),
            no_style: bool = typer.Option(False, "--no-style")):
        try:
            train_upcracknet(data, out, epochs, batch, lr, tile, seed, resume, preset=preset, width=width,
                             max_tiles=max_tiles, max_minutes=max_minutes, threads=threads, style=not no_style)
        except (D.BadInputError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)

    app(argv, standalone_mode=True)


if __name__ == "__main__":
    main()
