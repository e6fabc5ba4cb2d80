"""The embedded task's answers: a problem's clean answer, or one corrupted in a known way.

Corruptions, cycled evenly over the corrupted records (embedded.py draws which):
- wrong_final: the `#### n` number is replaced by a plausible wrong one (an intermediate result
  or a near miss), never the right one.
- broken_step: one step's annotation gets a wrong result, and later steps compute from it, as a
  real slip would; the final number is always wrong.
- missing_final: the `#### n` line is removed.
"""

from __future__ import annotations

import random

from dwbench.data.embedded_problems import Solver, _Calculator

CORRUPTIONS = ("wrong_final", "broken_step", "missing_final")
_DELTAS = tuple(d for d in range(-10, 11) if d != 0)


def _answer(lines: list[str], final: int | None) -> str:
    return "\n".join(lines if final is None else [*lines, f"#### {final}"])


def _clean_answer(solve: Solver) -> str:
    calc = _Calculator()
    lines = solve(calc)
    return _answer(lines, calc.results[-1])


def _corrupt_answer(solve: Solver, kind: str, rng: random.Random) -> str:
    calc = _Calculator()
    lines = solve(calc)
    right = calc.results[-1]
    if kind == "missing_final":
        return _answer(lines, None)
    if kind == "wrong_final":
        near = {right + d for d in _DELTAS} | {right * 2, right * 10, right // 2}
        candidates = sorted(n for n in near | set(calc.results[:-1]) if n > 0 and n != right)
        return _answer(lines, rng.choice(candidates))
    slips = [(step, delta) for step in range(len(calc.results)) for delta in _DELTAS]
    rng.shuffle(slips)
    for step, delta in slips:
        broken = _Calculator(break_at=step, delta=delta)
        lines = solve(broken)
        if broken.valid and broken.results[-1] != right:
            return _answer(lines, broken.results[-1])
    raise AssertionError("a positive slip in the last step always gives a valid wrong answer")
