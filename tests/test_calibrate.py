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

from dwbench.bench import calibrate
from dwbench.bench.calibrate import Setting, choose, reference_cells
from dwbench.bench.measure import Measured, versus_random
from dwbench.sweep.grid import load_sweep


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


def test_noise_calibration_cells_are_the_dialogsum_slices(tmp_path) -> None:
    """Calibrating through the preset runs the slice's own Random and oracle_clean cells (and
    its whole-pool and zero-shot rows), so the slice reuses them."""
    preset = ["+experiment=dialogsum_noise_table2", f"task.path={tmp_path}"]
    setting = Setting(None, 0.3, None, None, 0.1, task="dialogsum")
    zero, whole, pair = (
        {c.key for c in load_sweep([*cells, *preset], progress=False).cells}
        for cells in reference_cells(setting, [0, 1, 2], [0], [0.05, 0.1, 0.2])
    )
    slice_ = load_sweep([*preset, "method=random,oracle_clean"], progress=False)
    assert {c.key for c in slice_.cells} < pair and len(pair) == 2 * 3 * 3
    for suffix, keys in (("_reference", whole), ("_zero_shot", zero)):
        rows = load_sweep(
            [f"+experiment=dialogsum_noise_table2{suffix}", *preset[1:]], progress=False
        )
        assert {c.key for c in rows.cells} == keys


def test_noise_setting_overrides_only_what_it_is_given() -> None:
    plain = Setting(None, 0.2, None, None, 0.1, task="dialogsum").task_overrides()
    assert plain == ["task=dialogsum", "task.noise.share=0.2"]
    sized = Setting(None, 0.2, 300, 50, 0.1, task="dialogsum").task_overrides()
    assert sized[2:] == ["task.pool_limit=300", "task.eval_limit=50"]


def test_noise_row_reads_the_task_metric_and_costs(monkeypatch) -> None:
    setting = Setting(None, 0.3, None, None, 0.1, task="dialogsum")
    rng = np.random.default_rng(2)
    random = rng.uniform(10, 30, 100)
    oracle = random + rng.uniform(0, 6, 100)

    def fake_measured(cells: list[str]) -> Measured:
        budget = float(next(c for c in cells if c.startswith("budget=")).split("=")[1])
        found = {0.0: [("random", [12.0] * 100)], 1.0: [("random", [35.0] * 100)]}.get(
            budget, [("random", list(random)), ("oracle_clean", list(oracle))]
        )
        cells_frame = pd.DataFrame(
            [
                {"method": m, "budget": budget, "seed": 0, "score": float(np.mean(s))}
                | {"eval_s": 50.0, "n_eval": 100, "metric": "rouge_l", "n_pool": 200}
                | ({"k": 20, "train_s": 90.0, "selection_precision": 0.7} if 0 < budget < 1 else {})
                for m, s in found
            ]
        )
        per_example = pd.concat([examples(m, budget, [0], s) for m, s in found])
        return Measured(cells_frame, per_example, [])

    monkeypatch.setattr(calibrate, "measured", fake_measured)
    row = calibrate.noise_row(setting, [0], [0], [])
    assert row["metric"] == "rouge_l" and (row["pool"], row["eval"], row["k"]) == (200, 100, 20)
    assert row["zero-shot"] == 12.0 and row["whole pool"] == 35.0
    assert row["oracle - random"] == pytest.approx((oracle - random).mean())
    assert row["power"] == "yes" and row["ci low"] > 0
    assert row["train s / cell"] == 90.0 and row["eval s / example"] == 0.5
    assert row["random precision"] == 0.7
    assert choose(pd.DataFrame([row, row | {"budget": 0.05}]))["budget"] == 0.05


def test_demo_compares_each_method_with_random(tmp_path, tiny_llama_dir, cache_dir) -> None:
    """The demo's three cells on a tiny model: one table, every method paired with Random."""
    results = tmp_path / "results"
    env = {**os.environ, "DWBENCH_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    done = forked_cli.run(
        [sys.executable, "-m", "dwbench.bench", "demo", f"results_dir={results}"]
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
