"""S2L, small-to-large (Yang et al., NeurIPS 2024): examples whose loss moves alike during a
small proxy's training are alike to learn; cover every such group equally.

The proxy (`method.proxy_model`, shared with STAFF through the train stage's cache) is LoRA-
fine-tuned on the pool with a snapshot after each epoch. Each example's trajectory is its mean
response NLL before training and at every snapshot; trajectories are clustered with k-means
(`n_clusters`, capped at the distinct trajectories) and each cluster, smallest first, gets an
equal share of the budget at random (dwbench/methods/stratified.py). S2L has no per-example score:
the `score` column holds the negated mean loss for inspection only; the rule never reads it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods import lm_signals
from dwbench.methods.base import ScoringContext
from dwbench.methods.staff import proxy_is_selector, proxy_problems
from dwbench.methods.stratified import s2l_clusters, s2l_select


class S2L:
    needs_selector = False  # only the proxy model is loaded
    extra_models = ("proxy_model",)
    config_problems = staticmethod(proxy_problems)

    def __init__(self, context: ScoringContext) -> None:
        cfg = context.method_cfg
        self.context = context
        self.n_clusters = int(cfg["n_clusters"])
        self.seed = context.seed
        problems = proxy_problems(cfg)
        if problems:
            raise ConfigError(problems[0])
        self.stats: dict[str, float] = {}

    def trajectories(self, pool: list[Example]) -> np.ndarray:
        ctx, cfg = self.context, self.context.method_cfg
        run = ctx.require_fine_tune("s2l")(pool, cfg["proxy_model"])
        model, tokenizer = lm_signals.load_model(
            cfg["proxy_model"], ctx.cache_dir, ctx.device, run.snapshots[0].adapter_dir
        )
        records = lm_signals.encode(tokenizer, pool, int(cfg["max_seq_len"]))
        batch = int(cfg["runtime"]["batch_size"])
        columns = []
        with model.disable_adapter():  # the untrained proxy: the trajectory's first point
            columns.append(lm_signals.token_stats(model, records, batch, "s2l: epoch 0").mean_nll)
        for snapshot in run.snapshots:
            lm_signals.swap_adapter(model, snapshot.adapter_dir)
            desc = f"s2l: epoch {snapshot.epoch}"
            columns.append(lm_signals.token_stats(model, records, batch, desc).mean_nll)
        return np.stack(columns, axis=1)

    def score(self, pool: list[Example]) -> pd.DataFrame:
        losses = self.trajectories(pool)
        clusters = s2l_clusters(losses, self.n_clusters, self.seed)
        self.stats = {
            "trajectory_points": float(losses.shape[1]),
            "clusters": float(len(np.unique(clusters))),
            "proxy_is_selector": float(proxy_is_selector(self.context, "s2l")),
        }
        frame = pd.DataFrame(
            {"id": [ex.id for ex in pool], "score": -losses.mean(axis=1), "cluster": clusters}
        )
        for t in range(losses.shape[1]):
            frame[f"loss_{t}"] = losses[:, t]
        return frame

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        positions = s2l_select(scores["cluster"].to_numpy(dtype=np.int64), k, self.seed)
        return scores["id"].iloc[positions].tolist()
