"""Episodes: which examples meet in which prompt, what each episode gives, and the resumable log.

Episodes are planned up front from the seed alone, so a resumed run plans the same ones, and
each finished episode is appended to `episodes.jsonl` (with its completions, for inspection)
as soon as all its rows are done, so a kill loses at most the episodes still running.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
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

    demos: Sequence[int]  # pool indices, in prompt order (position 0 first)
    score: float  # mean metric over the episode's queries
    attention: Sequence[float]  # a_i per demonstration (any positive scale)
    query_ids: Sequence[str] = ()  # the queries asked (query_baseline=mean needs them)
    query_scores: Sequence[float] = ()  # each query's metric, in query_ids' order
    effects: Sequence[float] | None = None  # leave-one-out: each demo's with - without effect


@dataclass
class ScoreTable:
    score: np.ndarray  # final score: mean of s * w_i over appearances (or a ridge coefficient)
    appearances: np.ndarray
    mean_episode_score: np.ndarray  # mean raw s: the "w/o Attn" score
    mean_weight: np.ndarray


# Post-processing of the episode log (no extra model calls); docs/algorithm.md, "Attribution".
ATTENTION_CORRECTIONS = ("none", "position")
QUERY_BASELINES = ("none", "mean", "zero_shot")
AGGREGATIONS = ("mean", "ridge")
# They change no episode, so they stay out of the plan's id and one episode log serves them all
# (query_baseline=zero_shot adds one row per query without demonstrations, in its own log).
ACCUMULATION_SWITCHES = ("attention_correction", "query_baseline", "aggregation")
# Everything that only re-reads a log: the accumulation switches and which logged value of a
# likelihood query is read (method.likelihood_score; both are written to every record).
READING_SWITCHES = (*ACCUMULATION_SWITCHES, "likelihood_score")
# Ridge penalty of aggregation=ridge. The design's entries are weights of mean 1, so an example
# seen in P episodes has about P on the diagonal of X'X: alpha 1 shrinks an example seen in 4
# passes by about a fifth, enough to keep the fit defined when episodes (passes * N / n_d) are
# fewer than examples, small enough that the ranking is the data's.
RIDGE_ALPHA = 1.0


def episode_weights(attention: Sequence[float]) -> np.ndarray:
    """w_i = n * a_i / sum_j a_j: the paper's normalised weight on a mean-1 scale."""
    a = np.asarray(attention, dtype=np.float64)
    total = a.sum()
    if not np.isfinite(total) or total <= 0:
        return np.ones_like(a)
    return a * (len(a) / total)


