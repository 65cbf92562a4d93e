"""``crack-train``: train a crack classifier on one bit per tile (or per image), validate every epoch, save a
run folder (see docs/training.md).  ``--model upcracknet`` hands over to :mod:`crackcam.train.upcracknet`;
``--model seg_tiny|seg_lite0`` to :mod:`crackcam.train.distill` (a segmenter from the ``--teacher``'s pseudo-masks).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, help=__doc__)


def _fail(msg: str, code: int = 2):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


# Options each route reads besides the shared ones (--data --model --out --epochs --batch --lr --seed --threads
# --device --resume --progress).  An option given on the command line that the chosen route would not read is one
# error line, not a silent no-op.
_CLASSIFIER_ONLY = {"stride", "train_stride", "label_rule", "scale", "max_side", "topk", "hard_repeat", "weights",
                    "augment", "double", "max_tiles", "workers", "test"}
_SEGMENTER_ONLY = {"teacher", "rounds", "samples", "crop", "pseudo_topk"}
_ROUTE_READS = {
    "classifier": _CLASSIFIER_ONLY | {"tile", "min_crack_px", "border", "margin", "val_fraction", "pretrained",
                                      "photometric", "devices", "overwrite"},
    "segmenter": _SEGMENTER_ONLY | {"tile", "min_crack_px", "border", "margin", "val_fraction", "pretrained",
                                    "photometric", "devices", "overwrite"},
    "upcracknet": {"preset", "tile", "max_tiles", "val_fraction", "max_side"},
}
_ALL_ROUTE_OPTIONS = set().union(*_ROUTE_READS.values())


def _check_route(route: str, model: str, given: set) -> None:
    stray = sorted((given & _ALL_ROUTE_OPTIONS) - _ROUTE_READS[route])
    if stray:
        names = ", ".join("--" + n.replace("_", "-") for n in stray)
        _fail(f"{names} {'does' if len(stray) == 1 else 'do'} not apply to --model {model} ({route}); "
              f"see crack-train --help")


@app.command()
def train_cmd(
    ctx: typer.Context,
    data: Optional[List[Path]] = typer.Option(None, "--data", help="data folder: images/ + masks/ (flat), "
                                              "train|test/images + masks (Kaggle), PaveSeg (images/, masks/, "
                                              "masks_multiclass/, ignore/, clean_tiles/) or crack/ + no_crack/ "
                                              "folders; repeat --data to mix sets. Default: a tiny synthetic set "
                                              "drawn into OUT/synthetic_data"),
    model: str = typer.Option("simple_cnn", "--model", help="a name from crackcam.models.list_models() (classifiers; "
                              "seg_tiny / seg_lite0 distil a segmenter from --teacher), or upcracknet"),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="run folder"),
    epochs: int = typer.Option(0, "--epochs", help="0 = auto: about 24k tile presentations (12k with ImageNet weights), 4..40 epochs (8 on the synthetic default set)"),
    batch: int = typer.Option(0, "--batch", help="0 = auto: 64 from 1000 training tiles, 32 from 400, else 16"),
    lr: float = typer.Option(0.0, "--lr", help="peak learning rate (OneCycle); 0 = 3e-3 from scratch, 1e-3 pretrained"),
    tile: int = typer.Option(128, "--tile", help="tile size in px (the tile rule's tile; segmenters: default 64, the teacher's)"),
    stride: int = typer.Option(0, "--stride", help="classifiers: val/test tile step; 0 = tile"),
    train_stride: int = typer.Option(0, "--train-stride", help="classifiers: training tile step; 0 = tile/2"),
    min_crack_px: int = typer.Option(40, "--min-crack-px", help="N: crack px needed inside the tile (segmenters: default 12)"),
    border: int = typer.Option(8, "--border", help="B: those crack px lie at least B px from the tile border (segmenters: default 4)"),
    margin: int = typer.Option(16, "--margin", help="M: crack-free only if no crack px within the tile grown by M (segmenters: default 8)"),
    label_rule: str = typer.Option("auto", "--label-rule", help="classifiers: auto | tiles | name | folder (name: Kaggle "
                                   "noncrack* files; folder: crack/ + no_crack/)"),
    scale: float = typer.Option(1.0, "--scale", help="classifiers: work scale, resize images by this before tiling (survey "
                                "frames: so crack widths match what crack-run sees)"),
    max_side: Optional[int] = typer.Option(None, "--max-side", help="classifiers and upcracknet: work scale, also shrink "
                                           "images whose longer side exceeds this (px)"),
    topk: Optional[float] = typer.Option(None, "--topk", help="MIL models (edge_mil, simple_cnn with "
                                         "pool topk): the share of positions whose mean is the tile logit"),
    hard_repeat: int = typer.Option(1, "--hard-repeat", help="classifiers: repeat hard-negative training tiles (sealed cracks, "
                                    "patches, manholes, joints) this many times"),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="share of training IMAGES used for validation"),
    seed: int = typer.Option(0, "--seed"),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained",
                                              help="ImageNet weights (default: where the model has them)"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="classifiers: initial weights (a state dict file)"),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="classifiers: random rot90 + flips each epoch"),
    photometric: bool = typer.Option(False, "--photometric/--no-photometric", help="random brightness, contrast, "
                                     "gamma, blur or noise each epoch (survey frames vary from dark to bleached; segmenters: on by default)"),
    double: bool = typer.Option(False, "--double", help="classifiers: double the training set with rotated/flipped copies"),
    max_tiles: Optional[int] = typer.Option(None, "--max-tiles", help="classifiers, upcracknet: cap on training tiles (seeded sample)"),
    workers: int = typer.Option(0, "--workers", help="classifiers: DataLoader worker processes"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    devices: int = typer.Option(1, "--devices", min=1, help="classifiers, segmenters: train in N processes with DistributedDataParallel, "
                                "launched through torchrun (one GPU each with NCCL; gloo on CPU)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in OUT after its last finished epoch"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a finished/old run in OUT"),
    test: bool = typer.Option(True, "--test/--no-test", help="classifiers: score best.pt on the test split at the end (report only)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    preset: Optional[str] = typer.Option(None, "--preset", help="upcracknet only: cpu (default) | official"),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="segmenters (seg_tiny, seg_lite0): the exported "
                                           "teacher model or its run folder (default: the packaged default model)"),
    rounds: int = typer.Option(2, "--rounds", min=1, help="segmenters: pseudo-mask rounds (2 = one self-training "
                               "round)"),
    samples: int = typer.Option(3000, "--samples", min=1, help="segmenters: training crops per epoch"),
    crop: int = typer.Option(192, "--crop", help="segmenters: training crop size (px at work scale)"),
    pseudo_topk: float = typer.Option(0.0, "--pseudo-topk", help="segmenters: also label the top share of the "
                                      "teacher's scores in every crack tile as crack (0 = off)"),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", hidden=True,
                                             help="stop (as after Ctrl-C) after this many epochs of this call"),
):
    """Train a crack classifier (see docs/training.md)."""
    from crackcam.runtime.cli import typed_options
    from crackcam.runtime.imageio import BadInputError

    given = set(typed_options(ctx))
    if model == "upcracknet":
        _check_route("upcracknet", model, given)  # --devices too: UP-CrackNet trains in one process
        # repeated --data: the crack-free fragments of every set are pooled (each set split by its own rule);
        # the first set is the run's default evaluation and calibration set
        data = (data[0] if len(data) == 1 else list(data)) if data else None
        from crackcam.train import upcracknet

        # crack-train's classifier defaults (batch, tile) are not UP-CrackNet's: only what was typed goes through,
        # the preset fills the rest
        kw = {"preset": preset or "cpu", "progress": progress}
        if max_tiles:
            kw["max_tiles"] = max_tiles
        if threads:
            kw["threads"] = threads
        if "val_fraction" in given:
            kw["val_fraction"] = val_fraction
        if max_side is not None:
            if max_side < 16:
                _fail(f"--max-side must be at least 16 px (got {max_side})")
            kw["max_side"] = max_side
        if device != "auto":
            kw["device"] = device
        try:
            upcracknet.train_upcracknet(data, out, epochs or None, batch if "batch" in given else None, lr or None,
                                        tile if "tile" in given else None, seed, resume, **kw)
        except KeyboardInterrupt:
            typer.echo(f"interrupted; finished epochs are saved in {out}; continue with --resume", err=True)
            raise typer.Exit(130)
        except (BadInputError, ValueError, FileNotFoundError) as exc:
            _fail(str(exc))
        return

    import crackcam.models as M
    from crackcam.train.loop import TrainConfig, TrainingInterrupted, train

    segmenter = model in M.list_models(kind="segmenter")
    if not segmenter and model not in M.list_models():
        _fail(f"unknown model {model!r}; choose one of: {', '.join(M.list_models() + ['upcracknet'])}")
    _check_route("segmenter" if segmenter else "classifier", model, given)  # before torchrun: one line, not N
    if devices > 1 and "WORLD_SIZE" not in os.environ:  # classifiers and segmenters alike
        raise typer.Exit(_launch_torchrun(devices, device, threads))

    if segmenter:
        rule = {k: v for k, v in {"tile": tile, "min_crack_px": min_crack_px, "border": border,
                                  "margin": margin}.items() if k in given}
        extra = {k: v for k, v in {"val_fraction": val_fraction, "photometric": photometric}.items() if k in given}
        return _distill(data, model, out, teacher, rounds, epochs, samples, batch, crop, lr, seed, threads, resume,
                        overwrite, progress, pretrained, pseudo_topk, device, tile_rule=rule, **extra)

    if label_rule not in ("auto", "tiles", "name", "folder"):
        _fail(f"--label-rule must be auto, tiles, name or folder (got {label_rule!r})")
    if not 0 < scale <= 4:
        _fail(f"--scale must lie in (0, 4] (got {scale})")
    if max_side is not None and max_side < 16:
        _fail(f"--max-side must be at least 16 px (got {max_side})")
    if hard_repeat < 1:
        _fail(f"--hard-repeat must be at least 1 (got {hard_repeat})")
    model_kwargs = {}
    if topk is not None:
        if not 0 < topk <= 1:
            _fail(f"--topk must lie in (0, 1] (got {topk})")
        model_kwargs["topk"] = topk
    data_arg = None if not data else (str(data[0]) if len(data) == 1 else [str(d) for d in data])
    if tile < 16:
        _fail(f"--tile must be at least 16 px (got {tile})")
    cfg = TrainConfig(
        data=data_arg, out=str(out), model=model, epochs=epochs, batch=batch, lr=lr,
        tile=tile, stride=stride, train_stride=train_stride, min_crack_px=min_crack_px, border=border,
        margin=margin, label_rule=label_rule, scale=scale, max_side=max_side, hard_repeat=hard_repeat,
        val_fraction=val_fraction, seed=seed, pretrained=pretrained,
        weights=str(weights) if weights else None, augment=augment, photometric=photometric, double=double, max_tiles=max_tiles,
        model_kwargs=model_kwargs, workers=workers, device=device, threads=threads, resume=resume, overwrite=overwrite, test=test,
        progress=progress)
    try:
        train(cfg, stop_after=stop_after, log=lambda s: typer.echo(s))
    except TrainingInterrupted as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(130)
    except KeyboardInterrupt:  # before the first epoch started: nothing of a run to lose
        typer.echo(f"interrupted while preparing the data; nothing trained yet in {out}", err=True)
        raise typer.Exit(130)
    except BadInputError as exc:
        _fail(str(exc))
    except (FileNotFoundError, ValueError) as exc:  # e.g. a --weights file that does not fit the model
        _fail(str(exc).splitlines()[0] if str(exc) else repr(exc))


def _distill(data, model, out, teacher, rounds, epochs, samples, batch, crop, lr, seed, threads, resume, overwrite,
             progress, pretrained, pseudo_topk=0.0, device="auto", tile_rule=None, **extra) -> None:
    """``--model seg_*``: distil the segmenter from ``--teacher`` (crackcam.train.distill).  ``tile_rule``: the
    tile-rule options the user typed (--tile --min-crack-px --border --margin), over DistillConfig's (the packaged
    teacher's rule); ``extra``: typed --val-fraction / --photometric."""
    from crackcam.runtime.imageio import BadInputError
    from crackcam.runtime.meta import ModelFileError
    from crackcam.train.distill import DistillConfig, distill

    if not data:
        _fail(f"--model {model} needs --data (the training images the teacher labels)")
    kw = {k: v for k, v in {"epochs": epochs, "batch": batch, "lr": lr}.items() if v}
    cfg = DistillConfig(data=[str(d) for d in data], out=str(out), model=model,
                        teacher=str(teacher) if teacher else None, rounds=rounds, samples=samples, crop=crop,
                        seed=seed, threads=threads, device=device, resume=resume, overwrite=overwrite, progress=progress,
                        pretrained=pretrained, pseudo_rule={"tile_topk": pseudo_topk} if pseudo_topk else {},
                        **kw, **extra)
    if tile_rule:
        cfg.tile_rule = {**cfg.tile_rule, **tile_rule}
    try:
        distill(cfg, log=lambda s: typer.echo(s))
    except KeyboardInterrupt:
        typer.echo(f"interrupted; finished epochs are saved in {out}; continue with --resume", err=True)
        raise typer.Exit(130)
    except (BadInputError, ModelFileError, FileNotFoundError, FileExistsError, ValueError) as exc:
        _fail(str(exc).splitlines()[0])


def _launch_torchrun(n: int, device: str, threads: int | None) -> int:
    """Re-run this very command under ``torchrun --standalone --nproc-per-node N`` (each child sees WORLD_SIZE and
    trains its share); returns the exit status.  CPU processes share the cores (``--threads`` each, default
    cores / N)."""
    import subprocess

    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        if torch.cuda.device_count() < n:
            _fail(f"--devices {n}: only {torch.cuda.device_count()} CUDA device(s) here")
    argv = list(_ARGV if _ARGV is not None else sys.argv[1:])
    if threads is None:
        argv += ["--threads", str(max(1, (os.cpu_count() or 1) // n))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "crackcam.train.cli", *argv]
    typer.echo(f"crack-train: launching {n} processes with torchrun (DistributedDataParallel)", err=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n))))
    return subprocess.run(cmd, env=env).returncode


_ARGV: list[str] | None = None  # the command line main() was given (re-used by --devices)


def main(argv=None) -> None:
    global _ARGV
    _ARGV = list(argv) if argv is not None else sys.argv[1:]
    app(argv, prog_name="crack-train")


if __name__ == "__main__":
    main()
