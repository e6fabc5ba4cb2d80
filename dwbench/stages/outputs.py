"""What each stage hands the next: one record per stage output, in one place, so stages import
records rather than each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dwbench.data.records import Example


@dataclass
class Prepared:
    key: str
    dir: Path
    fingerprint: str
    pool: list[Example]
    queries: list[Example] | None
    eval_path: Path
    # the embedded task's or planted noise's ground truth; only reference methods see it
    clean_flags: dict[str, bool] | None


@dataclass
class Scored:
    key: str
    scores: pd.DataFrame
    selection_s: float  # wall time of scoring, as first measured (a cached result keeps it)
    peak_rss_mb: float


@dataclass
class Selected:
    key: str
    ids: list[str]
    select_s: float
    selection_precision: float | None


@dataclass
class Trained:
    key: str
    adapter_dir: Path
    marker: dict[str, Any]


@dataclass
class Evaluated:
    key: str
    marker: dict[str, Any]


@dataclass
class Summary:
    """The cell's result, logged on its evaluation run and its parent run."""

    score: float
    selection_s: float
    train_s: float
    eval_s: float
    full_train_s: float | None
    STR: float
    peak_memory_mb: float
    selection_precision: float | None
