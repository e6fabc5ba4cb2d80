"""GSM8K final-answer parsing: the number after `####`.

A reference has one `####` line. A model's prediction may run on past its answer and print more
(`#### 36 * 100 = ...`); as in GSM8K's strict match and the paper's own scoring script, the
prediction's first `####` number is the answer it committed to.

The released code stripped every non-digit before comparing, so "1,000" became "000" and "-47"
became "47", and it rejected "$18". Here a number keeps its sign (ASCII or Unicode minus), its
thousands separators are read as such, a currency sign and trailing units or punctuation are
ignored, and anything ambiguous ("1,00", "3/4") parses to None rather than to a wrong number.
"""

from __future__ import annotations

import re
from decimal import Decimal

_MINUS = "-\u2212"  # ASCII hyphen-minus and the Unicode minus sign
_NUMBER = re.compile(
    rf"""
    \s*
    (?P<sign>[{_MINUS}+])?\s*            # sign before the currency: -$18
    [$\u20ac\u00a3]?\s*                  # optional currency: $, euro, pound
    (?P<sign2>[{_MINUS}])?               # sign after the currency: $-18
    (?P<digits>\d{{1,3}}(?:,\d{{3}})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)
    (?![,.]?\d|/\d)                      # not a malformed group (1,00) or a fraction (3/4)
    """,
    re.VERBOSE,
)


def parse_number_token(s: str) -> Decimal | None:
    """The number at the start of `s` (after spaces), ignoring trailing units and punctuation.

    "1,000" -> 1000, "-47" -> -47, "$18" -> 18, "18.50 dollars" -> 18.50, "\u22125" -> -5;
    None when `s` does not start with a number.
    """
    match = _NUMBER.match(s)
    if match is None:
        return None
    value = Decimal(match["digits"].replace(",", ""))
    negative = any(sign is not None and sign in _MINUS for sign in (match["sign"], match["sign2"]))
    return -value if negative else value


def parse_final_number(text: str) -> Decimal | None:
    """The number right after the last `####` in `text`, or None if there is none."""
    _, marker, tail = text.rpartition("####")
    if not marker:
        return None
    return parse_number_token(tail)


def parse_predicted_number(text: str) -> Decimal | None:
    """The number right after the first `####` of a model's answer, or None if there is none."""
    _, marker, tail = text.partition("####")
    if not marker:
        return None
    return parse_number_token(tail)


def numbers_equal(pred: str, ref: str) -> bool:
    """True when the prediction's committed number equals the reference's (18.50 == 18.5)."""
    p, r = parse_predicted_number(pred), parse_final_number(ref)
    return p is not None and r is not None and p == r
