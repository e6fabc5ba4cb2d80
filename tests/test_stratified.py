"""Budget rules of CCS, STAFF and S2L: exact totals, hand-worked allocations, cut-offs, seeding."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from dwbench.methods.stratified import (
    ccs_allocation,
    ccs_select,
    equal_width_strata,
    s2l_clusters,
    s2l_select,
    staff_allocate,
    staff_regions,
    staff_select,
    staff_verification_ratios,
    staff_verification_sample,
)


def _hardest(scores: np.ndarray, share: float) -> set[int]:
    """The floor(share * N) highest scores, earlier position first on ties."""
    n_drop = math.floor(share * len(scores) + 1e-9)
    return set(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n_drop])


def _random_scores(rng: np.random.Generator, n: int) -> np.ndarray:
    """Continuous scores, heavy ties or all equal, so edge cases come up in the loops."""
    kind = rng.integers(3)
    if kind == 0:
        return rng.random(n)
    if kind == 1:
        return rng.integers(0, 4, size=n).astype(float)
    return np.full(n, 0.7)


# --- strata -----------------------------------------------------------------------------------


def test_equal_width_strata_puts_the_max_in_the_last_bin() -> None:
    strata = equal_width_strata(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), 2)
    assert strata.tolist() == [0, 0, 1, 1, 1]


def test_equal_width_strata_all_equal_is_one_bin() -> None:
    assert equal_width_strata(np.full(5, 3.0), 4).tolist() == [0] * 5
    with pytest.raises(ValueError, match="n_strata"):
        equal_width_strata(np.arange(3.0), 0)


# --- CCS --------------------------------------------------------------------------------------


def test_ccs_allocation_hand_worked() -> None:
    # m=12: floor(12/4)=3 -> 1 (full); floor(11/3)=3 -> 2 (full); floor(9/2)=4 -> 4; last -> 5.
    assert ccs_allocation([1, 2, 10, 30], 12) == [1, 2, 4, 5]
    # Same strata in another order, with an empty one: budgets follow the input order.
    assert ccs_allocation([30, 0, 1, 10, 2], 12) == [5, 0, 1, 4, 2]
    # Equal sizes are visited by index: floor(7/3)=2, floor(5/2)=2, last takes 3.
    assert ccs_allocation([5, 5, 5], 7) == [2, 2, 3]


def test_ccs_allocation_total_is_exactly_k() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(0, 15, size=rng.integers(1, 8)).tolist()
        k = int(rng.integers(0, sum(sizes) + 1))
        budgets = ccs_allocation(sizes, k)
        assert sum(budgets) == k
        assert all(0 <= b <= s for b, s in zip(budgets, sizes, strict=True))


def test_ccs_select_hand_worked_strata_and_cut_off() -> None:
    # Over [0, 4] with 4 strata of width 1: sizes 1, 2, 10, 30 (4.0 is in the last stratum).
    strata_values = [
        np.array([0.0]),
        np.array([1.2, 1.5]),
        2.0 + 0.05 * np.arange(10),
        3.0 + np.arange(30) / 29,
    ]
    values = np.concatenate([*strata_values, np.full(7, 100.0)])  # 7 hardest, dropped
    perm = np.random.default_rng(1).permutation(values.size)
    difficulty = values[perm]
    stratum_of = np.concatenate([np.full(len(v), s) for s, v in enumerate(strata_values)])
    stratum_of = np.concatenate([stratum_of, np.full(7, -1)])[perm]

    picked = ccs_select(difficulty, k=12, beta=0.14, n_strata=4, seed=0)  # floor(0.14*50) = 7

    assert len(picked) == 12
    assert np.bincount(stratum_of[picked] + 1, minlength=5).tolist() == [0, 1, 2, 4, 5]


def test_ccs_select_budget_cut_off_and_strata_for_random_inputs() -> None:
    rng = np.random.default_rng(2)
    for _ in range(300):
        n = int(rng.integers(0, 60))
        difficulty = _random_scores(rng, n)
        beta = float(rng.choice([0.0, 0.1, 0.25, 0.5, rng.random()]))
        n_strata = int(rng.integers(1, 10))
        dropped = _hardest(difficulty, beta)
        n_eligible = n - len(dropped)
        k = int(rng.choice([0, n_eligible, rng.integers(0, n_eligible + 1)]))

        picked = ccs_select(difficulty, k, beta, n_strata, seed=int(rng.integers(1000)))

        assert len(picked) == k == len(set(picked))
        assert picked == sorted(picked)
        assert not dropped & set(picked)
        kept = np.array(sorted(set(range(n)) - dropped), dtype=int)
        strata = equal_width_strata(difficulty[kept], n_strata)
        expected = ccs_allocation(np.bincount(strata, minlength=n_strata).tolist(), k)
        position_stratum = dict(zip(kept.tolist(), strata.tolist(), strict=True))
        counts = np.bincount([position_stratum[p] for p in picked], minlength=n_strata)
        assert counts.tolist() == expected
        if k == n_eligible:
            assert picked == kept.tolist()


def test_ccs_select_ties_at_the_cut_off_drop_earlier_positions() -> None:
    assert ccs_select(np.full(10, 1.0), 5, beta=0.5, n_strata=3, seed=0) == [5, 6, 7, 8, 9]


def test_ccs_select_rejects_impossible_budgets() -> None:
    difficulty = np.arange(10.0)
    with pytest.raises(ValueError, match="exceeds the 9 eligible"):
        ccs_select(difficulty, 10, beta=0.1, n_strata=2, seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        ccs_select(difficulty, -1, beta=0.1, n_strata=2, seed=0)
    assert ccs_select(difficulty, 0, beta=1.0, n_strata=2, seed=0) == []


def test_ccs_select_is_seeded() -> None:
    difficulty = np.random.default_rng(3).random(200)
    first = ccs_select(difficulty, 30, beta=0.1, n_strata=5, seed=0)
    assert ccs_select(difficulty, 30, beta=0.1, n_strata=5, seed=0) == first
    assert ccs_select(difficulty, 30, beta=0.1, n_strata=5, seed=1) != first


# --- STAFF ------------------------------------------------------------------------------------


def test_staff_regions_exclude_the_hardest_tenth() -> None:
    values = np.random.default_rng(4).permutation(20).astype(float)
    eligible, region_of = staff_regions(values, drop_share=0.1, n_regions=3)
    # 18 and 19 are dropped; the rest span [0, 17] in 3 regions of width 17/3.
    expected = np.where(values >= 18, -1, values // 6).astype(int)
    assert region_of.tolist() == expected.tolist()
    assert eligible.tolist() == np.flatnonzero(values < 18).tolist()


def test_staff_verification_sample_takes_up_to_per_region() -> None:
    region_of = np.array([0, 0, 2, -1, 2, 2, 2, 2, 0, 2, -1, 2])
    samples = staff_verification_sample(region_of, per_region=3, seed=0)
    assert sorted(samples) == [0, 2]
    assert samples[0] == [0, 1, 8]  # only 3 members: all of them
    assert len(samples[2]) == 3 and all(region_of[p] == 2 for p in samples[2])
    assert staff_verification_sample(region_of, per_region=3, seed=0) == samples


def test_staff_verification_ratios_hand_worked(caplog: pytest.LogCaptureFixture) -> None:
    small = np.array([1.0, 3.0, 2.0, 0.0, 0.0])
    target = {0: 2.0, 1: 6.0, 2: 1.0, 3: 5.0, 4: 0.0}
    samples = {0: [0, 1], 1: [2], 2: [3, 4]}
    with caplog.at_level(logging.WARNING):
        ratios = staff_verification_ratios(samples, small, target, n_regions=4)
    # (2+6)/(1+3) = 2; 1/2; region 2 has zero small effort -> neutral 1; region 3 unsampled -> 0.
    assert ratios.tolist() == [2.0, 0.5, 1.0, 0.0]
    assert "region 2" in caplog.text
    with pytest.raises(ValueError, match="No target effort"):
        staff_verification_ratios({0: [0, 1]}, small, {0: 1.0}, n_regions=1)


def test_staff_allocate_hand_worked() -> None:
    # Visit sizes 2, 5, 10, 20 with V sums 8, 7, 6, 4 left:
    # floor(12*1/8)=1, floor(11*1/7)=1, floor(10*2/6)=3, floor(7*4/4)=7.
    assert staff_allocate([2, 5, 10, 20], [1.0, 1.0, 2.0, 4.0], 12) == [1, 1, 3, 7]
    # floor(7*1/13)=0, floor(7*2/12)=1, the last is full at 4: the 2 left top up V=2 first.
    assert staff_allocate([2, 3, 4], [1.0, 2.0, 10.0], 7) == [0, 3, 4]
    # All V zero: equal shares. Empty regions are never visited, whatever their V.
    assert staff_allocate([3, 3], [0.0, 0.0], 4) == [2, 2]
    assert staff_allocate([0, 4, 4], [5.0, 1.0, 1.0], 4) == [0, 2, 2]
    # floor(15*1/101)=0, then 10 (full); the V=0 region gets 0, the 5 left top up V=1.
    assert staff_allocate([10, 10, 30], [1.0, 100.0, 0.0], 15) == [5, 10, 0]
    with pytest.raises(ValueError, match="exceeds"):
        staff_allocate([2, 3], [1.0, 1.0], 6)


def test_staff_allocate_total_is_exactly_k_with_zero_ratios() -> None:
    rng = np.random.default_rng(9)
    for _ in range(300):
        sizes = rng.integers(0, 15, size=rng.integers(1, 8)).tolist()
        ratios = rng.choice([0.0, 0.5, 1.0, 3.0], size=len(sizes)).tolist()
        k = int(rng.integers(0, sum(sizes) + 1))
        budgets = staff_allocate(sizes, ratios, k)
        assert sum(budgets) == k
        assert all(0 <= b <= s for b, s in zip(budgets, sizes, strict=True))


def test_staff_select_takes_the_highest_within_each_region() -> None:
    small = np.array([5.0, 1.0, 4.0, 9.0, 2.0, 7.0, 3.0])
    region_of = np.array([0, 0, 0, -1, 1, 1, 1])
    assert staff_select(small, region_of, [2, 1]) == [0, 2, 5]
    with pytest.raises(ValueError, match="exceeds"):
        staff_select(small, region_of, [4, 0])


def test_staff_pipeline_total_is_exactly_k() -> None:
    rng = np.random.default_rng(5)
    for _ in range(150):
        n = int(rng.integers(1, 80))
        small = _random_scores(rng, n)
        n_regions = int(rng.integers(1, 8))
        eligible, region_of = staff_regions(small, drop_share=0.1, n_regions=n_regions)
        samples = staff_verification_sample(region_of, per_region=3, seed=int(rng.integers(1000)))
        target = {p: small[p] * rng.uniform(0.0, 2.0) for ps in samples.values() for p in ps}
        ratios = staff_verification_ratios(samples, small, target, n_regions)
        sizes = np.bincount(region_of[eligible], minlength=n_regions).tolist()
        k = int(rng.choice([0, eligible.size, rng.integers(0, eligible.size + 1)]))

        budgets = staff_allocate(sizes, ratios, k)
        picked = staff_select(small, region_of, budgets)

        assert sum(budgets) == k == len(picked) == len(set(picked))
        assert not _hardest(small, 0.1) & set(picked)
        assert np.bincount(region_of[picked], minlength=n_regions).tolist() == budgets


# --- S2L --------------------------------------------------------------------------------------


def test_s2l_select_hand_worked_shares() -> None:
    # Sizes 2, 5, 5, 20 under labels 7, 3, 5, 0: floor(12/4)=3 -> 2, floor(10/3)=3,
    # floor(7/2)=3, last takes 4.
    labels = np.repeat([7, 3, 5, 0], [2, 5, 5, 20])
    cluster_of = labels[np.random.default_rng(6).permutation(labels.size)]
    picked = s2l_select(cluster_of, 12, seed=0)
    counts = dict(zip(*np.unique(cluster_of[picked], return_counts=True), strict=True))
    assert counts == {7: 2, 3: 3, 5: 3, 0: 4}
    assert s2l_select(cluster_of, 12, seed=0) == picked
    assert s2l_select(cluster_of, 12, seed=1) != picked


def test_s2l_select_total_is_exactly_k() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(0, 60))
        cluster_of = rng.integers(0, int(rng.integers(1, 10)), size=n)
        k = int(rng.choice([0, n, rng.integers(0, n + 1)]))
        picked = s2l_select(cluster_of, k, seed=0)
        assert len(picked) == k == len(set(picked))
    with pytest.raises(ValueError, match="exceeds"):
        s2l_select(np.zeros(3, dtype=int), 4, seed=0)


def test_s2l_clusters_finds_groups_and_caps_k(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(8)
    centres = np.array([[0.0, 0.0, 0.0], [5.0, 4.0, 3.0], [9.0, 1.0, 8.0]])
    group = np.repeat([0, 1, 2], 5)
    labels = s2l_clusters(centres[group] + 0.01 * rng.standard_normal((15, 3)), 3, seed=0)
    assert all(len(set(labels[group == g])) == 1 for g in range(3))
    assert len(set(labels)) == 3

    with caplog.at_level(logging.WARNING):
        capped = s2l_clusters(np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0], [3.0, 4.0]]), 5, 0)
    assert capped.tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
    assert "only 2 distinct" in caplog.text
