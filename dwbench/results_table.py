"""The table a run prints: every evaluated cell of this task and target model in the store."""

from __future__ import annotations

from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from dwbench.tracking import Tracker

COLUMNS = {
    "tags.task": "task",
    "tags.method": "method",
    "tags.budget": "budget",
    "tags.selector": "selector",
    "tags.seed": "seed",
    "metrics.score": "score",
    "metrics.selection_s": "selection s",
    "metrics.train_s": "fine-tune s",
    "metrics.STR": "STR",
    "metrics.selection_precision": "selection precision",
}


def evaluated_cells(tracker: Tracker, tags: dict[str, str]) -> pd.DataFrame:
    """Finished evaluation runs of this run's task config and target model, one row per
    (method, budget, selector), mean over seeds."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_ids=[tracker.experiment_id],
        filter_string=(
            f"tags.stage = 'evaluate' and tags.task = '{tags['task']}' "
            f"and tags.task_config = '{tags['task_config']}' and tags.target = '{tags['target']}' "
            "and attributes.status = 'FINISHED'"
        ),
        output_format="pandas",
    )
    if runs.empty or "metrics.STR" not in runs:
        return pd.DataFrame(columns=[*COLUMNS.values(), "seeds"])
    runs = runs.reindex(columns=list(COLUMNS)).rename(columns=COLUMNS)
    runs["score"] *= 100
    keys = ["task", "method", "budget", "selector"]
    table = runs.groupby(keys, dropna=False).agg(
        **{
            c: (c, "mean")
            for c in ["score", "selection s", "fine-tune s", "STR", "selection precision"]
        },
        seeds=("seed", "nunique"),
    )
    return table.reset_index().sort_values(["budget", "method"])


def summary_row(tags: dict[str, str], summary: Any) -> pd.DataFrame:
    """One cell's summary as a table row, in the columns `evaluated_cells` gives."""
    row = {
        "task": tags["task"],
        "method": tags["method"],
        "budget": tags["budget"],
        "selector": tags["selector"],
        "score": summary.score * 100,
        "selection s": summary.selection_s,
        "fine-tune s": summary.train_s,
        "STR": summary.STR,
        "selection precision": summary.selection_precision,
        "seeds": 1,
    }
    return pd.DataFrame([row])


def print_table(cells: pd.DataFrame, metric: str, console: Console | None = None) -> None:
    console = console or Console(width=160)
    table = Table(title=f"dwbench results (score = {metric}, %)")
    for column in cells.columns:
        table.add_column(column, justify="left" if cells[column].dtype == object else "right")
    for row in cells.itertuples(index=False):
        table.add_row(*(_fmt(v) for v in row))
    console.print(table)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if pd.isna(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
