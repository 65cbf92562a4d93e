"""Scoring UP-CrackNet restoration maps (and their fusion with a classifier CAM).

* :class:`RestorationMethod` / :class:`FusionMethod`: image (uint8 RGB) → crack map on [0, 1]; these are what
  ``crack-eval --method restoration | restoration-masked | fusion`` plug into its method registry.
* ``python -m crackcam.tools.upcracknet_eval --run DIR``: a self-contained scoring run — the threshold is chosen
  on the validation images of the training set (ODS on val), then each test set is scored at that threshold,
  with the paper's per-image Otsu binarisation, and by ODS/OIS (tolerance 0 and 2 px).  Writes
  ``results.json``, PR curves and overlay figures to ``--out``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from crackcam.runtime.imageio import BadInputError, read_image, read_mask
from crackcam.runtime.postprocess import binarize

VARIANTS = {"restoration": "full", "restoration-masked": "masked"}


class RestorationMethod:
    """Crack maps from a ``crack-train --model upcracknet`` run: ``variant`` "full" (the paper) or "masked"."""

    def __init__(self, run_dir, variant: str = "masked", which: str = "best", smooth: bool = True, device=None,
                 polarity: str = "abs", debias: bool = False):
        from crackcam.models.upcracknet import load_restoration

        self.generator, self.config = load_restoration(run_dir, which)
        if device:
            self.generator.to(device)
        self.variant = variant
        self.smooth = smooth
        self.polarity = polarity
        self.debias = debias
        self.tile = int(self.config["tile"])
        self.name = "restoration" if variant == "full" else "restoration-masked"

    def __call__(self, image_rgb: np.ndarray) -> np.ndarray:
        from crackcam.models.upcracknet import restoration_map

        return restoration_map(self.generator, image_rgb, self.variant, tile=self.tile, smooth=self.smooth,
                               polarity=self.polarity, debias=self.debias)

    def describe(self) -> dict:
        return {"method": self.name, "variant": self.variant, "tile": self.tile, "width": self.config["width"],
                "smooth": self.smooth, "polarity": self.polarity, "debias": self.debias,
                "style_loss": self.config.get("style_loss")}


# map configurations scored by the evaluation run (the first is the paper's); chosen on validation images
CONFIGS = {
    "full": dict(variant="full"),
    "full-dark": dict(variant="full", polarity="dark"),
    "masked": dict(variant="masked"),
    "masked-dark": dict(variant="masked", polarity="dark"),
    "masked-debias": dict(variant="masked", debias=True),
    "masked-dark-debias": dict(variant="masked", polarity="dark", debias=True),
    "masked-dark-raw": dict(variant="masked", polarity="dark", smooth=False),
}


class MultiMap:
    """All :data:`CONFIGS` maps of one image from one set of generator passes."""

    def __init__(self, run_dir, which: str = "best", configs=tuple(CONFIGS), cam_fn=None,
                 fuse_with=("full-dark", "masked-dark"), gate: float = 0.5):
        from crackcam.models.upcracknet import load_restoration

        self.generator, self.config = load_restoration(run_dir, which)
        self.configs = {k: CONFIGS[k] for k in configs}
        self.tile = int(self.config["tile"])
        self.cam_fn = cam_fn
        self.fuse_with = [k for k in fuse_with if k in self.configs] if cam_fn else []
        self.gate = gate

    def __call__(self, image_rgb):
        from crackcam.models.upcracknet import fuse_maps, map_from_errors, restoration_errors

        variants = sorted({c["variant"] for c in self.configs.values()})
        errs = restoration_errors(self.generator, image_rgb, variants, tile=self.tile)
        maps = {k: map_from_errors(errs, **c) for k, c in self.configs.items()}
        if self.cam_fn is not None:
            prob, cam = self.cam_fn(image_rgb)
            maps["cam"] = cam if prob >= self.gate else np.zeros_like(cam)
            for k in self.fuse_with:
                maps[f"fusion-{k}"] = fuse_maps(cam, maps[k], "product", prob=prob, gate=self.gate)
        return maps


class FusionMethod:
    """Restoration error × classifier CAM (see :func:`crackcam.models.upcracknet.fuse_maps`).

    ``cam_fn(image_rgb) -> (prob, cam map H×W on [0, 1])`` — by default built from a classifier run folder with
    :class:`crackcam.models.cam.CamModel` (ungated: the probability gate is applied here)."""

    def __init__(self, restoration: RestorationMethod, cam_fn, mode: str = "product", gate: float = 0.5):
        self.restoration = restoration
        self.cam_fn = cam_fn
        self.mode = mode
        self.gate = gate
        self.name = "fusion"

    @classmethod
    def from_runs(cls, classifier_dir, restoration_dir, variant: str = "masked", mode: str = "product",
                  cam_method: str = "gradcam", gate: float = 0.5):
        return cls(RestorationMethod(restoration_dir, variant), cam_function(classifier_dir, cam_method), mode, gate)

    def __call__(self, image_rgb: np.ndarray) -> np.ndarray:
        from crackcam.models.upcracknet import fuse_maps

        prob, cam = self.cam_fn(image_rgb)
        rest = self.restoration(image_rgb)
        return fuse_maps(cam, rest, self.mode, prob=prob, gate=self.gate)


def cam_function(classifier_dir, method: str = "gradcam"):
    """``image_rgb -> (prob, cam)`` from a classifier run folder (helper B's CamModel, no gating)."""
    import torch

    from crackcam.models.cam import CamModel
    from crackcam.models.checkpoint import load_classifier

    model, cfg = load_classifier(classifier_dir)
    cam = CamModel(model, method, gate=0.0)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    @torch.no_grad()
    def fn(image_rgb):
        x = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1)[None].float() / 255.0
        prob, m = cam((x - mean) / std)
        return float(prob[0]), m[0].cpu().numpy().astype(np.float32)

    return fn


