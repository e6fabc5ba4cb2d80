"""The episode log read back into the pool's scores, and the run's diagnostics.

Scores are only ever computed from the log, never from a run's memory: a run that finished in
one go, a resumed one and merged shards read the same lines the same way, and the reading
switches (docs/algorithm.md, "Switches") re-read an existing log without scoring again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dwbench.data.records import Example
from dwbench.errors import DataError
from dwbench.methods.base import ScoringContext
from dwbench.methods.data_whisperer.episodes import (
    Contribution,
    Episode,
    ScoreTable,
    accumulate,
    accumulate_float16,
    read_episode_log,
    split_half_reliability,
)
from dwbench.methods.data_whisperer.runner import GREEDY
from dwbench.methods.data_whisperer.settings import Settings

ZERO_SHOT_FILE = "zero_shot.jsonl"  # query_baseline=zero_shot: each query without demonstrations


class LogScores:
    """DataWhisperer's reading of its episode log (a mixin: it sets `stats`, `params` and the
    shared score that the method's report warns about)."""

    context: ScoringContext
    settings: Settings
    stats: dict[str, float]
    params: dict[str, Any]
    _single_score: float

    def _scores(
        self,
        pool: list[Example],
        plan: list[Episode],
        done: Mapping[int, dict[str, Any]],
        zero_shot: Mapping[str, float] | None = None,
    ) -> pd.DataFrame:
        """Accumulate the episodes' records in plan order into the pool's scores."""
        s = self.settings
        records = [done[e.index] for e in plan]
        index = {ex.id: i for i, ex in enumerate(pool)}
        counted = [
            r
            for r in records
            if r["demo_ids"] and not (s.failed_episodes == "skip" and r["parse_failures"] > 0)
        ]
        contributions = []
        for r in counted:
            values = self._query_values(r)
            score = r["score"] if s.likelihood_score == "probability" else float(np.mean(values))
            contributions.append(
                Contribution(
                    [index[i] for i in r["demo_ids"]],
                    score,
                    r["attention"],
                    r.get("query_ids", ()),
                    values,
                    self._effects(r, values) if s.leave_one_out else None,
                )
            )
        table = accumulate(
            len(pool), contributions, s.attention_weighting, zero_shot=zero_shot, **s.accumulation()
        )
        if s.score_arithmetic == "float16":
            table.score, _ = accumulate_float16(
                len(pool),
                (
                    (
                        [index[i] for i in r["demo_ids"]],
                        r["query_scores"],
                        r["attention"] if s.attention_weighting else [1.0] * len(r["demo_ids"]),
                    )
                    for r in counted
                ),
            )
        self.stats = _summarise(records, table, len(pool), s.n_queries)
        self.stats.update(
            attention_layer=float(records[0]["attention_layer"]),
            episodes_per_call=float(s.episodes_per_call(self.context.device)),
        )
        if s.episode_order == "random" and s.passes >= 2:
            per_pass = len(plan) // s.passes  # the plan lists its passes one after another
            passes = {e.index: e.index // per_pass for e in plan}
            self.stats["split_half_reliability"] = split_half_reliability(
                len(pool),
                contributions,
                [passes[int(r["episode"])] for r in counted],
                s.attention_weighting,
                zero_shot=zero_shot,
                **s.accumulation(),
            )
        self.params = {
            "query_layout": s.query_layout,
            "query_scoring": s.query_scoring,
            **({"generation": GREEDY} if s.query_scoring == "generate" else {}),
        }
        self._single_score = float(table.score[0])
        return pd.DataFrame(
            {
                "id": [ex.id for ex in pool],
                "score": table.score,
                "appearances": table.appearances,
                "mean_episode_score": table.mean_episode_score,
                "mean_weight": table.mean_weight,
            }
        )

    def _query_values(self, record: Mapping[str, Any], prefix: str = "") -> list:
        """A record's per-query values as `likelihood_score` reads them (`prefix="blind_"`:
        per demonstration, its queries' values with that demonstration hidden)."""
        if self.settings.likelihood_score == "probability":
            return list(record.get(f"{prefix}query_scores", ()))
        if f"{prefix}query_log_probs" not in record:
            raise DataError(
                "method.likelihood_score=log_probability reads each query's log-probability, "
                "which this episode log lacks (written by an older dwbench): score it again."
            )
        return list(record[f"{prefix}query_log_probs"])

    def _effects(self, record: Mapping[str, Any], values: Sequence[float]) -> list[float]:
        """Per demonstration: mean over the episode's queries of value with it - without it."""
        blind = self._query_values(record, "blind_")
        if len(blind) != len(record["demo_ids"]):
            raise DataError(
                f"episode {record['episode']} has no leave-one-out rows for each of its "
                "demonstrations (a log written without method.leave_one_out?): score it again."
            )
        full = np.asarray(values, dtype=np.float64)
        return [float(np.mean(full - np.asarray(b, dtype=np.float64))) for b in blind]

    def _zero_shot_scores(self, work_dir: Path, plan_id: str) -> dict[str, float] | None:
        """query id -> zero-shot value as `likelihood_score` reads it; None unless asked for."""
        if self.settings.query_baseline != "zero_shot":
            return None
        records = read_episode_log(work_dir / ZERO_SHOT_FILE, plan_id)
        return {r["query_id"]: self._query_values(r)[0] for r in records.values()}


def _summarise(
    records: Sequence[dict[str, Any]], table: ScoreTable, n_pool: int, n_queries: int
) -> dict[str, float]:
    """Run diagnostics for the score stage's log; rates are over all episodes of the plan."""
    ran = [r for r in records if r["demo_ids"]]
    answers = max(len(ran) * n_queries, 1)
    correct = [c for r in ran for c in r["correct"] if c is not None]
    accuracy = {"query_accuracy": float(np.mean(correct))} if correct else {}
    return {
        **accuracy,
        "episodes": float(len(records)),
        "truncated_episodes": float(sum(r["dropped"] > 0 for r in records)),
        "skipped_episodes": float(len(records) - len(ran)),
        "dropped_demonstrations": float(sum(r["dropped"] for r in records)),
        "parse_failure_rate": sum(r["parse_failures"] for r in ran) / answers,
        "capped_episodes": float(sum(not r["complete"] for r in ran)),
        "generated_tokens_per_episode": float(np.mean([r["new_tokens"] for r in ran] or [0])),
        "seconds_per_episode": float(np.mean([r["seconds"] for r in ran] or [0])),
        "mean_episode_score": float(np.mean([r["score"] for r in ran] or [0])),
        "unscored_examples": float(np.sum(table.appearances == 0)),
        "distinct_scores": float(len(np.unique(table.score))),
        "pool_size": float(n_pool),
    }
