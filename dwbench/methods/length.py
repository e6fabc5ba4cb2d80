"""Response length: keep the longest (or shortest) responses, counted in the selector's tokens.

"Longest" is the nearly free baseline that "Chasing Random" (Xia et al., arXiv 2410.15225) and
the million-scale study of data selection (arXiv 2410.09335) find hard to beat: a method that
does not beat it adds nothing a length count does not. Tokens, not words or characters, so the
count is what the model trains on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods.base import ScoringContext, top_k

ORDERS = ("longest", "shortest")


class ResponseLength:
    """Score = the response's token count (longest) or its negative (shortest); ties broken by
    the run seed (top_k)."""

    needs_selector = True  # its tokenizer counts the tokens

    @staticmethod
    def check_options(
        method_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], pool_size: int | None
    ) -> None:
        """Run before anything is written (dwbench.validate), and by the constructor."""
        order = method_cfg.get("order")
        if order not in ORDERS:
            raise ConfigError(
                f"method.order={order!r} is not one of {', '.join(ORDERS)}; pick "
                "method=length_longest or method=length_shortest."
            )

    def __init__(self, context: ScoringContext) -> None:
        self.check_options(context.method_cfg, context.task_cfg, None)
        self.context = context
        self.order = str(context.method_cfg["order"])
        self.seed = context.seed
        self.stats: dict[str, float] = {}

    def score(self, pool: list[Example]) -> pd.DataFrame:
        from dwbench.models import load_tokenizer

        tokenizer = load_tokenizer(self.context.selector_cfg, self.context.cache_dir)
        lengths = [
            len(tokenizer(ex.response, add_special_tokens=False)["input_ids"]) for ex in pool
        ]
        sign = 1.0 if self.order == "longest" else -1.0
        self.stats = {"median_response_tokens": float(pd.Series(lengths).median())}
        return pd.DataFrame(
            {
                "id": [ex.id for ex in pool],
                "score": [sign * n for n in lengths],
                "response_tokens": lengths,
            }
        )

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k, self.seed)
