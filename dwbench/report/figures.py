"""The paper's figures, from the report frame: a figure is drawn only when the experiment has its
data, as PNG (to look at) and PDF (for a paper).

- score_vs_budget: score per method at each budget, a panel per task x target model;
- str: selection-to-tuning ratio per method (log scale; 1 = selection costs a full fine-tune);
- weak_to_strong: GraNd, Data Whisperer selecting for itself, and a weaker selector (Figure 3);
- ablation: heatmaps of the score per setting (n_d, n_q or the attention layer / w/o Attn, with
  Random) and budget, for Tables 4 and 5;
- selection_precision: share of clean examples among those selected (the embedded task only),
  with the pool's clean share, which random selection gets on average.
Error bars are ± one std over seeds (none with one seed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.container import BarContainer
from matplotlib.lines import Line2D

from dwbench.report.frame import (
    MODEL_ORDER,
    TASK_ORDER,
    WHOLE,
    ZERO_SHOT,
    metric_label,
    selected_budget,
    sort_values,
    variants,
)
from dwbench.report.paper import model_label, task_label

BUDGET_AXIS = "budget (% of the training pool)"
MARKERS = ["o", "s", "D", "^", "v", "P", "X", "*", "<", ">", "p", "h", "8", "d", "H"] * 3
REFERENCE = {"color": "0.35", "linestyle": "--", "linewidth": 1}  # reference lines' style
ZERO_SHOT_LINE = {"color": "0.35", "linestyle": ":", "linewidth": 1.2}  # the untuned model


def draw_all(frame: pd.DataFrame, kind: str, folder: Path) -> list[Path]:
    """Every figure the experiment has data for, as PNG and PDF; returns the files written."""
    data = _labelled(frame[frame["score"].notna()])
    written: list[Path] = []
    figures: dict[str, Callable[[pd.DataFrame, str], plt.Figure | None]] = {
        "score_vs_budget": score_vs_budget,
        "str": str_per_method,
        "weak_to_strong": weak_to_strong,
        "ablation": ablation_heatmaps,
        "selection_precision": selection_precision,
    }
    folder.mkdir(parents=True, exist_ok=True)
    plt.switch_backend("Agg")  # files only: no display needed, none opened
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.15):
        for name, draw in figures.items():
            figure = draw(data, kind) if not data.empty else None
            if figure is None:
                continue
            for suffix in ("png", "pdf"):
                path = folder / f"{name}.{suffix}"
                stamp = {"CreationDate": None} if suffix == "pdf" else None  # same data, same bytes
                figure.savefig(path, dpi=150, bbox_inches="tight", metadata=stamp)
                written.append(path)
            plt.close(figure)
    return written


def _labelled(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(
        task_name=frame["task"].map(task_label),
        target_name=frame["target"].map(model_label),
    )


def _facets(data: pd.DataFrame) -> dict[str, list[str]]:
    """Panel rows (target models) and columns (tasks) in the paper's order."""
    targets = sort_values(list(data["target"].unique()), MODEL_ORDER)
    tasks = sort_values(list(data["task"].unique()), TASK_ORDER)
    return {
        "row": "target_name",
        "col": "task_name",
        "row_order": [model_label(t) for t in targets],
        "col_order": [task_label(t) for t in tasks],
    }


def _budget_order(data: pd.DataFrame) -> list[str]:
    return list(data.sort_values("budget")["budget_label"].unique())


def _palette(labels: list[str]) -> dict[str, tuple]:
    """Random in near-black (the baseline every method is read against), the rest in distinct
    colours: tab10's, then their light variants beyond ten."""
    tab20 = sns.color_palette("tab20", 20)
    colours = iter([*tab20[0::2], *tab20[1::2]])
    return {label: (0.15, 0.15, 0.15) if label == "Random" else next(colours) for label in labels}


def _score_axes(grid: sns.FacetGrid, data: pd.DataFrame) -> None:
    """Each panel's y label names its task's metric (tasks may differ), and its range stays
    within 0..100 % and spans at least 10 points (all-zero scores would spread over +-0.04)."""
    metrics = dict(data[["task_name", "metric"]].drop_duplicates().itertuples(index=False))
    for (_, task), ax in grid.axes_dict.items():
        ax.set_ylabel(metric_label(metrics.get(task, "")))
        low, high = ax.get_ylim()
        low, high = max(low, -1.0), min(high, 101.0)
        if high - low < 10:
            low = min(max((low + high) / 2 - 5, -1.0), 91.0)
            high = low + 10
        ax.set_ylim(low, high)


