"""`python -m dwbench.bench rerun NAME --rerun DIR`: does a rerun of committed cells reproduce
them, and what did each stage cost before and after?

A speed change must not change results, and a user on another machine wants to know whether
their run matches the committed one. Both questions compare two snapshots of one report: the
committed `results/NAME.csv` (with its `_examples.csv`) and a fresh freeze of the rerun's store
(`python -m dwbench.report NAME ... results_dir=RERUN --snapshot-dir DIR`). Cells are matched by
their key (the same config gives the same key). Per cell: the score before and after, the share
of evaluation examples whose score is equal, whether the selected examples are the same (where
both stores still hold the selection, `--stores`), and the seconds of selection, training and
evaluation. Per method and budget, seeds pooled: the paired bootstrap interval of rerun minus
committed over the same evaluation examples, so "within evaluation noise" is a test, not a
judgement. The table goes to stdout (markdown) and, with `--out`, to a CSV.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from dwbench.bench.common import markdown_table
from dwbench.errors import DataError
from dwbench.report import snapshot
from dwbench.report.bootstrap import paired_interval

STAGE_SECONDS = ["selection_s", "train_s", "eval_s"]
SIDES = ("before", "after")
CELL_COLUMNS = [
    "method",
    "budget",
    "seed",
    "score before",
    "score after",
    "equal examples",
    "same selection",
    *[f"{stage} {side}" for stage in STAGE_SECONDS for side in SIDES],
]


def paired_cells(committed: snapshot.Snapshot, rerun: snapshot.Snapshot) -> pd.DataFrame:
    """One row per cell in both snapshots: descriptors, `<metric>_before/_after`, run ids."""
    keep = ["cell", "method", "budget", "seed", "score", *STAGE_SECONDS, "run_id"]
    before = committed.runs[keep]
    after = rerun.runs[["cell", "score", *STAGE_SECONDS, "run_id"]]
    cells = before.merge(after, on="cell", suffixes=("_before", "_after"))
    if cells.empty:
        raise DataError(
            "the two snapshots share no cell: the rerun used another config (a different task, "
            "budget or seed gives another cell key); freeze the rerun with the same experiment "
            "and overrides as the committed report."
        )
    return cells


def example_differences(committed: snapshot.Snapshot, rerun: snapshot.Snapshot) -> pd.DataFrame:
    """Per cell and evaluation example: rerun score minus committed score."""
    merged = committed.examples.merge(
        rerun.examples, on=["cell", "example_id"], suffixes=("_before", "_after")
    )
    return merged.assign(diff=merged["score_after"] - merged["score_before"])


class Selections:
    """The ids each evaluation run's cell selected, from one results folder: the run's
    `select_key` tag names the select stage's output in `artifacts/`, or, where that cache was
    cleared, the select run's own MLflow copy of it."""

    def __init__(self, results_dir: Path) -> None:
        from dwbench.sweep.progress import store_runs

        self.select_key: dict[str, str] = {}  # evaluation run id -> select stage key
        self.logged: dict[str, Path] = {}  # select stage key -> the select run's copy
        self.select_dir = results_dir / "artifacts" / "select"
        runs = store_runs(f"sqlite:///{results_dir / 'mlflow.db'}")
        if runs.empty:
            return
        if "tags.select_key" in runs:
            tagged = runs[runs["tags.select_key"].notna()]
            self.select_key = dict(zip(tagged["run_id"], tagged["tags.select_key"], strict=True))
        select_runs = runs[runs["tags.stage"] == "select"]
        for key, uri in zip(
            select_runs["tags.stage_key"], select_runs["artifact_uri"], strict=True
        ):
            self.logged[key] = Path(str(uri).removeprefix("file://")) / "selected_ids.json"

    def of(self, run_id: str) -> list[str] | None:
        """None where the run, its tag or the selection is not in this folder."""
        key = self.select_key.get(run_id)
        if key is None:
            return None
        for path in (self.select_dir / key / "selected_ids.json", self.logged.get(key)):
            if path is not None and path.is_file():
                return sorted(json.loads(path.read_text()))
        return None


