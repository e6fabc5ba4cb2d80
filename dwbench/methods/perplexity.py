"""Perplexity selection (Marion et al. 2023; Ankner et al. 2024): response-only perplexity under
the untuned selector model; keep the lowest, the middle or the highest.

The paper observes that Data Whisperer's picks are easy, low-perplexity examples, so the `low`
variant is the sanity baseline that says whether DW adds anything beyond "pick what the model
already finds likely".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods import lm_signals
from dwbench.methods.base import ScoringContext, top_k
from dwbench.methods.sharding import PerExampleShards
from dwbench.validate import check_fields, whole_at_least

VARIANTS = ("low", "middle", "high")


def variant_score(perplexity: np.ndarray, variant: str) -> np.ndarray:
    """Higher = keep: -ppl (low), ppl (high), or closeness to the median rank (middle)."""
    if variant == "low":
        return -perplexity
    if variant == "high":
        return perplexity.copy()
    ranks = pd.Series(perplexity).rank(method="first").to_numpy() - 1
    return -np.abs(ranks - (len(perplexity) - 1) / 2)


class Perplexity(PerExampleShards):
    needs_selector = True

    @staticmethod
    def check_options(
        method_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], pool_size: int | None
    ) -> None:
        """Run before anything is written (dwbench.validate), and by the constructor."""
        variant = method_cfg.get("variant")
        if variant not in VARIANTS:
            raise ConfigError(
                f"method.variant={variant!r} is not one of {', '.join(VARIANTS)}; "
                "pick method=perplexity_low, perplexity_middle or perplexity_high."
            )
        check_fields(method_cfg, [("runtime.batch_size", whole_at_least(1), "8")], "method.")

    def __init__(self, context: ScoringContext) -> None:
        self.check_options(context.method_cfg, context.task_cfg, None)
        self.context = context
        self.variant = str(context.method_cfg["variant"])
        self.stats: dict[str, float] = {}

    def unit_size(self) -> int:
        return int(self.context.method_cfg["runtime"]["batch_size"])

    def example_values(
        self, pool: list[Example], units: range | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ctx = self.context
        model, tokenizer = lm_signals.load_model(ctx.selector_cfg, ctx.cache_dir, ctx.device)
        records = lm_signals.encode(tokenizer, pool, int(ctx.method_cfg["max_seq_len"]))
        stats = lm_signals.token_stats(
            model, records, self.unit_size(), f"perplexity ({self.variant})", units
        )
        rows = stats.positions
        return rows, {"mean_nll": stats.mean_nll[rows], "n_tokens": stats.n_tokens[rows]}

    def scores_from_values(
        self, pool: list[Example], values: dict[str, np.ndarray]
    ) -> pd.DataFrame:
        perplexity = np.exp(values["mean_nll"])
        self.stats = {"median_perplexity": float(np.median(perplexity))}
        return pd.DataFrame(
            {
                "id": [ex.id for ex in pool],
                "score": variant_score(perplexity, self.variant),
                "perplexity": perplexity,
                "n_response_tokens": values["n_tokens"].astype(int),
            }
        )

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k, self.context.seed)
