"""The synthetic GSM8K-format task: determinism, corruption bookkeeping and answer format."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import pytest

from dwbench.data.answers import parse_final_number
from dwbench.data.embedded import generate_embedded_task
from dwbench.data.embedded_answers import CORRUPTIONS
from dwbench.data.embedded_problems import DIFFICULTIES
from dwbench.data.loading import load_task
from dwbench.errors import ConfigError

_ANNOTATION = re.compile(r"<<(\d+)([-+*/])(\d+)=(-?\d+)>>")


def _annotations(answer: str) -> list[tuple[int, int]]:
    """(true value of the expression, result the answer states) for every `<<a op b=c>>`."""
    out = []
    for a, op, b, stated in _ANNOTATION.findall(answer):
        x, y = int(a), int(b)
        value = {"+": x + y, "-": x - y, "*": x * y, "/": x / y}[op]
        out.append((value, int(stated)))
    return out


@pytest.fixture(scope="module")
def task() -> tuple[list[dict], list[dict]]:
    return generate_embedded_task(seed=3, pool_size=300, eval_size=80, corrupt_share=0.3)


def test_deterministic_in_the_seed(task: tuple[list[dict], list[dict]]) -> None:
    assert generate_embedded_task(3, 300, 80, 0.3) == task
    other_pool, _ = generate_embedded_task(4, 300, 80, 0.3)
    assert [r["question"] for r in other_pool] != [r["question"] for r in task[0]]


@pytest.mark.parametrize(("pool_size", "share"), [(300, 0.3), (10, 0.25), (7, 0.0), (50, 0.9)])
def test_exact_corrupt_count(pool_size: int, share: float) -> None:
    pool, _ = generate_embedded_task(0, pool_size, 5, share)
    assert len(pool) == pool_size
    assert sum(not r["is_clean"] for r in pool) == round(share * pool_size)
    assert all(r["is_clean"] == (r["corruption"] is None) for r in pool)


def test_corruption_kinds_cycle_evenly(task: tuple[list[dict], list[dict]]) -> None:
    counts = Counter(r["corruption"] for r in task[0] if not r["is_clean"])
    assert set(counts) == set(CORRUPTIONS)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_clean_answers_are_consistent(task: tuple[list[dict], list[dict]]) -> None:
    pool, eval_records = task
    for record in [*(r for r in pool if r["is_clean"]), *eval_records]:
        steps = _annotations(record["answer"])
        assert 2 <= len(steps) <= 4
        assert all(value == stated for value, stated in steps), record["answer"]
        assert record["answer"].splitlines()[-1].startswith("#### ")
        assert parse_final_number(record["answer"]) == steps[-1][0]


def test_corruptions_are_wrong_in_their_own_way(task: tuple[list[dict], list[dict]]) -> None:
    clean_pool, _ = generate_embedded_task(3, 300, 80, 0.0)
    assert [r["question"] for r in clean_pool] == [r["question"] for r in task[0]]
    for record, clean in zip(task[0], clean_pool, strict=True):
        steps = _annotations(record["answer"])
        final = parse_final_number(record["answer"])
        if record["corruption"] == "missing_final":
            assert final is None and "####" not in record["answer"]
        elif record["corruption"] == "wrong_final":
            assert all(value == stated for value, stated in steps)
            assert final is not None and final != parse_final_number(clean["answer"])
        elif record["corruption"] == "broken_step":
            assert any(value != stated for value, stated in steps)
            assert final == steps[-1][1]  # the answer follows its own broken arithmetic
            assert final != parse_final_number(clean["answer"])
            assert all(stated > 0 for _, stated in steps)


def test_eval_is_clean_and_disjoint(task: tuple[list[dict], list[dict]]) -> None:
    pool, eval_records = task
    assert len(eval_records) == 80
    assert all(set(r) == {"question", "answer"} for r in eval_records)
    assert all(parse_final_number(r["answer"]) is not None for r in eval_records)
    questions = [r["question"] for r in [*pool, *eval_records]]
    assert len(set(questions)) == len(questions)


def test_templates_vary(task: tuple[list[dict], list[dict]]) -> None:
    asks = {" ".join(r["question"].rsplit(". ", 1)[-1].split()[:3]) for r in task[0]}
    assert len(asks) >= 8, asks  # "How much change", "How many miles", ...


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pool_size": 0}, "task.generator.pool_size"),
        ({"eval_size": -1}, "task.generator.eval_size"),
        ({"pool_size": 2.5}, "task.generator.pool_size"),
        ({"corrupt_share": 1.0}, "task.generator.corrupt_share"),
        ({"corrupt_share": -0.1}, "task.generator.corrupt_share"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    args = {"seed": 0, "pool_size": 10, "eval_size": 5, "corrupt_share": 0.2} | kwargs
    with pytest.raises(ConfigError, match=re.escape(field)):
        generate_embedded_task(**args)


# sha256 of generate_embedded_task(3, 300, 80, 0.3) as JSON (sort_keys), taken before difficulty
# existed: multi_step must keep producing these problems byte for byte.
_MULTI_STEP_SHA256 = "a50e997b79d843e25efb747a638fa425b9c5c3016c00976324de784c8f47929c"
_STEPS = {"one_step": (1, 1), "two_step": (2, 2), "multi_step": (3, 4)}


def _sha256(task: tuple[list[dict], list[dict]]) -> str:
    return hashlib.sha256(json.dumps(task, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module", params=DIFFICULTIES)
def graded(request: pytest.FixtureRequest) -> tuple[str, list[dict], list[dict]]:
    pool, eval_records = generate_embedded_task(3, 300, 80, 0.3, difficulty=request.param)
    return request.param, pool, eval_records


def test_multi_step_is_the_original_task(task: tuple[list[dict], list[dict]]) -> None:
    assert _sha256(task) == _MULTI_STEP_SHA256
    assert generate_embedded_task(3, 300, 80, 0.3, difficulty="multi_step") == task


def test_every_difficulty_is_valid_and_has_its_step_count(
    graded: tuple[str, list[dict], list[dict]],
) -> None:
    difficulty, pool, eval_records = graded
    fewest, most = _STEPS[difficulty]
    for record in [*pool, *eval_records]:
        assert fewest <= len(_annotations(record["answer"])) <= most, record["answer"]
    for record in [*(r for r in pool if r["is_clean"]), *eval_records]:
        steps = _annotations(record["answer"])
        assert all(value == stated > 0 for value, stated in steps), record["answer"]
        assert record["answer"].splitlines()[-1] == f"#### {steps[-1][1]}"
        assert parse_final_number(record["answer"]) == steps[-1][0]
    questions = [r["question"] for r in [*pool, *eval_records]]
    assert len(set(questions)) == len(questions)


@pytest.mark.parametrize("difficulty", ["one_step", "two_step"])
def test_small_difficulties_use_small_numbers(difficulty: str) -> None:
    pool, eval_records = generate_embedded_task(3, 300, 80, 0.3, difficulty=difficulty)
    for record in [*(r for r in pool if r["is_clean"]), *eval_records]:
        numbers = [int(n) for n in re.findall(r"\d+", record["question"] + record["answer"])]
        assert max(numbers) <= 80, record
    asks = {" ".join(r["question"].rsplit(". ", 1)[-1].split()[:3]) for r in pool}
    assert len(asks) >= 4, asks  # several templates, not one sentence with other numbers


def test_corruptions_at_every_difficulty(graded: tuple[str, list[dict], list[dict]]) -> None:
    difficulty, pool, _ = graded
    assert sum(not r["is_clean"] for r in pool) == round(0.3 * len(pool))
    assert all(r["is_clean"] == (r["corruption"] is None) for r in pool)
    counts = Counter(r["corruption"] for r in pool if not r["is_clean"])
    assert set(counts) == set(CORRUPTIONS)
    assert max(counts.values()) - min(counts.values()) <= 1
    clean_pool, _ = generate_embedded_task(3, 300, 80, 0.0, difficulty=difficulty)
    assert [r["question"] for r in clean_pool] == [r["question"] for r in pool]
    for record, clean in zip(pool, clean_pool, strict=True):
        steps = _annotations(record["answer"])
        final = parse_final_number(record["answer"])
        right = parse_final_number(clean["answer"])
        if record["corruption"] == "missing_final":
            assert final is None and "####" not in record["answer"]
            assert record["answer"] == clean["answer"].rsplit("\n", 1)[0]
        elif record["corruption"] == "wrong_final":
            assert all(value == stated for value, stated in steps)
            assert final is not None and final > 0 and final != right
        elif record["corruption"] == "broken_step":
            assert any(value != stated for value, stated in steps), record["answer"]
            assert final == steps[-1][1] != right
            assert all(stated > 0 for _, stated in steps)


def test_every_difficulty_is_deterministic_in_the_seed(
    graded: tuple[str, list[dict], list[dict]],
) -> None:
    difficulty, pool, eval_records = graded
    assert generate_embedded_task(3, 300, 80, 0.3, difficulty=difficulty) == (pool, eval_records)
    other, _ = generate_embedded_task(4, 300, 80, 0.3, difficulty=difficulty)
    assert [r["question"] for r in other] != [r["question"] for r in pool]


@pytest.mark.parametrize("bad", ["easy", "", None, 1])
def test_bad_difficulty_names_the_field_and_the_choices(bad: object) -> None:
    with pytest.raises(ConfigError, match="task.generator.difficulty") as error:
        generate_embedded_task(0, 10, 5, 0.2, difficulty=bad)  # type: ignore[arg-type]
    assert all(name in str(error.value) for name in DIFFICULTIES)


def test_the_task_config_passes_difficulty_on_and_defaults_to_multi_step() -> None:
    generator = {"pool_size": 12, "eval_size": 4, "corrupt_share": 0.25, "seed": 1}
    old = load_task({"source": "embedded", "generator": generator})
    multi = load_task(
        {"source": "embedded", "generator": {**generator, "difficulty": "multi_step"}}
    )
    one = load_task({"source": "embedded", "generator": {**generator, "difficulty": "one_step"}})
    assert old == multi
    assert all(len(_annotations(ex.response)) == 1 for ex in one.pool)
    with pytest.raises(ConfigError, match="task.generator.difficulty"):
        load_task({"source": "embedded", "generator": {**generator, "difficulty": "hard"}})
