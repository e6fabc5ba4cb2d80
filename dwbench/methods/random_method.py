"""Random selection: a uniform subset without replacement, seeded by the run seed."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dwbench.data.records import Example
from dwbench.methods.base import ScoringContext, top_k


class RandomSelection:
    """Scores are i.i.d. uniform draws, so top-k is a uniform random k-subset."""

    needs_selector = False  # no model is loaded, so none needs to be available

    def __init__(self, context: ScoringContext) -> None:
        self.seed = context.seed

    def score(self, pool: list[Example]) -> pd.DataFrame:
        rng = np.random.default_rng(self.seed)
        return pd.DataFrame({"id": [ex.id for ex in pool], "score": rng.random(len(pool))})

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k, self.seed)
