"""TensorRT 10 engines from the exported ONNX graph (``crack-export --format trt``).

Build path (TensorRT 10 Python API): ``Builder`` → ``create_network(0)`` (explicit batch is the only mode in 10.x)
→ ``OnnxParser.parse`` → ``BuilderConfig`` (workspace ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``,
``BuilderFlag.FP16`` / ``BuilderFlag.INT8``) → one optimisation profile for the dynamic ``image`` input
(min / opt / max N×H×W×3) → ``build_serialized_network``.

INT8 uses *implicit* quantisation with an ``IInt8EntropyCalibrator2`` fed by a folder of images (pre-processed
exactly like the runtime: BGR uint8 resized to the profile's opt size; the graph does the rest).  TensorRT 10.1
deprecated implicit quantisation in favour of explicit Q/DQ graphs (TensorRT Model Optimizer), which would need
another dependency and a second export path; the calibrator still works in every 10.x release and is the simplest
path that needs nothing beyond ``tensorrt``.  FP16 is enabled together with INT8 so layers without INT8 kernels
(the CAM tail) fall back to FP16, not FP32.

Engines are cached under ``~/.cache/crackcam/trt`` (``--cache-dir``), keyed by GPU name + compute capability +
TensorRT version + the ONNX file's sha256 + the build flags and profile, so a second export of the same model on
the same machine is instant.  An engine only runs on the GPU model and TensorRT version it was built with.

The runtime needs the model's metadata beside an engine: ``NAME.engine.json`` holds the same ``crackcam`` JSON as
the ONNX file (see ``crackcam.runtime.meta.sidecar_meta``).

Where ``tensorrt``, ``cuda-python`` or an NVIDIA GPU are missing, :func:`check_available` raises
:class:`TensorRTUnavailable` with one line saying what is missing and how to get it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.optional import OptionalBroken, cuda_device_count, import_cudart, import_optional
from ..runtime.sinks import file_sha256

INSTALL_HINT = ("install it on a machine with an NVIDIA GPU and driver: pip install 'crackcam[trt]' cuda-python "
                "(TensorRT 10); or use the ONNX file with ONNX Runtime: crack-export --format onnx")
DEFAULT_CACHE = Path(os.path.expanduser("~")) / ".cache" / "crackcam" / "trt"


class TensorRTUnavailable(RuntimeError):
    """TensorRT / CUDA / a GPU is missing (one line)."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build (one line)."""


@dataclass(frozen=True)
class Profile:
    """Optimisation profile for the ``image`` input, as (batch, height, width) triples."""

    min: tuple[int, int, int]
    opt: tuple[int, int, int]
    max: tuple[int, int, int]

    def shapes(self):
        return tuple((b, h, w, 3) for b, h, w in (self.min, self.opt, self.max))


def _import_tensorrt():
    try:
        trt = import_optional("tensorrt")
    except OptionalBroken as exc:  # installed but broken (libnvinfer missing, ...): say so, do not call it absent
        raise TensorRTUnavailable(f"TensorRT {exc}; --format trt needs a working 'tensorrt' package; "
                                  f"{INSTALL_HINT}") from None
    if trt is None:
        raise TensorRTUnavailable(f"TensorRT is not installed: --format trt needs the 'tensorrt' package; "
                                  f"{INSTALL_HINT}")
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: crackcam builds engines with the "
                                  f"TensorRT 10 API; {INSTALL_HINT}")
    return trt


def _import_cudart():
    """cuda-python's runtime, or None when it is not installed (a broken install is TensorRTUnavailable)."""
    try:
        return import_cudart()
    except OptionalBroken as exc:
        raise TensorRTUnavailable(f"{exc}; {INSTALL_HINT}") from None


def gpu_info() -> dict | None:
    """``{"name", "compute_capability"}`` of GPU 0, or None when no NVIDIA GPU / driver is reachable."""
    cudart = _import_cudart()
    if cudart is not None:
        try:
            n = cuda_device_count(cudart)
        except OptionalBroken as exc:  # a driver is loaded and CUDA fails: broken, not absent
            raise TensorRTUnavailable(f"{exc}; {INSTALL_HINT}") from None
        try:
            if n > 0:
                err, prop = cudart.cudaGetDeviceProperties(0)
                if int(err) == 0:
                    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
                    return {"name": name.strip("\x00 "), "compute_capability": f"{prop.major}.{prop.minor}"}
        except Exception:  # noqa: BLE001
            pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception:  # noqa: BLE001
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20)
            line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
            if line:
                name, cc = [s.strip() for s in line.split(",")[:2]]
                return {"name": name, "compute_capability": cc}
        except Exception:  # noqa: BLE001
            pass
    return None


