"""Budget-allocation rules of the stratified selection methods CCS, STAFF and S2L.

The scores these rules consume (EL2N difficulty, small- and target-model effort, clusters of loss
trajectories) need models and are computed elsewhere. Keeping the rules pure numpy lets tests pin
them to hand-worked examples. Whatever samples takes a seed and draws only from
`np.random.default_rng(seed)`, so a selection reproduces from its inputs. Selections are lists of
positions into the pool, in ascending order, of length exactly k.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# floor(share * N) is taken with this slack, so that 0.29 * 100 (28.999...96 in floating point)
# drops 29 examples, not 28.
_SHARE_SLACK = 1e-9


def _check_budget(k: int, n_eligible: int) -> int:
    k = operator.index(k)
    if k < 0:
        raise ValueError(f"Budget k must be >= 0, got {k}.")
    if k > n_eligible:
        raise ValueError(f"Budget k={k} exceeds the {n_eligible} eligible examples.")
    return k


def _as_scores(values: np.ndarray, name: str) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {scores.shape}.")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return scores


def _check_sizes(sizes: Sequence[int], name: str) -> list[int]:
    checked = [operator.index(s) for s in sizes]
    if any(s < 0 for s in checked):
        raise ValueError(f"{name} must be non-negative, got {checked}.")
    return checked


def _drop_hardest(scores: np.ndarray, share: float, name: str) -> np.ndarray:
    """Positions left after dropping the floor(share * N) highest scores, ascending.

    The sort on -score is stable, so among equal scores the earlier position counts as harder:
    the cut is deterministic even on ties.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {share}.")
    n_drop = min(scores.size, math.floor(share * scores.size + _SHARE_SLACK))
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[n_drop:])


