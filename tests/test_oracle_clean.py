"""oracle_clean, the reference that keeps clean examples only: no model, contexts built here."""

from __future__ import annotations

import re

import pytest

from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods.base import ScoringContext
from dwbench.methods.oracle_clean import OracleClean

_POOL = [Example(f"id{i:02d}", "q", "a", ("a",)) for i in range(40)]
_FLAGS = {ex.id: i % 4 != 0 for i, ex in enumerate(_POOL)}  # 30 clean, 10 corrupted
_CLEAN = {i for i, ok in _FLAGS.items() if ok}


def _select(seed: int, k: int, tmp_path) -> list[str]:
    context = ScoringContext({}, {}, {}, None, seed, "cpu", tmp_path, tmp_path, clean_flags=_FLAGS)
    method = OracleClean(context)
    return method.select(method.score(_POOL), k)


def test_keeps_only_clean_examples_while_there_are_enough(tmp_path) -> None:
    for k in (1, 10, len(_CLEAN)):
        picks = _select(0, k, tmp_path)
        assert len(set(picks)) == k and set(picks) <= _CLEAN


def test_fills_with_corrupted_examples_only_past_the_clean_ones(tmp_path) -> None:
    picks = _select(0, len(_CLEAN) + 4, tmp_path)
    assert set(picks[: len(_CLEAN)]) == _CLEAN
    assert len(set(picks)) == len(picks) and not set(picks[len(_CLEAN) :]) & _CLEAN
    assert set(_select(0, len(_POOL), tmp_path)) == set(_FLAGS)


def test_picks_are_seeded(tmp_path) -> None:
    first = _select(0, 10, tmp_path)
    assert _select(0, 10, tmp_path) == first
    assert _select(1, 10, tmp_path) != first
    assert len({tuple(sorted(_select(seed, 10, tmp_path))) for seed in range(5)}) > 1


def test_refuses_a_task_without_clean_flags(tmp_path) -> None:
    context = ScoringContext({}, {}, {}, None, 0, "cpu", tmp_path, tmp_path)
    message = "method=oracle_clean selects by the task's is_clean flags, and this task has none"
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        OracleClean(context)
    assert "embedded" in str(error.value)
