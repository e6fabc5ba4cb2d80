"""Per-example metrics, used where dwbench scores generations itself (tests, the dummy path).

The reported numbers come from the shipped lm-eval tasks; these functions implement the same
definitions so that both agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING

from dwbench.data.answers import numbers_equal
from dwbench.errors import ConfigError

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer


@cache
def _rouge_scorer() -> RougeScorer:
    """Built once: the stemmer setup is the slow part, and importing nltk is not free."""
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_f1(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 in [0, 1], the best over the references (DialogSum has three per dialogue)."""
    if not references:
        raise ValueError("rouge_l_f1 needs at least one reference")
    scorer = _rouge_scorer()
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def exact_match_number(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the final `#### n` number matches any reference's, else 0.0."""
    return float(any(numbers_equal(prediction, ref) for ref in references))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact_match_number": exact_match_number,
    "rouge_l": rouge_l_f1,
}


def get_metric(name: str) -> Callable[[str, Sequence[str]], float]:
    """The metric named by `task.metric`."""
    try:
        return METRICS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown metric {name!r} in task.metric. Valid names: {', '.join(sorted(METRICS))}."
        ) from None