# ---------------------------------------------------------------------------------------------- scoring
def _pairs(data, split: str, val_fraction: float = 0.2, split_seed: int = 0):
    from crackcam.train.data import list_items

    return [(it.image, it.mask) for it in list_items(data, split, val_fraction=val_fraction, split_seed=split_seed)
            if it.mask is not None]


def score_set(maps_fn, pairs, *, thresholds: dict | None = None, tolerances=(0, 2), progress: bool = True,
              keep: int = 4, extra_splits: dict | None = None, desc: str = "maps"):
    """``maps_fn(image) -> {name: map}`` for every (image, mask) pair → ({name: figures}, {name: MapScorer},
    {name: examples})."""
    from crackcam.tools.metrics import BinaryScorer, MapScorer

    scorers, otsus, examples, subs = {}, {}, {}, {}
    it = pairs
    if progress:
        from tqdm import tqdm

        it = tqdm(pairs, desc=desc, unit="img", file=sys.stderr)
    t0 = time.time()
    n = 0
    for img_p, mask_p in it:
        try:
            img = read_image(img_p)
            gt = read_mask(mask_p, img.shape[:2])
        except BadInputError as exc:
            print(f"skipping {exc}", file=sys.stderr)
            continue
        n += 1
        for name, m in maps_fn(img).items():
            if name not in scorers:
                scorers[name], otsus[name], examples[name] = MapScorer(100, tolerances), BinaryScorer(tolerances), []
                subs[name] = {k: (set(v), MapScorer(100, tolerances), BinaryScorer(tolerances))
                              for k, v in (extra_splits or {}).items()}
            scorers[name].add(m, gt, img_p.name)
            b = binarize(m, "otsu")
            otsus[name].add(b, gt, img_p.name)
            for names, ms, bs in subs[name].values():
                if img_p.name in names:
                    ms.add(m, gt, img_p.name)
                    bs.add(b, gt, img_p.name)
            if len(examples[name]) < keep:
                examples[name].append((img_p.name, img, m, b, gt))
    sec = (time.time() - t0) / max(n, 1)

    def figs(ms, bs, thr):
        out = {"images": len(ms), "sec_per_image_all_configs": round(sec, 3)}
        for t in tolerances:
            out[f"t{t}"] = {"ods": ms.ods(t), "ois": ms.ois(t)["f1"], "otsu": bs.figures(t)}
            if thr is not None:
                out[f"t{t}"]["at_val_threshold"] = ms.at(thr, t)
        return out

    res = {}
    for name in scorers:
        thr = (thresholds or {}).get(name)
        res[name] = figs(scorers[name], otsus[name], thr)
        for k, (_, ms, bs) in subs[name].items():
            if len(ms):
                res[name][k] = figs(ms, bs, thr)
    return res, scorers, examples


