"""Task loading: local files in both formats, clear errors, limits, grouping and fingerprints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dwbench.data.loading import load_task
from dwbench.data.records import Example, TaskSplits, fingerprint, read_jsonl, write_jsonl
from dwbench.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def _gsm_rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [
        {
            "question": f"What is {i} + {i}?",
            "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}",
        }
        for i in range(start, start + n)
    ]


def _write_array(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(rows, indent=4), encoding="utf-8")


def _write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def gsm_dir(tmp_path: Path) -> Path:
    """The authors' format for train.json (a JSON array), JSON Lines for test.json."""
    _write_array(tmp_path / "train.json", _gsm_rows(20))
    _write_lines(tmp_path / "test.json", _gsm_rows(6, start=100))
    return tmp_path


def _task(path: Path, **overrides: Any) -> dict[str, Any]:
    return {"name": "t", "source": "local", "path": str(path), **overrides}


def test_local_array_and_jsonl(gsm_dir: Path) -> None:
    splits = load_task(_task(gsm_dir))
    assert len(splits.pool) == 20 and len(splits.eval) == 6
    assert splits.queries is None and splits.clean_flags is None
    by_id = {ex.id: ex for ex in splits.pool}
    assert by_id["pool-00003"].prompt == "What is 3 + 3?"
    assert by_id["pool-00003"].references == (by_id["pool-00003"].response,)
    assert {ex.prompt for ex in splits.eval} == {f"What is {i} + {i}?" for i in range(100, 106)}


def test_path_wins_over_source(gsm_dir: Path) -> None:
    splits = load_task({"source": "hub", "path": str(gsm_dir)})
    assert len(splits.pool) == 20


def test_accepts_an_omegaconf_config(gsm_dir: Path) -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "conf" / "task" / "gsm8k.yaml")
    cfg.path = str(gsm_dir)
    assert fingerprint(load_task(cfg)) == fingerprint(load_task(_task(gsm_dir)))


def test_malformed_json_array_names_the_line(gsm_dir: Path) -> None:
    (gsm_dir / "train.json").write_text('[\n{"question": "a", "answer": "b"},\n{"question": }\n]')
    with pytest.raises(DataError, match=r"train\.json: malformed JSON at line 3"):
        load_task(_task(gsm_dir))


def test_malformed_jsonl_names_the_line(gsm_dir: Path) -> None:
    (gsm_dir / "test.json").write_text('{"question": "a", "answer": "b"}\n{"question": "a",\n')
    with pytest.raises(DataError, match=r"test\.json: malformed JSON on line 2"):
        load_task(_task(gsm_dir))


def test_missing_field_names_file_record_and_field(gsm_dir: Path) -> None:
    rows = _gsm_rows(5)
    rows[3] = {"question": "q", "solution": "s"}
    _write_array(gsm_dir / "train.json", rows)
    with pytest.raises(DataError) as info:
        load_task(_task(gsm_dir))
    message = str(info.value)
    for part in ("train.json", "record 3", "'answer'", "question, solution", "task.fields"):
        assert part in message


def test_missing_file_names_path_and_field(gsm_dir: Path) -> None:
    (gsm_dir / "test.json").unlink()
    with pytest.raises(DataError, match="task.path") as info:
        load_task(_task(gsm_dir))
    assert str(gsm_dir.resolve() / "test") + ".json" in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        load_task(_task(gsm_dir / "nowhere"))


def test_missing_validation_file_when_queries_come_from_it(gsm_dir: Path) -> None:
    with pytest.raises(DataError, match=r"validation\.json"):
        load_task(_task(gsm_dir, query_source="validation"))


def test_limits_cut_the_seeded_shuffle(gsm_dir: Path) -> None:
    full = load_task(_task(gsm_dir))
    cut = load_task(_task(gsm_dir, pool_limit=5, eval_limit=2))
    assert cut.pool == full.pool[:5] and cut.eval == full.eval[:2]
    assert load_task(_task(gsm_dir, pool_limit=5)).pool == cut.pool
    assert [ex.id for ex in full.pool] != [f"pool-{i:05d}" for i in range(20)]  # shuffled
    reordered = load_task(_task(gsm_dir, shuffle_seed=1))
    assert [ex.id for ex in reordered.pool] != [ex.id for ex in full.pool]
    assert sorted(reordered.pool, key=lambda ex: ex.id) == sorted(full.pool, key=lambda ex: ex.id)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "5", True])
def test_bad_limit_names_the_field(gsm_dir: Path, bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"task\.pool_limit"):
        load_task(_task(gsm_dir, pool_limit=bad))


def test_unknown_key_is_an_error(gsm_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"task\.pool_limt"):
        load_task(_task(gsm_dir, pool_limt=5))
    with pytest.raises(ConfigError, match=r"task\.fields\.answer"):
        load_task(_task(gsm_dir, fields={"answer": "x"}))


def test_empty_pool_is_an_error(gsm_dir: Path) -> None:
    _write_array(gsm_dir / "train.json", [])
    with pytest.raises(DataError, match="no records"):
        load_task(_task(gsm_dir))


def test_duplicate_ids_are_an_error(gsm_dir: Path) -> None:
    _write_array(gsm_dir / "train.json", [{"id": "a", "question": "q", "answer": "r"}] * 2)
    _write_array(gsm_dir / "test.json", [{"id": "b", "question": "q", "answer": "r"}])
    fields = {"prompt": ["question"], "response": "answer", "id": "id"}
    with pytest.raises(DataError, match="'a'.*more than once"):
        load_task(_task(gsm_dir, fields=fields))