def _add_reference_to_legend(grid: sns.FacetGrid, label: str, style: dict | None = None) -> None:
    """Name a reference line in the legend, outside the panels, not over the data."""
    legend = grid.legend
    entries = dict(zip((t.get_text() for t in legend.texts), legend.legend_handles, strict=True))
    entries[label] = Line2D([], [], **(style or REFERENCE))
    title = legend.get_title().get_text()
    legend.remove()
    grid.add_legend(legend_data=entries, title=title, label_order=list(entries))


def score_vs_budget(data: pd.DataFrame, kind: str) -> plt.Figure | None:
    """Mean score (± std over seeds) per method at each budget; the whole dataset as a dashed
    line, the untuned model (zero-shot) as a dotted one."""
    budgets = data[selected_budget(data["budget"])]
    if budgets.empty:
        return None
    hue_order = variants(budgets)
    grid = sns.catplot(
        data=budgets,
        kind="point",
        x="budget_label",
        y="score_pct",
        hue="variant",
        hue_order=hue_order,
        order=_budget_order(budgets),
        palette=_palette(hue_order),
        markers=MARKERS[: len(hue_order)],
        dodge=0.5 if len(hue_order) > 1 else False,
        errorbar="sd",
        capsize=0.08,
        markersize=5,
        linewidth=1.2,
        sharey=False,
        height=3.4,
        aspect=max(1.35, 0.17 * len(hue_order)),
        **_facets(data),
    )
    grid.set_titles("{col_name}\n{row_name}")
    grid.set_axis_labels(BUDGET_AXIS, "")
    drawn = []
    for variant, label, style in [
        (WHOLE, "whole dataset", REFERENCE),
        (ZERO_SHOT, "zero-shot (untuned)", ZERO_SHOT_LINE),
    ]:
        rows = data[(data["variant"] == variant) & data["score_pct"].notna()]
        for (target, task), mean in (
            rows.groupby(["target_name", "task_name"])["score_pct"].mean().items()
        ):
            ax = grid.axes_dict.get((target, task))
            if ax is not None:
                ax.axhline(mean, **style)  # before the y range is set, so the line is in view
        if not rows.empty:
            drawn.append((label, style))
    _score_axes(grid, data)
    for label, style in drawn:
        _add_reference_to_legend(grid, label, style)
    grid.legend.set_title("method")
    return grid.figure


def str_per_method(data: pd.DataFrame, kind: str) -> plt.Figure | None:
    """STR per method and budget, log scale, with the line where selection costs a fine-tune."""
    ratios = data[selected_budget(data["budget"]) & (data["STR"] > 0)]
    if ratios.empty:
        return None
    order = variants(ratios)
    grid = sns.catplot(
        data=ratios,
        kind="bar",
        x="variant",
        y="STR",
        order=order,
        hue="budget_label",
        hue_order=_budget_order(ratios),
        palette="crest",
        errorbar="sd",
        capsize=0.1,
        height=3.4,
        aspect=max(1.2, 0.22 * len(order)),
        **_facets(ratios),
    )
    grid.set(yscale="log")
    grid.set_titles("{col_name}\n{row_name}")
    grid.set_axis_labels("", "STR (log scale)")
    for ax in grid.axes.flat:
        ax.axhline(1.0, **REFERENCE)
        ax.tick_params(axis="x", labelrotation=40)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    grid.legend.set_title("budget")
    _add_reference_to_legend(grid, "STR = 1: selection\ncosts a full fine-tune")
    return grid.figure


def weak_to_strong(data: pd.DataFrame, kind: str) -> plt.Figure | None:
    """Figure 3's bars: GraNd, Data Whisperer selecting for itself, and with a weaker selector."""
    bars = data[
        data["method"].isin(["grand", "data_whisperer"])
        & (data["ablation"] == "")
        & selected_budget(data["budget"])
    ]
    weaker = (bars["selector"] != bars["target"]) & (bars["method"] == "data_whisperer")
    if bars.empty or not (kind == "fig3" or weaker.any()):
        return None
    selection = bars["method"].map({"grand": "GraNd", "data_whisperer": "Data Whisperer"})
    bars = bars.assign(
        selection=selection.where(~weaker, "Data Whisperer, weaker selector").where(
            weaker | (bars["method"] == "grand"), "Data Whisperer, same model"
        )
    )
    selectors = bars[weaker].groupby("target_name")["selector"].unique()
    for target, names in selectors.items():  # the panel names its weaker selector
        label = f"{target}\nweaker selector: {', '.join(model_label(n) for n in names)}"
        bars.loc[bars["target_name"] == target, "target_name"] = label
    hue_order = [
        s
        for s in ("GraNd", "Data Whisperer, same model", "Data Whisperer, weaker selector")
        if s in set(bars["selection"])
    ]
    grid = sns.catplot(
        data=bars,
        kind="bar",
        x="budget_label",
        y="score_pct",
        order=_budget_order(bars),
        hue="selection",
        hue_order=hue_order,
        palette=["tab:blue", "tab:orange", "tab:green"][: len(hue_order)],
        errorbar="sd",
        capsize=0.1,
        sharey=False,
        height=3.2,
        aspect=1.3,
        row="target_name",
        col="task_name",
        col_order=_facets(bars)["col_order"],
    )
    grid.set_titles("{col_name}\n{row_name}")
    grid.set_axis_labels(BUDGET_AXIS, "")
    _score_axes(grid, bars)
    for ax in grid.axes.flat:  # the values on the bars: a 0 % bar is otherwise invisible
        for container in ax.containers:
            if isinstance(container, BarContainer):
                ax.bar_label(container, fmt="%.1f", padding=2, fontsize=8)
    grid.legend.set_title("selection")
    return grid.figure


