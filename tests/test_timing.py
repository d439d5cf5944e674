"""Where a run's wall time goes: the stopwatch's phases add up to the wall, never more."""

import time

import pytest

from medlm.timing import Stopwatch, describe, non_training_fraction


def test_nested_phases_count_once_and_the_split_adds_up_to_the_wall():
    stopwatch = Stopwatch()
    with stopwatch.phase("logging"):
        time.sleep(0.02)
        with stopwatch.phase("samples"):  # inside an epoch's logging: counted as samples only
            time.sleep(0.05)
        time.sleep(0.02)
    with stopwatch.phase("training"):
        time.sleep(0.05)
    time.sleep(0.02)  # claimed by no phase
    split = stopwatch.split()
    assert split["samples"] == pytest.approx(0.05, abs=0.02)
    assert split["logging"] == pytest.approx(0.04, abs=0.02)
    assert split["other"] == pytest.approx(0.02, abs=0.02)
    assert sum(value for name, value in split.items() if name != "wall") == pytest.approx(
        split["wall"], rel=1e-6)
    assert non_training_fraction(split) == pytest.approx(1 - split["training"] / split["wall"])
    line = describe(split)
    assert "training" in line and "samples" in line and "not training" in line


def test_laps_split_the_run_into_epochs_that_add_up_to_the_whole():
    stopwatch = Stopwatch(started=time.time() - 1.0)  # a process that began a second ago
    assert stopwatch.split()["startup"] == pytest.approx(1.0, abs=0.1)
    first = stopwatch.lap()
    with stopwatch.phase("training"):
        time.sleep(0.03)
        second = stopwatch.lap()  # inside an open phase: counted up to now
    third = stopwatch.lap()
    laps = [first, second, third]
    total = stopwatch.split()
    for name in ("startup", "training", "wall"):
        assert sum(lap[name] for lap in laps) == pytest.approx(total[name], abs=0.01)
    assert first["startup"] > 0.9 and second["training"] >= 0.03


def test_an_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="unknown phase 'trianing'"):
        with Stopwatch().phase("trianing"):
            pass
