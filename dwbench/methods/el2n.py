"""EL2N (Paul et al., NeurIPS 2021): how far the model's predictive distribution is from the
reference tokens, from a model fine-tuned early on the task. Keep the highest (hardest).

Token-level and shifted: the mean over response tokens t of || softmax(logits_t) - onehot(y_t) ||_2,
with logits at position t - 1 predicting token t, averaged over the configured epoch snapshots of
the whole-pool scorer fine-tune. The code the paper's baselines likely came from used raw,
unshifted logits (each position compared with its own token); that is not reproduced here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dwbench.data.records import Example
from dwbench.methods import lm_signals
from dwbench.methods.base import ScoringContext, top_k
from dwbench.methods.scorer_model import pick_snapshots, whole_pool_fine_tune
from dwbench.methods.sharding import PerExampleShards


def el2n_values(
    context: ScoringContext, pool: list[Example], method: str, units: range | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """EL2N per pool example for each snapshot in method.checkpoint_epochs: (the positions
    computed, `el2n_<k>` per snapshot k aligned with them); `units` as in token_stats."""
    cfg = context.method_cfg
    run = whole_pool_fine_tune(context, pool, method)
    epochs = cfg["checkpoint_epochs"]
    snapshots = pick_snapshots(
        run, None if epochs is None else [int(e) for e in epochs], "method.checkpoint_epochs"
    )
    model, tokenizer = lm_signals.load_model(
        context.selector_cfg, context.cache_dir, context.device, snapshots[0].adapter_dir
    )
    records = lm_signals.encode(tokenizer, pool, int(cfg["max_seq_len"]))
    values, rows = {}, np.arange(len(pool))
    for index, snapshot in enumerate(snapshots):
        lm_signals.swap_adapter(model, snapshot.adapter_dir)
        stats = lm_signals.token_stats(
            model,
            records,
            int(cfg["runtime"]["batch_size"]),
            f"EL2N epoch {snapshot.epoch}",
            units,
        )
        rows = stats.positions
        values[f"el2n_{index}"] = stats.el2n[rows]
    return rows, values


def mean_el2n(values: dict[str, np.ndarray]) -> np.ndarray:
    """The EL2N score: the mean over the snapshots' values, in snapshot order."""
    return np.mean([values[f"el2n_{i}"] for i in range(len(values))], axis=0)


class EL2NShards(PerExampleShards):
    """Sharded EL2N scoring for methods built on it (EL2N, CCS): batches of its forward passes;
    the scorer fine-tune is the unsplittable part."""

    context: ScoringContext
    scorer_name: str

    def shared_work(self, pool: list[Example]) -> None:
        whole_pool_fine_tune(self.context, pool, self.scorer_name)

    def unit_size(self) -> int:
        return int(self.context.method_cfg["runtime"]["batch_size"])

    def example_values(
        self, pool: list[Example], units: range | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return el2n_values(self.context, pool, self.scorer_name, units)


class EL2N(EL2NShards):
    needs_selector = True
    scorer_name = "el2n"

    def __init__(self, context: ScoringContext) -> None:
        self.context = context
        self.stats: dict[str, float] = {}

    def scores_from_values(
        self, pool: list[Example], values: dict[str, np.ndarray]
    ) -> pd.DataFrame:
        el2n = mean_el2n(values)
        self.stats = {"median_el2n": float(np.median(el2n))}
        return pd.DataFrame({"id": [ex.id for ex in pool], "score": el2n, "el2n": el2n})

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k, self.context.seed)
