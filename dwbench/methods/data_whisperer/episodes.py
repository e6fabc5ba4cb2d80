"""Episodes: which examples meet in which prompt, what each episode gives, and the resumable log.

Episodes are planned up front from the seed alone, so a resumed run plans the same ones, and
each finished episode is appended to `episodes.jsonl` (with its completions, for inspection)
as soon as all its rows are done, so a kill loses at most the episodes still running.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dwbench.errors import DataError

logger = logging.getLogger(__name__)

EPISODE_ORDERS = ("sequential", "random", "released")
CHECKPOINT_FILE = "episodes.jsonl"


@dataclass(frozen=True)
class Episode:
    """One ICL prompt: pool indices of its demonstrations, indices of its queries."""

    index: int
    demos: tuple[int, ...]
    queries: tuple[int, ...]  # into the pool (pool_kfold) or into the query split (validation)


def plan_episodes(
    n_pool: int,
    n_query_split: int | None,
    n_demos: int,
    n_queries: int,
    episode_order: str,
    passes: int,
    seed: int,
) -> list[Episode]:
    """Every episode of the run, from the seed alone, so a resumed run plans the same ones.

    With `n_query_split` None the pool is split into two shuffled folds: each fold's examples are
    demonstrations while the other fold supplies the queries (the released code's 2-fold KFold).
    """
    if episode_order == "released":
        return released_plan(n_pool, n_query_split, n_demos, n_queries)
    rng = np.random.default_rng(seed)
    if n_query_split is None:
        order = rng.permutation(n_pool)
        half = (n_pool + 1) // 2
        groups = [(order[:half], order[half:]), (order[half:], order[:half])]
    else:
        groups = [(np.arange(n_pool), np.arange(n_query_split))]
    episodes: list[Episode] = []
    n_d, n_q = n_demos, n_queries
    for _ in range(passes):
        for demos, queries in groups:
            demo_order = rng.permutation(demos)
            query_order = rng.permutation(queries)
            pointer = 0
            for start in range(0, len(demo_order), n_d):
                if episode_order == "sequential":
                    picked = [query_order[(pointer + j) % len(query_order)] for j in range(n_q)]
                    pointer += n_q
                else:
                    picked = list(rng.choice(queries, size=n_q, replace=False))
                episodes.append(
                    Episode(
                        index=len(episodes),
                        demos=tuple(int(i) for i in demo_order[start : start + n_d]),
                        queries=tuple(int(i) for i in picked),
                    )
                )
    return episodes


def released_plan(
    n_pool: int, n_query_split: int | None, n_demos: int, n_queries: int
) -> list[Episode]:
    """The released code's episodes (independent of the run seed).

    Demonstrations are consecutive chunks of n_d examples; queries are consecutive chunks of
    n_q, the chunk pointer advancing by one per episode and wrapping around. With a query split
    the pool is chunked in file order once; without one, `KFold(n_splits=2, shuffle=True,
    random_state=42)` splits the pool and each fold's training part (ascending positions) is
    chunked against its held-out part, the pointer restarting at each fold. Last chunks may be
    shorter, as released.
    """
    from sklearn.model_selection import KFold

    if n_query_split is None:
        folds = list(KFold(n_splits=2, shuffle=True, random_state=42).split(np.arange(n_pool)))
    else:
        folds = [(np.arange(n_pool), np.arange(n_query_split))]
    episodes: list[Episode] = []
    for demos, queries in folds:
        query_chunks = [queries[i : i + n_queries] for i in range(0, len(queries), n_queries)]
        for pointer, start in enumerate(range(0, len(demos), n_demos)):
            episodes.append(
                Episode(
                    index=len(episodes),
                    demos=tuple(int(i) for i in demos[start : start + n_demos]),
                    queries=tuple(int(i) for i in query_chunks[pointer % len(query_chunks)]),
                )
            )
    return episodes


@dataclass(frozen=True)
class Contribution:
    """What one episode gives its demonstrations."""

    demos: Sequence[int]  # pool indices
    score: float  # mean metric over the episode's queries
    attention: Sequence[float]  # a_i per demonstration (any positive scale)


@dataclass
class ScoreTable:
    score: np.ndarray  # final score: mean of s * w_i over appearances
    appearances: np.ndarray
    mean_episode_score: np.ndarray  # mean raw s: the "w/o Attn" score
    mean_weight: np.ndarray


def episode_weights(attention: Sequence[float]) -> np.ndarray:
    """w_i = n * a_i / sum_j a_j: the paper's normalised weight on a mean-1 scale."""
    a = np.asarray(attention, dtype=np.float64)
    total = a.sum()
    if not np.isfinite(total) or total <= 0:
        return np.ones_like(a)
    return a * (len(a) / total)


def accumulate(
    n_examples: int, contributions: Iterable[Contribution], weighting: bool
) -> ScoreTable:
    """S[i] += s * w_i over episodes, in float64; the score is S[i] / appearances (0 if none)."""
    total = np.zeros(n_examples, dtype=np.float64)
    raw = np.zeros(n_examples, dtype=np.float64)
    weights = np.zeros(n_examples, dtype=np.float64)
    count = np.zeros(n_examples, dtype=np.int64)
    for c in contributions:
        demos = np.asarray(c.demos, dtype=np.int64)
        w = episode_weights(c.attention) if weighting else np.ones(len(demos))
        np.add.at(total, demos, c.score * w)
        np.add.at(raw, demos, c.score)
        np.add.at(weights, demos, w)
        np.add.at(count, demos, 1)
    seen = np.maximum(count, 1)
    return ScoreTable(
        score=total / seen,
        appearances=count,
        mean_episode_score=raw / seen,
        mean_weight=weights / seen,
    )


def accumulate_float16(
    n_examples: int,
    contributions: Iterable[tuple[Sequence[int], Sequence[float], Sequence[float]]],
) -> tuple[np.ndarray, np.ndarray]:
    """The released arithmetic: (final scores, output order), all in torch float16.

    Per episode (demonstrations, per-query metrics, raw a_i): w = a / sum(a) in float16; for each
    query, score[d] += metric * w[d] (float16 scatter_add_); count[d] += number of queries; the
    final score is score / count (0 where count is 0), ordered by `torch.argsort(descending)`,
    which is not stable: equal scores come out in torch's CPU order, as in the released output.
    """
    import torch

    score = torch.zeros(n_examples, dtype=torch.float16)
    count = torch.zeros(n_examples, dtype=torch.int32)
    for demos, metrics, attention in contributions:
        index = torch.tensor(list(demos), dtype=torch.int64)
        raw = torch.tensor(list(attention), dtype=torch.float16)
        weight = raw / raw.sum()
        for metric in metrics:
            value = torch.tensor([metric], dtype=torch.float16).expand(len(index))
            score.scatter_add_(0, index, value * weight)
        count[index] += len(metrics)
    final = torch.where(count > 0, score / count, torch.zeros_like(score))
    order = torch.argsort(final, descending=True)
    return final.double().numpy(), order.numpy()


class EpisodeLog:
    """Finished episodes as JSON lines after a header naming the plan; resumable after a kill.

    A header that does not match this run's plan (other config, pool or seed) means the file
    belongs to another run: it is started afresh. A torn last line from a kill is ignored.
    """

    def __init__(self, path: Path, plan_id: str) -> None:
        self.path = path
        self.plan_id = plan_id
        self.records: dict[int, dict[str, Any]] = {}
        if path.is_file():
            self._load()
        if not self.records:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"plan": plan_id}) + "\n", encoding="utf-8")

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        header, records = _parse(lines)
        if header.get("plan") != self.plan_id:
            logger.warning("%s belongs to another scoring run; starting afresh.", self.path)
            return
        self.records = records
        # Rewrite without torn lines, so later appends start on a fresh line.
        self.path.write_text(
            "\n".join([lines[0], *(json.dumps(r) for r in self.records.values())]) + "\n",
            encoding="utf-8",
        )

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
                self.records[int(record["episode"])] = record
            f.flush()
            os.fsync(f.fileno())


def _parse(lines: Sequence[str]) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """(header, records by episode) of a log's lines; a torn line is skipped."""
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    records = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[int(record["episode"])] = record
    return header if isinstance(header, dict) else {}, records


def read_episode_log(path: Path, plan_id: str) -> dict[int, dict[str, Any]]:
    """The finished episodes of a log written for this plan (a score shard's), read only."""
    if not path.is_file():
        raise DataError(f"{path} is missing: score its shard again (python -m dwbench.plan).")
    header, records = _parse(path.read_text(encoding="utf-8").splitlines())
    if header.get("plan") != plan_id:
        raise DataError(
            f"{path} was written for another scoring plan (config, pool or seed differ); "
            "delete its shard folder and score it again."
        )
    return records
