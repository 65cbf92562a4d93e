"""Inference sessions: ONNX Runtime (TensorRT → CUDA → CPU providers) and a native TensorRT engine runner.

Both take a uint8 NHWC BGR batch and return ``(prob [N] float32, map [N,H,W] float32)`` as the contract says.
Nothing here imports torch.  TensorRT and CUDA are optional: when absent, opening an ``.engine`` raises
:class:`BackendUnavailable` with one line (the CLI prints it and exits 2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .meta import (BackendUnavailable, ModelFileError, ModelMeta, check_io, is_engine_path, meta_from_map,
                   sidecar_meta)
from .optional import OptionalBroken, cuda_device_count, import_cudart, import_optional

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def _short(name: str) -> str:
    return name.replace("ExecutionProvider", "")


def choose_providers(provider: str, available: list[str]) -> list[str]:
    """The provider chain to try: ``auto`` → every one of TensorRT, CUDA, CPU that this onnxruntime offers;
    an explicit name → that provider then CPU.  An explicit provider this build lacks → BackendUnavailable."""
    provider = (provider or "auto").lower()
    if provider == "auto":
        chain = [p for p in PROVIDER_ORDER if p in available]
        return chain or ["CPUExecutionProvider"]
    if provider not in PROVIDER_ALIASES:
        raise BackendUnavailable(f"unknown provider {provider!r} (choose auto, tensorrt, cuda or cpu)")
    want = PROVIDER_ALIASES[provider]
    if want not in available:
        raise BackendUnavailable(f"provider {provider!r} is not available in this onnxruntime "
                                 f"(available: {', '.join(_short(p) for p in available)}); "
                                 f"install onnxruntime-gpu / TensorRT or use --provider cpu")
    return [want] + ([] if want == "CPUExecutionProvider" else ["CPUExecutionProvider"])


class Session:
    """Common interface."""

    meta: ModelMeta
    path: Path
    provider: str = ""
    max_batch: int | None = None

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


def frame_pass_tile_outputs(logits: np.ndarray, k: int, tile) -> tuple[np.ndarray, np.ndarray]:
    """What a top-k tile graph outputs for tiles whose per-position logits are ``logits`` (N×h×w): ``prob`` =
    σ(mean of the top ``k``), ``map`` = σ(z) resized to ``tile`` (bilinear with half-pixel centres, the rule of
    ONNX's Resize and of OpenCV's INTER_LINEAR).  Shared by the frame pass (``steps.infer_frame``) and the export
    check (``crackcam.export.frame_pass``)."""
    z = np.asarray(logits, np.float32)
    prob = frame_pass_probs(z, k)
    th, tw = int(tile[0]), int(tile[1])
    maps = np.stack([cv2.resize(sigmoid(m), (tw, th), interpolation=cv2.INTER_LINEAR) for m in z]) if len(z) \
        else np.zeros((0, th, tw), np.float32)
    return prob, maps


def frame_pass_probs(logits: np.ndarray, k: int) -> np.ndarray:
    """σ(mean of the top ``k`` of each window's logits) — a top-k head's tile probability (N×h×w → N)."""
    z = np.asarray(logits, np.float32)
    top = np.partition(z.reshape(z.shape[0], -1), -int(k), axis=1)[:, -int(k):]
    return sigmoid(top.astype(np.float64).mean(axis=1)).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, float32 in → float32 out."""
    x = np.asarray(x)
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32 if x.dtype == np.float32 else np.float64)


