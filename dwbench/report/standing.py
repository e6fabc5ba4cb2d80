"""Does a method beat Random across settings, or only in one? ("Chasing Random", arXiv 2410.15225)

A setting is what was evaluated: the data (task, metric, planted noise, evaluation examples; see
`data_key`) x target x selector x budget, its seeds aggregated. Per method and setting:
- win / tie / loss against Random: the paired bootstrap interval of method minus Random
  (dwbench.report.bootstrap, examples and seeds resampled) lies above zero / covers it / lies
  below it;
- rank among the methods of that setting (Random included; 1 = best mean score over seeds; ties
  share the average rank).
Per method: its wins, ties and losses and its mean rank over the settings it was run in, with how
many methods each ranking held (a rank of 2 of 3 is not a rank of 2 of 17).

The per-report table (`standing.md`, `standing.png/.pdf`) covers the report's cells;
`python -m dwbench.report.standing` covers every snapshot committed under `results/`, so it
grows as cells are added. There, all snapshots are pooled and an evaluation counts once however
many snapshots or labels carry it (`counted_runs`), and a setting whose references cannot tell
methods apart is listed apart and never counted (`power`): a tie there says nothing.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from dwbench.content_hash import stable_hash
from dwbench.errors import DwbenchError
from dwbench.report import bootstrap, snapshot
from dwbench.report.cells import DESCRIPTORS
from dwbench.report.frame import METHOD_LABELS, budget_label, selected_budget

SETTING = ["task", "target", "selector", "budget"]
OUTCOMES = ("win", "tie", "loss")
SUMMARY = ["method", "settings", "win", "tie", "loss", "mean_rank", "mean_methods"]
ROWS = [*SETTING, "data", "method", "outcome", "rank", "n_methods", "cells", "snapshot"]
APART = [*SETTING, "data", "why", "methods"]
# a rerun of one cell description on the same data is the same measurement repeated
RERUN = ["data", *(c for c in DESCRIPTORS if c not in ("cell", "role"))]
ORACLE, ZERO_SHOT, WHOLE_POOL = "oracle_clean", "zero_shot", 1.0


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


def to_markdown(table: pd.DataFrame, title: str, without_power: pd.DataFrame | None = None) -> str:
    """The summary table; then the settings left out for want of power, when given."""
    lines = [
        f"## {title}",
        "",
        "Win / tie / loss: the paired bootstrap interval of method minus Random (95%, evaluation "
        "examples and seeds resampled) lies above zero / covers zero / lies below zero, per "
        "setting: the data evaluated (task, noise, evaluation examples) x target x selector x "
        "budget, seeds aggregated. Mean rank: among the methods of each such setting, Random "
        "included (1 = best mean score), over the settings the method ran in; `of` is how many "
        "methods a ranking held on average.",
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
    if without_power is not None and not without_power.empty:
        lines += [
            "",
            "### Settings without power, not counted",
            "",
            "The references there cannot tell methods apart (the oracle not above Random, or the "
            "whole pool not above zero-shot, by the same paired interval as a win; or every "
            "score equal), so a tie there says nothing; `data` names what was evaluated.",
            "",
            "| task | data | target | selector | budget | why | methods |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in without_power.itertuples():
            lines.append(
                f"| {row.task} | {row.data} | {row.target} | {row.selector} | "
                f"{budget_label(row.budget)} | {row.why} | {row.methods} |"
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


@dataclass(frozen=True)
class Committed:
    """The standing over every committed snapshot: `rows` counted (one per method and setting,
    ROWS), `without_power` the settings left out and why (APART), `snapshots` the names read."""

    rows: pd.DataFrame
    without_power: pd.DataFrame
    snapshots: list[str]


def data_key(runs: pd.DataFrame, examples: pd.DataFrame) -> pd.Series:
    """Per run, what it was evaluated on: `<task>@<hash>`.

    The snapshots keep no hash of the data themselves, so the key is built from what they hold
    that changes with the data: the task and its metric, the pool's clean share (the planted
    noise) and the set of evaluation example ids the run was scored on (`<name>_examples.csv`).
    The embedded task's 30-problem version and its 200-problem one share a name but not an
    evaluation set, so they are two settings, not one. A pool drawn again with the same share
    and scored on the same ids (another generator seed) is not told apart: a snapshot does not
    record the draw. Target, selector and budget complete the setting (SETTING).
    """
    ids = examples.groupby("cell")["example_id"].agg(lambda e: stable_hash(sorted(set(e))))
    share = runs["pool_clean_share"].astype(object).where(runs["pool_clean_share"].notna(), None)
    parts = zip(runs["task"], runs["metric"], share, runs["cell"].map(ids), strict=True)
    return pd.Series(
        [f"{task}@{stable_hash([task, *rest])}" for task, *rest in parts], index=runs.index
    )


def counted_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluation, whatever snapshots or labels carry it.

    A cell counts once by its evaluate key: an ablation preset that is the default configuration
    (Table 4's [nd10_nq5], Table 5's [layer15]) or a snapshot that copies another's cells under
    other cell keys evaluates nothing new. The label kept is the plain method's over an
    ablation's, then the first by method, ablation, snapshot and cell. A rerun of the same cell
    description on the same data (RERUN; a cell re-keyed after a code change, same seed) is the
    same measurement repeated: the latest finished one counts. `runs` needs `data` and
    `snapshot` columns.
    """
    runs = runs.assign(
        ablation=text(runs["ablation"]),
        evaluation=runs["evaluate_key"].fillna(runs["cell"]),
        aliased=text(runs["ablation"]) != "",
    )
    runs = runs.sort_values(["aliased", "method", "ablation", "snapshot", "cell"], kind="stable")
    once = runs.drop_duplicates("evaluation")
    once = once.sort_values(
        ["finished", "cell"], ascending=[False, True], na_position="last", kind="stable"
    )
    once = once.drop_duplicates(RERUN)
    return once.drop(columns=["evaluation", "aliased"]).sort_values("cell", kind="stable")


