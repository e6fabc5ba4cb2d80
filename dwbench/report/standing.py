"""Does a method beat Random across settings, or only in one? ("Chasing Random", arXiv 2410.15225)

A setting is (task, target, selector, budget), its seeds aggregated. Per method and setting:
- win / tie / loss against Random: the paired bootstrap interval of method minus Random
  (dwbench.report.bootstrap, examples and seeds resampled) lies above zero / covers it / lies
  below it;
- rank among the methods of that setting (Random included; 1 = best mean score over seeds; ties
  share the average rank).
Per method: its wins, ties and losses and its mean rank over the settings it was run in, with how
many methods each ranking held (a rank of 2 of 3 is not a rank of 2 of 17).

The per-report table (`standing.md`, `standing.png/.pdf`) covers the report's cells;
`python -m dwbench.report.standing` covers every snapshot committed under `results/`, so it
grows as cells are added. A cell shared by several snapshots (embedded_table1, _table2 and
_table6 hold the same cells) counts once: each snapshot is compared within itself (its cells
share one configuration, so Random is paired with its own evaluation examples), and a
(method, setting) whose cells another snapshot already counted is dropped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from dwbench.errors import DwbenchError
from dwbench.report import bootstrap, snapshot
from dwbench.report.frame import METHOD_LABELS, selected_budget

SETTING = ["task", "target", "selector", "budget"]
OUTCOMES = ("win", "tie", "loss")
SUMMARY = ["method", "settings", "win", "tie", "loss", "mean_rank", "mean_methods"]


def text(values: pd.Series) -> pd.Series:
    """A text column with blanks (read back from CSV as missing) as ""."""
    return values.astype(object).where(values.notna(), "")


def method_label(method: str, ablation: str) -> str:
    label = METHOD_LABELS.get(method, method)
    return f"{label} [{ablation}]" if ablation else label


def outcomes(frame: pd.DataFrame, intervals: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, setting): `outcome` against Random (None for Random itself), `rank`,
    `n_methods` ranked, and `cells` (the method's cell keys there, to count a cell once).

    `frame` has one row per cell (cell, task, target, selector, method, ablation, budget, seed,
    score); `intervals` is bootstrap.compare_to_random's output for it.
    """
    found = frame[frame["score"].notna() & selected_budget(frame["budget"])]
    found = found.assign(ablation=text(found["ablation"]))
    if found.empty:
        return pd.DataFrame(columns=[*SETTING, "method", "outcome", "rank", "n_methods", "cells"])
    per = (
        found.groupby([*SETTING, "method", "ablation"], sort=True)
        .agg(score=("score", "mean"), cells=("cell", lambda c: ",".join(sorted(c))))
        .reset_index()
    )
    random = _random_means(per)
    rows = []
    for setting, own in per.groupby(SETTING, sort=True):
        task, target, _, budget = setting
        if not ((own["method"] == "random") & (own["ablation"] == "")).any():
            fill = random[(random["task"] == task) & (random["target"] == target)]
            own = pd.concat([own, fill[fill["budget"] == budget].assign(selector=setting[2])])
        own = own.assign(
            rank=own["score"].rank(ascending=False, method="average"), n_methods=len(own)
        )
        rows.append(own)
    ranked = pd.concat(rows, ignore_index=True)
    verdict = intervals[intervals["budget"].notna()]
    verdict = verdict.assign(
        ablation=text(verdict["ablation"]),
        outcome=[
            _outcome(low, high)
            for low, high in zip(verdict["ci_low"], verdict["ci_high"], strict=True)
        ],
    )
    ranked = ranked.merge(
        verdict[[*bootstrap.CELL, "budget", "outcome"]],
        on=[*bootstrap.CELL, "budget"],
        how="left",
    )
    ranked["method"] = [
        method_label(m, a) for m, a in zip(ranked["method"], ranked["ablation"], strict=True)
    ]
    return ranked[[*SETTING, "method", "outcome", "rank", "n_methods", "cells"]]


def _outcome(low: float, high: float) -> str:
    return "win" if low > 0 else "loss" if high < 0 else "tie"


