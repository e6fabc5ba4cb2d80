"""Calibration's rule and the demo's comparison: pure logic, then the demo on a tiny model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import forked_cli
import numpy as np
import pandas as pd
import pytest
from test_cli import REPO, tiny_overrides

from dwbench import calibrate
from dwbench.calibrate import Setting, choose
from dwbench.measure import Measured, versus_random


def examples(method: str, budget: float, seeds: list[int], scores: list[float]) -> pd.DataFrame:
    rows = [
        {"method": method, "budget": budget, "seed": s, "example_id": f"e{i}", "score": v}
        for s in seeds
        for i, v in enumerate(scores)
    ]
    return pd.DataFrame(rows)


def test_versus_random_pairs_by_seed_and_problem() -> None:
    rng = np.random.default_rng(0)
    random = rng.integers(0, 2, 200).astype(float) * 100
    better = np.where(rng.random(200) < 0.3, 100.0, random)  # flips some answers to right
    frame = pd.concat(
        [examples("random", 0.1, [0, 1], list(random)), examples("o", 0.1, [0, 1], list(better))]
    )
    interval = versus_random(frame, "o", 0.1)
    assert interval.difference == pytest.approx((better - random).mean())
    assert interval.low > 0 and interval.n_seeds == 2 and interval.n_examples == 200
    assert versus_random(frame, "o", 0.2) is None  # no cell at that budget
    same = versus_random(pd.concat([frame, examples("r2", 0.1, [0, 1], list(random))]), "r2", 0.1)
    assert same.difference == 0 and same.low == 0 and same.high == 0


def row(difficulty: str, share: float, power: str) -> dict:
    return {"difficulty": difficulty, "corrupt share": share, "power": power, "interval": ""}


def test_rule_picks_the_hardest_powered_setting_then_the_smallest_share() -> None:
    table = pd.DataFrame(
        [
            row("one_step", 0.3, "yes"),
            row("two_step", 0.5, "yes"),
            row("two_step", 0.4, "yes"),
            row("multi_step", 0.3, "no"),
        ]
    )
    chosen = choose(table)
    assert (chosen["difficulty"], chosen["corrupt share"]) == ("two_step", 0.4)
    assert choose(table.assign(power="no")) is None


def test_calibration_row_applies_both_conditions(monkeypatch) -> None:
    setting = Setting("one_step", 0.3, 8, 200, 0.1)
    rng = np.random.default_rng(1)
    random = rng.integers(0, 2, 200).astype(float) * 100
    oracle = np.maximum(random, np.where(rng.random(200) < 0.4, 100.0, 0.0))

    def fake_measured(zero_shot: float, whole: float):
        frames = {
            "budget=0": ("random", 0.0, [zero_shot] * 200),
            "budget=1.0": ("random", 1.0, [whole] * 200),
        }

        def measured(cells: list[str]) -> Measured:
            budget = next(c for c in cells if c.startswith("budget="))
            if budget in frames:
                method, value, scores = frames[budget]
                found = [(method, value, scores)]
            else:
                found = [("random", 0.1, list(random)), ("oracle_clean", 0.1, list(oracle))]
            cells_frame = pd.DataFrame(
                [
                    {"method": m, "budget": b, "seed": 0, "score": float(np.mean(s))}
                    | {"eval_s": 100.0, "n_eval": 200}
                    for m, b, s in found
                ]
            )
            per_example = pd.concat([examples(m, b, [0], s) for m, b, s in found])
            return Measured(cells_frame, per_example, [])

        return measured

    monkeypatch.setattr(calibrate, "measured", fake_measured(5.0, 40.0))
    powered = calibrate.calibration_row(setting, [0], [0], {"clean": 30.0, "corrupted": 20.0})
    assert powered["power"] == "yes" and powered["ci low"] > 0
    assert powered["whole pool EM"] == 40.0 and powered["eval s / problem"] == 0.5
    monkeypatch.setattr(calibrate, "measured", fake_measured(35.0, 40.0))  # zero-shot too close
    assert calibrate.calibration_row(setting, [0], [0], {})["power"] == "no"


def test_setting_caps_answers_by_difficulty() -> None:
    overrides = Setting("multi_step", 0.3, 200, 200, 0.1).task_overrides()
    assert "task.answer_max_tokens=128" in overrides
    assert "task.generator.difficulty=multi_step" in overrides
    assert "task.answer_max_tokens=64" in Setting("one_step", 0.3, 200, 200, 0.1).task_overrides()


def test_demo_compares_each_method_with_random(tmp_path, tiny_llama_dir, cache_dir) -> None:
    """The demo's three cells on a tiny model: one table, every method paired with Random."""
    results = tmp_path / "results"
    env = {**os.environ, "DWBENCH_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    done = forked_cli.run(
        [sys.executable, "-m", "dwbench.demo", f"results_dir={results}"]
        + tiny_overrides(tiny_llama_dir),
        cwd=REPO,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.split("Demo: each method against Random")[1].splitlines()
    lines = {line.split("|")[1].strip(): line for line in table if line.startswith("| ")}
    assert set(lines) >= {"random", "oracle_clean"}
    dw = next(name for name in lines if name.startswith("data_whisperer"))
    for name in ("oracle_clean", dw):
        difference = lines[name].split("|")[3]
        assert "[" in difference and "]" in difference, lines[name]  # an interval, not n/a
    assert lines["oracle_clean"].split("|")[4].strip() == "1"  # selection precision: all clean
    assert Path(results, "artifacts", "evaluate").is_dir()
