"""The phase clock credits each second to the innermost phase, so phases add up."""

from __future__ import annotations

import time

import pytest

from dwbench import timing


def test_nested_phases_are_exclusive_and_add_up_to_the_wall_time() -> None:
    with timing.cell_clock() as clock:
        with timing.phase("score"):
            time.sleep(0.05)
            with timing.phase("load"):
                time.sleep(0.1)
            time.sleep(0.05)
        time.sleep(0.02)  # no phase: `other`
    seconds = clock.breakdown()
    assert seconds["load"] == pytest.approx(0.1, abs=0.03)
    assert seconds["score"] == pytest.approx(0.1, abs=0.03)
    assert seconds["other"] >= 0.02
    assert sum(seconds[p] for p in timing.PHASES) == pytest.approx(seconds["total"], abs=1e-6)


def test_outside_a_cell_nothing_is_recorded_and_unknown_phases_are_refused() -> None:
    with timing.phase("load"):  # no running cell: a no-op
        pass
    with timing.cell_clock() as clock, pytest.raises(ValueError, match="unknown phase"):
        with timing.phase("loading"):
            pass
    assert clock.seconds["load"] == 0.0


def test_a_breakdown_survives_the_round_trip_through_metrics() -> None:
    with timing.cell_clock() as clock, timing.phase("train"):
        time.sleep(0.01)
    back = timing.from_metrics(clock.as_metrics())
    assert back["train"] == pytest.approx(clock.breakdown()["train"], abs=1e-3)
    assert timing.describe({"train": 61.0, "load": 0.1, "total": 62.0}) == "train 61s (total 62s)"
