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


def _cell(name: str, method: str, budget: float, seed: int, **row: object) -> dict:
    return {
        "cell": name,
        "role": "grid",
        "task": "t",
        "metric": "exact_match_number",
        "target": "m",
        "selector": "m",
        "method": method,
        "ablation": "",
        "budget": budget,
        "seed": seed,
        "pool_clean_share": 0.7,
        "evaluate_key": f"key-{name}",
        "run_id": f"run-{name}",
        "finished": "2026-12-01T00:00:00+00:00",
        **row,
    }


def _synthetic() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two budgets x 3 seeds. "good" answers every example right (Random half of them): a win at
    both budgets; "bad" answers none: a loss; "same" answers what Random answers: a tie."""
    runs, examples = [], []
    for budget in (0.05, 0.1):
        for seed in range(3):
            for method in ("random", "good", "bad", "same"):
                cell = f"{method}-{budget}-{seed}"
                runs.append(_cell(cell, method, budget, seed))
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


def test_committed_snapshots_count_each_evaluation_once(tmp_path: Path) -> None:
    standing_ = standing.committed(RESULTS, resamples=500)
    rows, apart = standing_.rows, standing_.without_power
    # checked against the snapshots as committed, not against what committed() deduplicated
    runs = pd.concat([pd.read_csv(p, dtype=str) for p in RESULTS.glob("*.csv")])
    runs = runs[runs["evaluate_key"].notna()].drop_duplicates(["cell", "evaluate_key"])
    counted = rows["cells"].str.split(",").explode()
    keys = counted.map(dict(zip(runs["cell"], runs["evaluate_key"], strict=True)))
    assert keys.notna().all() and not keys.duplicated().any()  # an evaluation counts once
    examples = pd.concat(pd.read_csv(p, dtype={"cell": str}) for p in RESULTS.glob("*_ex*.csv"))
    scores = examples.drop_duplicates(["cell", "example_id"]).sort_values(["cell", "example_id"])
    vectors = scores.groupby("cell")["score"].agg(tuple)
    described = runs.set_index("cell").loc[counted, ["method", "budget", "seed"]]
    copies = described.assign(scores=vectors.loc[counted].to_numpy()).duplicated()
    assert not copies.any()  # no renamed copy (same run, same scores, other keys) counted again
    assert not rows.duplicated([*standing.SETTING, "data", "method"]).any()
    table = standing.summary(rows).set_index("method")
    table2 = pd.read_csv(RESULTS / "embedded_table2.csv")
    separate = table2[table2["method"] == "data_whisperer_separate"]["budget"].nunique()
    assert table.loc["Data Whisperer (separate)", "settings"] <= separate
    assert table.loc["Oracle (clean only)", "win"] >= 1  # docs/embedded-task.md: +9.7, +7.2
    assert (table[["win", "tie", "loss"]].sum(axis=1) <= table["settings"]).all()
    # the 30-problem task's settings (every score 0 or 3.3%, no references) are apart
    assert "GraNd" not in table.index and apart["methods"].str.contains("GraNd").any()
    assert not set(apart[[*standing.SETTING, "data"]].itertuples(index=False)) & set(
        rows[[*standing.SETTING, "data"]].itertuples(index=False)
    )
    assert (
        standing.main(["--results", str(RESULTS), "--out-dir", str(tmp_path), "--resamples", "500"])
        == 0
    )
    text = (tmp_path / "standing.md").read_text()
    assert text.count("| Oracle (clean only) |") == 1 and "without power, not counted" in text
    assert (tmp_path / "standing.png").stat().st_size > 0


def test_no_snapshot_is_an_error_naming_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert standing.main(["--results", str(tmp_path), "--out-dir", str(tmp_path / "o")]) == 2
    assert "python -m dwbench.report <experiment>" in capsys.readouterr().err


# Snapshots written as CSV files with the committed snapshots' own columns, read by the real
# standing: a setting with power (the oracle and the whole pool clear Random and zero-shot).
HEADER = (RESULTS / "embedded_table2.csv").open().readline().strip().split(",")
EXAMPLES_HEADER = (RESULTS / "embedded_table2_examples.csv").open().readline().strip().split(",")


def _right(method: str, seed: int, n: int) -> np.ndarray:
    """Which of n examples a run answers right: zero-shot 10%, Random 50%, Data Whisperer 60%,
    the oracle and the whole pool 90-100%."""
    i = np.arange(n)
    return {
        "zero_shot": i % 10 == 0,
        "whole": i % 10 != 0,
        "oracle_clean": np.ones(n, dtype=bool),
        "data_whisperer": (i + seed) % 5 < 3,
    }.get(method, (i + seed) % 2 == 0)


def _grid(prefix: str = "", methods: tuple[str, ...] = ("random", "oracle_clean")) -> list[dict]:
    """Zero-shot, the whole pool (3 seeds) and `methods` at 10% (3 seeds)."""
    cells = [_cell(f"{prefix}zero", "zero_shot", 0.0, 0, role="companion")]
    cells += [
        _cell(f"{prefix}whole-{s}", "random", 1.0, s, role="companion", kind="whole")
        for s in range(3)
    ]
    cells += [_cell(f"{prefix}{m}-{s}", m, 0.1, s) for m in methods for s in range(3)]
    return cells


def _write(folder: Path, name: str, cells: list[dict], n: int = 60, zero: bool = False) -> None:
    """`<name>.csv` and `<name>_examples.csv`; every score 0 with `zero`."""
    examples = []
    for cell in cells:
        right = _right(cell.pop("kind", cell["method"]), cell["seed"], n) & (not zero)
        cell.update(score=right.mean(), n_examples=n)
        examples += [
            {"cell": cell["cell"], "example_id": f"eval-{i:05d}", "score": float(v)}
            for i, v in enumerate(right)
        ]
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(cells).reindex(columns=HEADER).to_csv(folder / f"{name}.csv", index=False)
    pd.DataFrame(examples)[EXAMPLES_HEADER].to_csv(folder / f"{name}_examples.csv", index=False)


def _standing(results: Path, out: Path) -> tuple[dict[str, list[str]], str]:
    """The summary table of `python -m dwbench.report.standing` by method, and its markdown."""
    assert (
        standing.main(["--results", str(results), "--out-dir", str(out), "--resamples", "500"]) == 0
    )
    text = (out / "standing.md").read_text()
    summary = text.split("| method | settings |")[1].split("\n\n")[0]
    rows = [line.strip("|").split(" | ") for line in summary.splitlines()[2:]]
    return {row[0].strip(): [c.strip() for c in row[1:]] for row in rows}, text


@pytest.mark.parametrize("rekeyed", [False, True])
def test_renamed_copies_of_one_run_in_two_snapshots_count_once(
    tmp_path: Path, rekeyed: bool
) -> None:
    main = _grid(methods=("random", "oracle_clean", "data_whisperer"))
    _write(tmp_path / "r", "table2", main)
    # table6 holds the same runs under other cell keys, same scores: with the same evaluate keys,
    # or (rekeyed) run again later under new keys, as results/embedded_table1 and _table6 do
    copies = [{**c, "cell": f"copy-{c['cell']}"} for c in _grid(methods=("data_whisperer",))]
    for copy in copies if rekeyed else []:
        copy.update(evaluate_key=f"new-{copy['evaluate_key']}", finished="2026-12-05")
    _write(tmp_path / "r", "table6", copies)
    table, _ = _standing(tmp_path / "r", tmp_path / "out")
    assert table["Data Whisperer"][0] == "1"
    assert table["Random"][0] == "1"
    settings = pd.read_csv(tmp_path / "out" / "standing_settings.csv")
    assert len(settings) == 3  # Random, the oracle, Data Whisperer at 10%


def test_an_ablation_alias_of_a_counted_cell_counts_once(tmp_path: Path) -> None:
    _write(tmp_path / "r", "table2", _grid(methods=("random", "oracle_clean", "data_whisperer")))
    # table4 runs the default configuration again as "[nd10_nq5]": the same evaluation
    alias = _cell("abl-dw-0", "data_whisperer", 0.1, 0, ablation="nd10_nq5")
    alias.update(evaluate_key="key-data_whisperer-0", kind="data_whisperer")
    other = _cell("abl-nd5-0", "data_whisperer", 0.1, 0, ablation="nd5_nq3", kind="random")
    random = _cell("random-0", "random", 0.1, 0, role="companion")
    _write(tmp_path / "r", "table4", [alias, other, random])
    table, _ = _standing(tmp_path / "r", tmp_path / "out")
    assert "Data Whisperer [nd10_nq5]" not in table
    assert table["Data Whisperer"][0] == "1" and table["Data Whisperer [nd5_nq3]"][0] == "1"
    settings = pd.read_csv(tmp_path / "out" / "standing_settings.csv")
    counted = settings["cells"].str.split(",").explode()
    assert not counted.duplicated().any() and "abl-dw-0" not in set(counted)
    assert set(settings["n_methods"]) == {4}  # Random, oracle, Data Whisperer, [nd5_nq3]


def test_an_all_zero_snapshot_is_listed_apart_and_not_counted(tmp_path: Path) -> None:
    _write(tmp_path / "r", "table2", _grid(methods=("random", "oracle_clean", "data_whisperer")))
    # an older 30-problem version of the task where every run scores 0
    old = _grid("old-", methods=("random", "data_whisperer", "grand"))
    _write(tmp_path / "r", "fig3", old, n=30, zero=True)
    table, text = _standing(tmp_path / "r", tmp_path / "out")
    assert "GraNd" not in table  # no rank from a setting that cannot tell methods apart
    assert table["Data Whisperer"][0] == "1" and table["Random"][0] == "1"
    apart = text.split("without power, not counted")[1]
    assert "| t |" in apart and "every score equal" in apart and "GraNd" in apart
    settings = pd.read_csv(tmp_path / "out" / "standing_settings.csv")
    assert not settings["cells"].str.contains("old-").any()


@pytest.mark.parametrize(
    ("reference", "answers_as", "why"),
    [
        ("oracle_clean", "random", "oracle not above Random"),
        ("whole", "zero_shot", "whole pool not above zero-shot"),
    ],
)
def test_a_setting_whose_reference_is_not_above_its_baseline_is_not_counted(
    tmp_path: Path, reference: str, answers_as: str, why: str
) -> None:
    cells = _grid(methods=("random", "oracle_clean", "data_whisperer"))
    for cell in cells:
        if cell["cell"].startswith(reference):
            cell["kind"] = answers_as
    _write(tmp_path / "r", "table2", cells)
    table, text = _standing(tmp_path / "r", tmp_path / "out")
    assert table == {}
    assert f"| 10% | {why} | Data Whisperer, Oracle (clean only), Random |" in text
