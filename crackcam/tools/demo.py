"""``crack-demo``: the whole product on its embedded default, in about a minute on 2 CPU cores.

    crack-demo --out runs/demo

1. **train** (``crack-train``): draws a small crack / crack-free data set in code (random-walk cracks on asphalt-like
   noise, ``OUT/synthetic_data``, label rule ``name``) and trains the ``simple_cnn`` classifier on it;
2. **calibrate** (``crack-eval calibrate``): method, per-tile gate (128-px tiles), refinement, threshold, post-processing and minimum
   crack length on the *validation* images, under the 5 % false-alarm budget on its crack-free images;
3. **export** (``crack-export``): one verified ONNX graph with the CAM folded in (``OUT/export/model.onnx``);
4. **run** (``crack-run``): drawn survey-style frames, with and without cracks (``OUT/frames``) → ``OUT/run``
   (results.jsonl, summary.json, masks, overlays);
5. **summary**: ``OUT/summary.md`` (every figure and file, with the equivalent commands) and ``OUT/overlays.png``.

A finished ``OUT`` is refused (one line) unless ``--overwrite``; an interrupted one continues with ``--resume``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import typer

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0], pretty_exceptions_enable=False)


def _fail(msg: str, code: int = 2):
    typer.echo(f"crack-demo: {msg}", err=True)
    raise typer.Exit(code)


def draw_frames(folder: Path, n: int = 8, h: int = 384, w: int = 512, seed: int = 7) -> list[Path]:
    """Survey-style frames: asphalt texture, a painted lane line, cracks in every other frame."""
    from crackcam.train.synth import draw_crack_image, draw_paint

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img, mask = draw_crack_image(rng, h, w, n_cracks=(1 + i % 4) if i % 2 == 0 else 0)
        img = draw_paint(rng, np.ascontiguousarray(img))  # lane paint: a hard negative
        img[mask] = np.minimum(img[mask], 90)
        p = folder / f"frame_{i:03d}{'_crack' if i % 2 == 0 else '_clean'}.jpg"
        cv2.imwrite(str(p), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        out.append(p)
    return out


def _grid(paths: list[Path], width: int = 256) -> np.ndarray:
    tiles = []
    for p in paths:
        im = cv2.imread(str(p))
        s = width / im.shape[1]
        im = cv2.resize(im, (width, int(round(im.shape[0] * s))), interpolation=cv2.INTER_AREA)
        cv2.putText(im, p.stem[:28], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 255, 255), 1, cv2.LINE_AA)
        tiles.append(im)
    h = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 0), (0, 0))) for t in tiles]
    cols = 4
    rows = [np.concatenate(tiles[i:i + cols] + [np.zeros_like(tiles[0])] * (cols - len(tiles[i:i + cols])), 1)
            for i in range(0, len(tiles), cols)]
    return np.concatenate(rows, 0)


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="output folder"),
         overwrite: bool = typer.Option(False, "--overwrite", help="replace a finished demo in OUT"),
         resume: bool = typer.Option(False, "--resume", help="continue an interrupted demo in OUT")):
    """Draw data → train → calibrate → export → crack-run → overlays and a summary (see the module doc)."""
    from crackcam.runtime.imageio import BadInputError

    done = out / "summary.md"
    if done.is_file() and not overwrite:
        _fail(f"{out} already holds a finished demo ({done}); pass --overwrite to run it again or choose another --out")
    if overwrite and out.exists():
        shutil.rmtree(out)
    try:
        summary = run_demo(out, resume=resume)
    except KeyboardInterrupt:
        _fail(f"interrupted; what is finished is kept in {out}; continue with: crack-demo --out {out} --resume", 130)
    except BadInputError as exc:
        _fail(str(exc))
    typer.echo(summary)


def run_demo(out: Path, resume: bool = False, log=None) -> str:
    from crackcam.export.api import ExportSettings, export_checkpoint
    from crackcam.runtime.pipeline import Pipeline, RunConfig
    from crackcam.runtime.sessions import open_session
    from crackcam.runtime.sources import open_source
    from crackcam.tools.calibration import calibrate
    from crackcam.train.loop import TrainConfig, train

    log = log or (lambda s: typer.echo(s, err=True))
    out = Path(out)
    run = out / "train"
    # 1. train (resumable)
    if not (run / "metrics.json").is_file() or not json.loads((run / "metrics.json").read_text()).get("test"):
        log("crack-demo 1/5: crack-train on the embedded drawn data set")
        cont = resume and (run / "train_state.pt").is_file()
        train(TrainConfig(data=None, out=str(run), model="simple_cnn", resume=cont, overwrite=not cont,
                          progress=False), log=log)
    metrics = json.loads((run / "metrics.json").read_text())
    # 2. calibrate on validation images
    if not (run / "recipe.json").is_file():
        log("crack-demo 2/5: crack-eval calibrate (validation images, 5 % false-alarm budget)")
        calibrate(checkpoint=run, mode="tiles", quick=True, log=log)
    recipe = json.loads((run / "recipe.json").read_text())
    # 3. export
    onnx = out / "export" / "model.onnx"
    if not onnx.is_file():
        log("crack-demo 3/5: crack-export (one verified ONNX graph)")
        export_checkpoint(run, onnx, ExportSettings(), log=log)
    # 4. crack-run on drawn frames
    frames = out / "frames"
    if not frames.is_dir() or not any(frames.iterdir()):
        draw_frames(frames)
    log("crack-demo 4/5: crack-run on the drawn frames")
    sess = open_session(onnx, provider="cpu", log=log, spin=False)
    src = open_source(str(frames), log=log)
    # resume=False: 8 frames take a second, and a re-run of the demo may have re-trained the model
    summ = Pipeline(sess, src, RunConfig(out=out / "run", batch=4, save=("masks", "overlays"), progress=False,
                                         source_root=str(frames), resume=False), log=log).run()
    # 5. summary
    ov = sorted((out / "run" / "overlays").glob("*.jpg"))
    if ov:
        cv2.imwrite(str(out / "overlays.png"), _grid(ov))
    recs = [json.loads(ln) for ln in (out / "run" / "results.jsonl").read_text().splitlines() if ln.strip()]
    val = recipe.get("val", {})
    best = metrics.get("best_val") or {}
    lines = [
        "# crackcam demo", "",
        f"Everything below was made by `crack-demo --out {out}` from data drawn in code.", "",
        "| step | equivalent command | result |", "|---|---|---|",
        f"| train | `crack-train --out {run}` | {metrics['model']}, {metrics['epochs']} epochs, label rule "
        f"`{metrics['label_rule']}`; validation tiles F1 {best.get('f1', float('nan')):.3f} (test "
        f"{metrics.get('test', {}).get('f1', float('nan')):.3f}) |",
        f"| calibrate | `crack-eval calibrate --checkpoint {run}` | `{recipe['method']}`, threshold "
        f"{recipe['threshold']}, gate {recipe['gate']}, min length {recipe['survey']['min_length']:g} px — "
        f"validation pixel F1 {recipe['val_f1']:.3f}, crack-free images flagged {val.get('false_alarm_frames')}, "
        f"cracked images found {val.get('detection_rate')} ({recipe['chosen_on']}) |",
        f"| export | `crack-export --checkpoint {run} --out {onnx}` | {onnx} ({onnx.stat().st_size / 1e3:.0f} kB, "
        f"verified against PyTorch) |",
        f"| run | `crack-run --model {onnx} --source {frames} --out {out / 'run'} --save masks,overlays` | "
        f"{summ['cracked']}/{summ['frames']} frames cracked, {summ['fps']:.1f} FPS |", "",
        "Frames (drawn: `_crack` ones hold cracks, `_clean` ones only texture and lane paint):", "",
        "| frame | cracked | prob | crack length px |", "|---|---|---|---|",
        *[f"| {Path(r['source']).name} | {'yes' if r['cracked'] else 'no'} | {r['prob']:.3f} | {r['length_px']:.0f} |"
          for r in recs], "",
        f"Overlays (red: crack mask, yellow: skeleton): `{out / 'overlays.png'}`, one per frame in "
        f"`{out / 'run' / 'overlays'}`; per-frame records: `{out / 'run' / 'results.jsonl'}`.", ""]
    (out / "summary.md").write_text("\n".join(lines))
    return (f"crack-demo: trained (val F1 {best.get('f1', float('nan')):.3f}), calibrated ({recipe['method']}), "
            f"exported, ran {summ['frames']} frames ({summ['cracked']} cracked) → {out / 'summary.md'}, "
            f"{out / 'overlays.png'}")


def main() -> None:
    app(prog_name="crack-demo")


if __name__ == "__main__":
    main()
