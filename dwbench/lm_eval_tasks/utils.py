"""`!function` hooks for the dwbench lm-eval tasks in this folder.

lm-eval loads this file by path, not as `dwbench.lm_eval_tasks.utils`; the scoring itself lives
in `dwbench.data.metrics` so that lm-eval and dwbench's own code share one definition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dwbench.data.metrics import exact_match_number, rouge_l_f1


def process_results_exact_match(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    """Per-sample GSM8K score; `results` holds the one (unfiltered) generation for `doc`."""
    return {"exact_match": exact_match_number(results[0], doc["references"])}


def process_results_rouge_l(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    """Per-sample ROUGE-L F1, the best over the document's references."""
    return {"rouge_l": rouge_l_f1(results[0], doc["references"])}