def ablation_heatmaps(data: pd.DataFrame, kind: str) -> plt.Figure | None:
    """Score (mean over seeds) per setting and budget, a heatmap per task x target model."""
    if kind not in ("table4", "table5"):
        return None
    cells = data[selected_budget(data["budget"])]
    if cells.empty:
        return None
    facets = _facets(cells)
    rows, cols = facets["row_order"], facets["col_order"]
    order = variants(cells)
    width = 4.0 + 1.1 * cells["budget"].nunique()  # room for the setting labels and colour bar
    height = 1.2 + 0.45 * len(order)
    figure, axes = plt.subplots(
        len(rows),
        len(cols),
        squeeze=False,
        figsize=(width * len(cols), height * len(rows)),
        layout="constrained",
    )
    for i, target in enumerate(rows):
        for j, task in enumerate(cols):
            ax = axes[i][j]
            panel = cells[(cells["target_name"] == target) & (cells["task_name"] == task)]
            if panel.empty:
                ax.set_axis_off()
                continue
            table = panel.pivot_table(index="variant", columns="budget_label", values="score_pct")
            table = table.reindex(
                index=[v for v in order if v in table.index], columns=_budget_order(panel)
            )
            sns.heatmap(
                table,
                annot=True,
                fmt=".1f",
                cmap="viridis",
                **_colour_range(table),
                ax=ax,
                cbar_kws={"label": metric_label(panel["metric"].iloc[0])},
            )
            ax.set_title(f"{task}\n{target}")
            ax.set_xlabel(BUDGET_AXIS)
            ax.set_ylabel("setting")
            ax.tick_params(axis="y", labelrotation=0)
    return figure


def _colour_range(table: pd.DataFrame) -> dict[str, float]:
    """A heatmap's colour range within 0..100 % that spans at least 10 points, so equal
    scores (all zero on a tiny model) do not get a colour bar over -0.1..0.1 %."""
    low, high = float(table.min().min()), float(table.max().max())
    if high - low < 10:
        low = min(max((low + high) / 2 - 5, 0.0), 90.0)
        high = low + 10
    return {"vmin": max(low, 0.0), "vmax": min(high, 100.0)}


def selection_precision(data: pd.DataFrame, kind: str) -> plt.Figure | None:
    """Share of clean examples among the selected, per method; the pool's share for reference."""
    cells = data[data["precision_pct"].notna() & selected_budget(data["budget"])]
    if cells.empty:
        return None
    order = variants(cells)
    grid = sns.catplot(
        data=cells,
        kind="bar",
        x="variant",
        y="precision_pct",
        order=order,
        hue="budget_label",
        hue_order=_budget_order(cells),
        palette="crest",
        errorbar="sd",
        capsize=0.1,
        height=3.4,
        aspect=max(1.2, 0.22 * len(order)),
        **_facets(cells),
    )
    grid.set_titles("{col_name}\n{row_name}")
    grid.set_axis_labels("", "selection precision (% clean)")
    grid.set(ylim=(0, 100))
    clean = cells.groupby(["target_name", "task_name"])["pool_clean_share"].first() * 100
    for key, ax in grid.axes_dict.items():
        share = clean.get(key)
        if share is not None and pd.notna(share):
            ax.axhline(share, **REFERENCE)
        ax.tick_params(axis="x", labelrotation=40)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    grid.legend.set_title("budget")
    if clean.notna().any():
        _add_reference_to_legend(grid, "pool's clean share\n(random's expectation)")
    return grid.figure
