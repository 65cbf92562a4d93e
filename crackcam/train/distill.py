"""``crack-train --model seg_tiny|seg_lite0 --teacher T``: distil a one-pass crack segmenter from the CAM teacher.

Round 1: pseudo-masks of every **training** image from the teacher (:mod:`crackcam.train.pseudo`); the student
trains on random crops (rot90/flips, the classifier's photometric jitter, scale jitter 0.7–1.4) with BCE + Dice on
the confident pixels only.  Round r > 1 (self-training): the best student so far relabels the training images — its
confident pixels inside the tiles the teacher's gate lets through — and training continues from it.  After every
epoch the student runs on the **validation** frames through the runtime frame steps (the survey tiling crack-run
uses) and is scored by its threshold-free pixel F1 (ODS, t=0, ``ignore/`` and out-of-ROI pixels skipped, mean over
the data sets); the best epoch of the best round becomes ``best.pt``.  Masks are read for two things only: the tile
bits of the pseudo-masks (the classifier's tile rule) and the validation score.  Test splits are never read.

The run folder is a normal crackcam run (``config.json`` with ``kind: segmenter``, ``best.pt``, ``metrics.json``,
``curves.png``), so ``crack-eval calibrate``, ``crack-eval`` and ``crack-export`` take it as they take a classifier.
Resumable per epoch (``--resume``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from crackcam.models import create_model, get_spec, list_models
from crackcam.models.checkpoint import atomic_torch_save, save_state_dict, write_json
from crackcam.models.student import StudentSession
from crackcam.runtime import survey as S
from crackcam.runtime.imageio import BadInputError, read_image, read_mask
from crackcam.runtime.postprocess import PostProcessConfig, postprocess
from crackcam.runtime.steps import FrameSteps

from . import data as D
from . import pseudo as P
from .metrics import pixel_ods


@dataclass
class DistillConfig:
    data: list
    out: str
    model: str = "seg_lite0"
    teacher: str | None = None  # exported model or run folder; None: the packaged default
    rounds: int = 2
    epochs: int = 6  # per round (round > 1: half, at least 2)
    samples: int = 3000  # crops per epoch
    batch: int = 16
    crop: int = 192
    lr: float = 2e-3
    weight_decay: float = 1e-4
    pos_weight: float = 3.0
    dice: float = 1.0
    crack_share: float = 0.6  # share of crops drawn from crack images
    scale_jitter: tuple = (0.7, 1.4)
    photometric: bool = True
    pretrained: bool | None = None
    tile_rule: dict = field(default_factory=lambda: {"tile": 64, "min_crack_px": 12, "border": 4, "margin": 8})
    pseudo_rule: dict = field(default_factory=dict)
    val_tile: int = 256  # the student's survey tile at work scale (fully convolutional: larger tiles, fewer calls)
    val_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0
    threads: int | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: one GPU per process)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    val_limit: int | None = None


# ---------------------------------------------------------------------------------------------- data
class CropSampler:
    """Random training crops (uint8 RGB, uint8 labels) from the pseudo-labelled work-scale images."""

    def __init__(self, images: list[np.ndarray], labels: list[np.ndarray], negative: list[bool], cfg: DistillConfig,
                 sets: list[str] | None = None):
        self.images, self.labels = images, labels
        sets = sets or [""] * len(images)
        names = sorted(set(sets))
        # per data set, so that 24 survey frames weigh as much as 240 close-ups
        self.pos_by = [[i for i, n in enumerate(negative) if not n and sets[i] == s] for s in names]
        self.neg_by = [[i for i, n in enumerate(negative) if n and sets[i] == s] for s in names]
        self.pos_by = [p for p in self.pos_by if p]
        self.neg_by = [p for p in self.neg_by if p]
        self.pos = [i for p in self.pos_by for i in p]
        self.neg = [i for p in self.neg_by for i in p]
        self.cfg = cfg

    def crop(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        c = self.cfg
        use_pos = bool(self.pos) and (not self.neg or rng.random() < c.crack_share)
        by = self.pos_by if use_pos else self.neg_by
        pool = by[int(rng.integers(len(by)))]
        i = pool[int(rng.integers(len(pool)))]
        img, lab = self.images[i], self.labels[i]
        s = float(math.exp(rng.uniform(math.log(c.scale_jitter[0]), math.log(c.scale_jitter[1]))))
        size = int(round(c.crop / s))  # crop this many source px, resize to c.crop
        h, w = lab.shape
        if h < size or w < size:  # small images (clean tiles): reflect-pad
            ph, pw = max(0, size - h), max(0, size - w)
            img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_REFLECT_101)
            lab = cv2.copyMakeBorder(lab, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=P.IGNORE)
            h, w = lab.shape
        if use_pos and rng.random() < 0.7:  # centre most crack crops on a crack pixel
            ys, xs = np.nonzero(lab == P.CRACK)
            if len(ys):
                k = int(rng.integers(len(ys)))
                y0 = int(np.clip(ys[k] - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, h - size))
                x0 = int(np.clip(xs[k] - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, w - size))
            else:
                y0, x0 = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        else:
            y0, x0 = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        a = img[y0:y0 + size, x0:x0 + size]
        b = lab[y0:y0 + size, x0:x0 + size]
        if size != c.crop:
            a = cv2.resize(a, (c.crop, c.crop), interpolation=cv2.INTER_AREA if size > c.crop else cv2.INTER_LINEAR)
            b = cv2.resize(b, (c.crop, c.crop), interpolation=cv2.INTER_NEAREST)
        k = int(rng.integers(4))
        a, b = np.rot90(a, k), np.rot90(b, k)
        if rng.random() < 0.5:
            a, b = a[:, ::-1], b[:, ::-1]
        if rng.random() < 0.5:
            a, b = a[::-1], b[::-1]
        a = np.ascontiguousarray(a)
        if c.photometric:
            a = D.photometric_tile(a, rng)
        return a, np.ascontiguousarray(b)

    def batch(self, rng, n: int):
        xs, ys = zip(*(self.crop(rng) for _ in range(n)))
        return np.stack(xs), np.stack(ys)


def confident_loss(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float, dice_w: float) -> torch.Tensor:
    """BCE (crack pixels weighted ``pos_weight``) + ``dice_w`` × soft Dice, both on the confident pixels only
    (labels CRACK / BACKGROUND; IGNORE pixels contribute nothing)."""
    y = (labels == P.CRACK).float()
    w = (labels != P.IGNORE).float()
    n = w.sum().clamp_min(1.0)
    pw = torch.tensor(float(pos_weight))
    bce = (F.binary_cross_entropy_with_logits(logits, y, reduction="none", pos_weight=pw) * w).sum() / n
    if dice_w <= 0:
        return bce
    p = torch.sigmoid(logits) * w
    inter = (p * y).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + (y * w).sum() + 1)
    return bce + dice_w * dice


# ---------------------------------------------------------------------------------------------- validation
def _val_items(cfg: DistillConfig) -> dict[str, list]:
    out = {}
    for root in cfg.data:
        vi = D.list_items(root, "val", val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
        vi = [it for it in vi if it.mask is not None and not it.is_tile]
        if cfg.val_limit:
            vi = vi[:cfg.val_limit]
        if vi:
            out[Path(root).name] = vi
    return out


class Validator:
    """The student's frame maps of the validation frames (runtime frame steps) → pixel ODS per set."""

    def __init__(self, items: dict[str, list], survey: S.SurveyConfig, log=print):
        self.sets = {}
        for name, its in items.items():
            rows = []
            for it in its:
                try:
                    img = read_image(it.image)
                    gt = read_mask(it.mask, img.shape)
                    valid = D.scored_pixels(it, img.shape[:2], survey)
                except BadInputError as exc:
                    log(f"distill: validation skips {exc}")
                    continue
                rows.append((np.ascontiguousarray(img[..., ::-1]), gt, valid))
            self.sets[name] = rows
        self.steps = FrameSteps(survey, None, PostProcessConfig(skeleton=False))

    def __call__(self, session) -> dict:
        per = {}
        for name, rows in self.sets.items():
            maps = [self.steps.process(session, bgr).map for bgr, _, _ in rows]
            per[name] = pixel_ods(maps, [g for _, g, _ in rows], [v for _, _, v in rows])
        mean = float(np.mean([p["f1"] for p in per.values()])) if per else 0.0
        thr = float(np.median([p["threshold"] for p in per.values()])) if per else 0.5
        return {"ods_mean": round(mean, 4), "threshold": round(thr, 4),
                "per_set": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in per.items()}}


