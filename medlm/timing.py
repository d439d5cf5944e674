"""Where a run's wall time goes: one stopwatch, named phases, a split that adds up to the wall.

Phases nest: time spent in an inner phase (say, samples written inside an epoch's logging)
counts for the inner one only, so the phases never add up to more than the wall time, and
what no phase claimed is shown as ``other``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

# In the order a run meets them. "startup": the interpreter, imports, data loading, model
# loading (GGUF de-quantisation); "tokenization": the datasets' rows encoded; "scoring": the
# answers written and scored for symptom F1 (and the model-free baselines); "samples": the
# per-epoch sample answers; "logging": MLflow runs, params, metrics and tables;
# "model_logging": the model saved, logged and registered.
PHASES = ("startup", "tokenization", "training", "validation", "scoring", "samples",
          "checkpoint", "logging", "model_logging")
LABELS = {"startup": "start-up", "scoring": "symptom scoring", "checkpoint": "checkpoint writes",
          "model_logging": "model logging and registration"}


class Stopwatch:
    """Seconds per phase since ``started`` (a ``time.time()`` value: a process's creation time
    makes the interpreter's start and the imports part of ``startup``)."""

    def __init__(self, started: float | None = None):
        now_wall, now = time.time(), time.perf_counter()
        self.origin = now - (now_wall - started) if started is not None else now
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._stack: list[list] = []  # [name, start of its current uncovered stretch]
        self._lap = dict(self.seconds)
        self._lap_wall = self.origin
        if started is not None:
            self.seconds["startup"] = now - self.origin

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}: expected one of {', '.join(PHASES)}")
        now = time.perf_counter()
        if self._stack:  # the outer phase pauses while this one runs
            outer = self._stack[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            _, since = self._stack.pop()
            self.seconds[name] += now - since
            if self._stack:
                self._stack[-1][1] = now

    def _closed(self) -> dict[str, float]:
        """The seconds so far, with the phases still open counted up to now."""
        seconds = dict(self.seconds)
        if self._stack:
            name, since = self._stack[-1]
            seconds[name] += time.perf_counter() - since
        return seconds

    def split(self) -> dict[str, float]:
        """Seconds per phase since the start, ``other`` (what no phase claimed) and ``wall``."""
        return _with_rest(self._closed(), time.perf_counter() - self.origin)

    def lap(self) -> dict[str, float]:
        """Like ``split``, for the time since the previous lap (an epoch's share)."""
        seconds, now = self._closed(), time.perf_counter()
        delta = {name: seconds[name] - self._lap[name] for name in PHASES}
        wall = now - self._lap_wall
        self._lap, self._lap_wall = seconds, now
        return _with_rest(delta, wall)


def process_started() -> float | None:
    """When this process began (``time.time()`` scale), or None where that cannot be told.

    On Linux from its start in clock ticks since boot against ``CLOCK_BOOTTIME`` (10 ms
    resolution; psutil's ``create_time`` adds the boot time in whole seconds, up to 1 s off);
    elsewhere from psutil."""
    now = time.time()
    try:
        with open("/proc/self/stat") as handle:  # the name may hold spaces: split after ")"
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        import os

        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return now - max(age, 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return min(psutil.Process().create_time(), now)
    except Exception:  # noqa: BLE001 - no psutil, or a platform it cannot read: time from now
        return None


def _with_rest(seconds: dict[str, float], wall: float) -> dict[str, float]:
    return {**seconds, "other": max(wall - sum(seconds.values()), 0.0), "wall": wall}


def non_training_fraction(split: dict[str, float]) -> float:
    """The share of the wall time that was not spent in training steps."""
    return 1 - split["training"] / split["wall"] if split["wall"] > 0 else 0.0


def describe(split: dict[str, float]) -> str:
    """"412 s in all: training 300 s (73%), validation 20 s (5%), ..." (phases that took time,
    largest first)."""
    wall = split["wall"]
    parts = sorted(((name, value) for name, value in split.items()
                    if name != "wall" and value >= 0.05), key=lambda item: -item[1])
    shown = ", ".join(f"{LABELS.get(name, name)} {value:.1f} s ({100 * value / wall:.0f}%)"
                      for name, value in parts) if wall > 0 else ""
    return f"{wall:.1f} s in all: {shown}; not training {100 * non_training_fraction(split):.0f}%"