def same_selection(cell: pd.Series, stores: tuple[Selections, Selections] | None) -> str:
    if stores is None:
        return "not compared"
    chosen = [store.of(cell[f"run_id_{side}"]) for store, side in zip(stores, SIDES, strict=True)]
    if any(ids is None for ids in chosen):
        return "n/a (not in both stores)"
    return "yes" if chosen[0] == chosen[1] else "no"


def compare(
    committed: snapshot.Snapshot,
    rerun: snapshot.Snapshot,
    stores: tuple[Selections, Selections] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-cell table, per method and budget table with the paired interval)."""
    cells = paired_cells(committed, rerun)
    diffs = example_differences(committed, rerun)
    equal = diffs.assign(equal=diffs["diff"] == 0).groupby("cell")["equal"].mean()
    rows = []
    for _, cell in cells.iterrows():
        row = {c: cell[c] for c in ("method", "budget", "seed")}
        row["score before"] = round(100 * cell["score_before"], 2)
        row["score after"] = round(100 * cell["score_after"], 2)
        row["equal examples"] = f"{equal.get(cell['cell'], float('nan')):.1%}"
        row["same selection"] = same_selection(cell, stores)
        for stage in STAGE_SECONDS:
            for side in SIDES:
                value = cell[f"{stage}_{side}"]
                row[f"{stage} {side}"] = round(float(value), 1) if pd.notna(value) else None
        rows.append(row)
    per_cell = pd.DataFrame(rows, columns=CELL_COLUMNS).sort_values(["method", "budget", "seed"])
    grouped = []
    described = diffs.merge(cells[["cell", "method", "budget", "seed"]], on="cell")
    for (method, budget), group in described.groupby(["method", "budget"], sort=True):
        interval = paired_interval(group.assign(group=0, diff=100 * group["diff"]))
        grouped.append(
            {
                "method": method,
                "budget": budget,
                "seeds": interval.n_seeds,
                "after - before [95% CI]": (
                    f"{interval.difference:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]"
                ),
                "within noise": "no" if interval.excludes_zero else "yes",
            }
        )
    return per_cell, pd.DataFrame(grouped)


def totals(per_cell: pd.DataFrame) -> dict[str, Any]:
    """Seconds of each stage summed over the compared cells, before and after (a score that
    several budgets share counts in each of their cells, on both sides alike)."""
    row: dict[str, Any] = {"cells": len(per_cell)}
    for stage in STAGE_SECONDS:
        for side in SIDES:
            row[f"{stage} {side}"] = round(float(per_cell[f"{stage} {side}"].fillna(0).sum()), 1)
    return row


def rerun(args: argparse.Namespace) -> None:
    committed = snapshot.read(args.committed, args.name)
    fresh = snapshot.read(args.rerun, args.name)
    stores = (Selections(args.stores[0]), Selections(args.stores[1])) if args.stores else None
    per_cell, per_method = compare(committed, fresh, stores)
    print(markdown_table(per_cell.to_dict("records"), CELL_COLUMNS))
    print()
    print(markdown_table(per_method.to_dict("records"), list(per_method.columns)))
    print()
    summed = totals(per_cell)
    print(markdown_table([summed], list(summed)))
    only_rerun = len(set(fresh.runs["cell"]) - set(committed.runs["cell"]))
    if only_rerun:
        print(f"\n{only_rerun} rerun cell(s) have no committed counterpart (not compared).")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        per_cell.to_csv(args.out, index=False)
        print(f"\nper-cell table: {args.out}")


def add_parser(commands: Any) -> None:
    command = commands.add_parser(
        "rerun",
        help="a rerun's snapshot against the committed one: same results? stage seconds?",
        description=__doc__.split("\n\n")[0],
    )
    command.add_argument("name", help="the report's snapshot name, e.g. embedded_table2")
    command.add_argument(
        "--rerun", type=Path, required=True, help="folder with the rerun's snapshot CSVs"
    )
    command.add_argument(
        "--committed",
        type=Path,
        default=Path("results"),
        help="folder with the committed snapshot CSVs (default: results)",
    )
    command.add_argument(
        "--stores",
        nargs=2,
        type=Path,
        metavar=("COMMITTED_RESULTS", "RERUN_RESULTS"),
        help="the two results_dir folders (mlflow.db and artifacts/): compare selections too",
    )
    command.add_argument("--out", type=Path, help="also write the per-cell table as CSV")
    command.set_defaults(handler=rerun)