# ---------------------------------------------------------------------------------------------- the run
def _student_fn(session, survey: S.SurveyConfig, threshold: float, post: dict):
    """work-scale RGB → (prob map, threshold, binary) of the student (for the self-training round)."""
    steps = FrameSteps(survey.replace(scale=1.0, max_side=None, roi=None, roi_mask=None, gate=0.0), None,
                       PostProcessConfig.from_dict({**post, "threshold": threshold, "skeleton": False}))

    def fn(rgb_work: np.ndarray):
        res = steps.process(session, np.ascontiguousarray(rgb_work[..., ::-1]))
        return res.map, threshold, res.post.mask

    return fn


def distill(cfg: DistillConfig, log=print) -> dict:
    """Run (or resume) a distillation; returns the metrics dict.  Under ``torchrun`` (``crack-train --devices N``)
    every process trains on its own crops (batch / N per step, DistributedDataParallel: gradients all-reduced, the
    same weights everywhere); rank 0 alone makes the pseudo-masks, validates, logs and writes the run folder while
    the others wait at a barrier."""
    from .loop import run_distributed

    return run_distributed(lambda lg, dist: _distill(cfg, lg, dist), log)


def _distill(cfg: DistillConfig, log, dist) -> dict:
    from .loop import resolve_device

    out = Path(cfg.out)
    spec = get_spec(cfg.model)
    if spec.kind != "segmenter":
        raise ValueError(f"--teacher distils a segmenter; {cfg.model!r} is not one "
                         f"({', '.join(list_models(kind='segmenter'))})")
    if (out / "metrics.json").is_file() and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(f"{out}: a finished run is there; --overwrite to replace it or --resume")
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    device = dist.init(resolve_device(cfg.device))
    teacher_path = P.resolve_teacher(cfg.teacher)
    rule = D.TileRule(**{**cfg.tile_rule, "stride": None})
    prule = P.PseudoRule(**{"tile": rule.tile, **cfg.pseudo_rule})
    if cfg.resume and (out / "config.json").is_file():  # the pseudo-masks on disk were made with the run's rules
        try:
            was = json.loads((out / "config.json").read_text()).get("label_rule") or {}
        except (OSError, ValueError):
            was = {}
        for key, now in (("tile_rule", rule.as_dict()), ("pseudo_rule", prule.to_dict())):
            if key in was and was[key] != json.loads(json.dumps(now)):
                changed = {k: (was[key].get(k), v) for k, v in now.items() if was[key].get(k) != v}
                raise ValueError(f"{out}: --resume with another {key.replace('_', ' ')} than the run's "
                                 f"({', '.join(f'{k} {a} → {b}' for k, (a, b) in changed.items())}); its pseudo-masks "
                                 f"were made with the first — resume with the same options or --overwrite")
    teacher = tmeta = survey = train_items = val = None
    if dist.main:  # rank 0 alone labels, validates and writes: the others train on what it wrote
        teacher = P.Teacher(teacher_path, log=log)
        tmeta = teacher.session.meta.raw
        survey0 = S.SurveyConfig.from_dict(dict(tmeta.get("survey") or {}))
        survey = survey0.replace(tile=int(cfg.val_tile), overlap=int(cfg.val_tile) // 8, gate=0.0, min_length=0.0)
        log(f"distill: teacher {teacher.describe}; student {cfg.model}; label rule: pseudo-masks from the teacher "
            f"on TRAINING images, tile bits by the tile rule ({rule.describe()}), crack-free images all background")
        train_items = {Path(r).name: D.list_items(r, "train", val_fraction=cfg.val_fraction,
                                                  split_seed=cfg.split_seed) for r in cfg.data}
        val = Validator(_val_items(cfg), survey, log=log)
        log(f"distill: {sum(map(len, train_items.values()))} training images "
            f"({', '.join(f'{k} {len(v)}' for k, v in train_items.items())}); validation frames "
            f"{', '.join(f'{k} {len(v)}' for k, v in val.sets.items())}")
    mean, std = spec.mean, spec.std
    state_path = out / "distill_state.pt"
    st = None
    if cfg.resume and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        log(f"distill: resuming after round {st['round']} epoch {st['epoch']}")
    history: list[dict] = st["history"] if st else []
    best = st["best"] if st else {"ods_mean": -1.0}
    model = create_model(cfg.model, pretrained=cfg.pretrained if cfg.pretrained is not None else True)
    if st:
        model.load_state_dict(st["model"])
    model.to(device)
    net = dist.wrap(model, device)
    proc_batch = max(1, cfg.batch // dist.world)  # the global batch and the steps per epoch of one process
    if dist.on:
        log(f"distributed: {dist.world} processes ({dist.backend}), {proc_batch} crops per step per process "
            f"(global batch {proc_batch * dist.world}); rank 0 makes the pseudo-masks, validates and writes")
    if dist.main:
        config = {"model": cfg.model, "model_kwargs": {}, "kind": "segmenter", "tile": int(cfg.val_tile),
                  "mean": list(mean), "std": list(std), "target_layers": list(spec.target_layers),
                  "teacher": str(teacher_path),
                  "teacher_meta": {k: tmeta.get(k) for k in ("model", "method", "version")},
                  "work_scale": {"scale": survey.scale, "max_side": survey.max_side},
                  "label_rule": {"name": "pseudo", "text": f"pseudo-masks from the teacher {teacher.describe} on the "
                                 f"training images; tile bits: {rule.describe()}; crack-free images (names, folders, "
                                 f"frame classes, clean tiles) all background", "tile_rule": rule.as_dict(),
                                 "pseudo_rule": prule.to_dict()},
                  "survey": survey.to_dict(),
                  "datasets": [{"data": str(d), "layout": D.detect_layout(d)} for d in cfg.data],
                  "data": str(cfg.data[0]),
                  "train_config": {**asdict(cfg), "scale_jitter": list(cfg.scale_jitter)},
                  "pretrained_source": getattr(model, "pretrained_source", None), "torch": torch.__version__,
                  "class_names": ["background", "crack"]}
        write_json(out / "config.json", config)
    t_start = time.perf_counter() - (st["seconds"] if st else 0.0)
    r0, e0 = (st["round"], st["epoch"]) if st else (1, 0)
    for rnd in range(r0, cfg.rounds + 1):
        pdir = out / "pseudo" / f"round{rnd}"
        if dist.main:  # rank 0 labels; round > 1: the best student so far relabels
            sfn = None
            if rnd > 1:
                prev = create_model(cfg.model)
                prev.load_state_dict(torch.load(out / "best.pt", map_location="cpu", weights_only=True))
                sfn = _student_fn(StudentSession(prev.eval(), mean, std), survey, float(best["threshold"]),
                                  tmeta.get("postprocess") or {})
            summ = P.make_pseudo_masks(train_items, pdir, teacher, rule, rule=prule, student_fn=sfn, log=log,
                                       progress=cfg.progress)
            log(f"distill: round {rnd} pseudo-masks: {summ['images']} images ({summ['negative_images']} "
                f"crack-free), {summ['crack_px']} crack px, ignore share {summ['ignore_share']} → {pdir}/preview.png")
        dist.barrier()  # the other ranks read the pseudo-masks rank 0 wrote
        rows = [json.loads(l) for l in (pdir / "manifest.jsonl").read_text().splitlines() if l.strip()]
        imgs, labs, neg = [], [], []
        for r in rows:
            a, b = P.read_pseudo(pdir, r)
            imgs.append(a)
            labs.append(b)
            neg.append(bool(r["negative"]) or not (b == P.CRACK).any())
        sampler = CropSampler(imgs, labs, neg, cfg, [r["set"] for r in rows])
        n_ep = cfg.epochs if rnd == 1 else max(2, cfg.epochs // 2)
        lr = cfg.lr if rnd == 1 else cfg.lr / 2
        if rnd > 1 and e0 == 0:
            model.load_state_dict(torch.load(out / "best.pt", map_location="cpu", weights_only=True))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        steps_per = max(1, cfg.samples // cfg.batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=n_ep * steps_per, pct_start=0.2)
        if st and rnd == r0 and "opt" in st:
            opt.load_state_dict(st["opt"])
            sched.load_state_dict(st["sched"])
        mt = torch.tensor(mean).view(1, 3, 1, 1).to(device)
        sd = torch.tensor(std).view(1, 3, 1, 1).to(device)
        for ep in range(e0 + 1 if rnd == r0 else 1, n_ep + 1):
            # each process its own crops (one process: the seeds of a plain run)
            rng = np.random.default_rng([cfg.seed, rnd, ep] + ([dist.rank] if dist.on else []))
            net.train()
            t0 = time.perf_counter()
            losses = []
            from crackcam.runtime.progress import progress as prog

            it = range(steps_per)
            for _ in (prog(it, desc=f"round {rnd} epoch {ep}/{n_ep}", unit="batch", every=50)
                      if cfg.progress and dist.main else it):
                xb, yb = sampler.batch(rng, proc_batch)
                x = (torch.from_numpy(xb).to(device).permute(0, 3, 1, 2).float() / 255.0 - mt) / sd
                y = torch.from_numpy(yb).to(device).unsqueeze(1)
                loss = confident_loss(net(x), y, cfg.pos_weight, cfg.dice)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
            model.eval()
            if not dist.main:
                dist.barrier()  # rank 0 validates and writes best.pt / the state before anyone goes on
                continue
            v = val(StudentSession(model, mean, std))
            row = {"round": rnd, "epoch": ep, "loss": round(float(np.mean(losses)), 4),
                   "train_s": round(time.perf_counter() - t0, 1),
                   "crops_seen": steps_per * proc_batch, **v}  # by this process (rank 0 under DDP)
            history.append(row)
            improved = v["ods_mean"] > best["ods_mean"]
            if improved:
                best = {**v, "round": rnd, "epoch": ep}
                save_state_dict(model, out / "best.pt")
            save_state_dict(model, out / "last.pt")
            atomic_torch_save({"round": rnd, "epoch": ep, "model": model.state_dict(), "opt": opt.state_dict(),
                               "sched": sched.state_dict(), "history": history, "best": best,
                               "seconds": time.perf_counter() - t_start}, state_path)
            per_txt = ", ".join(f"{k} {p['f1']:.3f}" for k, p in v["per_set"].items())
            log(f"round {rnd} epoch {ep}/{n_ep}: loss {row['loss']:.4f}, val pixel ODS {v['ods_mean']:.4f} "
                f"({per_txt}) at {v['threshold']}"
                f"{' *best' if improved else ''} [{row['train_s']} s]")
            dist.barrier()
        e0 = 0
        st = None
    if not dist.main:
        return {}
    rounds = {}
    for h in history:
        r = rounds.setdefault(h["round"], {"best_ods": -1.0})
        if h["ods_mean"] > r["best_ods"]:
            r.update(best_ods=h["ods_mean"], epoch=h["epoch"], per_set=h["per_set"])
    metrics = {"best": best, "rounds": rounds, "history": history, "model": cfg.model,
               "parameters": int(sum(p.numel() for p in model.parameters())),
               "seconds": round(time.perf_counter() - t_start, 1), "teacher": str(teacher_path),
               "selection": "best epoch of the best round by the mean threshold-free pixel F1 (ODS, t=0) on the "
                            "validation frames"}
    if dist.on:
        metrics["distributed"] = dist.record(proc_batch)
    write_json(out / "metrics.json", metrics)
    _plot(history, out / "curves.png")
    log(f"distill: best round {best.get('round')} epoch {best.get('epoch')}: val pixel ODS {best['ods_mean']} → "
        f"{out}/best.pt ({metrics['seconds']} s)")
    return metrics


def _plot(history: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    x = list(range(1, len(history) + 1))
    ax[0].plot(x, [h["loss"] for h in history], "o-")
    ax[0].set_title("training loss (confident pixels)")
    for s in (history[0]["per_set"] if history else {}):
        ax[1].plot(x, [h["per_set"].get(s, {}).get("f1", np.nan) for h in history], "o-", label=s)
    ax[1].set_title("validation pixel ODS F1")
    ax[1].legend()
    for a in ax:
        a.set_xlabel("epoch (all rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