def check_available():
    """``(tensorrt module, gpu_info)``; :class:`TensorRTUnavailable` (one line) when anything is missing."""
    trt = _import_tensorrt()
    gpu = gpu_info()
    if gpu is None:
        raise TensorRTUnavailable(f"no NVIDIA GPU found (CUDA reports none): TensorRT engines are built on the GPU "
                                  f"they will run on; {INSTALL_HINT}")
    return trt, gpu


def cache_key(*, gpu: dict, trt_version: str, onnx_sha256: str, fp16: bool, int8: bool, profile: Profile,
              workspace_gb: float, calib_digest: str | None = None) -> str:
    """The engine cache key: everything an engine depends on, hashed (docs/export.md)."""
    blob = json.dumps({"gpu": gpu["name"], "cc": gpu["compute_capability"], "trt": trt_version,
                       "onnx": onnx_sha256, "fp16": bool(fp16), "int8": bool(int8),
                       "profile": [list(profile.min), list(profile.opt), list(profile.max)],
                       "workspace_gb": float(workspace_gb), "calib": calib_digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def make_profile(meta_input: dict, *, opt_hw=(448, 448), min_hw=(64, 64), max_hw=(1024, 1024), opt_batch=1,
                 max_batch=8) -> Profile:
    """Profile from the graph's input dims: fixed dims are used as they are, dynamic ones get the given ranges."""
    b, h, w = meta_input.get("batch"), meta_input.get("height"), meta_input.get("width")

    def rng(fixed, lo, opt, hi):
        return (fixed, fixed, fixed) if fixed else (min(lo, opt), opt, max(hi, opt))

    bb, hh, ww = rng(b, 1, opt_batch, max_batch), rng(h, min_hw[0], opt_hw[0], max_hw[0]), \
        rng(w, min_hw[1], opt_hw[1], max_hw[1])
    return Profile((bb[0], hh[0], ww[0]), (bb[1], hh[1], ww[1]), (bb[2], hh[2], ww[2]))


# --------------------------------------------------------------------------------------------- calibration
def calibration_batches(folder, batch: int, height: int, width: int, limit: int = 512):
    """uint8 NHWC BGR batches from the images in ``folder`` (resized to height×width), like the runtime feeds."""
    import cv2

    from crackcam.runtime.imageio import BadInputError, list_images, read_image

    files = list_images(folder)
    if not files:
        raise BadInputError(folder, "no images to calibrate INT8 with")
    imgs = []
    for f in files[:limit]:
        try:
            rgb = read_image(f)
        except BadInputError as exc:
            print(f"[crack-export] skipping {exc}")
            continue
        imgs.append(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)[..., ::-1])
    if not imgs:
        raise BadInputError(folder, "no readable images to calibrate INT8 with")
    for i in range(0, len(imgs), batch):
        chunk = imgs[i:i + batch]
        if len(chunk) < batch:  # the calibrator's batch size is fixed: repeat to fill the last one
            chunk = (chunk * batch)[:batch]
        yield np.ascontiguousarray(np.stack(chunk))


def folder_digest(folder) -> str:
    from crackcam.runtime.imageio import list_images

    h = hashlib.sha256()
    for f in list_images(folder):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def make_calibrator(trt, folder, batch: int, height: int, width: int, cache_file: Path):
    """An ``IInt8EntropyCalibrator2`` over the images in ``folder`` (device buffers through cuda-python)."""
    cudart = _import_cudart()
    if cudart is None:
        raise TensorRTUnavailable(f"INT8 calibration needs cuda-python for device buffers; {INSTALL_HINT}")

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = iter(calibration_batches(folder, batch, height, width))
            self.nbytes = batch * height * width * 3
            err, self.dptr = cudart.cudaMalloc(self.nbytes)
            if int(err) != 0:
                raise EngineBuildError(f"cudaMalloc failed ({err}) for the calibration buffer")

        def get_batch_size(self):
            return batch

        def get_batch(self, names):
            try:
                x = next(self.batches)
            except StopIteration:
                return None
            cudart.cudaMemcpy(self.dptr, x.ctypes.data, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
            return [int(self.dptr)]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_bytes(bytes(cache))

        def free(self):
            if self.dptr:
                cudart.cudaFree(self.dptr)
                self.dptr = 0

    return _Calibrator()


# --------------------------------------------------------------------------------------------- build
@dataclass
class EngineResult:
    path: Path
    cache_path: Path
    from_cache: bool
    key: str
    gpu: dict
    trt_version: str
    profile: Profile


def build_engine(onnx_path, out_path, meta: dict, *, fp16: bool = False, int8: bool = False, calib=None,
                 profile: Profile | None = None, workspace_gb: float = 4.0, cache_dir=None,
                 log=print) -> EngineResult:
    """Build (or take from the cache) a serialized TensorRT engine for ``onnx_path``; write ``out_path`` and the
    metadata side-car ``out_path + '.json'`` atomically."""
    trt, gpu = check_available()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if int8 and not calib:
        raise EngineBuildError("--int8 needs --calib DIR (a folder of typical images for the INT8 calibration)")
    profile = profile or make_profile(meta["input"])
    digest = folder_digest(calib) if int8 else None
    key = cache_key(gpu=gpu, trt_version=trt.__version__, onnx_sha256=file_sha256(onnx_path), fp16=fp16, int8=int8,
                    profile=profile, workspace_gb=workspace_gb, calib_digest=digest)
    cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    cache_path = cache_dir / f"{key}.engine"
    from_cache = cache_path.is_file()
    if from_cache:
        log(f"[crack-export] engine cache hit: {cache_path}")
        data = cache_path.read_bytes()
    else:
        data = _build(trt, onnx_path, fp16=fp16, int8=int8, calib=calib, profile=profile,
                      workspace_gb=workspace_gb, calib_cache=cache_dir / f"{key}.calib", log=log)
        _atomic_write(cache_path, data)
    _atomic_write(out_path, data)
    side = dict(meta)
    side["tensorrt"] = {"version": trt.__version__, "gpu": gpu["name"], "compute_capability": gpu["compute_capability"],
                        "fp16": fp16, "int8": int8, "profile": {"min": list(profile.min), "opt": list(profile.opt),
                                                                "max": list(profile.max)},
                        "onnx_sha256": file_sha256(onnx_path), "cache_key": key}
    _atomic_write(out_path.with_name(out_path.name + ".json"), (json.dumps(side, indent=2) + "\n").encode())
    return EngineResult(out_path, cache_path, from_cache, key, gpu, trt.__version__, profile)


def _build(trt, onnx_path: Path, *, fp16, int8, calib, profile: Profile, workspace_gb, calib_cache: Path, log):
    logger = trt.Logger(trt.Logger.WARNING)
    # ScatterElements with reduction="add" (the max-pool backward) is TensorRT's scatterElements plugin
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT cannot parse the ONNX graph: {errs[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 or int8:
        if not getattr(builder, "platform_has_fast_fp16", True):  # deprecated in TensorRT 10
            log("[crack-export] note: this GPU has no fast FP16; building anyway")
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    opt_profile.set_shape(name, *profile.shapes())
    config.add_optimization_profile(opt_profile)
    calibrator = None
    if int8:
        if not getattr(builder, "platform_has_fast_int8", True):
            log("[crack-export] note: this GPU has no fast INT8; building anyway")
        config.set_flag(trt.BuilderFlag.INT8)
        b, h, w = profile.opt
        calibrator = make_calibrator(trt, calib, b, h, w, calib_cache)
        config.int8_calibrator = calibrator
        calib_profile = builder.create_optimization_profile()
        calib_profile.set_shape(name, (b, h, w, 3), (b, h, w, 3), (b, h, w, 3))
        config.set_calibration_profile(calib_profile)
    log(f"[crack-export] building TensorRT {trt.__version__} engine (fp16={fp16}, int8={int8}, profile min/opt/max "
        f"{profile.min}/{profile.opt}/{profile.max}); this takes a while")
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT messages above)")
    return bytes(serialized)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def verify_engine(engine_path, onnx_path, images, log=print) -> dict:
    """Run the engine (through the runtime's TensorRT session) and the ONNX file (ONNX Runtime, CPU) on the same
    uint8 batches; return the max abs differences of ``prob`` and ``map``."""
    import onnxruntime as ort

    from crackcam.runtime.sessions import open_session

    trt_sess = open_session(engine_path, log=lambda *_: None)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    worst = {"prob": 0.0, "map": 0.0}
    for x in images:
        p_ref, m_ref = ref.run(["prob", "map"], {"image": x})
        p, m = trt_sess.run(x)
        worst["prob"] = max(worst["prob"], float(np.abs(np.asarray(p) - p_ref).max()))
        worst["map"] = max(worst["map"], float(np.abs(np.asarray(m) - m_ref).max()))
    if hasattr(trt_sess, "close"):
        trt_sess.close()
    return worst
