"""Is a difference to Random real? Paired bootstrap intervals over evaluation examples and seeds.

The paper prints single numbers without variance. Here every method's score is compared with
Random's at the same task, target model and budget, pairing the two runs of one seed on the
same evaluation example (both models answer the same questions, so per-example differences
cancel the examples' own difficulty). A resample draws evaluation examples and seeds with
replacement, each with one fixed RNG seed, so the interval is reproducible and the same for a
report rebuilt from its snapshot. The statistic is the mean difference in percentage points
(over a table's budgets too, for Tables 1 and 6's averages: each budget weighs the same).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dwbench.report.frame import selected_budget

CELL = ["task", "target", "selector", "method", "ablation"]
COLUMNS = [
    *CELL,
    "budget",
    "n_seeds",
    "n_examples",
    "difference",
    "ci_low",
    "ci_high",
    "excludes_zero",
]
ABOVE, BELOW = "†", "‡"


@dataclass(frozen=True)
class Interval:
    difference: float  # observed mean difference (method - Random), percentage points
    low: float
    high: float
    n_seeds: int
    n_examples: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_interval(
    diffs: pd.DataFrame, resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Percentile interval of the mean of `diffs` (columns group, seed, example_id, diff).

    Resampling draws examples and seeds with replacement as multinomial counts, so one resample
    is a weighted mean over the (group, seed, example) array and all resamples are two matrix
    products per group; a pair missing from the array (a seed without Random) weighs nothing.
    """
    groups = sorted(diffs["group"].unique())
    seeds = sorted(diffs["seed"].unique())
    examples = sorted(diffs["example_id"].unique())
    array = np.full((len(groups), len(seeds), len(examples)), np.nan)
    array[
        diffs["group"].map({g: i for i, g in enumerate(groups)}).to_numpy(),
        diffs["seed"].map({s: i for i, s in enumerate(seeds)}).to_numpy(),
        diffs["example_id"].map({e: i for i, e in enumerate(examples)}).to_numpy(),
    ] = diffs["diff"].to_numpy()
    present = ~np.isnan(array)
    values = np.where(present, array, 0.0)
    observed = np.mean([values[g].sum() / present[g].sum() for g in range(len(groups))])
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for start in range(0, resamples, 1000):
        size = min(1000, resamples - start)
        seed_counts = rng.multinomial(len(seeds), np.full(len(seeds), 1 / len(seeds)), size)
        example_counts = rng.multinomial(
            len(examples), np.full(len(examples), 1 / len(examples)), size
        )
        per_group = []
        for g in range(len(groups)):
            total = ((seed_counts @ values[g]) * example_counts).sum(axis=1)
            weight = ((seed_counts @ present[g]) * example_counts).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_group.append(total / weight)
        stats[start : start + size] = np.mean(per_group, axis=0)
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(stats, [tail, 100 - tail])
    return Interval(float(observed), float(low), float(high), len(seeds), len(examples))


def compare_to_random(
    frame: pd.DataFrame,
    examples: pd.DataFrame,
    resamples: int = 10_000,
    seed: int = 0,
    averages: bool = False,
) -> pd.DataFrame:
    """One interval per (cell setting, budget) against Random; with `averages`, also one over
    all budgets (budget empty), for tables that print a mean over budgets."""
    found = frame[frame["score"].notna() & selected_budget(frame["budget"])]
    scores = examples.merge(found[["cell", *CELL, "budget", "seed"]], on="cell")
    scores["score"] *= 100
    random = _random_scores(scores)
    rows = []
    others = scores[scores["method"] != "random"]
    for setting, own in others.groupby(CELL, sort=True):
        paired = own.merge(
            random, on=["task", "target", "budget", "seed", "example_id"], suffixes=("", "_random")
        )
        if paired.empty:
            continue
        paired = paired.assign(diff=paired["score"] - paired["score_random"])
        by_budget = [(b, part) for b, part in paired.groupby("budget")]
        if averages and len(by_budget) > 1:
            by_budget.append((np.nan, paired))
        for budget, part in by_budget:
            interval = paired_interval(
                part.assign(group=part["budget"]), resamples=resamples, seed=seed
            )
            rows.append(
                [
                    *setting,
                    budget,
                    interval.n_seeds,
                    interval.n_examples,
                    interval.difference,
                    interval.low,
                    interval.high,
                    interval.excludes_zero,
                ]
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def _random_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Random's per-example scores by (task, target, budget, seed): the run whose selector is the
    target when there are several (Random ignores its selector, but its key does not)."""
    random = scores[(scores["method"] == "random") & (scores["ablation"] == "")]
    random = random.assign(own=random["selector"] == random["target"])
    keys = ["task", "target", "budget", "seed"]
    first = random.sort_values("own", ascending=False).drop_duplicates(keys)[[*keys, "cell"]]
    chosen = random.merge(first, on=[*keys, "cell"])
    return chosen[[*keys, "example_id", "score"]]


def mark(interval: Mapping[str, Any] | None) -> str:
    """† when the interval lies above zero, ‡ below, nothing otherwise."""
    if interval is None or not interval["excludes_zero"]:
        return ""
    return ABOVE if interval["ci_low"] > 0 else BELOW
