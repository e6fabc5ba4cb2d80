"""The phase clock credits each second to the innermost phase, so phases add up."""

from __future__ import annotations

import pytest

from dwbench import timing


class FakeClock:
    """`time.perf_counter` that moves only when the test sleeps: exact seconds on any machine,
    however loaded."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def test_nested_phases_are_exclusive_and_add_up_to_the_wall_time(clock: FakeClock) -> None:
    with timing.cell_clock() as cell:
        with timing.phase("score"):
            clock.sleep(0.05)
            with timing.phase("load"):
                clock.sleep(0.1)
            clock.sleep(0.05)
        clock.sleep(0.02)  # no phase: `other`
    seconds = cell.breakdown()
    assert seconds["load"] == pytest.approx(0.1)
    assert seconds["score"] == pytest.approx(0.1)
    assert seconds["other"] == pytest.approx(0.02)
    assert sum(seconds[p] for p in timing.PHASES) == pytest.approx(seconds["total"], abs=1e-6)


def test_outside_a_cell_nothing_is_recorded_and_unknown_phases_are_refused() -> None:
    with timing.phase("load"):  # no running cell: a no-op
        pass
    with timing.cell_clock() as clock, pytest.raises(ValueError, match="unknown phase"):
        with timing.phase("loading"):
            pass
    assert clock.seconds["load"] == 0.0


def test_a_breakdown_survives_the_round_trip_through_metrics(clock: FakeClock) -> None:
    with timing.cell_clock() as cell, timing.phase("train"):
        clock.sleep(0.01)
    back = timing.from_metrics(cell.as_metrics())
    assert back["train"] == pytest.approx(cell.breakdown()["train"], abs=1e-3)
    assert timing.describe({"train": 61.0, "load": 0.1, "total": 62.0}) == "train 61s (total 62s)"
