"""RDS+ (Ivison et al. 2025, "Large-Scale Data Selection for Instruction Tuning"): pick the pool
examples whose representation is closest to the target task's examples.

1. Embed every pool example and every target example with the untuned selector: its final
   hidden states over the whole conversation (prompt and response, in the chat template every
   method uses), mean-pooled with weights proportional to token position
   (lm_signals.weighted_mean_hidden).
2. Cosine similarity of each pool example to each target. Targets are LESS's
   (methods.base.target_examples): `n_targets` seeded examples of the task's query split where it
   has one, else of the pool; a pool example that is a target is never its own nearest pool
   example (its similarity to itself is left out).
3. Round-robin over the targets: target 1 takes its most similar example not yet taken, then
   target 2, ..., then target 1 again, until the pool is ordered.
Round-robin is greedy, so the first k of the one ordering are exactly what round-robin picks at
budget k: the score is the ordering (n - rank, higher = keep), and top-k selects the round-robin
set at every budget from one scoring run (no tie, so the run seed never breaks one).
One forward pass per example; no fine-tune.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from dwbench.data.records import Example
from dwbench.methods import lm_signals
from dwbench.methods.base import ScoringContext, check_target_count, target_examples, top_k
from dwbench.validate import Rules, check_fields, whole_at_least

OPTIONS: Rules = [
    ("n_targets", whole_at_least(1), "8"),
    ("max_seq_len", whole_at_least(1), "1024"),
    ("runtime.batch_size", whole_at_least(1), "8"),
]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n x d), (m x d) -> (n x m) cosine similarities."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def round_robin(similarity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pool positions in pick order, the target that picked each) over a (pool x targets)
    similarity: targets take turns, each its most similar example not yet taken (ties: pool
    order)."""
    n, m = similarity.shape
    ranked = [np.argsort(-similarity[:, t], kind="stable") for t in range(m)]
    cursor = [0] * m
    taken = np.zeros(n, dtype=bool)
    order, picker = [], []
    while len(order) < n:
        for t in range(m):
            while cursor[t] < n and taken[ranked[t][cursor[t]]]:
                cursor[t] += 1
            if cursor[t] == n:
                continue
            position = int(ranked[t][cursor[t]])
            taken[position] = True
            order.append(position)
            picker.append(t)
            if len(order) == n:
                break
    return np.array(order, dtype=np.int64), np.array(picker, dtype=np.int64)


class RDSPlus:
    needs_selector = True

    @staticmethod
    def check_options(
        method_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], pool_size: int | None
    ) -> None:
        """Run before anything is written (dwbench.validate), and by the constructor."""
        check_fields(method_cfg, OPTIONS, "method.")
        check_target_count(method_cfg, task_cfg, pool_size)

    def __init__(self, context: ScoringContext) -> None:
        self.check_options(context.method_cfg, context.task_cfg, None)
        self.context = context
        self.n_targets = int(context.method_cfg["n_targets"])
        self.stats: dict[str, float] = {}

    def embed(self, examples: list[Example], desc: str) -> np.ndarray:
        """The examples' position-weighted mean final hidden states under the selector."""
        ctx = self.context
        model, tokenizer = lm_signals.load_model(ctx.selector_cfg, ctx.cache_dir, ctx.device)
        records = lm_signals.encode(tokenizer, examples, int(ctx.method_cfg["max_seq_len"]))
        batch_size = int(ctx.method_cfg["runtime"]["batch_size"])
        return lm_signals.weighted_mean_hidden(model, records, batch_size, desc)

    def score(self, pool: list[Example]) -> pd.DataFrame:
        targets, target_positions = target_examples(
            pool, self.context.queries, self.n_targets, self.context.seed
        )
        pool_embeddings = self.embed(pool, "RDS+ pool")
        if target_positions:
            target_embeddings = pool_embeddings[target_positions]
        else:
            target_embeddings = self.embed(targets, "RDS+ targets")
        similarity = cosine(pool_embeddings, target_embeddings)
        for j, position in enumerate(target_positions):  # a target is not its own neighbour
            similarity[position, j] = -np.inf
        order, picker = round_robin(similarity)
        rank = np.empty(len(pool), dtype=np.int64)
        rank[order] = np.arange(len(pool))
        target_of = np.empty(len(pool), dtype=np.int64)
        target_of[order] = picker
        finite = np.where(np.isfinite(similarity), similarity, np.nan)
        self.stats = {
            "n_targets": float(len(targets)),
            "targets_from_pool": float(len(target_positions)),
        }
        return pd.DataFrame(
            {
                "id": [ex.id for ex in pool],
                "score": (len(pool) - rank).astype(float),
                "round_robin_rank": rank,
                "picked_by_target": target_of,
                "max_similarity": np.nanmax(finite, axis=1),
                "is_target": [i in target_positions for i in range(len(pool))],
            }
        )

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k, self.context.seed)
