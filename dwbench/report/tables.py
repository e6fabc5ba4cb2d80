"""The paper's tables, measured beside the paper: each cell reads "measured (paper)".

Measured is mean ± std over seeds (sample std; a single seed prints no ±), marked † or ‡ when
the paired bootstrap interval of its difference to Random lies above or below zero. The paper's
number comes from `paper.Paper`; "–" where there is none or nothing was measured. Three layouts
cover the paper: methods x (task, budget) per target model (Tables 2 and 3, Figure 3), methods x
(task: STR per budget, average score) per target model (Tables 1 and 6), and (task, budget) x
setting per target model (the ablations, Tables 4 and 5). This module picks the layout and
writes the caption and notes; table_layouts.py builds each layout's blocks, and table_render.py
prints the table as Markdown and LaTeX from the same entries.
"""

from __future__ import annotations

import pandas as pd

from dwbench.report.bootstrap import ABOVE, BELOW
from dwbench.report.frame import (
    MODEL_ORDER,
    TASK_ORDER,
    budget_label,
    metric_label,
    selected_budget,
    sort_values,
)
from dwbench.report.paper import Paper, model_label, table_label, task_label
from dwbench.report.table_layouts import _ablation_block, _Intervals, _methods_block, _str_block
from dwbench.report.table_render import Block, Table

TITLES = {
    "table1": "Table 1: selection-to-tuning ratio (STR) and average score",
    "table2": "Table 2: score by selection method and budget",
    "table3": "Table 3: score by selection method and budget (synthetic data)",
    "table4": "Table 4: Data Whisperer's demonstrations (n_d) and queries (n_q) per episode",
    "table5": "Table 5: Data Whisperer's attention layer, with and without attention weighting",
    "table6": "Table 6: selection-to-tuning ratio (STR) and average score",
    "fig3": "Figure 3: weak-to-strong selection",
}
LAYOUTS = {
    "table1": "str",
    "table6": "str",
    "table4": "ablation",
    "table5": "ablation",
    "table2": "methods",
    "table3": "methods",
    "fig3": "methods",
}


def build_table(
    frame: pd.DataFrame,
    kind: str,
    paper: Paper,
    intervals: pd.DataFrame,
    resamples: int,
    rng_seed: int,
) -> Table:
    """The experiment's paper table from the report frame (grid cells with measurements)."""
    lookup = _Intervals(intervals)
    layout = LAYOUTS[kind]
    targets = sort_values(list(frame["target"].unique()), MODEL_ORDER)
    blocks = []
    for target in targets:
        sub = frame[frame["target"] == target]
        title = f"Target model {model_label(target)}"
        if layout == "str":
            blocks.append(_str_block(title, sub, paper, lookup))
        elif layout == "ablation":
            blocks.append(_ablation_block(title, sub, paper, lookup))
        else:
            blocks.append(_methods_block(title, sub, paper, lookup))
    tasks = sort_values(list(frame["task"].unique()), TASK_ORDER)
    metrics = ", ".join(
        f"{task_label(t)}: {metric_label(m)}"
        for t, m in frame[["task", "metric"]].drop_duplicates().itertuples(index=False)
    )
    seeds = sorted(int(s) for s in frame["seed"].unique())
    found = frame["score"].notna()
    caption = [
        f"Measured: mean ± std over seeds (sample std; no ± where one seed finished) of the score "
        f"({metrics}); the grid's seeds are {', '.join(map(str, seeds))}; "
        f"{int(found[frame['role'] == 'grid'].sum())} of {int((frame['role'] == 'grid').sum())} "
        "grid cells measured.",
        paper.source_text(targets, tasks),
    ]
    footnotes = [
        f"{ABOVE} / {BELOW}: the paired bootstrap 95% interval of the difference to Random (same "
        "task, target model, budget and seed, paired by evaluation example; "
        f"{resamples:,} resamples of examples and seeds, RNG seed {rng_seed}) lies above / below "
        "zero. bootstrap.csv lists every interval.",
        "–: nothing measured for that cell (not in the snapshot), or no paper number.",
    ]
    footnotes += _layout_notes(kind, frame, layout)
    footnotes += _caveats(blocks)
    return Table(kind, TITLES[kind], caption, blocks, footnotes)


def _layout_notes(kind: str, frame: pd.DataFrame, layout: str) -> list[str]:
    notes = []
    if layout == "str":
        selected = frame.loc[selected_budget(frame["budget"]), "budget"]
        budgets = ", ".join(budget_label(b) for b in sorted(selected.unique()))
        notes.append(
            "STR: selection seconds / seconds to fine-tune on the whole pool (measured when a "
            "budget-1.0 run exists, else estimated from throughput: full_train_s_source in the "
            f"snapshot). Avg: each seed's mean score over {budgets}, then mean ± std over the "
            "seeds that finished every budget; the paper's Avg is over 1/5/10%. "
            "The paper prints no STR for Random. Speedup: Nuggets STR / Data Whisperer STR per "
            "seed, then mean ± std (the paper's Table 6 speedup is over its weak-to-strong Data "
            "Whisperer)."
        )
    if kind == "table5":
        notes.append(
            "Layer roles rank the experiment's three attention layers (shallow / intermediate "
            "/ deep); the paper's are layers 5 / 13 / 30 of Llama-3-8B, and a cell takes the "
            "paper number of its role. w/o Attn: every demonstration gets its episode's score."
        )
    if kind == "fig3":
        notes.append(
            "Figure 3's paper numbers are bars read off the figure (±0.5); its Random column is "
            "Table 2's."
        )
    if (frame["role"] == "companion").any():
        shown = sorted(frame.loc[frame["role"] == "companion", "variant"].unique())
        notes.append(
            f"{', '.join(shown)}: cells of a companion preset (not in this experiment's grid), "
            "shown where they were run; never required."
        )
    return notes


def _caveats(blocks: list[Block]) -> list[str]:
    """The paper's own notes on numbers that are not what the cell suggests (marked *)."""
    notes: dict[str, None] = {}
    for block in blocks:
        for _, entries in block.rows:
            for entry in entries:
                if entry is not None and entry.paper is not None and entry.paper.caveat:
                    value = entry.paper
                    where = ", ".join(
                        [table_label(value.table), model_label(value.model), task_label(value.task)]
                    )
                    notes[f"* {where}, {value.value:g}: {value.note}."] = None
    return list(notes)
