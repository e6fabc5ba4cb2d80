"""A damaged stage output is never reused: it is reported with its path, set aside and computed
again; a folder without a marker is replaced; nothing logged to MLflow is overwritten. Damage is
anything but the shape and content written: a marker naming its output and listing its files,
prepared data that is the data loaded, a selection of k distinct pool ids."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import forked_cli
import mlflow
import pytest
from test_cli import REPO, run_cli, run_in_process

from dwbench.artifacts import SUCCESS_MARKER, manifest

CELL = [
    "method=random",
    "stages=[score,select]",
    "task.generator.pool_size=20",
    "task.generator.eval_size=5",
    "budget=0.5",
]


def _only(results: Path, stage: str) -> Path:
    (folder,) = [p for p in (results / "artifacts" / stage).iterdir() if not p.name.startswith(".")]
    return folder


def _set_aside(results: Path, stage: str) -> list[Path]:
    return sorted((results / "artifacts" / stage).glob(".damaged-*"))


@pytest.fixture
def finished(tmp_path: Path, cache_dir: Path) -> Path:
    """The finished cell each test damages (run in this process; the rerun is the CLI's)."""
    results = tmp_path / "results"
    run_in_process(CELL, results)
    return results


def _logged_scores(results: Path, run_id: str, name: str) -> str:
    """The scores.csv logged to MLflow with a score run."""
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path="scores.csv",
        dst_path=str(results.parent / name),
        tracking_uri=f"sqlite:///{results}/mlflow.db",
    )
    return Path(path).read_text()


def _cut(path: Path, lines: int) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:lines]))


