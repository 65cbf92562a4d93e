"""``crack-export``: a crack-train run folder → one self-contained ONNX graph with the CAM folded in (pre-processing,
classifier, explicit-gradient CAM, upsampling, gating), verified against PyTorch, or a TensorRT engine built from it.

    crack-export --method gradcam++ --format onnx            # newest run under ./runs, its recipe's defaults
    crack-export --checkpoint runs/vgg16 --format trt --fp16
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)

FORMATS = ("onnx", "trt")


def _fail(msg: str, code: int = 2):
    typer.echo(f"crack-export: {msg}", err=True)
    raise typer.Exit(code)


def _dim(value: str, name: str) -> int | None:
    v = str(value).strip().lower()
    if v in ("dynamic", "dyn", "none", "auto", ""):
        return None
    try:
        n = int(v)
    except ValueError:
        _fail(f"--{name} must be a positive integer or 'dynamic', not {value!r}")
    if n <= 0:
        _fail(f"--{name} must be a positive integer or 'dynamic', not {value!r}")
    return n


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@app.command()
def export(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c",
                                              help="crack-train run folder (default: the newest run under ./runs)"),
    method: Optional[str] = typer.Option(None, help="CAM method (default: the run's recipe.json, else gradcam++)"),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or trt (TensorRT engine, needs an NVIDIA GPU)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="output file (default: DIR/export/<model>_<method>.onnx|.engine)"),
    opset: int = typer.Option(18, help="ONNX opset"),
    exporter: str = typer.Option("auto", help="auto (legacy then dynamo; for trt dynamo then legacy), legacy or "
                                              "dynamo"),
    batch: str = typer.Option("dynamic", help="batch size N or 'dynamic'"),
    height: str = typer.Option("dynamic", help="input height H or 'dynamic'"),
    width: str = typer.Option("dynamic", help="input width W or 'dynamic'"),
    outputs: str = typer.Option("prob,map", help="comma list of map, prob, logits, activations, gradients"),
    layers: Optional[str] = typer.Option(None, help="comma list of target layers (default: recipe's, else the "
                                                    "model's first target layer)"),
    gate: Optional[float] = typer.Option(None, help="map is zero where prob < gate (default: recipe's, else 0.5)"),
    threshold: Optional[str] = typer.Option(None, help="default threshold written to the metadata (float, otsu, "
                                                       "pXX; default: recipe's, else 0.5)"),
    which: str = typer.Option("best", help="best or last weights"),
    verify: bool = typer.Option(True, help="verify ONNX Runtime against PyTorch before writing"),
    tol_map: float = typer.Option(1e-4, help="verification tolerance on the map (max abs difference)"),
    tol_prob: float = typer.Option(1e-5, help="verification tolerance on prob"),
    fp16: bool = typer.Option(False, "--fp16", help="TensorRT: allow FP16 kernels"),
    int8: bool = typer.Option(False, "--int8", help="INT8 calibrated over --calib: ONNX Runtime static quantization "
                              "(--format onnx: NAME.int8.onnx beside the fp32 graph) or TensorRT INT8 (trt)"),
    calib: Optional[Path] = typer.Option(None, help="TensorRT INT8: folder of typical images"),
    opt_size: int = typer.Option(448, help="TensorRT profile: optimal H and W for dynamic sizes"),
    min_size: int = typer.Option(64, help="TensorRT profile: smallest H and W"),
    max_size: int = typer.Option(1024, help="TensorRT profile: largest H and W"),
    max_batch: int = typer.Option(8, help="TensorRT profile: largest batch for a dynamic batch"),
    workspace: float = typer.Option(4.0, help="TensorRT builder workspace (GiB)"),
    cache_dir: Optional[Path] = typer.Option(None, help="TensorRT engine cache (default ~/.cache/crackcam/trt)"),
):
    """Export a trained crack classifier with its CAM folded into one ONNX graph (or a TensorRT engine)."""
    from crackcam.runtime.imageio import BadInputError

    fmt = fmt.lower()
    if fmt not in FORMATS:
        _fail(f"--format must be onnx or trt, not {fmt!r}")
    if fmt == "trt":  # say so at once, before minutes of export work
        from .tensorrt import TensorRTUnavailable, check_available

        try:
            check_available()
        except TensorRTUnavailable as exc:
            _fail(str(exc))
    if int8 and calib is None:
        _fail("--int8 needs --calib DIR (a folder of typical road images; training images, not the test split)")
    if calib is not None and not calib.is_dir():
        _fail(f"{calib}: calibration folder not found")

    from .api import ExportSettings, export_checkpoint, find_latest_run

    if checkpoint is None:
        checkpoint = find_latest_run()
        if checkpoint is None:
            _fail("no run folder found under ./runs (a folder with config.json and best.pt); "
                  "train one with crack-train or pass --checkpoint DIR")
        typer.echo(f"[crack-export] using the newest run: {checkpoint}")
    if not checkpoint.is_dir():
        _fail(f"{checkpoint}: run folder not found")

    outs = _csv(outputs) or ["prob", "map"]
    thr = threshold
    if thr is not None:
        try:
            thr = float(thr)
        except ValueError:
            pass
    settings = ExportSettings(method=method, layers=_csv(layers) or None, outputs=outs, batch=_dim(batch, "batch"),
                              height=_dim(height, "height"), width=_dim(width, "width"), opset=opset,
                              exporter=exporter, prefer_dynamo=fmt == "trt", gate=gate, threshold=thr, which=which,
                              verify=verify, tol_map=tol_map, tol_prob=tol_prob)
    onnx_out = out
    if fmt == "trt" and out is not None:
        onnx_out = out.with_suffix(".onnx")
    from .onnx_export import ExportError
    from .verify import VerificationError

    try:
        res = export_checkpoint(checkpoint, onnx_out, settings, log=lambda s: typer.echo(f"[crack-export] {s}"))
    except VerificationError as exc:
        _fail(str(exc))
    except (ExportError, BadInputError, FileNotFoundError, ValueError, KeyError) as exc:
        _fail(" ".join(str(exc).split()) or type(exc).__name__)
    for note in res.notes:
        typer.echo(f"[crack-export] {note}")
    meta = res.metadata
    inp = meta["input"]
    dims = "×".join("?" if inp[k] is None else str(inp[k]) for k in ("batch", "height", "width"))
    typer.echo(f"[crack-export] wrote {res.path} ({res.path.stat().st_size / 1e6:.1f} MB, {res.exporter} exporter, "
               f"{meta['model']} {meta['method'] or meta['kind']}, input {dims}×3 uint8 BGR, outputs "
               f"{', '.join(meta['outputs'])}) in {res.seconds:.1f} s")
    if fmt == "onnx":
        if int8:
            from .quantize import quantize_int8

            q_out = res.path.with_name(res.path.stem + ".int8.onnx")
            try:
                quantize_int8(res.path, q_out, calib, log=lambda s: typer.echo(f"[crack-export] {s}"))
            except (ExportError, BadInputError) as exc:
                _fail(" ".join(str(exc).split()))
        return
    from .api import default_out
    from .tensorrt import EngineBuildError, TensorRTUnavailable, build_engine, make_profile

    engine_out = out or default_out(checkpoint, meta, "trt")
    profile = make_profile(inp, opt_hw=(opt_size, opt_size), min_hw=(min_size, min_size),
                           max_hw=(max_size, max_size), max_batch=max_batch)
    try:
        eng = build_engine(res.path, engine_out, meta, fp16=fp16, int8=int8, calib=calib, profile=profile,
                           workspace_gb=workspace, cache_dir=cache_dir, log=typer.echo)
    except (TensorRTUnavailable, EngineBuildError, BadInputError) as exc:
        _fail(str(exc))
    typer.echo(f"[crack-export] wrote {eng.path} (+ {eng.path.name}.json metadata) for {eng.gpu['name']} "
               f"(sm {eng.gpu['compute_capability']}, TensorRT {eng.trt_version})"
               f"{' from the engine cache' if eng.from_cache else ''}")
    if verify:
        from .tensorrt import verify_engine
        from .verify import default_images

        b, h, w = eng.profile.opt
        try:
            diff = verify_engine(eng.path, res.path, default_images(b, h, w))
        except Exception as exc:  # noqa: BLE001 - report, the engine is written
            typer.echo(f"[crack-export] could not run the engine to compare it: {' '.join(str(exc).split())[:200]}")
        else:
            typer.echo(f"[crack-export] engine vs ONNX Runtime (CPU) at {b}×{h}×{w}: max diff prob {diff['prob']:.2e}, "
                       f"map {diff['map']:.2e}{' (FP16/INT8 kernels)' if fp16 or int8 else ' (TF32 kernels)'}")


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, prog_name="crack-export", standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
