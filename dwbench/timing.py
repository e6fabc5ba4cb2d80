"""Where a cell's wall time goes: one clock per cell, split into named phases.

Phases nest (a model load inside the score stage), and each second is credited to the innermost
phase only, so the phases of a cell add up to its wall time: loading a model counts as `load`
wherever it happens, and MLflow calls count as `log` wherever they happen. `startup` is the
process's own start (interpreter, Hydra, dwbench) before its first cell. Heavy libraries
(torch, transformers, lm-eval) are imported where first needed, so their import lands in that
phase, mostly `load`; a later cell of the same process finds them imported.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psutil

PHASES = ("startup", "prepare", "load", "score", "select", "train", "evaluate", "log", "other")
METRIC_PREFIX = "time_"  # MLflow metric names: time_<phase>_s, and time_total_s

_Call = TypeVar("_Call", bound=Callable[..., Any])


class PhaseClock:
    """Exclusive seconds per phase: entering a nested phase pauses the enclosing one."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._open: list[tuple[str, float]] = []  # (phase, when it last resumed)
        self._started = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; one of {PHASES}")
        now = time.perf_counter()
        if self._open:
            outer, since = self._open[-1]
            self.seconds[outer] += now - since
        self._open.append((name, now))
        try:
            yield
        finally:
            now = time.perf_counter()
            _, since = self._open.pop()
            self.seconds[name] += now - since
            if self._open:
                self._open[-1] = (self._open[-1][0], now)

    def breakdown(self) -> dict[str, float]:
        """Seconds per phase so far; `other` is the cell's wall time no phase claimed."""
        elapsed = time.perf_counter() - self._started + self.seconds["startup"]
        claimed = sum(s for p, s in self.seconds.items() if p != "other")
        return {**self.seconds, "other": max(0.0, elapsed - claimed), "total": elapsed}

    def as_metrics(self) -> dict[str, float]:
        return {f"{METRIC_PREFIX}{p}_s": round(s, 3) for p, s in self.breakdown().items()}


_current: PhaseClock | None = None
_process_started = False  # the first cell of a process pays its start-up


@contextmanager
def cell_clock() -> Iterator[PhaseClock]:
    """The clock of one cell; `phase` and `timed` credit it until the block ends."""
    global _current, _process_started
    clock = PhaseClock()
    if not _process_started:
        clock.seconds["startup"] = max(0.0, time.time() - psutil.Process().create_time())
        _process_started = True
    previous, _current = _current, clock
    try:
        yield clock
    finally:
        _current = previous


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Credit the block to `name` on the running cell's clock (nothing outside a cell)."""
    if _current is None:
        yield
        return
    with _current.phase(name):
        yield


def timed(name: str) -> Callable[[_Call], _Call]:
    """Decorator form of `phase`, for calls made from many places (model loads, MLflow)."""

    def wrap(call: _Call) -> _Call:
        @functools.wraps(call)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with phase(name):
                return call(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


def describe(seconds: dict[str, float] | None) -> str:
    """One line: each phase that took time, then the total."""
    if not seconds:
        return "-"
    parts = [f"{p} {seconds[p]:.0f}s" for p in PHASES if seconds.get(p, 0.0) >= 0.5]
    return ", ".join(parts) + f" (total {seconds.get('total', 0.0):.0f}s)"


def from_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A breakdown back from a run's `time_<phase>_s` metrics (empty when it has none)."""
    found = {}
    for name in (*PHASES, "total"):
        value = metrics.get(f"{METRIC_PREFIX}{name}_s")
        if value is not None:
            found[name] = float(value)
    return found