def _dialogsum_task(path: Path) -> dict[str, Any]:
    return _task(
        path,
        fields={"prompt": ["dialogue"], "response": "summary", "id": "id"},
        prompt_template="Summarize the following dialogue.\n\n{dialogue}",
        metric="rouge_l",
        query_source="validation",
    )


def test_dialogsum_groups_references(tmp_path: Path) -> None:
    train = [
        {"id": f"train_{i}", "dialogue": f"#P1#: hi {i}", "summary": f"s{i}"} for i in range(4)
    ]
    test = [
        {"id": f"test_{d}_{k}", "dialogue": f"#P1#: talk {d}", "summary": f"summary {d}.{k}"}
        for d in range(2)
        for k in (1, 2, 3)
    ]
    _write_lines(tmp_path / "train.json", train)
    _write_array(tmp_path / "test.json", test)
    _write_array(tmp_path / "validation.json", [{"id": "dev_0", "dialogue": "x", "summary": "y"}])
    splits = load_task(_dialogsum_task(tmp_path))
    assert len(splits.eval) == 2
    by_id = {ex.id: ex for ex in splits.eval}
    assert by_id["test_0_1"].references == ("summary 0.1", "summary 0.2", "summary 0.3")
    assert by_id["test_1_1"].prompt == "Summarize the following dialogue.\n\n#P1#: talk 1"
    assert splits.queries is not None and [ex.id for ex in splits.queries] == ["dev_0"]


def test_empty_input_leaves_the_instruction_alone(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Define anemia.", "input": "", "output": "o1"},
        {"instruction": "Summarize.", "input": "Patient is 54.", "output": "o2"},
    ]
    _write_array(tmp_path / "train.json", rows)
    _write_array(tmp_path / "test.json", rows)
    task = _task(
        tmp_path,
        fields={"prompt": ["instruction", "input"], "response": "output"},
        prompt_template="{instruction}\n\nInput:\n{input}",
    )
    prompts = {ex.response: ex.prompt for ex in load_task(task).pool}
    assert prompts == {"o1": "Define anemia.", "o2": "Summarize.\n\nInput:\nPatient is 54."}


def test_template_field_missing_is_a_config_error(gsm_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"task\.prompt_template uses \{problem\}"):
        load_task(_task(gsm_dir, prompt_template="{problem}"))


def test_embedded_source_sets_clean_flags() -> None:
    generator = {"pool_size": 30, "eval_size": 10, "corrupt_share": 0.2, "seed": 1}
    splits = load_task({"source": "embedded", "generator": generator})
    assert splits.clean_flags is not None
    assert sorted(splits.clean_flags) == sorted(ex.id for ex in splits.pool)
    assert sum(not clean for clean in splits.clean_flags.values()) == 6
    assert {ex.id for ex in splits.pool} == {f"pool-{i:05d}" for i in range(30)}
    cut = load_task({"source": "embedded", "generator": generator, "pool_limit": 10})
    assert set(cut.clean_flags or {}) == {ex.id for ex in cut.pool} and len(cut.pool) == 10


def test_embedded_needs_its_generator() -> None:
    with pytest.raises(ConfigError, match=r"task\.generator"):
        load_task({"source": "embedded"})
    with pytest.raises(ConfigError, match=r"task\.generator\.seed"):
        load_task(
            {
                "source": "embedded",
                "generator": {"pool_size": 5, "eval_size": 5, "corrupt_share": 0},
            }
        )


def test_hub_holdout_reproduces_the_paper_split(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    fake = datasets.DatasetDict({"train": datasets.Dataset.from_list(_gsm_rows(7473))})
    calls = []

    def load_dataset(name: str, config: str | None, revision: str | None) -> Any:
        calls.append((name, config, revision))
        return fake

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    splits = load_task({"hub": {"id": "openai/gsm8k", "config": "main"}})
    assert calls == [("openai/gsm8k", "main", None)]
    assert (len(splits.pool), len(splits.eval)) == (6725, 748)
    assert not {ex.prompt for ex in splits.pool} & {ex.prompt for ex in splits.eval}


def test_hub_failure_suggests_a_local_path(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def load_dataset(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match=r"ConnectionError: offline.*task\.path=<local folder>"):
        load_task({"hub": {"id": "openai/gsm8k", "config": "main"}})


def test_jsonl_roundtrip(tmp_path: Path) -> None:
    examples = [Example("a", "p \u2028 q", "r", ("r", "r2")), Example("b", "{}", "s", ("s",))]
    write_jsonl(tmp_path / "x.jsonl", examples)
    assert read_jsonl(tmp_path / "x.jsonl") == examples
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(DataError, match="line 1"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_fingerprint_is_content_sensitive(gsm_dir: Path) -> None:
    splits = load_task(_task(gsm_dir))
    base = fingerprint(splits)
    assert len(base) == 16
    changed = Example(splits.pool[0].id, splits.pool[0].prompt, "x", ("x",))
    assert fingerprint(TaskSplits([changed, *splits.pool[1:]], None, splits.eval, None)) != base
    assert fingerprint(TaskSplits(splits.pool, [], splits.eval, None)) != base
    assert fingerprint(TaskSplits(splits.pool, None, splits.eval, {"pool-00000": True})) != base


def test_fingerprint_is_stable_across_hash_seeds(gsm_dir: Path) -> None:
    task = _task(gsm_dir)
    expected = fingerprint(load_task(task))
    script = (
        "import json, sys\n"
        "from dwbench.data.loading import load_task\n"
        "from dwbench.data.records import fingerprint\n"
        "sys.stdout.write(fingerprint(load_task(json.loads(sys.argv[1]))))\n"
    )
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [sys.executable, "-c", script, json.dumps(task)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout == expected
