"""GSM8K final-number parsing, including the cases the released code got wrong."""

from __future__ import annotations

from decimal import Decimal

import pytest

from dwbench.data.answers import (
    numbers_equal,
    parse_final_number,
    parse_number_token,
    parse_predicted_number,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So she has 1000 left.\n#### 1,000", Decimal(1000)),
        ("#### -47", Decimal(-47)),
        ("#### \u22125", Decimal(-5)),
        ("#### $18", Decimal(18)),
        ("#### -$18", Decimal(-18)),
        ("#### $-18", Decimal(-18)),
        ("#### 1,234.50", Decimal("1234.50")),
        ("#### 18.50", Decimal("18.5")),
        ("#### 18 dollars", Decimal(18)),
        ("#### 18.", Decimal(18)),
        ("####18", Decimal(18)),
        ("#### 1,575,000", Decimal(1575000)),
        ("#### 7\nThen again\n#### 42", Decimal(42)),  # the last marker counts
    ],
)
def test_parse_final_number(text: str, expected: Decimal) -> None:
    assert parse_final_number(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 42.",  # no marker
        "#### ",
        "#### the answer is 42",  # the number must follow the marker
        "#### 42\n####",  # the last marker has no number
        "#### 1,00",  # a malformed thousands group is ambiguous
        "#### 3/4",  # a fraction is not an integer answer
    ],
)
def test_parse_final_number_none(text: str) -> None:
    assert parse_final_number(text) is None


def test_parse_number_token_ignores_spaces_and_units() -> None:
    assert parse_number_token("  $1,000 apples") == Decimal(1000)
    assert parse_number_token("apples: 3") is None


def test_numbers_equal() -> None:
    assert numbers_equal("#### 18.50", "#### 18.5")
    assert numbers_equal("blah\n#### 1,000", "#### 1000")
    assert numbers_equal("#### $18 dollars.", "#### 18")
    assert not numbers_equal("#### -47", "#### 47")
    assert not numbers_equal("#### 000", "#### 1,000")
    assert not numbers_equal("no answer", "no answer")  # None never equals None
    assert not numbers_equal("#### 5", "no answer")


def test_prediction_is_scored_on_its_first_answer_line() -> None:
    runaway = "6 * 6 = <<6*6=36>>36.\n#### 36\n#### 36 * 100 = 3600\n#### 3600"
    assert parse_predicted_number(runaway) == Decimal(36)
    assert numbers_equal(runaway, "#### 36") and not numbers_equal(runaway, "#### 3600")