def _random_means(per: pd.DataFrame) -> pd.DataFrame:
    """Random's mean score per (task, target, budget): the run whose selector is the target when
    there are several, as the bootstrap pairs it (Random ignores its selector)."""
    random = per[(per["method"] == "random") & (per["ablation"] == "")]
    random = random.assign(own=random["selector"] == random["target"])
    random = random.sort_values("own", ascending=False, kind="stable")
    return random.drop_duplicates(["task", "target", "budget"]).drop(columns="own")


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per method: settings, wins, ties, losses, mean rank and mean number of methods ranked;
    best mean rank first."""
    if rows.empty:
        return pd.DataFrame(columns=SUMMARY)
    counts = pd.crosstab(rows["method"], rows["outcome"]).reindex(
        columns=list(OUTCOMES), fill_value=0
    )
    table = rows.groupby("method").agg(
        settings=("rank", "size"), mean_rank=("rank", "mean"), mean_methods=("n_methods", "mean")
    )
    table = table.join(counts).fillna(0).reset_index()
    for column in OUTCOMES:
        table[column] = table[column].astype(int)
    return table.sort_values(["mean_rank", "method"], kind="stable")[SUMMARY]


def to_markdown(table: pd.DataFrame, title: str) -> str:
    lines = [
        f"## {title}",
        "",
        "Win / tie / loss: the paired bootstrap interval of method minus Random (95%, evaluation "
        "examples and seeds resampled) lies above zero / covers zero / lies below zero, per task "
        "x target x selector x budget (seeds aggregated). Mean rank: among the methods of each "
        "such setting, Random included (1 = best mean score), over the settings the method ran "
        "in; `of` is how many methods a ranking held on average.",
        "",
        "| method | settings | win / tie / loss vs Random | mean rank | of |",
        "|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        versus = "-" if row.method == "Random" else f"{row.win} / {row.tie} / {row.loss}"
        lines.append(
            f"| {row.method} | {row.settings} | {versus} | {row.mean_rank:.2f} | "
            f"{row.mean_methods:.1f} |"
        )
    return "\n".join(lines) + "\n"


def draw(table: pd.DataFrame, folder: Path, name: str = "standing") -> list[Path]:
    """Stacked win / tie / loss bars and the mean rank per method, as PNG and PDF."""
    if table.empty:
        return []
    plt.switch_backend("Agg")
    versus = table[table["method"] != "Random"]
    long = versus.melt(id_vars="method", value_vars=list(OUTCOMES), var_name="outcome")
    colours = dict(zip(OUTCOMES, sns.color_palette("RdYlGn_r", 3), strict=True))
    height = 1.0 + 0.35 * len(table)
    written = []
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.15):
        figure, (bars, ranks) = plt.subplots(1, 2, figsize=(10, height), sharey=False)
        left = pd.Series(0, index=versus["method"])
        for outcome in OUTCOMES:
            part = long[long["outcome"] == outcome].set_index("method")["value"]
            bars.barh(
                part.index, part, left=left[part.index], color=colours[outcome], label=outcome
            )
            left = left.add(part, fill_value=0)
        bars.invert_yaxis()
        bars.set_xlabel("settings (task x target x selector x budget)")
        bars.set_title("against Random (paired 95% interval)")
        bars.legend(loc="lower right", frameon=True)
        sns.barplot(data=table, y="method", x="mean_rank", ax=ranks, color="0.6")
        ranks.set_xlabel("mean rank (1 = best)")
        ranks.set_ylabel("")
        ranks.set_title("rank among the methods of a setting")
        figure.tight_layout()
        folder.mkdir(parents=True, exist_ok=True)
        for suffix in ("png", "pdf"):
            path = folder / f"{name}.{suffix}"
            stamp = {"CreationDate": None} if suffix == "pdf" else None
            figure.savefig(path, dpi=150, bbox_inches="tight", metadata=stamp)
            written.append(path)
        plt.close(figure)
    return written


def committed(results: Path, resamples: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Outcomes over every snapshot in `results` (largest first), each (method, setting) whose
    cells were counted already dropped."""
    names = [
        p.name.removesuffix("_examples.csv")
        for p in sorted(results.glob("*_examples.csv"))
        if (results / p.name.replace("_examples.csv", ".csv")).is_file()
    ]
    if not names:
        raise DwbenchError(
            f"no snapshot in {results} (<name>.csv with <name>_examples.csv); freeze one with "
            "python -m dwbench.report <experiment>."
        )
    parts = []
    for name in names:
        frozen = snapshot.read(results, name)
        runs = frozen.runs.assign(ablation=text(frozen.runs["ablation"]))
        intervals = bootstrap.compare_to_random(runs, frozen.examples, resamples, seed)
        parts.append(outcomes(runs, intervals).assign(snapshot=name, size=len(runs)))
    rows = pd.concat(parts, ignore_index=True).sort_values(["size", "snapshot"], ascending=False)
    return rows.drop_duplicates(["method", "cells"]).drop(columns=["size"])


def parser() -> argparse.ArgumentParser:
    command = argparse.ArgumentParser(
        prog="python -m dwbench.report.standing",
        description="Win / tie / loss against Random and mean rank over every committed cell.",
    )
    command.add_argument("--results", type=Path, default=Path("results"), help="snapshot folder")
    command.add_argument(
        "--out-dir", type=Path, default=Path("paper_figures") / "standing", help="output folder"
    )
    command.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    return command


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        rows = committed(args.results, args.resamples)
    except DwbenchError as error:
        print(f"dwbench.report.standing: {error}", file=sys.stderr)
        return 2
    table = summary(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    title = f"Every committed cell (from {rows['snapshot'].nunique()} snapshots in {args.results})"
    markdown = to_markdown(table, title)
    (args.out_dir / "standing.md").write_text(markdown, encoding="utf-8")
    rows.to_csv(args.out_dir / "standing_settings.csv", index=False)
    written = draw(table, args.out_dir)
    print(markdown)
    print("Wrote:", args.out_dir / "standing.md", *written, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
