"""Oracle (clean only): a uniform, seeded subset of the examples whose answers are clean.

A reference, not a competitor: it reads the `is_clean` flags (the embedded task's, or those of
noise planted with `task.noise.share` on any task), which real methods never see, so its score
bounds what a perfect noise filter could gain over random selection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from dwbench.data.loading import has_clean_flags
from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods.base import ScoringContext, top_k

NO_FLAGS = (
    "method=oracle_clean selects by the task's is_clean flags, and this task has none; plant "
    "noise with task.noise.share (e.g. task.noise.share=0.3), or use the embedded task: "
    "python -m dwbench task=embedded_gsm method=oracle_clean."
)


class OracleClean:
    """Clean examples score a uniform draw in [1, 2), corrupted ones one in [0, 1).

    So top-k is a uniform random k-subset of the clean examples, and corrupted ones are kept
    only once every clean example is.
    """

    needs_selector = False  # no model is loaded, so none needs to be available
    reads_labels = True  # a reference: its context carries the is_clean flags (methods.base)

    @staticmethod
    def check_options(
        method_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], pool_size: int | None
    ) -> None:
        """Run before anything is written (dwbench.validate): only the generator and planted
        noise label data."""
        if not has_clean_flags(task_cfg):
            raise ConfigError(NO_FLAGS)

    def __init__(self, context: ScoringContext) -> None:
        if context.clean_flags is None:
            raise ConfigError(NO_FLAGS)
        self.clean_flags = context.clean_flags
        self.seed = context.seed

    def score(self, pool: list[Example]) -> pd.DataFrame:
        draws = np.random.default_rng(self.seed).random(len(pool))
        clean = np.array([self.clean_flags[ex.id] for ex in pool], dtype=np.float64)
        return pd.DataFrame({"id": [ex.id for ex in pool], "score": draws + clean})

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k, self.seed)
