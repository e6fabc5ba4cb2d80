"""The three table layouts, each a block of entries for one target model.

methods x (task, budget) for Tables 2 and 3 and Figure 3, methods x (task: STR per budget,
average score) with the speedup over Nuggets for Tables 1 and 6, and (task, budget) x setting
for the ablations, Tables 4 and 5; each entry is mean ± std over seeds with its bootstrap mark.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dwbench.report.bootstrap import CELL, mark
from dwbench.report.frame import (
    DATA_WHISPERERS,
    TASK_ORDER,
    WHOLE,
    ZERO_SHOT,
    budget_label,
    selected_budget,
    sort_values,
    variants,
)
from dwbench.report.paper import Paper, PaperValue, task_label
from dwbench.report.table_render import Block, Entry


class _Intervals:
    """Bootstrap intervals by (task, target, selector, method, ablation, budget)."""

    def __init__(self, intervals: pd.DataFrame) -> None:
        self.rows = {
            (*(r[c] for c in CELL), _budget_key(r["budget"])): r
            for r in intervals.to_dict("records")
        }

    def mark(self, row: pd.Series, budget: float | None) -> str:
        return mark(self.rows.get((*(row[c] for c in CELL), _budget_key(budget))))


def _budget_key(budget: float | None) -> float | None:
    return None if budget is None or pd.isna(budget) else round(float(budget), 6)


def _entry(cells: pd.DataFrame, column: str, paper: PaperValue | None, **kwargs) -> Entry:
    values = cells[column].dropna()
    mean = float(values.mean()) if len(values) else None
    std = float(values.std(ddof=1)) if len(values) > 1 else None
    return Entry(mean, std, paper, **kwargs)


def _at(cells: pd.DataFrame, task: str, budget: float) -> pd.DataFrame:
    return cells[(cells["task"] == task) & np.isclose(cells["budget"], budget)]


def _methods_block(title: str, sub: pd.DataFrame, paper: Paper, lookup: _Intervals) -> Block:
    """Methods x (task, budget); the zero-shot and whole-dataset rows under each task's first
    budget (the paper's layout)."""
    tasks = sort_values(list(sub["task"].unique()), TASK_ORDER)
    budgets = sorted(sub.loc[selected_budget(sub["budget"]), "budget"].unique()) or [1.0]
    references = {WHOLE: 1.0, ZERO_SHOT: 0.0}
    block = Block(
        title,
        ["Method"],
        [task_label(t) for t in tasks for _ in budgets],
        [budget_label(b) for _ in tasks for b in budgets],
    )
    for name in variants(sub):
        own = sub[sub["variant"] == name]
        entries: list[Entry | None] = []
        for task in tasks:
            for budget in budgets:
                cells = _at(own, task, references.get(name, budget))
                if cells.empty or (name in references and budget != budgets[0]):
                    entries.append(None)
                    continue
                row = cells.iloc[0]
                marked = lookup.mark(row, budget) if name not in references else ""
                entries.append(_entry(cells, "score_pct", paper.score(row), mark=marked))
        block.rows.append(([name], entries))
    return block


def _str_block(title: str, sub: pd.DataFrame, paper: Paper, lookup: _Intervals) -> Block:
    """Methods x (task: STR at each budget, then the average score over budgets)."""
    sub = sub[selected_budget(sub["budget"])]
    tasks = sort_values(list(sub["task"].unique()), TASK_ORDER)
    budgets = sorted(sub["budget"].unique())
    per_task = [*(f"STR {budget_label(b)}" for b in budgets), "Avg"]
    block = Block(
        title,
        ["Method"],
        [task_label(t) for t in tasks for _ in per_task],
        [column for _ in tasks for column in per_task],
    )
    for name in variants(sub):
        own = sub[sub["variant"] == name]
        entries: list[Entry | None] = []
        for task in tasks:
            for budget in budgets:
                cells = _at(own, task, budget)
                if cells.empty:
                    entries.append(None)
                    continue
                entries.append(_entry(cells, "STR", paper.str_ratio(cells.iloc[0]), ratio=True))
            cells = own[own["task"] == task]
            if cells.empty:
                entries.append(None)
                continue
            averages = _seed_averages(cells, budgets)
            row = cells.iloc[0]
            over = budgets[0] if len(budgets) == 1 else None  # one budget: its own interval
            entries.append(
                _entry(averages, "score_pct", paper.average(row), mark=lookup.mark(row, over))
            )
        block.rows.append(([name], entries))
    block.rows += _speedup_rows(sub, tasks, budgets, paper)
    return block


def _speedup_rows(
    sub: pd.DataFrame, tasks: list[str], budgets: list[float], paper: Paper
) -> list[tuple[list[str], list[Entry | None]]]:
    """The paper's "Speedup vs Nuggets" (Nuggets STR / Data Whisperer STR), one row per Data
    Whisperer variant (same model, weaker selector): each seed's ratio, then mean ± std."""
    plain = sub[sub["ablation"] == ""]
    nuggets = plain[plain["method"] == "nuggets"]
    whisperers = plain[plain["method"].isin(DATA_WHISPERERS)]
    if nuggets.empty or whisperers.empty:
        return []
    rows = []
    for name in variants(whisperers):
        own = whisperers[whisperers["variant"] == name]
        entries: list[Entry | None] = []
        for task in tasks:
            for budget in budgets:
                pairs = _at(own, task, budget)[["seed", "STR", "target", "selector", "task"]]
                pairs = pairs.merge(
                    _at(nuggets, task, budget)[["seed", "STR"]], on="seed", suffixes=("", "_n")
                )
                pairs = pairs[(pairs["STR"] > 0) & pairs["STR_n"].notna()]
                if pairs.empty:
                    entries.append(None)
                    continue
                ratios = pairs.assign(speedup=pairs["STR_n"] / pairs["STR"])
                value = paper.speedup(pairs.iloc[0], budget)
                entries.append(_entry(ratios, "speedup", value, ratio=True))
            entries.append(None)  # no Avg for a speedup
        rows.append(([f"Speedup: Nuggets / {name}"], entries))
    return rows


def _seed_averages(cells: pd.DataFrame, budgets: list[float]) -> pd.DataFrame:
    """Each seed's mean score over the budgets, for seeds that finished every budget."""
    measured = cells[cells["score_pct"].notna()]
    complete = measured.groupby("seed")["budget"].nunique() == len(budgets)
    kept = measured[measured["seed"].isin(complete[complete].index)]
    return kept.groupby("seed", as_index=False)["score_pct"].mean()


def _ablation_block(title: str, sub: pd.DataFrame, paper: Paper, lookup: _Intervals) -> Block:
    """(task, budget) x setting, Random first: how the paper prints its ablations. Table 4's 0%
    row is the untuned model: one cell, the same under every setting, as the paper prints it."""
    untuned = sub[sub["variant"] == ZERO_SHOT]
    sub = sub[selected_budget(sub["budget"])]
    tasks = sort_values(list(sub["task"].unique()), TASK_ORDER)
    budgets = sorted(sub["budget"].unique())
    names = variants(sub)
    block = Block(title, ["Dataset", "Budget"], [""] * len(names), names)
    for task in tasks:
        cells = _at(untuned, task, 0.0)
        if not cells.empty:
            entry = _entry(cells, "score_pct", paper.score(cells.iloc[0]))
            block.rows.append(([task_label(task), "0% (zero-shot)"], [entry] * len(names)))
        for budget in budgets:
            entries: list[Entry | None] = []
            for name in names:
                cells = _at(sub[sub["variant"] == name], task, budget)
                if cells.empty:
                    entries.append(None)
                    continue
                row = cells.iloc[0]
                entries.append(
                    _entry(cells, "score_pct", paper.score(row), mark=lookup.mark(row, budget))
                )
            block.rows.append(([task_label(task), budget_label(budget)], entries))
    return block
