"""Where a run's wall time goes: named phases that nest (time in an inner one counts for it
alone), split so that they and ``other`` (what no phase claimed) add up to the wall."""

import contextlib
import os
import time
from collections.abc import Iterator

# in the order a run meets them; "startup": the interpreter, imports, data and model loading
PHASES = ("startup", "tokenization", "training", "validation", "scoring", "samples",
          "checkpoint", "logging", "model_logging")
LABELS = {"startup": "start-up", "scoring": "symptom scoring", "checkpoint": "checkpoint writes",
          "model_logging": "model logging and registration"}


class Stopwatch:
    """Seconds per phase since ``started`` (a ``time.time()`` value: the process's creation
    time makes the interpreter's start and the imports part of ``startup``)."""

    def __init__(self, started: float | None = None):
        now_wall, self._mark = time.time(), time.perf_counter()
        self.origin = self._mark - (now_wall - started) if started is not None else self._mark
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.seconds["startup"] = self._mark - self.origin
        self._open: list[str] = []  # the phases open, innermost last
        self._lap, self._lap_wall = dict.fromkeys(PHASES, 0.0), self.origin

    def _charge(self) -> float:
        """The time since the last mark charged to the innermost open phase; the new mark."""
        now = time.perf_counter()
        if self._open:
            self.seconds[self._open[-1]] += now - self._mark
        self._mark = now
        return now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}: expected one of {', '.join(PHASES)}")
        self._charge()
        self._open.append(name)
        try:
            yield
        finally:
            self._charge()
            self._open.pop()

    def split(self) -> dict[str, float]:
        """Seconds per phase since the start, ``other`` (what no phase claimed) and ``wall``."""
        return self._since(dict.fromkeys(PHASES, 0.0), self.origin)

    def lap(self) -> dict[str, float]:
        """Like ``split``, for the time since the previous lap (an epoch's share)."""
        lap = self._since(self._lap, self._lap_wall)
        self._lap, self._lap_wall = dict(self.seconds), self._mark
        return lap

    def _since(self, seconds: dict[str, float], start: float) -> dict[str, float]:
        now = self._charge()  # the open phase's time up to now counted first
        delta = {name: self.seconds[name] - seconds[name] for name in PHASES}
        wall = now - start
        return {**delta, "other": max(wall - sum(delta.values()), 0.0), "wall": wall}


def process_started() -> float | None:
    """When this process began (``time.time()``), or None: on Linux from /proc (10 ms; psutil's
    is up to 1 s off), elsewhere from psutil."""
    now = time.time()
    with contextlib.suppress(OSError, ValueError, IndexError, AttributeError):
        with open("/proc/self/stat") as handle:  # the name may hold spaces: split after ")"
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return now - max(age, 0.0)
    try:
        import psutil  # only where /proc is missing

        return min(psutil.Process().create_time(), now)
    except Exception:  # noqa: BLE001 - no psutil, or a platform it cannot read
        return None


def non_training_fraction(split: dict[str, float]) -> float:
    return 1 - split["training"] / split["wall"] if split["wall"] > 0 else 0.0


def describe(split: dict[str, float]) -> str:
    """"412 s in all: training 300 s (73%), ..." (phases that took time, largest first)."""
    wall = split["wall"]
    parts = sorted(((name, value) for name, value in split.items()
                    if name != "wall" and value >= 0.05), key=lambda item: -item[1])
    shown = ", ".join(f"{LABELS.get(name, name)} {value:.1f} s ({100 * value / wall:.0f}%)"
                      for name, value in parts) if wall > 0 else ""
    return f"{wall:.1f} s in all: {shown}; not training {100 * non_training_fraction(split):.0f}%"
