"""A damaged stage output is never reused: it is reported with its path, set aside and computed
again; a folder without a marker is replaced; nothing logged to MLflow is overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from test_cli import run_cli, run_in_process

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


@pytest.mark.parametrize("damage", ["marker not JSON", "ids cut"])
def test_a_damaged_selection_is_selected_again(finished, cache_dir, damage: str) -> None:
    folder = _only(finished, "select")
    if damage == "marker not JSON":
        (folder / "_SUCCESS.json").write_text("{not json")
    else:
        (folder / "selected_ids.json").write_text('["pool-0')
    again = run_cli(CELL, finished, cache_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Traceback" not in again.stderr
    assert len(json.loads((folder / "selected_ids.json").read_text())) == 10
    assert len(_set_aside(finished, "select")) == 1


def test_selected_ids_outside_the_pool_are_refused_with_the_file(finished, cache_dir) -> None:
    """An output from before markers listed their files cannot be checked by hash: its ids are."""
    folder = _only(finished, "select")
    marker = json.loads((folder / "_SUCCESS.json").read_text())
    marker.pop("files")
    (folder / "_SUCCESS.json").write_text(json.dumps(marker))
    (folder / "selected_ids.json").write_text(json.dumps(["not-a-pool-id"] * 10))
    again = run_cli([*CELL, "stages=[select]"], finished, cache_dir)
    assert again.returncode == 2
    assert "selected_ids.json holds ids that are not in the pool" in again.stderr
    assert "Traceback" not in again.stderr
