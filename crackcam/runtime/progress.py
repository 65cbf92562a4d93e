"""Progress that suits where it goes: a tqdm bar on a terminal, one plain line every ``every`` items in a log file.

    for item in progress(items, "crack-eval", unit="img"):
        ...

A bar redraws itself with ``\\r``, which fills a log file with thousands of fragments; when stderr is not a
terminal (a pipe, a file, CI) this prints ``desc: n/total unit (rate/s)`` every ``every`` items and at the end.
``CRACKCAM_PROGRESS=bar|lines|off`` forces one behaviour.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def mode(stream=None) -> str:
    """``bar``, ``lines`` or ``off`` for ``stream`` (default stderr)."""
    forced = os.environ.get("CRACKCAM_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    stream = stream or sys.stderr
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):
        return "lines"


class LineProgress:
    """tqdm-like object for log files: ``update(n)``, ``set_postfix(**kw)``, ``close()``, ``write(msg)``."""

    def __init__(self, total: int | None, desc: str, unit: str, every: int, stream=None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, max(1, int(every))
        self.stream = stream or sys.stderr
        self.n = 0
        self.t0 = time.perf_counter()
        self._last = 0
        self.postfix = ""

    def _line(self) -> None:
        dt = max(1e-9, time.perf_counter() - self.t0)
        tot = f"/{self.total}" if self.total else ""
        post = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}{tot} {self.unit} ({self.n / dt:.1f} {self.unit}/s){post}", file=self.stream,
              flush=True)
        self._last = self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n - self._last >= self.every:
            self._line()

    def set_postfix(self, **kw) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def write(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self.n != self._last:
            self._line()


class _Off(LineProgress):
    def _line(self) -> None:
        self._last = self.n


def bar(total: int | None = None, desc: str = "", unit: str = "it", every: int = 50, leave: bool = False):
    """A progress object (tqdm on a terminal, :class:`LineProgress` otherwise)."""
    m = mode()
    if m == "bar":
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=sys.stderr)
    return (LineProgress if m == "lines" else _Off)(total, desc, unit, every)


def progress(it: Iterable[T], desc: str = "", total: int | None = None, unit: str = "it", every: int = 50,
             leave: bool = False) -> Iterator[T]:
    """Iterate ``it`` showing progress (see the module docstring)."""
    if total is None:
        try:
            total = len(it)  # type: ignore[arg-type]
        except TypeError:
            total = None
    p = bar(total, desc, unit, every, leave)
    try:
        for x in it:
            yield x
            p.update(1)
    finally:
        p.close()