def power(
    frame: pd.DataFrame,
    examples: pd.DataFrame,
    intervals: pd.DataFrame,
    resamples: int = 10_000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per setting of `frame`: `why` it cannot tell methods apart ("" when it can) and `methods`.

    The same paired interval that makes a win must show that the setting separates: the oracle
    (clean examples only) above Random at the setting's budget, and the whole pool above
    zero-shot. A setting where either is not above, where every per-example score is equal (all
    zero: the ranks are ties), or where neither reference was run, is without power. `frame`,
    `examples` and `intervals` as for `outcomes`, plus the whole-pool (budget 1) and zero-shot
    (budget 0) runs.
    """
    found = frame[frame["score"].notna() & selected_budget(frame["budget"])]
    found = found.assign(ablation=text(found["ablation"]))
    spread = examples.merge(found[["cell", *SETTING]], on="cell").groupby(SETTING)["score"]
    distinct = spread.nunique()
    whole = _whole_over_zero(frame, examples, resamples, seed)
    oracle = intervals[
        (intervals["method"] == ORACLE)
        & (text(intervals["ablation"]) == "")
        & intervals["budget"].notna()
    ]
    rows = []
    for setting, own in found.groupby(SETTING, sort=True):
        task, target, selector, budget = setting
        why = []
        if distinct.get(setting, 0) <= 1:
            why.append("every score equal")
        refs = oracle[
            (oracle["task"] == task) & (oracle["target"] == target) & (oracle["budget"] == budget)
        ]
        if not refs.empty:
            preference = (refs["selector"] != selector) * 1 + (refs["selector"] != target) * 1
            if refs["ci_low"].iloc[preference.to_numpy().argmin()] <= 0:
                why.append("oracle not above Random")
        above = whole.get((task, target))
        if above is False:
            why.append("whole pool not above zero-shot")
        if refs.empty and above is None:
            why.append("no oracle, no whole pool and zero-shot run")
        labels = {method_label(m, a) for m, a in zip(own["method"], own["ablation"], strict=True)}
        rows.append([*setting, "; ".join(why), ", ".join(sorted(labels))])
    return pd.DataFrame(rows, columns=[*SETTING, "why", "methods"])


def _whole_over_zero(
    frame: pd.DataFrame, examples: pd.DataFrame, resamples: int, seed: int
) -> dict[tuple[str, str], bool]:
    """Per (task, target) with both runs: whether the whole pool's paired interval over zero-shot
    lies above zero. The whole pool's seeds are resampled; zero-shot trains nothing, so its
    per-example scores (mean over its seeds) pair with every seed."""
    scores = examples.merge(frame.drop(columns="score"), on="cell")
    plain = text(scores["ablation"]) == ""
    whole = scores[(scores["method"] == "random") & plain & (scores["budget"] == WHOLE_POOL)]
    zero = scores[(scores["method"] == ZERO_SHOT) & (scores["budget"] == 0.0)]
    above = {}
    for (task, target), own in whole.groupby(["task", "target"], sort=True):
        selector = target if (own["selector"] == target).any() else own["selector"].min()
        own = own[own["selector"] == selector]
        base = zero[(zero["task"] == task) & (zero["target"] == target)]
        base = base.groupby("example_id")["score"].mean()
        diffs = own.assign(group=0, diff=own["score"] - own["example_id"].map(base))
        diffs = diffs.dropna(subset=["diff"])
        if not diffs.empty:
            above[(task, target)] = bootstrap.paired_interval(diffs, resamples, seed).low > 0
    return above


def committed(results: Path, resamples: int = 10_000, seed: int = 0) -> Committed:
    """The standing over every snapshot in `results`, pooled: each evaluation counted once
    (`counted_runs`), settings keyed by their data (`data_key`), those without power apart."""
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
    frozen = {name: snapshot.read(results, name) for name in names}
    runs = pd.concat([f.runs.assign(snapshot=n) for n, f in frozen.items()], ignore_index=True)
    examples = pd.concat([f.examples for f in frozen.values()], ignore_index=True)
    examples = examples.drop_duplicates(["cell", "example_id"])
    runs = runs[runs["cell"].isin(examples["cell"])]  # no per-example scores: nothing to pair
    evaluation = runs["evaluate_key"].fillna(runs["cell"])
    carried = runs.groupby(evaluation)["snapshot"].agg(lambda n: ",".join(sorted(set(n))))
    runs = counted_runs(runs.assign(data=data_key(runs, examples)))
    where = runs["evaluate_key"].fillna(runs["cell"]).map(carried).set_axis(runs["cell"])
    examples = examples[examples["cell"].isin(runs["cell"])]
    keyed = runs.assign(task=runs["data"])  # a setting is keyed by its data, not its task name
    intervals = bootstrap.compare_to_random(keyed, examples, resamples, seed)
    rows = outcomes(keyed, intervals)
    settings = power(keyed, examples, intervals, resamples, seed)
    rows = rows.merge(settings[[*SETTING, "why"]], on=SETTING, how="left")
    rows["snapshot"] = [  # every snapshot that holds the row's evaluations
        ",".join(sorted({s for c in cells.split(",") for s in where[c].split(",")}))
        for cells in rows["cells"]
    ]
    counted = _named(rows[rows["why"] == ""])[ROWS]
    apart = _named(settings[settings["why"] != ""])[APART]
    return Committed(counted.reset_index(drop=True), apart.reset_index(drop=True), names)


def _named(frame: pd.DataFrame) -> pd.DataFrame:
    """`task` back to the task's name, the data key's hash in `data`; sorted by setting."""
    parts = [key.rpartition("@") for key in frame["task"]]
    named = frame.assign(task=[p[0] for p in parts], data=[p[2] for p in parts])
    order = [*SETTING, "data", *(["method"] if "method" in named else [])]
    return named.sort_values(order, kind="stable")


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
        standing = committed(args.results, args.resamples)
    except DwbenchError as error:
        print(f"dwbench.report.standing: {error}", file=sys.stderr)
        return 2
    table = summary(standing.rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    title = f"Every committed cell (from {len(standing.snapshots)} snapshots in {args.results})"
    markdown = to_markdown(table, title, standing.without_power)
    (args.out_dir / "standing.md").write_text(markdown, encoding="utf-8")
    standing.rows.to_csv(args.out_dir / "standing_settings.csv", index=False)
    standing.without_power.to_csv(args.out_dir / "standing_without_power.csv", index=False)
    written = draw(table, args.out_dir)
    print(markdown)
    print("Wrote:", args.out_dir / "standing.md", *written, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
