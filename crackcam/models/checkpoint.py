"""Run folders: plain state dicts (``best.pt`` / ``last.pt``, loadable with ``torch.load(weights_only=True)``)
beside ``config.json``.  ``load_classifier(DIR, which="best") -> (model.eval(), config)``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from .registry import create_model


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def save_state_dict(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model.state_dict()`` (CPU tensors, contiguous) atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_torch_save(state, path)


def write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_config(run_dir: str | os.PathLike) -> dict:
    p = Path(run_dir) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: run config not found (is {run_dir} a crack-train output folder?)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_classifier(run_dir: str | os.PathLike, which: str = "best", map_location="cpu"):
    """Build the run's model and load its ``best`` or ``last`` weights (or a ``.pt`` path); returns
    ``(model.eval(), config)``."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    wpath = Path(which) if str(which).endswith(".pt") else run_dir / f"{which}.pt"
    if not wpath.is_file():
        raise FileNotFoundError(f"{wpath}: checkpoint not found")
    model = create_model(config["model"], pretrained=False, **config.get("model_kwargs", {}))
    try:
        state = torch.load(wpath, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a bad model file
        raise ValueError(f"{wpath}: cannot load state dict ({str(exc).splitlines()[0]})") from None
    model.load_state_dict(state)
    model.pretrained_source = config.get("pretrained_source")
    return model.eval(), config