def test_cut_scores_with_their_marker_are_detected_and_scored_again(finished, cache_dir) -> None:
    scores = _only(finished, "score") / "scores.csv"
    _cut(scores, 6)  # the header and 5 of 20 rows
    again = run_cli([*CELL, "budget=0.25"], finished, cache_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "scores.csv changed since it was written (5 rows, 20 written)" in again.stderr
    assert len(scores.read_text().splitlines()) == 21
    assert len(_set_aside(finished, "score")) == 1


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("nan", "scores.csv holds non-finite scores for ['"),
        ("text", "scores.csv holds non-finite scores for ['"),
        ("ids reordered", "scores.csv holds scores that do not match the pool's ids"),
    ],
)
def test_scores_edited_with_their_marker_are_damage_not_the_methods_fault(
    finished, cache_dir, damage: str, expected: str
) -> None:
    """The marker matches the files, yet the scores are not the pool's finite scores: set aside
    and scored again (before, every rerun ended blaming the method for non-finite scores)."""
    folder = _only(finished, "score")
    scores = folder / "scores.csv"
    written = scores.read_text()
    lines = written.splitlines(keepends=True)
    first = lines[1].split(",")
    if damage == "ids reordered":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines[1] = ",".join([first[0], "nan" if damage == "nan" else "high", *first[2:]])
        lines[1] += "" if lines[1].endswith("\n") else "\n"
    scores.write_text("".join(lines))
    _relist(folder)
    again = run_cli(CELL, finished, cache_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Traceback" not in again.stderr and "selection method returned" not in again.stderr
    assert f"{folder} is damaged" in again.stderr and expected in again.stderr
    assert scores.read_text() == written
    assert len(_set_aside(finished, "score")) == 1


def test_a_folder_without_a_marker_is_replaced_and_the_logged_run_kept(finished, cache_dir):
    folder = _only(finished, "score")
    _cut(folder / "scores.csv", 6)
    (folder / "_SUCCESS.json").unlink()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{finished}/mlflow.db")
    experiment = client.get_experiment_by_name("dwbench")
    (first,) = client.search_runs([experiment.experiment_id], "tags.stage = 'score'")
    before = _logged_scores(finished, first.info.run_id, "before")
    again = run_cli(CELL, finished, cache_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len((folder / "scores.csv").read_text().splitlines()) == 21  # fresh, not the cut one
    assert (folder / "_SUCCESS.json").is_file() and len(_set_aside(finished, "score")) == 1
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'score'")
    assert len(runs) == 2 and {r.data.tags.get("recomputes") for r in runs} == {
        None,
        first.info.run_id,
    }
    assert _logged_scores(finished, first.info.run_id, "after") == before


def test_a_cut_evaluation_split_without_its_marker_is_prepared_again(finished, cache_dir) -> None:
    folder = _only(finished, "prepare")
    _cut(folder / "eval.jsonl", 2)
    (folder / "_SUCCESS.json").unlink()
    again = run_cli(CELL, finished, cache_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len((folder / "eval.jsonl").read_text().splitlines()) == 5


def _relist(folder: Path) -> None:
    """The marker's file list made to match the files as they are now: an output written that
    way (a method that once wrote it, a copy that came with its own marker)."""
    marker = json.loads((folder / SUCCESS_MARKER).read_text())
    marker["files"] = manifest(folder)
    (folder / SUCCESS_MARKER).write_text(json.dumps(marker))


def _unlist(folder: Path) -> None:
    """The marker as written before markers listed their files."""
    marker = json.loads((folder / SUCCESS_MARKER).read_text())
    del marker["files"]
    (folder / SUCCESS_MARKER).write_text(json.dumps(marker))


def _set_files(folder: Path, files: Any) -> None:
    marker = json.loads((folder / SUCCESS_MARKER).read_text())
    marker["files"] = files
    (folder / SUCCESS_MARKER).write_text(json.dumps(marker))


def _status(cell: list[str], results: Path, cache_dir: Path) -> Any:
    return forked_cli.run(
        [sys.executable, "-m", "dwbench.sweep.status", *cell, f"results_dir={results}"],
        cwd=REPO,
        env={**os.environ, "DWBENCH_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )


@pytest.mark.parametrize("damage", ["marker {}", "old marker, pool cut"])
def test_a_prepared_folder_not_holding_the_data_is_prepared_again(
    finished, cache_dir, damage: str
) -> None:
    """Its marker must name it and record the data's fingerprint, and its files must hold the
    data loaded: before, `{}` was trusted (later stages used the loaded pool, evaluation the
    folder's files) and `dwbench.sweep.status` failed with KeyError: 'fingerprint'."""
    folder = _only(finished, "prepare")
    _cut(folder / "pool.jsonl", 10)
    if damage == "marker {}":
        (folder / SUCCESS_MARKER).write_text("{}")
        expected = "names stage None and key None, not 'prepare'"
    else:
        _unlist(folder)
        expected = "pool.jsonl does not hold the 20 examples loaded (10 found)"
    status = _status(CELL, finished, cache_dir)
    assert status.returncode == 0, status.stderr[-2000:]
    assert "Traceback" not in status.stderr
    if damage == "marker {}":
        assert "_SUCCESS.json names stage None" in status.stderr
        assert "Run its cell again" in status.stderr and "1 missing" in status.stdout
    selected = json.loads((_only(finished, "select") / "selected_ids.json").read_text())
    again = run_cli(CELL, finished, cache_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert expected in again.stderr and "Traceback" not in again.stderr
    assert len((folder / "pool.jsonl").read_text().splitlines()) == 20
    assert len(_set_aside(finished, "prepare")) == 1
    # the same data, so the same key: the selection made from it stands
    assert json.loads((_only(finished, "select") / "selected_ids.json").read_text()) == selected
    assert "1 done" in _status(CELL, finished, cache_dir).stdout


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ([], "files is list, not an object"),
        (None, "files is NoneType, not an object"),
        ({"scores.csv": None}, "scores.csv has NoneType, not its size and sha256"),
        ({}, "scores.csv is not listed in its marker"),
    ],
    ids=["list", "null", "entry null", "empty beside cut scores"],
)
def test_a_marker_listing_its_files_in_another_shape_is_damage(
    finished, cache_dir, files: Any, expected: str
) -> None:
    """Before: an AttributeError or TypeError traceback on every rerun, and for `{}` beside a
    cut scores.csv an error naming no file and no fix."""
    folder = _only(finished, "score")
    _cut(folder / "scores.csv", 6)
    _set_files(folder, files)
    again = run_cli(CELL, finished, cache_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Traceback" not in again.stderr
    assert f"{folder} is damaged" in again.stderr and expected in again.stderr
    assert len((folder / "scores.csv").read_text().splitlines()) == 21
    assert len(_set_aside(finished, "score")) == 1


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("marker not JSON", "cannot be read"),
        ("ids cut", "selected_ids.json changed since it was written"),
        ("duplicate ids", "holds 10 ids but 1 distinct (repeated: ['pool-"),
        ("duplicate ids, old marker", "holds 10 ids but 1 distinct"),
        ("ids outside the pool", "holds ids that are not in the pool (['elsewhere-0', "),
        ("too few ids", "holds 5 ids, not k=10"),
        ("not a list", "is not a JSON list of example ids"),
    ],
)
def test_a_damaged_selection_is_selected_again(
    finished, cache_dir, damage: str, expected: str
) -> None:
    """A selection is k distinct ids of the pool: anything else is set aside and selected
    again (before, duplicate ids trained silently on copies of one example)."""
    folder = _only(finished, "select")
    ids = json.loads((folder / "selected_ids.json").read_text())
    written = {
        "duplicate ids": [ids[0]] * 10,
        "duplicate ids, old marker": [ids[0]] * 10,
        "ids outside the pool": [f"elsewhere-{i}" for i in range(10)],
        "too few ids": ids[:5],
        "not a list": {"ids": ids},
    }
    if damage == "marker not JSON":
        (folder / SUCCESS_MARKER).write_text("{not json")
    elif damage == "ids cut":
        (folder / "selected_ids.json").write_text('["pool-0')
    else:
        (folder / "selected_ids.json").write_text(json.dumps(written[damage]))
        (_unlist if damage == "duplicate ids, old marker" else _relist)(folder)
    again = run_cli(CELL, finished, cache_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Traceback" not in again.stderr
    assert f"{folder} is damaged" in again.stderr and expected in again.stderr
    assert json.loads((folder / "selected_ids.json").read_text()) == ids
    assert len(_set_aside(finished, "select")) == 1


def test_a_damaged_selection_in_a_read_only_store_is_one_message(finished) -> None:
    """Where nothing can be computed again, the damage is one message naming the folder, what
    is wrong and where to run it."""
    from dwbench.artifacts import ArtifactStore
    from dwbench.errors import DwbenchError
    from dwbench.stages.select import not_a_selection

    folder = _only(finished, "select")
    ids = json.loads((folder / "selected_ids.json").read_text())
    (folder / "selected_ids.json").write_text(json.dumps([ids[0]] * 10))
    _relist(folder)
    store = ArtifactStore(finished / "artifacts", read_only=True)
    pool = {f"pool-{i}" for i in range(100)} | set(ids)
    with pytest.raises(DwbenchError, match="holds 10 ids but 1 distinct.*is read-only"):
        store.reusable("select", folder.name, lambda f, m: not_a_selection(f, m, pool, 10))
    assert folder.is_dir()