def _sample_groups(
    group_of: np.ndarray, groups: Sequence[int], budgets: Sequence[int], seed: int
) -> list[int]:
    """Uniform draws without replacement of budgets[j] positions whose group is groups[j]."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for group, budget in zip(groups, budgets, strict=True):
        if budget > 0:
            members = np.flatnonzero(group_of == group)
            chosen.extend(rng.choice(members, size=budget, replace=False).tolist())
    return sorted(chosen)


def equal_width_strata(values: np.ndarray, n_strata: int) -> np.ndarray:
    """Stratum index per example: [min, max] cut into n_strata equal-width bins.

    The maximum goes into the last bin (bins are half-open except the last); if all values are
    equal there is no range to cut and every example goes into bin 0. Bin edges are exact up to
    floating-point rounding.
    """
    if operator.index(n_strata) < 1:
        raise ValueError(f"n_strata must be >= 1, got {n_strata}.")
    scores = _as_scores(values, "values")
    if scores.size == 0 or scores.min() == scores.max():
        return np.zeros(scores.size, dtype=np.int64)
    low, high = scores.min(), scores.max()
    strata = np.floor((scores - low) / (high - low) * n_strata).astype(np.int64)
    return np.minimum(strata, n_strata - 1)


def ccs_allocation(strata_sizes: Sequence[int], k: int) -> list[int]:
    """Per-stratum budgets of CCS (also S2L's per-cluster rule), in the order of strata_sizes.

    Non-empty strata are visited from the smallest (ties by index); each gets
    min(|B|, floor(m_left / strata_left)). Visiting small strata first lets what they cannot use
    roll over to the larger ones, and the last stratum (strata_left = 1) takes min(|B|, m_left),
    so the total is exactly k for any k <= sum(strata_sizes); see the comment in the loop.
    Empty strata get 0 and do not count in strata_left (Zheng's `stratified_sampling` counts
    them, but sorts them first, where they take 0: the budgets are the same).
    """
    sizes = _check_sizes(strata_sizes, "strata_sizes")
    m_left = _check_budget(k, sum(sizes))
    visit = sorted((i for i, s in enumerate(sizes) if s > 0), key=lambda i: (sizes[i], i))
    budgets = [0] * len(sizes)
    for n_visited, i in enumerate(visit):
        # Why nothing is left over: m_left never exceeds the capacity of the strata not yet
        # visited. A stratum that is not exhausted takes q = floor(m / r) < |B|; every later
        # stratum is at least as large (>= q + 1), and m < r(q + 1) gives m - q <= (r - 1)(q + 1),
        # so what is left still fits. The last one (r = 1) thus takes all of m_left.
        budgets[i] = min(sizes[i], m_left // (len(visit) - n_visited))
        m_left -= budgets[i]
    return budgets


def ccs_select(difficulty: np.ndarray, k: int, beta: float, n_strata: int, seed: int) -> list[int]:
    """Coverage-centric coreset selection (Zheng et al., ICLR 2023): k positions into the pool.

    Drops the floor(beta * N) hardest (highest difficulty, earlier position first on ties), cuts
    the remaining score range into n_strata equal-width strata, budgets them with
    `ccs_allocation` and samples each stratum uniformly without replacement. Raises ValueError
    unless 0 <= k <= N - floor(beta * N).
    """
    scores = _as_scores(difficulty, "difficulty")
    kept = _drop_hardest(scores, beta, "beta")
    k = _check_budget(k, kept.size)
    stratum_of = np.full(scores.size, -1, dtype=np.int64)  # -1: dropped as too hard
    stratum_of[kept] = equal_width_strata(scores[kept], n_strata)
    budgets = ccs_allocation(np.bincount(stratum_of[kept], minlength=n_strata).tolist(), k)
    return _sample_groups(stratum_of, range(n_strata), budgets, seed)


def staff_regions(
    small_effort: np.ndarray, drop_share: float = 0.1, n_regions: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """STAFF's regions: (eligible positions ascending, region index per pool position).

    The floor(drop_share * N) highest small-model efforts are dropped (region -1; earlier position
    first on ties); the rest are cut into n_regions equal-width regions over their own score range.
    """
    scores = _as_scores(small_effort, "small_effort")
    eligible = _drop_hardest(scores, drop_share, "drop_share")
    region_of = np.full(scores.size, -1, dtype=np.int64)
    region_of[eligible] = equal_width_strata(scores[eligible], n_regions)
    return eligible, region_of


def staff_verification_sample(
    region_of: np.ndarray, per_region: int = 10, *, seed: int
) -> dict[int, list[int]]:
    """Positions to score with the target model: min(per_region, |B_i|) per non-empty region.

    Only this sample needs the expensive target model, which is why STAFF is split in steps.
    """
    if operator.index(per_region) < 1:
        raise ValueError(f"per_region must be >= 1, got {per_region}.")
    labels = np.asarray(region_of)
    rng = np.random.default_rng(seed)
    samples: dict[int, list[int]] = {}
    for region in np.unique(labels[labels >= 0]).tolist():
        members = np.flatnonzero(labels == region)
        picked = rng.choice(members, size=min(per_region, members.size), replace=False)
        samples[region] = sorted(picked.tolist())
    return samples


def staff_verification_ratios(
    samples: Mapping[int, Sequence[int]],
    small_effort: np.ndarray,
    target_effort: Mapping[int, float],
    n_regions: int,
) -> np.ndarray:
    """V_i = sum target effort / sum small effort over region i's verification sample.

    target_effort maps each sampled pool position to its target-model effort. Regions without a
    sample (empty ones) get V = 0; they are never visited by `staff_allocate`. A zero small-effort
    sum leaves the ratio undefined: such a region gets the neutral V = 1 (no evidence that the
    small model misjudges it) and a warning is logged.
    """
    scores = _as_scores(small_effort, "small_effort")
    ratios = np.zeros(n_regions, dtype=np.float64)
    for region, positions in samples.items():
        missing = [p for p in positions if p not in target_effort]
        if missing:
            raise ValueError(f"No target effort for positions {missing[:5]} of region {region}.")
        small = scores[list(positions)]
        target = np.array([target_effort[p] for p in positions], dtype=np.float64)
        if np.any(small < 0) or np.any(target < 0) or not np.all(np.isfinite(target)):
            raise ValueError(f"Efforts of region {region} must be finite and non-negative.")
        if small.sum() == 0:
            logger.warning("STAFF region %d: small-model effort sums to 0; using V = 1.", region)
            ratios[region] = 1.0
        else:
            ratios[region] = target.sum() / small.sum()
    return ratios


def staff_allocate(region_sizes: Sequence[int], ratios: Sequence[float], k: int) -> list[int]:
    """Per-region budgets of STAFF, in the order of region_sizes; they sum to exactly k.

    Non-empty regions are visited from the smallest (ties by index); each gets
    min(|B_i|, floor(m_left * V_i / sum of V over the regions not yet visited)), and 0 where that
    sum is 0 (only V = 0 regions are left). If every non-empty region has V = 0, there is nothing
    to weigh by and all V count as 1, which gives CCS's equal shares. The last region with V > 0
    thus takes min(|B_i|, m_left). Budget still left because regions were full (or lost to
    flooring) tops up the regions with spare capacity, largest V first (ties by index), so V = 0
    regions are filled last. The total is exactly k for any k <= sum(region_sizes), since the
    spare capacity is at least the budget left.
    """
    sizes = _check_sizes(region_sizes, "region_sizes")
    weights = [float(v) for v in ratios]
    if len(weights) != len(sizes):
        raise ValueError(f"Got {len(weights)} ratios for {len(sizes)} regions.")
    if any(not math.isfinite(v) or v < 0 for v in weights):
        raise ValueError(f"Ratios V_i must be finite and non-negative, got {weights}.")
    m_left = _check_budget(k, sum(sizes))
    visit = sorted((i for i, s in enumerate(sizes) if s > 0), key=lambda i: (sizes[i], i))
    if all(weights[i] == 0 for i in visit):
        weights = [1.0] * len(sizes)
    budgets = [0] * len(sizes)
    for n_visited, i in enumerate(visit):
        remaining = sum(weights[j] for j in visit[n_visited:])
        share = math.floor(m_left * (weights[i] / remaining)) if remaining > 0 else 0
        budgets[i] = min(sizes[i], share)
        m_left -= budgets[i]
    for i in sorted(visit, key=lambda i: (-weights[i], i)):
        extra = min(sizes[i] - budgets[i], m_left)
        budgets[i] += extra
        m_left -= extra
    return budgets


def staff_select(
    small_effort: np.ndarray, region_of: np.ndarray, budgets: Sequence[int]
) -> list[int]:
    """The budgets[i] highest small-effort positions of each region i (earlier first on ties)."""
    scores = _as_scores(small_effort, "small_effort")
    labels = np.asarray(region_of)
    if labels.shape != scores.shape:
        raise ValueError(f"region_of has shape {labels.shape}, small_effort {scores.shape}.")
    chosen: list[int] = []
    for region, budget in enumerate(_check_sizes(budgets, "budgets")):
        members = np.flatnonzero(labels == region)
        if budget > members.size:
            raise ValueError(f"Budget {budget} for region {region} exceeds its {members.size}.")
        order = np.argsort(-scores[members], kind="stable")
        chosen.extend(members[order[:budget]].tolist())
    return sorted(chosen)


def s2l_select(cluster_of: np.ndarray, k: int, seed: int) -> list[int]:
    """S2L (Yang et al., NeurIPS 2024): an equal share of k per cluster, smallest cluster first.

    Uses the `ccs_allocation` rule over clusters (ties in size by label), then samples each
    cluster uniformly without replacement. Every position is eligible; labels may be any integers.
    """
    labels = np.asarray(cluster_of)
    if labels.ndim != 1:
        raise ValueError(f"cluster_of must be one-dimensional, got shape {labels.shape}.")
    k = _check_budget(k, labels.size)
    clusters, sizes = np.unique(labels, return_counts=True)
    budgets = ccs_allocation(sizes.tolist(), k)
    return _sample_groups(labels, clusters.tolist(), budgets, seed)


def s2l_clusters(trajectories: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """K-means cluster per example of its loss trajectory (one row of T losses per example).

    n_clusters is capped at the number of distinct trajectories (with a warning), since K-means
    cannot find more clusters than distinct points.
    """
    # Imported here so that importing the methods package stays light.
    from sklearn.cluster import KMeans

    points = np.asarray(trajectories, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"trajectories must be a non-empty 2-D array, got shape {points.shape}.")
    if not np.all(np.isfinite(points)):
        raise ValueError("trajectories contain NaN or infinite values.")
    if operator.index(n_clusters) < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}.")
    n_distinct = np.unique(points, axis=0).shape[0]
    if n_clusters > n_distinct:
        logger.warning(
            "S2L: %d clusters requested, but %d examples have only %d distinct trajectories; "
            "using %d.",
            n_clusters,
            points.shape[0],
            n_distinct,
            n_distinct,
        )
        n_clusters = n_distinct
    kmeans = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
    return kmeans.fit_predict(points).astype(np.int64)
