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

from typing import Any

import numpy as np
import pandas as pd

from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods import lm_signals
from dwbench.methods.base import ScoringContext
from dwbench.methods.sharding import PerExampleShards
from dwbench.methods.staff import proxy_is_selector, proxy_problems
from dwbench.methods.stratified import s2l_clusters, s2l_select


class S2L(PerExampleShards):
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

    def _proxy_fine_tune(self, pool: list[Example]) -> Any:
        return self.context.require_fine_tune("s2l")(pool, self.context.method_cfg["proxy_model"])

    def shared_work(self, pool: list[Example]) -> None:
        self._proxy_fine_tune(pool)

    def unit_size(self) -> int:
        return int(self.context.method_cfg["runtime"]["batch_size"])

    def example_values(
        self, pool: list[Example], units: range | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Each example's loss before training (`loss_0`) and after each epoch (`loss_<t>`)."""
        ctx, cfg = self.context, self.context.method_cfg
        run = self._proxy_fine_tune(pool)
        model, tokenizer = lm_signals.load_model(
            cfg["proxy_model"], ctx.cache_dir, ctx.device, run.snapshots[0].adapter_dir
        )
        records = lm_signals.encode(tokenizer, pool, int(cfg["max_seq_len"]))
        batch = self.unit_size()
        with model.disable_adapter():  # the untrained proxy: the trajectory's first point
            stats = lm_signals.token_stats(model, records, batch, "s2l: epoch 0", units)
        rows, values = stats.positions, {"loss_0": stats.mean_nll[stats.positions]}
        for snapshot in run.snapshots:
            lm_signals.swap_adapter(model, snapshot.adapter_dir)
            desc = f"s2l: epoch {snapshot.epoch}"
            stats = lm_signals.token_stats(model, records, batch, desc, units)
            values[f"loss_{len(values)}"] = stats.mean_nll[rows]
        return rows, values

    def scores_from_values(
        self, pool: list[Example], values: dict[str, np.ndarray]
    ) -> pd.DataFrame:
        losses = np.stack([values[f"loss_{t}"] for t in range(len(values))], axis=1)
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
