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


def el2n_scores(context: ScoringContext, pool: list[Example], method: str) -> np.ndarray:
    """EL2N per pool example, averaged over the snapshots listed in method.checkpoint_epochs."""
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
    per_snapshot = []
    for snapshot in snapshots:
        lm_signals.swap_adapter(model, snapshot.adapter_dir)
        stats = lm_signals.token_stats(
            model, records, int(cfg["runtime"]["batch_size"]), desc=f"EL2N epoch {snapshot.epoch}"
        )
        per_snapshot.append(stats.el2n)
    return np.mean(per_snapshot, axis=0)


class EL2N:
    needs_selector = True

    def __init__(self, context: ScoringContext) -> None:
        self.context = context
        self.stats: dict[str, float] = {}

    def score(self, pool: list[Example]) -> pd.DataFrame:
        el2n = el2n_scores(self.context, pool, "el2n")
        self.stats = {"median_el2n": float(np.median(el2n))}
        return pd.DataFrame({"id": [ex.id for ex in pool], "score": el2n, "el2n": el2n})

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k, self.context.seed)