def write_examples(path: Path, examples, title: str) -> None:
    """Rows: image | map | Otsu mask | ground truth."""
    import cv2

    rows = []
    for name, img, m, b, gt in examples:
        h, w = img.shape[:2]
        heat = cv2.cvtColor(cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
        bb = np.repeat((b[..., None] * 255).astype(np.uint8), 3, 2)
        gg = np.repeat((gt[..., None] * 255).astype(np.uint8), 3, 2)
        row = np.concatenate([img, heat, bb, gg], 1)
        rows.append(cv2.resize(row, (row.shape[1] // 2, row.shape[0] // 2), interpolation=cv2.INTER_AREA))
    if not rows:
        return
    wmax = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, wmax - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    canvas = np.concatenate(rows)
    head = np.full((20, canvas.shape[1], 3), 255, np.uint8)
    cv2.putText(head, title + ": image | map | Otsu | ground truth", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (0, 0, 0), 1, cv2.LINE_AA)
    ok, enc = cv2.imencode(".png", cv2.cvtColor(np.concatenate([head, canvas]), cv2.COLOR_RGB2BGR))
    path.write_bytes(enc.tobytes())


def write_pr(path: Path, curves: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for label, sc in curves.items():
        c = sc.curve(0)
        ax.plot(c["recall"], c["precision"], label=f"{label} (ODS F1 {c['f1'].max():.3f})")
    ax.set_xlabel("recall"), ax.set_ylabel("precision"), ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_title(title), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    import typer

    app = typer.Typer(add_completion=False)

    @app.command()
    def run(run_dir: Path = typer.Option(..., "--run", help="crack-train --model upcracknet run folder"),
            out: Path = typer.Option(None, "--out", help="output folder (default RUN/eval)"),
            config: list[str] = typer.Option(list(CONFIGS), help="map configurations to score: "
                                             + ", ".join(CONFIGS)),
            val_data: Path = typer.Option(Path("../shared/datasets/deepcrack"), help="threshold chosen on its val"),
            test: list[str] = typer.Option(["deepcrack=../shared/datasets/deepcrack:test",
                                            "cfd=../shared/datasets/cfd:all"], help="NAME=PATH:SPLIT"),
            max_images: int = typer.Option(None, help="cap per set (smoke runs)"),
            threads: int = typer.Option(1), which: str = typer.Option("best"),
            classifier: Path = typer.Option(None, help="classifier run folder: adds its CAM and the fusion maps"),
            cam_method: str = typer.Option("gradcam", help="CAM method of the classifier (crackcam.models.cam)")):
        import torch

        torch.set_num_threads(threads)
        out = out or run_dir / "eval"
        out.mkdir(parents=True, exist_ok=True)
        configs = [c for c in config if c in CONFIGS]
        if len(configs) != len(config):
            typer.echo(f"error: unknown --config; choose from {', '.join(CONFIGS)}", err=True)
            raise typer.Exit(2)
        results = {"run": str(run_dir), "which": which, "protocol": "threshold = ODS (t=0) on the validation "
                   "images of --val-data; test sets scored at it, with per-image Otsu (the paper), and ODS/OIS"}
        try:
            val_pairs = _pairs(val_data, "val")[:max_images]
            tests = []
            for spec in test:
                name, rest = spec.split("=", 1)
                path, split = rest.rsplit(":", 1)
                pairs = _pairs(path, split)[:max_images]
                extra = {}
                if name == "cfd" and split == "all":  # also the CFD test split (073-118)
                    extra["test_split"] = [p.name for p, _ in _pairs(path, "test")]
                tests.append((name, pairs, extra))
        except BadInputError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        cam_fn = cam_function(classifier, cam_method) if classifier else None
        mm = MultiMap(run_dir, which, configs, cam_fn=cam_fn)
        if classifier:
            results["classifier"] = {"run": str(classifier), "cam_method": cam_method, "gate": mm.gate,
                                     "fusion": "sqrt(CAM x restoration map), zero where prob < gate"}
        val_res, val_sc, _ = score_set(mm, val_pairs, desc="val")
        thr = {k: v["t0"]["ods"]["threshold"] for k, v in val_res.items()}
        best = max(val_res, key=lambda k: val_res[k]["t0"]["ods"]["f1"])
        results.update({"configs": {k: CONFIGS.get(k, k) for k in val_res}, "val": val_res, "val_thresholds": thr,
                        "selected_on_val": best, "train_config": mm.config})
        typer.echo(f"validation ODS F1: " + ", ".join(f"{k} {v['t0']['ods']['f1']:.3f}" for k, v in val_res.items())
                   + f" -> selected {best}")
        curves = {k: {"val": v} for k, v in val_sc.items()}
        for name, pairs, extra in tests:
            res, sc, ex = score_set(mm, pairs, thresholds=thr, extra_splits=extra, desc=name)
            results[name] = res
            for k in res:
                curves[k][name] = sc[k]
                t0 = res[k]["t0"]
                typer.echo(f"{name:>10} {k:>20}{'*' if k == best else ' '}: F1 at val threshold {thr[k]:.2f}: "
                           f"{t0['at_val_threshold']['f1']:.3f}  Otsu F1 {t0['otsu']['f1']:.3f}  "
                           f"ODS {t0['ods']['f1']:.3f}  OIS {t0['ois']:.3f}  "
                           f"(t=2: at val thr {res[k]['t2']['at_val_threshold']['f1']:.3f}, "
                           f"Otsu {res[k]['t2']['otsu']['f1']:.3f}, ODS {res[k]['t2']['ods']['f1']:.3f})")
            for k in ("full", best):
                if k in ex:
                    write_examples(out / f"examples_{k}_{name}.png", ex[k], f"{k} on {name}")
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        for k in ("full", best):
            if k in curves:
                write_pr(out / f"pr_{k}.png", curves[k], f"UP-CrackNet ({k})")
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        typer.echo(f"wrote {out / 'results.json'}")

    app(argv, standalone_mode=True)


if __name__ == "__main__":
    main()
