"""A synthetic GSM8K-format task with known label noise, generated from a seed.

It lets the whole pipeline run here without the hub, and it gives selection methods something
to find: a share of the pool has corrupted answers, and `is_clean` says which. Answers follow
GSM8K's style (one sentence per step, `<<a*b=c>>` calculator annotations, a final `#### n`), and
every number stays a small positive integer. The problems depend only on the seed, the sizes and
the difficulty; `corrupt_share` only decides how many of them are corrupted.

This module checks the generator's arguments and draws the pool and eval records; the problem
templates and their difficulties are in embedded_problems.py, the clean and corrupted answers
(the corruption kinds) in embedded_answers.py.
"""

from __future__ import annotations

import random
from typing import Any

from dwbench.data.embedded_answers import CORRUPTIONS, _clean_answer, _corrupt_answer
from dwbench.data.embedded_problems import _TEMPLATES, DIFFICULTIES, Problem
from dwbench.errors import ConfigError

# Pool and eval problems together: 100,000 take a few seconds to draw. The templates hold about
# 250,000 distinct one_step problems, and every new one takes longer to find as they run out.
MAX_PROBLEMS = 100_000


def check_generator_args(
    pool_size: Any, eval_size: Any, corrupt_share: Any, difficulty: Any
) -> None:
    """The generator's arguments checked without generating (dwbench.validate runs this)."""
    for field, value in (("pool_size", pool_size), ("eval_size", eval_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(
                f"task.generator.{field} must be a positive integer, got {value!r}; "
                f"set e.g. task.generator.{field}=200."
            )
    if pool_size + eval_size > MAX_PROBLEMS:
        field, value = max((("pool_size", pool_size), ("eval_size", eval_size)), key=lambda f: f[1])
        raise ConfigError(
            f"task.generator.{field}={value} asks for {pool_size + eval_size:,} problems (pool "
            f"and eval), above the {MAX_PROBLEMS:,} the embedded generator makes: its templates "
            "hold a few hundred thousand distinct problems, and drawing ever more would run for "
            f"hours. Lower it, e.g. task.generator.{field}=200, or use a real dataset for a "
            "larger pool (task=gsm8k)."
        )
    if (
        isinstance(corrupt_share, bool)
        or not isinstance(corrupt_share, int | float)
        or not 0 <= corrupt_share < 1
    ):
        raise ConfigError(
            f"task.generator.corrupt_share must be a number in [0, 1), got {corrupt_share!r}; "
            "set e.g. task.generator.corrupt_share=0.3."
        )
    if difficulty not in DIFFICULTIES:
        raise ConfigError(
            f"task.generator.difficulty must be one of {', '.join(DIFFICULTIES)}, got "
            f"{difficulty!r}; set e.g. task.generator.difficulty=one_step."
        )


def generate_embedded_task(
    seed: int,
    pool_size: int,
    eval_size: int,
    corrupt_share: float,
    *,
    difficulty: str = "multi_step",
) -> tuple[list[dict], list[dict]]:
    """Pool records (question, answer, is_clean, corruption) and clean eval records.

    Deterministic in its arguments; no question appears twice, so pool and eval never overlap.
    """
    check_generator_args(pool_size, eval_size, corrupt_share, difficulty)
    templates = _TEMPLATES[difficulty]
    rng = random.Random(seed)
    wanted = pool_size + eval_size
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < wanted:
        if attempts == 100 * wanted:
            raise ConfigError(
                f"Could not generate {wanted} distinct problems; lower task.generator.pool_size "
                "or task.generator.eval_size."
            )
        attempts += 1
        question, solve = rng.choice(templates)(rng)
        if question not in seen:
            seen.add(question)
            problems.append((question, solve))

    corrupted = rng.sample(range(pool_size), round(corrupt_share * pool_size))
    kinds = {index: CORRUPTIONS[i % len(CORRUPTIONS)] for i, index in enumerate(corrupted)}
    pool = []
    for index, (question, solve) in enumerate(problems[:pool_size]):
        kind = kinds.get(index)
        answer = _clean_answer(solve) if kind is None else _corrupt_answer(solve, kind, rng)
        pool.append(
            {"question": question, "answer": answer, "is_clean": kind is None, "corruption": kind}
        )
    eval_records = [
        {"question": question, "answer": _clean_answer(solve)}
        for question, solve in problems[pool_size:]
    ]
    return pool, eval_records
