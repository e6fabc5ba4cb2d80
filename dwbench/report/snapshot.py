"""The frozen CSV snapshots under `results/`: what tables and figures are rebuilt from.

`<name>.csv` holds one row per finished cell (what the cell is, its logged metrics, where they
came from); `<name>_examples.csv` one row per cell and evaluation example (the bootstrap's input).
Both are plain CSV so that `results/*.csv` is committed with the repository (.gitignore), and
the report always renders from the files it reads back, so a rebuild with `--from-snapshot`
gives the same tables byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dwbench.errors import DataError
from dwbench.report.cells import DESCRIPTORS

METRICS = [  # logged on each evaluation run by the log stage
    "score",
    "STR",
    "selection_s",
    "train_s",
    "eval_s",
    "full_train_s",
    "peak_memory_mb",
    "selection_precision",
]
TAGS = ["full_train_s_source", "git_sha"]  # evaluation run tags kept for provenance
PROVENANCE = ["n_examples", "full_train_s_source", "evaluate_key", "run_id", "git_sha", "finished"]
COLUMNS = [*DESCRIPTORS, *METRICS, *PROVENANCE]
MEASURED = [*METRICS, *PROVENANCE]  # what a snapshot adds to the grid's own description
EXAMPLE_COLUMNS = ["cell", "example_id", "score"]
ORDER = ["role", "task", "target", "selector", "method", "ablation", "budget", "seed"]
INTEGERS = ["n_demos", "n_queries", "attention_layer", "seed", "n_examples"]  # blank = n/a
TEXT = {"cell": str, "evaluate_key": str, "run_id": str, "example_id": str, "git_sha": str}


@dataclass
class Snapshot:
    runs: pd.DataFrame
    examples: pd.DataFrame


def paths(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / f"{name}.csv", folder / f"{name}_examples.csv"


def write(folder: Path, name: str, runs: pd.DataFrame, examples: pd.DataFrame) -> list[Path]:
    """Both CSVs, in a stable order so that a re-freeze of unchanged runs changes no line."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = examples.groupby("cell").size()
    runs = runs.assign(n_examples=runs["cell"].map(counts).fillna(0))
    runs = runs.reindex(columns=COLUMNS).astype({c: "Int64" for c in INTEGERS})
    runs = runs.sort_values(ORDER, kind="stable")
    examples = examples[EXAMPLE_COLUMNS].sort_values(["cell", "example_id"], kind="stable")
    runs_path, examples_path = paths(folder, name)
    runs.to_csv(runs_path, index=False)
    examples.to_csv(examples_path, index=False)
    return [runs_path, examples_path]


def read(folder: Path, name: str) -> Snapshot:
    """Both CSVs, checked for the columns the report needs."""
    runs_path, examples_path = paths(folder, name)
    frames = []
    for path, columns in ((runs_path, COLUMNS), (examples_path, EXAMPLE_COLUMNS)):
        if not path.is_file():
            raise DataError(
                f"{path} does not exist: freeze it from MLflow first with "
                f"`python -m dwbench.report {name}` (without --from-snapshot), or pass "
                "--snapshot-dir where the snapshots are."
            )
        frame = pd.read_csv(path, dtype=TEXT, keep_default_na=False, na_values=[""])
        absent = [c for c in columns if c not in frame.columns]
        if absent:
            raise DataError(
                f"{path} lacks the column(s) {absent}: it was not written by this version of "
                "the report; freeze it again from MLflow (python -m dwbench.report without "
                "--from-snapshot)."
            )
        frames.append(frame)
    return Snapshot(*frames)


def carry_over(
    folder: Path, name: str, fresh: Snapshot, keys: set[str]
) -> tuple[Snapshot, set[str]]:
    """A fresh freeze plus the earlier snapshot's rows for `keys` (cells MLflow lacks here).

    An MLflow store belongs to one machine or cluster while the snapshot is what the repository
    keeps, so a re-freeze elsewhere must not drop cells measured before. A cell key hashes the
    cell's composed config, so an equal key is the same cell; returns the keys carried over.
    """
    if not paths(folder, name)[0].is_file():
        return fresh, set()
    earlier = read(folder, name)
    kept = earlier.runs[earlier.runs["cell"].isin(keys)]
    carried = set(kept["cell"])
    if not carried:
        return fresh, carried
    runs = pd.concat([fresh.runs, kept], ignore_index=True)
    examples = earlier.examples[earlier.examples["cell"].isin(carried)]
    return Snapshot(runs, pd.concat([fresh.examples, examples], ignore_index=True)), carried
