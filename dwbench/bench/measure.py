"""Run a set of cells through the pipeline and read back what they measured, paired by example.

`python -m dwbench.bench calibrate` and `python -m dwbench.bench demo` compare methods on the same
pipeline users run: each set of cells is one `python -m dwbench -m ...` process (finished
stages are reused, a failed cell does not stop the others), and the results come from the stage
cache the pipeline wrote, as `dwbench.sweep.status` finds them. Differences to Random are the
report's paired bootstrap (`dwbench.report.bootstrap.paired_interval`): same seed, same evaluation
problem.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from dwbench.bench.common import auroc
from dwbench.report.bootstrap import Interval, paired_interval
from dwbench.report.collect import read_samples
from dwbench.sweep.grid import load_sweep
from dwbench.sweep.progress import DONE, cell_progress, store_of, store_runs

logger = logging.getLogger(__name__)


def run_cells(overrides: Sequence[str]) -> int:
    """`python -m dwbench -m <overrides>` in a fresh process; its exit status."""
    command = [sys.executable, "-m", "dwbench", "-m", *overrides]
    logger.warning("running: python -m dwbench -m %s", " ".join(overrides))
    done = subprocess.run(command, check=False)
    if done.returncode:
        logger.warning("some cells failed (exit %d): %s", done.returncode, " ".join(overrides))
    return done.returncode


@dataclass
class Measured:
    """The finished cells of a sweep: one row per cell, and per-example scores (0/1 or ROUGE)."""

    # method, budget, seed, score, eval_s, n_eval, metric, n_pool; where selected: k,
    # selection_precision, selection_s, distinct_scores and (a pool with is_clean flags) auroc
    # of the scores against them; where fine-tuned: train_s
    cells: pd.DataFrame
    examples: pd.DataFrame  # method, budget, seed, example_id, score
    missing: list[str]  # overrides of cells that did not finish


def measured(overrides: Sequence[str]) -> Measured:
    """What the cells of `python -m dwbench -m <overrides>` left in the stage cache."""

    sweep = load_sweep(list(overrides), progress=False)
    runs = store_runs(str(sweep.cells[0].cfg.tracking.uri))
    rows, examples, missing = [], [], []
    for cell in sweep.cells:
        progress = cell_progress(cell, runs)
        if progress.state != DONE:
            missing.append(" ".join(cell.overrides))
            continue
        store, keys = store_of(cell.cfg), progress.keys
        marker = store.marker("evaluate", keys["evaluate"])
        described = {
            "method": str(cell.cfg.method.name),
            "budget": float(cell.cfg.budget),
            "seed": int(cell.cfg.seed),
        }
        row = {**described, "score": 100 * marker["score"], "eval_s": marker["eval_s"]}
        row["n_eval"], row["metric"] = marker["n_eval"], marker.get("metric")
        row["n_pool"] = store.marker("prepare", keys["prepare"]).get("n_pool")
        if "select" in keys and store.is_done("select", keys["select"]):
            select = store.marker("select", keys["select"])
            row["selection_precision"] = select.get("selection_precision")
            row["k"] = select.get("k")
        if "train" in keys and store.is_done("train", keys["train"]):
            row["train_s"] = store.marker("train", keys["train"])["train_s"]
        if "score" in keys and store.is_done("score", keys["score"]):
            row["selection_s"] = store.marker("score", keys["score"])["selection_s"]
            scores = pd.read_csv(
                store.stage_dir("score", keys["score"]) / "scores.csv", dtype={"id": str}
            )
            labels = store.stage_dir("prepare", keys["prepare"]) / "labels.json"
            flags = json.loads(labels.read_text()) if labels.is_file() else {}
            row["distinct_scores"] = int(scores["score"].nunique())
            if flags:
                row["auroc"] = auroc(scores["score"], [flags.get(i, False) for i in scores["id"]])
        rows.append(row)
        samples = read_samples(store.stage_dir("evaluate", keys["evaluate"]) / "samples.jsonl")
        examples.append(samples.assign(**described))
    frame = pd.DataFrame(rows)
    per_example = pd.concat(examples, ignore_index=True) if examples else pd.DataFrame()
    if not per_example.empty:
        per_example["score"] *= 100
    return Measured(frame, per_example, missing)


def versus_random(examples: pd.DataFrame, method: str, budget: float) -> Interval | None:
    """`method` minus Random at `budget`, percentage points, paired by seed and problem."""
    at_budget = examples[examples["budget"] == budget]
    mine = at_budget[at_budget["method"] == method]
    random = at_budget[at_budget["method"] == "random"]
    paired = mine.merge(random, on=["seed", "example_id"], suffixes=("", "_random"))
    if paired.empty:
        return None
    diffs = paired.assign(group=0, diff=paired["score"] - paired["score_random"])
    return paired_interval(diffs[["group", "seed", "example_id", "diff"]])


def interval_text(interval: Interval | None) -> str:
    if interval is None:
        return "n/a"
    return f"{interval.difference:+.1f} [{interval.low:+.1f}, {interval.high:+.1f}]"
