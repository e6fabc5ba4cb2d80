"""`python -m dwbench.bench rerun`: the committed Table 2 snapshot against itself and against a
copy in which one cell answers differently and training got faster."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from dwbench.bench.__main__ import main
from dwbench.bench.rerun import compare, totals
from dwbench.errors import DataError
from dwbench.report import snapshot

RESULTS = Path(__file__).resolve().parents[1] / "results"
NAME = "embedded_table2"
CHANGED = 20  # examples per seed


@pytest.fixture(scope="module")
def committed() -> snapshot.Snapshot:
    return snapshot.read(RESULTS, NAME)


def changed_copy(committed: snapshot.Snapshot, folder: Path) -> None:
    """The snapshot written to `folder` with Random 10% answering 20 more examples right in each
    seed and every cell's training twice as fast."""
    runs, examples = committed.runs.copy(), committed.examples.copy()
    for key in random_10_cells(runs):
        wrong = examples.index[(examples["cell"] == key) & (examples["score"] == 0.0)][:CHANGED]
        assert len(wrong) == CHANGED
        examples.loc[wrong, "score"] = 1.0
        runs.loc[runs["cell"] == key, "score"] += CHANGED / (examples["cell"] == key).sum()
    runs["train_s"] = runs["train_s"] / 2
    snapshot.write(folder, NAME, runs, examples)


def random_10_cells(runs: pd.DataFrame) -> list[str]:
    chosen = runs[(runs["method"] == "random") & (runs["budget"] == 0.1) & (runs["role"] == "grid")]
    assert len(chosen) == 3
    return list(chosen["cell"])


def test_a_snapshot_against_itself_is_equal_everywhere(committed) -> None:
    per_cell, per_method = compare(committed, committed)
    assert len(per_cell) == len(committed.runs)
    assert (per_cell["equal examples"] == "100.0%").all()
    assert (per_cell["score before"] == per_cell["score after"]).all()
    assert (per_method["within noise"] == "yes").all()
    assert per_method["after - before [95% CI]"].str.startswith("+0.00 [+0.00, +0.00]").all()
    assert (per_cell["same selection"] == "not compared").all()


def test_changed_cells_are_found_and_their_method_leaves_noise(committed, tmp_path) -> None:
    changed_copy(committed, tmp_path)
    per_cell, per_method = compare(committed, snapshot.read(tmp_path, NAME))
    keys = random_10_cells(committed.runs)
    n_eval = (committed.examples["cell"] == keys[0]).sum()
    is_changed = committed.runs.set_index("cell").loc[keys]
    rows = per_cell[(per_cell["method"] == "random") & (per_cell["budget"] == 0.1)]
    rows = rows[rows["seed"].isin(is_changed["seed"])]
    assert len(rows) == 3
    assert (rows["equal examples"] == f"{1 - CHANGED / n_eval:.1%}").all()
    gained = rows["score after"] - rows["score before"]
    assert gained.to_numpy() == pytest.approx([100 * CHANGED / n_eval] * 3, abs=0.01)
    assert (per_cell.drop(index=rows.index)["equal examples"] == "100.0%").all()
    random_10 = per_method[(per_method["method"] == "random") & (per_method["budget"] == 0.1)]
    assert random_10["within noise"].item() == "no"  # +20 of 200 answers in every seed
    assert random_10["after - before [95% CI]"].item().startswith("+10.00 [")
    assert (per_method.drop(index=random_10.index)["within noise"] == "yes").all()
    summed = totals(per_cell)
    assert summed["train_s after"] == pytest.approx(summed["train_s before"] / 2, abs=0.2)
    assert summed["eval_s after"] == summed["eval_s before"]


def test_the_command_prints_the_tables_and_writes_the_csv(committed, tmp_path, capsys) -> None:
    changed_copy(committed, tmp_path / "rerun")
    out = tmp_path / "rerun.csv"
    rerun = ["--rerun", str(tmp_path / "rerun"), "--out", str(out)]
    main(["rerun", NAME, "--committed", str(RESULTS), *rerun])
    printed = capsys.readouterr().out
    assert "| random | 0.1 | 3 | +10.00 [" in printed and "| no |" in printed
    assert pd.read_csv(out).shape[0] == len(committed.runs)


def test_snapshots_of_different_configs_are_refused(committed, tmp_path) -> None:
    other = committed.runs.assign(cell=committed.runs["cell"] + "x")
    snapshot.write(tmp_path, NAME, other, committed.examples.assign(cell=lambda f: f["cell"] + "x"))
    with pytest.raises(DataError, match="share no cell"):
        compare(committed, snapshot.read(tmp_path, NAME))


def test_a_missing_rerun_snapshot_names_the_freeze_command(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["rerun", NAME, "--committed", str(RESULTS), "--rerun", str(tmp_path)])
    assert exit_.value.code == 2
    assert "python -m dwbench.report" in capsys.readouterr().err
