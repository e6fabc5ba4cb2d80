"""pool_from_test: a task folder from validation.json and test.json, no example in two roles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dwbench.data.loading import load_task
from dwbench.data.pool_from_test import main, split_folder
from dwbench.errors import DataError


def write_source(folder: Path, n_test_dialogues: int = 6, n_validation: int = 10) -> None:
    folder.mkdir()
    test = [
        {"id": f"test_{d}_{r}", "dialogue": f"#Person1#: test {d}", "summary": f"sum {d}.{r}"}
        for d in range(n_test_dialogues)
        for r in (1, 2, 3)
    ]
    validation = [
        {"id": f"dev_{i}", "dialogue": f"#Person1#: dev {i}", "summary": f"dev sum {i}"}
        for i in range(n_validation)
    ]
    (folder / "test.json").write_text(json.dumps(test))
    (folder / "validation.json").write_text(json.dumps(validation))


def read(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def test_pool_is_one_record_per_dialogue_and_queries_are_disjoint_from_eval(tmp_path) -> None:
    write_source(tmp_path / "src")
    counts = split_folder(tmp_path / "src", tmp_path / "out", queries=3, seed=1)
    assert counts == {"train": 6, "validation": 3, "test": 7}
    pool = read(tmp_path / "out" / "train.json")
    assert [r["id"] for r in pool] == [f"test_{d}_1" for d in range(6)]  # the first summary
    queries = {r["id"] for r in read(tmp_path / "out" / "validation.json")}
    evaluation = [r["id"] for r in read(tmp_path / "out" / "test.json")]
    assert not queries & set(evaluation) and len(queries | set(evaluation)) == 10
    assert evaluation == sorted(evaluation, key=lambda i: int(i.split("_")[1]))  # file order
    split_folder(tmp_path / "src", tmp_path / "again", queries=3, seed=1)
    assert read(tmp_path / "again" / "validation.json") == read(
        tmp_path / "out" / "validation.json"
    )
    split_folder(tmp_path / "src", tmp_path / "other", queries=3, seed=2)
    assert {r["id"] for r in read(tmp_path / "other" / "validation.json")} != queries


def test_the_folder_loads_as_a_dialogsum_task_with_noise(tmp_path) -> None:
    write_source(tmp_path / "src")
    split_folder(tmp_path / "src", tmp_path / "out", queries=4)
    task = {
        "name": "dialogsum",
        "path": str(tmp_path / "out"),
        "fields": {"prompt": ["dialogue"], "response": "summary", "id": "id"},
        "prompt_template": "{dialogue}",
        "query_source": "validation",
        "noise": {"share": 0.5, "kinds": ["copy_prompt"]},
    }
    splits = load_task(task)
    assert len(splits.pool) == 6 and len(splits.queries) == 4 and len(splits.eval) == 6
    assert sum(not clean for clean in splits.clean_flags.values()) == 3
    assert all(len(ex.references) == 1 for ex in splits.eval)


def test_bad_input_names_the_file_or_option(tmp_path, capsys) -> None:
    write_source(tmp_path / "src", n_validation=3)
    with pytest.raises(DataError, match="--queries 3 must leave evaluation records"):
        split_folder(tmp_path / "src", tmp_path / "out", queries=3)
    with pytest.raises(DataError, match="no field 'conversation'"):
        split_folder(tmp_path / "src", tmp_path / "out", queries=1, key="conversation")
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "must hold validation.json and test.json" in capsys.readouterr().err
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--queries", "1"]) == 0
    assert "train.json: 6, validation.json: 1, test.json: 2" in capsys.readouterr().out
