"""``crack-bench AREA [options]``: the benchmark commands, one per area, each printing its figures side by side
with the reference measured in the same run.

  crack-bench cam          CAM methods (explicit-gradient heads) vs the grad-cam package, seconds per image
  crack-bench export       Grad-CAM++ folded ONNX graph vs grad-cam vs plain ONNX forward (448², batch 1 and 8)
  crack-bench runtime      bare ONNX Runtime FPS vs crack-run end-to-end FPS; post-processing ms per frame
  crack-bench postprocess  shared OpenCV post-processing vs a scikit-image-only pipeline
  crack-bench survey       survey frames (1280x1080): crack-run FPS end to end vs the model alone, per-step ms
  crack-bench ray          crack-run --engine ray vs the local engine, 1 and 2 workers, per-frame breakdown
  crack-bench student      distilled segmenter (fp32, int8) vs the packaged CAM model: FPS and validation F1

Options after AREA go to that benchmark (``crack-bench export --help``).
"""

from __future__ import annotations

import importlib
import sys

def _input_errors() -> tuple:
    """The runtime's bad-input and missing-backend errors (each says the file and the problem in one line)."""
    from crackcam.runtime.imageio import BadInputError
    from crackcam.runtime.meta import BackendUnavailable, ModelFileError
    from crackcam.runtime.survey import RoiError

    return (BadInputError, ModelFileError, BackendUnavailable, RoiError, FileNotFoundError)


BENCH_INPUT_ERRORS = _input_errors()

AREAS = {
    "cam": "crackcam.tools.bench_cam",
    "export": "crackcam.tools.bench_export",
    "runtime": "crackcam.tools.bench_runtime",
    "postprocess": "crackcam.tools.bench_postprocess",
    "survey": "crackcam.tools.bench_survey",
    "ray": "crackcam.tools.bench_ray",
    "student": "crackcam.tools.bench_student",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in AREAS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"crack-bench: unknown area {argv[0]!r}; choose one of {', '.join(AREAS)}")
            return 2
        return 0
    mod = importlib.import_module(AREAS[argv[0]])
    sys.argv = [f"crack-bench {argv[0]}"] + argv[1:]
    try:
        ret = mod.main()
    except BENCH_INPUT_ERRORS as exc:  # a bad model file, image or ROI, a missing backend: one line, exit 2
        print(f"crack-bench {argv[0]}: {exc}", file=sys.stderr)
        return 2
    return int(ret or 0)


if __name__ == "__main__":
    raise SystemExit(main())
