"""Format rules: the checks a person writes first for GSM8K-format answers, as a reference.

Not a learned selector and not a competitor: it reads no labels, only the answer's text, and
shows what a few regular expressions find. Each answer is scored by how many of three rules it
passes (ties broken by the run seed):
- a final line `#### n` is there;
- every calculator annotation `<<expr=result>>` is right (the expression, evaluated, equals the
  result written after it);
- the final number equals the last annotation's result (where there is one).
The embedded task's corruptions (a wrong final number, a broken step, a missing `####` line) are
each visible to one of them, so on that task this reference bounds what "finds bad data" can
mean: a selector's AUROC there measures a syntactic signal (docs/embedded-task.md).
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Mapping
from typing import Any

import pandas as pd

from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods.base import ScoringContext, top_k

FINAL = re.compile(r"^####\s*(-?[\d,]*\.?\d+)\s*$", re.MULTILINE)
ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
RULES = ("has_final", "steps_right", "final_is_last_step")
METRIC = "exact_match_number"  # GSM8K-format tasks: embedded_gsm, gsm8k


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def _evaluate(expression: str) -> float | None:
    """The value of an arithmetic expression (numbers, + - * /, parentheses); None otherwise."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(ast.dump(node))

    try:
        return value(ast.parse(expression.replace(",", ""), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


def check_answer(answer: str) -> dict[str, bool]:
    """Which of the three rules `answer` passes."""
    finals = FINAL.findall(answer)
    final = _number(finals[-1]) if finals else None
    steps = [(_evaluate(expr), _number(result)) for expr, result in ANNOTATION.findall(answer)]
    right = all(
        got is not None and written is not None and abs(got - written) < 1e-6
        for got, written in steps
    )
    last = steps[-1][1] if steps else None
    return {
        "has_final": final is not None,
        "steps_right": right,
        "final_is_last_step": final is not None and (last is None or abs(final - last) < 1e-6),
    }


class FormatRules:
    """Score = rules passed (0-3): a clean GSM8K-format answer passes all three."""

    needs_selector = False  # reads the text alone

    @staticmethod
    def check_options(
        method_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], pool_size: int | None
    ) -> None:
        """Run before anything is written (dwbench.validate): rules exist for GSM8K answers."""
        if task_cfg.get("metric") != METRIC:
            raise ConfigError(
                f"method=format_rules has rules for GSM8K-format answers (task.metric={METRIC}: "
                f"embedded_gsm, gsm8k), not for task {task_cfg.get('name')!r}; pick another "
                "method for this task."
            )

    def __init__(self, context: ScoringContext) -> None:
        self.check_options(context.method_cfg, context.task_cfg, None)
        self.seed = context.seed
        self.stats: dict[str, float] = {}

    def score(self, pool: list[Example]) -> pd.DataFrame:
        checks = pd.DataFrame([check_answer(ex.response) for ex in pool])
        self.stats = {f"share_{rule}": float(checks[rule].mean()) for rule in RULES}
        return pd.DataFrame(
            {
                "id": [ex.id for ex in pool],
                "score": checks[list(RULES)].sum(axis=1).astype(float),
                **{rule: checks[rule] for rule in RULES},
            }
        )

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k, self.seed)
