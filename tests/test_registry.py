from __future__ import annotations

import pandas as pd
import pytest

from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods.base import ScoringContext, top_k
from dwbench.methods.registry import get_method, method_names


def test_typo_suggests_the_method() -> None:
    with pytest.raises(ConfigError, match="Did you mean: random"):
        get_method("randon")


def test_every_registered_method_imports_and_has_a_config(tmp_path) -> None:
    from dwbench.cli import CONF_DIR

    for name in method_names():
        assert callable(get_method(name))
        assert (CONF_DIR / "method" / f"{name}.yaml").exists(), name


def test_top_k_orders_by_score_and_breaks_ties_by_the_seed() -> None:
    scores = pd.DataFrame({"id": list("abcde"), "score": [1.0, 2.0, 2.0, 0.5, 2.0]})
    for seed in range(4):
        picked = top_k(scores, 4, seed)
        assert sorted(picked[:3]) == ["b", "c", "e"] and picked[3] == "a"
        assert top_k(scores, 4, seed) == picked
    assert len({tuple(top_k(scores, 3, seed)) for seed in range(8)}) > 1


def _context(seed: int, tmp_path) -> ScoringContext:
    return ScoringContext({}, {}, {}, None, seed, "cpu", tmp_path, tmp_path)


def test_random_selection_is_seeded_and_uniform(tmp_path) -> None:
    pool = [Example(f"id{i}", "q", "a", ("a",)) for i in range(100)]
    method = get_method("random")
    first = method(_context(0, tmp_path)).score(pool)
    again = method(_context(0, tmp_path)).score(pool)
    other = method(_context(1, tmp_path)).score(pool)
    picks = method(_context(0, tmp_path)).select(first, 10)
    assert first.equals(again) and not first.equals(other)
    assert len(set(picks)) == 10 and picks != [f"id{i}" for i in range(10)]