def _outputs_to_prob_map(meta: ModelMeta, names: list[str], outs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    d = dict(zip(names, outs))
    m = np.asarray(d["map"], dtype=np.float32)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if "prob" in d:
        p = np.asarray(d["prob"], dtype=np.float32).reshape(m.shape[0], -1)[:, 0]
    else:  # restoration graphs: no classifier, the strongest map value stands in
        p = m.reshape(m.shape[0], -1).max(axis=1)
    return p, m


class OrtSession(Session):
    """ONNX Runtime session with the provider chain of :func:`choose_providers`."""

    def __init__(self, path, provider: str = "auto", log: Callable[[str], None] = print,
                 threads: int | None = None, trt_cache: str | None = None, spin: bool | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(self.path, "model file not found")
        available = ort.get_available_providers()
        chain = choose_providers(provider, available)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        if spin is not None:  # ORT's idle threads busy-wait by default; in a pipeline that steals decode/post CPU
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        opts = []
        for p in chain:
            if p == "TensorrtExecutionProvider":
                cache = trt_cache or os.path.join(os.path.expanduser("~"), ".cache", "crackcam", "trt")
                opts.append({"trt_engine_cache_enable": True, "trt_engine_cache_path": cache, "trt_fp16_enable": True})
            else:
                opts.append({})
        sess = None
        while chain:
            try:
                sess = ort.InferenceSession(str(self.path), so, providers=chain, provider_options=opts)
                break
            except Exception as e:  # noqa: BLE001 - decide below: bad file vs. failing provider
                msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                if chain == ["CPUExecutionProvider"] or _looks_like_bad_model(msg):
                    raise ModelFileError(self.path, f"not a loadable ONNX model ({msg})")
                log(f"crack-run: provider {_short(chain[0])} failed to start ({msg}); falling back to "
                    f"{_short(chain[1])}")
                chain, opts = chain[1:], opts[1:]
        active = sess.get_providers()
        for p in chain:  # providers ORT dropped silently while building the session
            if p not in active:
                nxt = next((q for q in chain[chain.index(p) + 1:] if q in active), active[0])
                log(f"crack-run: provider {_short(p)} did not initialise; falling back to {_short(nxt)}")
                break
        self.sess = sess
        self.provider = _short(active[0])
        self.meta = meta_from_map(sess.get_modelmeta().custom_metadata_map, self.path)
        ins = [(i.name, i.type, list(i.shape)) for i in sess.get_inputs()]
        self.output_names = [o.name for o in sess.get_outputs()]
        check_io(self.meta, ins, self.output_names, self.path)
        self.max_batch = self.meta.batch
        self._want = [n for n in ("prob", "map") if n in self.output_names]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.meta.frame_pass:  # tiles through a frame-pass graph: the tile graph's outputs from its logits
            fp = self.meta.frame_pass
            return frame_pass_tile_outputs(self.run_logits(batch), fp["k"], fp["tile"])
        outs = self.sess.run(self._want, {"image": np.ascontiguousarray(batch, dtype=np.uint8)})
        return _outputs_to_prob_map(self.meta, self._want, outs)

    def run_logits(self, batch: np.ndarray) -> np.ndarray:
        """A frame-pass graph's per-position crack logits (N×h×w) of uint8 NHWC BGR images whose height and width
        are whole multiples of its stride (``steps.frame_pass_input`` pads them)."""
        z = np.asarray(self.sess.run(["logits"], {"image": np.ascontiguousarray(batch, dtype=np.uint8)})[0],
                       np.float32)
        return z.reshape(z.shape[0], z.shape[-2], z.shape[-1])


def _looks_like_bad_model(msg: str) -> bool:
    m = msg.lower()
    return any(s in m for s in ("protobuf", "invalid_graph", "invalid_protobuf", "load model", "no_suchfile",
                                "model_path", "failed to load", "parse"))


def _import_trt():
    """TensorRT + cuda-python's runtime bindings, or one line saying what is missing -- or what is broken."""
    hint = "pip install 'crackcam[trt]' cuda-python"
    try:
        trt = import_optional("tensorrt")
        cudart = import_cudart()
    except OptionalBroken as exc:  # installed but not loadable: a fault to fix, not an absence
        raise BackendUnavailable(f"TensorRT engines cannot run: {exc}") from None
    if trt is None:
        raise BackendUnavailable(f"TensorRT engines need the 'tensorrt' Python package and an NVIDIA GPU ({hint}); "
                                 f"tensorrt is not installed here")
    if cudart is None:
        raise BackendUnavailable(f"TensorRT engines need the 'cuda-python' package for device buffers ({hint}); "
                                 f"it is not installed here")
    try:
        n = cuda_device_count(cudart)
    except OptionalBroken as exc:
        raise BackendUnavailable(f"TensorRT engines cannot run: {exc}") from None
    if n < 1:
        raise BackendUnavailable("TensorRT engines need an NVIDIA GPU; CUDA reports none here")
    return trt, cudart


def _ck(res):
    """cuda-python calls return ``(err, *values)``; raise on error, return the values."""
    err, *rest = res if isinstance(res, tuple) else (res,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (rest or None)


class TrtSession(Session):
    """Native TensorRT 10 runner: Runtime → deserialize_cuda_engine → execution context, ``set_input_shape``,
    ``set_tensor_address`` and ``execute_async_v3`` on a CUDA stream; buffers through cuda-python's ``cudart``."""

    def __init__(self, path, log: Callable[[str], None] = print):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(self.path, "engine file not found")
        self.meta = sidecar_meta(self.path)  # checked before touching the GPU
        if self.meta.frame_pass:
            raise ModelFileError(self.path, "frame-pass graphs run with ONNX Runtime (--provider tensorrt / cuda "
                                            "on the .onnx); this native engine runner reads tile engines only")
        trt, cudart = _import_trt()
        self.trt, self.cudart = trt, cudart
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ModelFileError(self.path, "TensorRT could not deserialize this engine (built for another "
                                            "TensorRT version or GPU?)")
        self.ctx = self.engine.create_execution_context()
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = self.engine.get_tensor_mode(name)
            (self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs).append(name)
        shape = list(self.engine.get_tensor_shape("image")) if "image" in self.inputs else []
        dt = str(self.engine.get_tensor_dtype("image")).lower() if "image" in self.inputs else "?"
        ins = [(n, dt if n == "image" else "?", [d if d > 0 else None for d in shape] if n == "image" else [])
               for n in self.inputs]
        check_io(self.meta, ins, self.outputs, self.path)
        if shape and shape[0] == -1:
            _, _, mx = self.engine.get_tensor_profile_shape("image", 0)
            self.max_batch = int(mx[0])
        else:
            self.max_batch = int(shape[0]) if shape else 1
        self.stream = _ck(cudart.cudaStreamCreate())
        self._bufs: dict[str, tuple[int, int]] = {}  # name -> (ptr, nbytes)
        self.provider = "TensorRT-engine"
        self._want = [n for n in ("prob", "map") if n in self.outputs]

    def _buf(self, name: str, nbytes: int) -> int:
        ptr, size = self._bufs.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _ck(self.cudart.cudaFree(ptr))
            ptr = int(_ck(self.cudart.cudaMalloc(nbytes)))
            self._bufs[name] = (ptr, nbytes)
        return ptr

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        trt, cudart = self.trt, self.cudart
        x = np.ascontiguousarray(batch, dtype=np.uint8)
        self.ctx.set_input_shape("image", tuple(x.shape))
        dptr = self._buf("image", x.nbytes)
        self.ctx.set_tensor_address("image", dptr)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _ck(cudart.cudaMemcpyAsync(dptr, x.ctypes.data, x.nbytes, h2d, self.stream))
        hosts = {}
        for name in self.outputs:
            shp = tuple(self.ctx.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            host = np.empty(shp, dtype)
            self.ctx.set_tensor_address(name, self._buf(name, max(host.nbytes, 1)))
            hosts[name] = host
        if not self.ctx.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"{self.path}: TensorRT execute_async_v3 failed")
        for name, host in hosts.items():
            _ck(cudart.cudaMemcpyAsync(host.ctypes.data, self._bufs[name][0], host.nbytes, d2h, self.stream))
        _ck(cudart.cudaStreamSynchronize(self.stream))
        return _outputs_to_prob_map(self.meta, self._want, [hosts[n] for n in self._want])

    def close(self) -> None:
        for ptr, _ in self._bufs.values():
            self.cudart.cudaFree(ptr)
        self._bufs.clear()


def open_session(path, provider: str = "auto", log: Callable[[str], None] = print,
                 threads: int | None = None, spin: bool | None = None) -> Session:
    """``.engine``/``.plan``/``.trt`` → :class:`TrtSession`; anything else → :class:`OrtSession`."""
    p = Path(path)
    if is_engine_path(p):
        return TrtSession(p, log=log)
    return OrtSession(p, provider=provider, log=log, threads=threads, spin=spin)
