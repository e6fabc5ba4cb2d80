"""ROUGE-L and final-number exact match, as dwbench computes them per example."""

from __future__ import annotations

import pytest

from dwbench.data.metrics import METRICS, exact_match_number, get_metric, rouge_l_f1
from dwbench.errors import ConfigError


def test_rouge_l_identical_and_disjoint() -> None:
    assert rouge_l_f1("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l_f1("the cat sat on the mat", ["dogs bark loudly"]) == 0.0


def test_rouge_l_partial_and_stemmed() -> None:
    partial = rouge_l_f1("the cat sat", ["the cat sat on the mat"])
    assert 0.0 < partial < 1.0
    assert partial == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # precision 1, recall 1/2
    assert rouge_l_f1("cats running", ["cat runs"]) == pytest.approx(1.0)  # Porter stemmer


def test_rouge_l_takes_the_best_reference() -> None:
    refs = ["dogs bark loudly", "the cat sat on the mat", "the cat"]
    assert rouge_l_f1("the cat sat on the mat", refs) == pytest.approx(1.0)
    assert rouge_l_f1("the cat", refs) == pytest.approx(1.0)


def test_rouge_l_needs_a_reference() -> None:
    with pytest.raises(ValueError):
        rouge_l_f1("anything", [])


def test_exact_match_number() -> None:
    assert exact_match_number("so 3 + 4 = 7\n#### 7", ["#### 7"]) == 1.0
    assert exact_match_number("#### 1,000", ["#### 999", "#### 1000"]) == 1.0
    assert exact_match_number("#### 8", ["#### 7"]) == 0.0
    assert exact_match_number("I think 7", ["#### 7"]) == 0.0


def test_get_metric() -> None:
    assert get_metric("rouge_l") is rouge_l_f1
    assert get_metric("exact_match_number") is exact_match_number
    assert set(METRICS) == {"rouge_l", "exact_match_number"}
    with pytest.raises(ConfigError, match=r"task\.metric.*exact_match_number, rouge_l"):
        get_metric("bleu")
