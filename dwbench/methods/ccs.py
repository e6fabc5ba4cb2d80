"""CCS, coverage-centric coreset selection (Zheng et al., ICLR 2023): cover the difficulty range.

Difficulty is EL2N (dwbench/methods/el2n.py, same scorer fine-tune). The beta*N hardest are
dropped as likely noise, the remaining range is cut into K equal-width strata, and the budget is
spread over strata from the smallest, each taking min(|B|, floor(budget left / strata left))
examples at random (dwbench/methods/stratified.py). The paper's likely source used beta = 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from dwbench.data.records import Example
from dwbench.methods.base import ScoringContext
from dwbench.methods.el2n import EL2NShards, mean_el2n
from dwbench.methods.stratified import ccs_select
from dwbench.validate import SHARE_BELOW_ONE, Rules, check_fields, whole_at_least

OPTIONS: Rules = [
    ("beta", SHARE_BELOW_ONE, "0"),  # the share of hardest examples dropped
    ("n_strata", whole_at_least(1), "50"),
    ("runtime.batch_size", whole_at_least(1), "8"),
]


class CCS(EL2NShards):
    needs_selector = True
    scorer_name = "ccs"

    @staticmethod
    def check_options(
        method_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], pool_size: int | None
    ) -> None:
        """Run before anything is written (dwbench.validate), and by the constructor."""
        check_fields(method_cfg, OPTIONS, "method.")

    def __init__(self, context: ScoringContext) -> None:
        cfg = context.method_cfg
        self.check_options(cfg, context.task_cfg, None)
        self.context = context
        self.beta = float(cfg["beta"])
        self.n_strata = int(cfg["n_strata"])
        self.seed = context.seed

    def scores_from_values(
        self, pool: list[Example], values: dict[str, np.ndarray]
    ) -> pd.DataFrame:
        el2n = mean_el2n(values)
        return pd.DataFrame({"id": [ex.id for ex in pool], "score": el2n, "el2n": el2n})

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        positions = ccs_select(
            scores["el2n"].to_numpy(dtype=float), k, self.beta, self.n_strata, self.seed
        )
        return scores["id"].iloc[positions].tolist()
