from __future__ import annotations

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from dwbench.config_files import CONF_DIR
from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods.base import ScoringContext, top_k
from dwbench.methods.registry import check_method, check_method_name, method_class

METHOD_YAMLS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


def _method_cfg(name: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"method={name}"]).method


def test_typo_suggests_the_method() -> None:
    with pytest.raises(ConfigError, match="Did you mean: random"):
        check_method_name("randon", METHOD_YAMLS)


# Old names kept working after a rename: their YAML composes the new method's config, name and all.
ALIASES = {
    "data_whisperer_one_shot": "one_shot_gain",
    "data_whisperer_one_shot_16q": "one_shot_gain_16q",
}


@pytest.mark.parametrize("name", METHOD_YAMLS)
def test_every_method_config_names_its_class(name: str) -> None:
    cfg = _method_cfg(name)
    assert cfg.name == ALIASES.get(name, name)
    check_method(cfg)
    cls = method_class(cfg)
    assert callable(getattr(cls, "score", None)) and callable(getattr(cls, "select", None))


def test_a_target_that_cannot_be_imported_is_named_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="no_such_package.Method.*not installed"):
        check_method({"name": "mine", "_target_": "no_such_package.Method"})
    with pytest.raises(ConfigError, match="has no class 'Missing'"):
        method_class({"name": "mine", "_target_": "dwbench.methods.random_method.Missing"})
    with pytest.raises(ConfigError, match="has no _target_"):
        method_class({"name": "mine"})


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
    method = method_class(_method_cfg("random"))
    first = method(_context(0, tmp_path)).score(pool)
    again = method(_context(0, tmp_path)).score(pool)
    other = method(_context(1, tmp_path)).score(pool)
    picks = method(_context(0, tmp_path)).select(first, 10)
    assert first.equals(again) and not first.equals(other)
    assert len(set(picks)) == 10 and picks != [f"id{i}" for i in range(10)]
