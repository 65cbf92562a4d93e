"""The package's arrows point one way (CONTRIBUTING / crackcam/__init__.py): ``models`` imports nothing from
train/export/runtime; ``runtime`` imports nothing from models/train/export and no torch (tests/test_runtime.py).
Modules are found by walking the packages, so a new module is checked without editing a list."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_WALK = """
import sys, importlib, pkgutil
import crackcam.{pkg} as P
mods = [m.name for m in pkgutil.walk_packages(P.__path__, "crackcam.{pkg}.")]
for m in mods:
    importlib.import_module(m)
bad = sorted(m for m in sys.modules if m.startswith(tuple("crackcam." + f for f in {forbidden!r})))
print("MODULES", len(mods))
print("FORBIDDEN", bad)
"""


@pytest.mark.parametrize("pkg, forbidden", [("models", ("train", "export", "runtime", "tools")),
                                            ("runtime", ("models", "train", "export", "tools"))])
def test_imports_point_one_way(pkg, forbidden):
    pytest.importorskip("torch")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _WALK.format(pkg=pkg, forbidden=forbidden)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    n = int(r.stdout.split("MODULES")[1].split()[0])
    assert n >= 5, r.stdout  # the walk found the package's modules
    assert "FORBIDDEN []" in r.stdout, r.stdout
