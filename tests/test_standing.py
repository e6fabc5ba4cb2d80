"""Win / tie / loss against Random and mean rank: a synthetic frame with known answers, and the
snapshots committed under results/."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dwbench.report import bootstrap, standing

RESULTS = Path(__file__).resolve().parents[1] / "results"
N_EXAMPLES = 60


def _synthetic() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two budgets x 3 seeds. "good" answers every example right (Random half of them): a win at
    both budgets; "bad" answers none: a loss; "same" answers what Random answers: a tie."""
    runs, examples = [], []
    for budget in (0.05, 0.1):
        for seed in range(3):
            for method in ("random", "good", "bad", "same"):
                cell = f"{method}-{budget}-{seed}"
                runs.append(
                    {
                        "cell": cell,
                        "task": "t",
                        "target": "m",
                        "selector": "m",
                        "method": method,
                        "ablation": "",
                        "budget": budget,
                        "seed": seed,
                    }
                )
                right = {
                    "good": np.ones(N_EXAMPLES),
                    "bad": np.zeros(N_EXAMPLES),
                }.get(method, (np.arange(N_EXAMPLES) + seed) % 2 == 0)
                examples += [
                    {"cell": cell, "example_id": f"e{i}", "score": float(v)}
                    for i, v in enumerate(right)
                ]
    examples_frame = pd.DataFrame(examples)
    runs_frame = pd.DataFrame(runs)
    means = examples_frame.groupby("cell")["score"].mean()
    return runs_frame.assign(score=runs_frame["cell"].map(means)), examples_frame


def test_synthetic_wins_ties_losses_and_ranks() -> None:
    frame, examples = _synthetic()
    companions = frame.iloc[:1].assign(cell="whole", budget=1.0, score=0.99)  # not counted
    frame = pd.concat([frame, companions], ignore_index=True)
    intervals = bootstrap.compare_to_random(frame, examples, resamples=1000)
    rows = standing.outcomes(frame, intervals)
    assert len(rows) == 2 * 4  # 2 settings x 4 methods, the whole-pool row left out
    table = standing.summary(rows).set_index("method")
    assert table.loc["good", ["win", "tie", "loss"]].tolist() == [2, 0, 0]
    assert table.loc["bad", ["win", "tie", "loss"]].tolist() == [0, 0, 2]
    assert table.loc["same", ["win", "tie", "loss"]].tolist() == [0, 2, 0]
    assert table.loc["Random", ["win", "tie", "loss"]].tolist() == [0, 0, 0]
    assert table["mean_rank"].to_dict() == {"good": 1.0, "Random": 2.5, "same": 2.5, "bad": 4.0}
    assert (table["settings"] == 2).all() and (table["mean_methods"] == 4).all()
    assert list(standing.summary(rows)["method"])[0] == "good"  # best mean rank first
    text = standing.to_markdown(standing.summary(rows), "T")
    assert "| good | 2 | 2 / 0 / 0 | 1.00 | 4.0 |" in text
    assert "| Random | 2 | - | 2.50 | 4.0 |" in text


def test_a_setting_without_its_own_random_ranks_against_the_targets_random() -> None:
    frame, examples = _synthetic()
    weak = frame[frame["method"] == "good"].assign(
        selector="small", cell=lambda f: "w2s-" + f["cell"]
    )
    examples = pd.concat(
        [
            examples,
            examples[examples["cell"].str.startswith("good")].assign(
                cell=lambda f: "w2s-" + f["cell"]
            ),
        ],
        ignore_index=True,
    )
    frame = pd.concat([frame, weak], ignore_index=True)
    rows = standing.outcomes(frame, bootstrap.compare_to_random(frame, examples, resamples=1000))
    w2s = rows[rows["selector"] == "small"]
    assert sorted(w2s["method"]) == ["Random", "Random", "good", "good"]  # at both budgets
    assert (w2s["n_methods"] == 2).all()
    assert set(w2s.loc[w2s["method"] == "good", "outcome"]) == {"win"}


def test_committed_snapshots_count_each_cell_once(tmp_path: Path) -> None:
    rows = standing.committed(RESULTS, resamples=500)
    table2 = pd.read_csv(RESULTS / "embedded_table2.csv")
    grid = table2[(table2["budget"] > 0) & (table2["budget"] < 1)]
    # embedded_table1 and _table6 hold the same cells as _table2: counted once
    from_table = rows[rows["cells"].str.split(",").map(lambda c: set(c) <= set(grid["cell"]))]
    settings = grid.groupby(["method", "budget"]).ngroups
    assert len(from_table) == settings
    assert rows.duplicated(["method", "cells"]).sum() == 0
    table = standing.summary(rows).set_index("method")
    assert table.loc["Oracle (clean only)", "win"] >= 1  # docs/embedded-task.md: +9.7, +7.2
    assert (table[["win", "tie", "loss"]].sum(axis=1) <= table["settings"]).all()
    assert (
        standing.main(["--results", str(RESULTS), "--out-dir", str(tmp_path), "--resamples", "500"])
        == 0
    )
    assert (tmp_path / "standing.md").read_text().count("| Oracle (clean only) |") == 1
    assert (tmp_path / "standing.png").stat().st_size > 0


def test_no_snapshot_is_an_error_naming_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert standing.main(["--results", str(tmp_path), "--out-dir", str(tmp_path / "o")]) == 2
    assert "python -m dwbench.report <experiment>" in capsys.readouterr().err