def position_corrected(weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each w_i divided by the mean w at its position over these episodes, renormalised.

    A small selector's attention mostly says where a demonstration sits (the last ones get
    several times the first ones' weight), not what it is; dividing by the position's mean,
    estimated from the run's own episodes (no labels), leaves what differs between examples at
    the same position. Weights are compared after the per-episode normalisation, so an episode
    whose raw attention is larger overall does not dominate a position's mean.
    """
    longest = max((len(w) for w in weights), default=0)
    totals, counts = np.zeros(longest), np.zeros(longest)
    for w in weights:
        totals[: len(w)] += w
        counts[: len(w)] += 1
    means = totals / np.maximum(counts, 1)
    return [episode_weights(w / means[: len(w)]) for w in weights]


def baselined_scores(
    contributions: Sequence[Contribution], zero_shot: Mapping[str, float] | None = None
) -> list[float]:
    """Each episode's mean over its queries of (query score - that query's baseline).

    The baseline is the query's mean score over every appearance of it in these episodes, or,
    given `zero_shot`, its score with no demonstration at all: either way an episode is
    credited for how much better its queries did than they do anyway, not for drawing easy
    queries. Against zero-shot, an episode of one demonstration is that demonstration's own
    paired effect (with it minus without it).
    """
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for c in contributions:
        if len(c.query_ids) != len(c.query_scores) or not c.query_ids:
            raise DataError(
                "method.query_baseline needs each episode's query_ids and query_scores; an "
                "episode log record lacks them (written by an older dwbench?): score it again."
            )
        for q, value in zip(c.query_ids, c.query_scores, strict=True):
            totals[q] = totals.get(q, 0.0) + float(value)
            counts[q] = counts.get(q, 0) + 1
    means = {q: totals[q] / counts[q] for q in totals} if zero_shot is None else zero_shot
    missing = sorted(set(totals) - set(means))
    if missing:
        raise DataError(
            f"query {missing[0]!r} has no zero-shot score ({len(missing)} queries lack one): "
            "score the run again so its zero-shot rows are written."
        )
    return [
        float(np.mean([v - means[q] for q, v in zip(c.query_ids, c.query_scores, strict=True)]))
        for c in contributions
    ]


def ridge_scores(
    n_examples: int,
    contributions: Sequence[Contribution],
    weights: Sequence[np.ndarray],
    scores: Sequence[float],
    alpha: float = RIDGE_ALPHA,
) -> np.ndarray:
    """Datamodels-style attribution: the coefficients of episode score ~ its demonstrations.

    Row e of the design holds w_i at each demonstration i of episode e (1 without attention
    weighting), so one fit credits each example with its own effect, the other demonstrations
    it shared episodes with held fixed, instead of averaging their effects into its score.
    An intercept absorbs the mean episode score; an example in no episode gets 0.
    """
    from scipy import sparse
    from sklearn.linear_model import Ridge

    rows = np.repeat(np.arange(len(contributions)), [len(c.demos) for c in contributions])
    cols = np.concatenate([np.asarray(c.demos, dtype=np.int64) for c in contributions])
    values = np.concatenate(list(weights))
    design = sparse.csr_matrix(
        (values, (rows, cols)), shape=(len(contributions), n_examples), dtype=np.float64
    )
    model = Ridge(alpha=alpha, fit_intercept=True, solver="sparse_cg", tol=1e-12, max_iter=None)
    model.fit(design, np.asarray(scores, dtype=np.float64))
    return np.asarray(model.coef_, dtype=np.float64)


def accumulate(
    n_examples: int,
    contributions: Iterable[Contribution],
    weighting: bool,
    attention_correction: str = "none",
    query_baseline: str = "none",
    aggregation: str = "mean",
    zero_shot: Mapping[str, float] | None = None,
) -> ScoreTable:
    """S[i] += s * w_i over episodes, in float64; the score is S[i] / appearances (0 if none).

    The switches only re-read the same episodes (no model calls): `attention_correction`
    divides out each position's mean weight, `query_baseline` credits an episode with its
    queries' scores minus their means (`mean`) or minus their scores without demonstrations
    (`zero_shot`, from `zero_shot`: query id -> score), `aggregation=ridge` replaces the mean
    by a regression. An episode with leave-one-out `effects` credits each demonstration with
    its own measured effect instead of s * w_i.
    At their defaults the arithmetic is exactly the faithful method's.
    """
    episodes = list(contributions)
    weights = [
        episode_weights(c.attention) if weighting else np.ones(len(c.demos)) for c in episodes
    ]
    if attention_correction == "position":
        weights = position_corrected(weights)
    if query_baseline == "none":
        scores = [c.score for c in episodes]
    elif query_baseline == "zero_shot":
        if zero_shot is None:
            raise ValueError("query_baseline=zero_shot needs each query's zero-shot score")
        scores = baselined_scores(episodes, zero_shot)
    else:
        scores = baselined_scores(episodes)
    total = np.zeros(n_examples, dtype=np.float64)
    raw = np.zeros(n_examples, dtype=np.float64)
    weight_sum = np.zeros(n_examples, dtype=np.float64)
    count = np.zeros(n_examples, dtype=np.int64)
    for c, w, s in zip(episodes, weights, scores, strict=True):
        demos = np.asarray(c.demos, dtype=np.int64)
        np.add.at(total, demos, s * w if c.effects is None else np.asarray(c.effects))
        np.add.at(raw, demos, c.score)
        np.add.at(weight_sum, demos, w)
        np.add.at(count, demos, 1)
    seen = np.maximum(count, 1)
    score = total / seen
    if aggregation == "ridge" and episodes:
        score = ridge_scores(n_examples, episodes, weights, scores)
    return ScoreTable(
        score=score,
        appearances=count,
        mean_episode_score=raw / seen,
        mean_weight=weight_sum / seen,
    )


def split_half_reliability(
    n_examples: int,
    contributions: Sequence[Contribution],
    passes: Sequence[int],
    weighting: bool,
    zero_shot: Mapping[str, float] | None = None,
    **switches: str,
) -> float:
    """Spearman between the scores of the even passes and of the odd passes (label-free).

    Each half is accumulated on its own, with the same switches (position means and query
    baselines estimated within the half), from the same episode log: no extra model calls.
    A score that measures the example, not the episodes it happened to land in, agrees with
    itself across halves; one at chance does not. Only examples seen in both halves count;
    NaN when fewer than 3 are, or when a half's scores are all equal.
    """
    from scipy.stats import spearmanr

    halves = [
        accumulate(
            n_examples,
            [c for c, p in zip(contributions, passes, strict=True) if p % 2 == parity],
            weighting,
            zero_shot=zero_shot,
            **switches,
        )
        for parity in (0, 1)
    ]
    both = (halves[0].appearances > 0) & (halves[1].appearances > 0)
    a, b = halves[0].score[both], halves[1].score[both]
    if both.sum() < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


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
        raise DataError(f"{path} is missing: score its shard again (python -m dwbench.sweep.plan).")
    header, records = _parse(path.read_text(encoding="utf-8").splitlines())
    if header.get("plan") != plan_id:
        raise DataError(
            f"{path} was written for another scoring plan (config, pool or seed differ); "
            "delete its shard folder and score it again."
        )
    return records
