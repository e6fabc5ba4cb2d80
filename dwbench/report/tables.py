"""The paper's tables, measured beside the paper: each cell reads "measured (paper)".

Measured is mean ± std over seeds (sample std; a single seed prints no ±), marked † or ‡ when
the paired bootstrap interval of its difference to Random lies above or below zero. The paper's
number comes from `paper.Paper`; "–" where there is none or nothing was measured. Three layouts
cover the paper: methods x (task, budget) per target model (Tables 2 and 3, Figure 3), methods x
(task: STR per budget, average score) per target model (Tables 1 and 6), and (task, budget) x
setting per target model (the ablations, Tables 4 and 5). Each renders as Markdown and LaTeX
from the same entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dwbench.report.bootstrap import ABOVE, BELOW, CELL, mark
from dwbench.report.frame import (
    DATA_WHISPERERS,
    MODEL_ORDER,
    TASK_ORDER,
    WHOLE,
    ZERO_SHOT,
    budget_label,
    metric_label,
    selected_budget,
    sort_values,
    variants,
)
from dwbench.report.paper import Paper, PaperValue, model_label, table_label, task_label

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


@dataclass
class Entry:
    mean: float | None
    std: float | None
    paper: PaperValue | None
    mark: str = ""
    ratio: bool = False  # an STR (a ratio), not a score in %


@dataclass
class Block:
    title: str
    row_header: list[str]
    groups: list[str]  # column group of each data column ("" when the block has none)
    columns: list[str]
    rows: list[tuple[list[str], list[Entry | None]]] = field(default_factory=list)


@dataclass
class Table:
    name: str
    title: str
    caption: list[str]
    blocks: list[Block]
    footnotes: list[str]


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


def _number(value: float, ratio: bool) -> str:
    """Two decimals, as the paper prints; two significant digits for ratios below 0.01."""
    if ratio and abs(value) < 0.01 and value != 0:
        return f"{value:.2g}"
    return f"{value:.2f}"


def format_entry(entry: Entry | None, tex: bool = False) -> str:
    """ "measured (paper)", e.g. "45.00 ± 3.33† (69.65)"; empty for a blank cell."""
    if entry is None:
        return ""
    dash = "--" if tex else "–"
    if entry.mean is None:
        measured = dash
    else:
        measured = _number(entry.mean, entry.ratio)
        if entry.std is not None:
            measured += (r" $\pm$ " if tex else " ± ") + _number(entry.std, entry.ratio)
        if entry.mark:
            measured += _tex_symbol(entry.mark) if tex else entry.mark
    if entry.paper is None:
        paper = dash
    else:
        paper = _number(entry.paper.value, entry.ratio)
        if entry.paper.caveat:
            paper += "$^*$" if tex else "*"
    return f"{measured} ({paper})"


def _tex_symbol(symbol: str) -> str:
    return {ABOVE: r"$^\dagger$", BELOW: r"$^\ddagger$"}[symbol]


def tex_escape(text: str) -> str:
    """Plain text (labels, captions, notes) as LaTeX: specials escaped, symbols as math."""
    for plain, escaped in (
        ("\\", r"\textbackslash{}"),
        ("$", r"\$"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("#", r"\#"),
        ("~", r"\textasciitilde{}"),
        ("±", r"$\pm$"),
        ("–", "--"),
        (ABOVE, r"$^\dagger$"),
        (BELOW, r"$^\ddagger$"),
    ):
        text = text.replace(plain, escaped)
    return text


def to_markdown(table: Table) -> str:
    lines = [f"## {table.title}", "", " ".join(table.caption), ""]
    for block in table.blocks:
        header = [*block.row_header] + [
            f"{g} {c}".strip() for g, c in zip(block.groups, block.columns, strict=True)
        ]
        lines += [f"### {block.title}", ""]
        lines.append("| " + " | ".join(header) + " |")
        rule = ["---"] * len(block.row_header) + ["---:"] * len(block.columns)
        lines.append("| " + " | ".join(rule) + " |")
        for labels, entries in block.rows:
            cells = [*labels, *(format_entry(e) for e in entries)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"- {note}" for note in table.footnotes]
    return "\n".join(lines) + "\n"


def to_latex(table: Table) -> str:
    """One table environment (booktabs), a tabular per target model; \\usepackage{booktabs}."""
    # LaTeX numbers the table itself: the caption says which of the paper's it reproduces.
    source, _, description = table.title.partition(": ")
    caption = tex_escape(
        f"{description[:1].upper()}{description[1:]} (the paper's {source}). "
        + " ".join(table.caption)
    )
    lines = [r"\begin{table*}[t]", r"\centering", r"\scriptsize", rf"\caption{{{caption}}}"]
    lines.append(rf"\label{{tab:dwbench-{table.name}}}")
    for block in table.blocks:
        n_labels = len(block.row_header)
        spec = "l" * n_labels + "r" * len(block.columns)
        lines += [
            rf"\par\medskip\textbf{{{tex_escape(block.title)}}}\par\smallskip",
            rf"\begin{{tabular}}{{{spec}}}",
            r"\toprule",
        ]
        if any(block.groups):
            lines += _tex_group_header(block, n_labels)
        header = [tex_escape(h) for h in block.row_header] + [tex_escape(c) for c in block.columns]
        lines += [" & ".join(header) + r" \\", r"\midrule"]
        for labels, entries in block.rows:
            cells = [tex_escape(label) for label in labels]
            cells += [format_entry(e, tex=True) for e in entries]
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
    lines.append(r"\par\smallskip\raggedright")
    lines += [_tex_note(note) + r"\\" for note in table.footnotes]
    lines.append(r"\end{table*}")
    return "\n".join(lines) + "\n"


def _tex_note(note: str) -> str:
    """A footnote line; a leading * (a caveat on a paper number) becomes a superscript."""
    if note.startswith("* "):
        return "$^*$ " + tex_escape(note[2:])
    return tex_escape(note)


def _tex_group_header(block: Block, n_labels: int) -> list[str]:
    """A \\multicolumn per run of equal column groups, with \\cmidrule under each."""
    spans: list[tuple[str, int, int]] = []
    for index, group in enumerate(block.groups):
        column = n_labels + index + 1
        if spans and spans[-1][0] == group:
            spans[-1] = (group, spans[-1][1], column)
        else:
            spans.append((group, column, column))
    cells = [""] * n_labels + [
        rf"\multicolumn{{{end - start + 1}}}{{c}}{{{tex_escape(group)}}}"
        for group, start, end in spans
    ]
    rules = " ".join(rf"\cmidrule(lr){{{start}-{end}}}" for _, start, end in spans)
    return [" & ".join(cells) + r" \\", rules]
