"""The fault probe's cases that lost work or gave a traceback or a wrong result, each now a
finished run with nothing lost or one clear line (exit 2): a kill right after a stage commits
its output, before its MLflow run has it; a resumed fine-tune's training log; own data files
with NaN fields, null ids, a byte order mark or a line no model can read; a `task.noise.share`
that corrupts none or all of the pool; damaged or incomplete `bench parity` references."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import pytest
from test_cli import REPO, run_cli, run_in_process, tiny_overrides
from test_faults import sealed_run  # noqa: F401  (the fixture: an uninterrupted fine-tune)

from dwbench.data.embedded import generate_embedded_task
from dwbench.data.loading import MAX_RECORD_CHARS
from dwbench.lora import fine_tune

# `python -m dwbench`, killed (SIGKILL) right after the stage named by DWBENCH_KILL_AFTER
# renames its output into place: the moment before its MLflow run is given what it made.
KILLED_AFTER_COMMIT = """
import os, runpy, signal, sys
from contextlib import contextmanager
from dwbench.artifacts import ArtifactStore

commit = ArtifactStore.writing


@contextmanager
def writing(self, stage, key):
    with commit(self, stage, key) as staged:
        yield staged
    if stage == os.environ["DWBENCH_KILL_AFTER"]:
        os.kill(os.getpid(), signal.SIGKILL)


ArtifactStore.writing = writing
sys.argv[0] = "dwbench"
runpy.run_module("dwbench", run_name="__main__", alter_sys=True)
"""
SELECTION = [
    "method=random",
    "stages=[score,select]",
    "task.generator.pool_size=20",
    "task.generator.eval_size=5",
    "budget=0.5",
]
PER_STEP = ("train_loss_step", "learning_rate", "grad_norm")


def _stage_runs(results: Path, stage: str) -> list[dict[str, Any]]:
    """What MLflow holds of a stage's runs: status, metric names, points per metric, files."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results}/mlflow.db")
    experiment = client.get_experiment_by_name("dwbench")
    runs = client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}'")
    return [
        {
            "status": run.info.status,
            "points": {
                name: len(client.get_metric_history(run.info.run_id, name))
                for name in run.data.metrics
            },
            "files": sorted(f.path for f in client.list_artifacts(run.info.run_id)),
        }
        for run in runs
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama_dir, cache_dir) -> dict[str, Path]:
    """The two cells the kills interrupt, each run once without a fault."""
    folders = {}
    for name, cell in (("selection", SELECTION), ("cell", tiny_overrides(tiny_llama_dir))):
        folders[name] = tmp_path_factory.mktemp(f"uninterrupted_{name}")
        run_in_process(cell, folders[name])
    return folders


@pytest.mark.parametrize(
    ("stage", "cell"),
    [("score", "selection"), ("select", "selection"), ("train", "cell"), ("evaluate", "cell")],
)
def test_a_kill_right_after_a_stage_commits_leaves_nothing_unlogged(
    stage: str, cell: str, uninterrupted, tiny_llama_dir, tmp_path, cache_dir
) -> None:
    """The probe's case: killed between the commit and the MLflow logging, the train run stayed
    RUNNING with no metrics or loss curve and the evaluation run had no samples, as the rerun
    reused the output and logged nothing. Now the rerun logs what the run lacks, once."""
    args = SELECTION if cell == "selection" else tiny_overrides(tiny_llama_dir)
    results = tmp_path / "results"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_COMMIT, f"results_dir={results}", *args],
        cwd=REPO,
        env={
            **os.environ,
            "DWBENCH_CACHE": str(cache_dir),
            "HF_HUB_OFFLINE": "1",
            "DWBENCH_KILL_AFTER": stage,
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [run["status"] for run in _stage_runs(results, stage)] == ["RUNNING"]
    again = run_cli(args, results, cache_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "its MLflow run" in again.stderr and "logging what it lacks" in again.stderr
    assert _stage_runs(results, stage) == _stage_runs(uninterrupted[cell], stage)
    if stage == "train":
        (run,) = _stage_runs(results, stage)
        assert all(run["points"][name] == 3 for name in PER_STEP)  # finetune.max_steps=3


def test_a_resumed_fine_tunes_log_states_the_loss_of_every_step(
    sealed_run,  # noqa: F811
    tmp_path: Path,
) -> None:
    """train_log.json's closing entry held the trainer's loss of the steps after the resume;
    an uninterrupted run's holds that of every step, as the stage's marker does."""
    scratch = tmp_path / "scratch"
    shutil.copytree(sealed_run.checkpoints / "checkpoint-4", scratch / "checkpoint-4")
    stats = fine_tune(sealed_run.recipe, sealed_run.subset, scratch, tmp_path / "adapter")
    assert stats["resumed"]
    closing = stats["log_history"][-1]
    assert "train_runtime" in closing and closing["train_loss"] == stats["train_loss"]


def _record(index: int) -> dict[str, Any]:
    a, b = index + 2, 3 * index + 1
    return {"id": f"r{index}", "question": f"What is {a} + {b}?", "answer": f"#### {a + b}"}


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _with(index: int, **fields: Any) -> list[dict[str, Any]]:
    records = [_record(i) for i in range(24)]
    records[index] = {**records[index], **fields}
    return records


OWN_DATA = [
    "task=gsm8k",
    "method=random",
    "stages=[score,select]",
    "budget=0.5",
]
BOM = b"\xef\xbb\xbf"
POOL = [_record(i) for i in range(24)]
# name -> (train file, test file, overrides, the line expected; None: the run finishes)
DATA_FILES = {
    "NaN question in the pool": (
        ("train.jsonl", _jsonl(_with(3, question=float("nan")))),
        None,
        [],
        "train.jsonl: record 3 field 'question' is nan (JSON NaN or Infinity",
    ),
    "NaN question in the evaluation split": (
        None,
        ("test.jsonl", _jsonl(_with(1, question=float("nan"))[:6])),
        [],
        "test.jsonl: record 1 field 'question' is nan (JSON NaN or Infinity",
    ),
    "NaN id": (
        ("train.jsonl", _jsonl(_with(5, id=float("nan")))),
        None,
        ["task.fields.id=id"],
        "train.jsonl: record 5 field 'id' is nan (JSON NaN or Infinity",
    ),
    "null id": (
        ("train.jsonl", _jsonl(_with(5, id=None))),
        None,
        ["task.fields.id=id"],
        "train.jsonl: record 5 field 'id' (task.fields.id) is null",
    ),
    "a line no model can read": (
        ("train.jsonl", _jsonl(_with(7, question="x" * MAX_RECORD_CHARS))),
        None,
        [],
        f"train.jsonl: record 7 is {MAX_RECORD_CHARS + len(_record(7)['answer']):,} characters",
    ),
    "byte order mark, JSON Lines": (("train.jsonl", BOM + _jsonl(POOL)), None, [], None),
    "byte order mark, JSON array": (
        ("train.json", BOM + json.dumps(POOL).encode()),
        None,
        [],
        None,
    ),
    "byte order marks of two joined files": (
        ("train.jsonl", BOM + _jsonl(POOL[:12]) + BOM + _jsonl(POOL[12:])),
        None,
        [],
        None,
    ),
    "noise share corrupting none of the pool": (
        None,
        None,
        ["task.noise.share=0.01"],
        "task.noise.share=0.01 of the 24-example pool corrupts none of it (round(0.01 x 24) = "
        "0); pass a share from 0.0417 to 0.958",
    ),
    "noise share corrupting all of the pool": (
        None,
        None,
        ["task.noise.share=0.99"],
        "task.noise.share=0.99 of the 24-example pool corrupts all of it",
    ),
}


def _data_folder(folder: Path, train: Any, test: Any) -> Path:
    folder.mkdir()
    for default, given in (("train.jsonl", train), ("test.jsonl", test)):
        name, content = given or (default, _jsonl(POOL if default == "train.jsonl" else POOL[:6]))
        (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize("case", list(DATA_FILES))
def test_own_data_files_are_read_as_written_or_refused_in_one_line(
    case: str, tmp_path: Path, cache_dir: Path
) -> None:
    """NaN in a field read became the text 'nan' (a prompt, an id), a null id 'None'; a 50 MB
    line ran the evaluation out of memory with no message; a byte order mark was 'malformed
    JSON', of a JSON array 'because it does not start with ['; a noise share rounding to none or
    all of the pool was planted as asked. Now each loads as without the fault, or stops with one
    line naming the file, the record and the field, before anything is written."""
    train, test, overrides, expected = DATA_FILES[case]
    data = _data_folder(tmp_path / "data", train, test)
    results = tmp_path / "results"
    done = run_cli([*OWN_DATA, f"task.path={data}", *overrides], results, cache_dir)
    assert "Traceback" not in done.stderr
    if expected is not None:
        assert done.returncode == 2, done.stderr[-2000:]
        assert expected in done.stderr, done.stderr[-2000:]
        assert not results.exists()
        return
    assert done.returncode == 0, done.stderr[-2000:]
    plain = _data_folder(tmp_path / "plain", None, None)
    again = run_cli([*OWN_DATA, f"task.path={plain}"], tmp_path / "plain_results", cache_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    keys = [
        sorted(p.name for p in (folder / "artifacts" / "prepare").iterdir())
        for folder in (results, tmp_path / "plain_results")
    ]
    assert keys[0] == keys[1]  # the same prepare key: the same data, by its fingerprint


def _reference(folder: Path, episodes: int = 4) -> Path:
    """A reference folder in the traced format: the pool of tests/test_released.py's run, as
    many episode lines of the right shape as asked, and every pool record's final score."""
    records, _ = generate_embedded_task(seed=0, pool_size=12, eval_size=1, corrupt_share=0.3)
    folder.mkdir()
    settings = {
        "dataset": "gsm8k",
        "model_type": "qwen",
        "batch_train": 3,
        "batch_test": 2,
        "attn_layer": 1,
        "max_token": 1000,
        "dtype": "float32",
        "query_source": "pool_kfold",
        "k_folds": 2,
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    (folder / "pool.json").write_text(json.dumps(records))
    empty = {
        "demo_indices": [],
        "query_indices": [],
        "prompt_token_ids": [],
        "generated_token_ids": [],
        "parsed_predictions": [],
        "attention_weights_raw": [],
        "attention_weights_normalised": [],
    }
    lines = [json.dumps({"episode": i, **empty}) for i in range(episodes)]
    (folder / "episodes.jsonl").write_text("".join(line + "\n" for line in lines))
    rows = "".join(f"{i},0.1,{i}\n" for i in range(len(records)))
    (folder / "scores.csv").write_text("pool_index,score,released_rank\n" + rows)
    return folder


def _cut(name: str, keep: int) -> Any:
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:keep])


def _without_setting(folder: Path) -> None:
    settings = json.loads((folder / "settings.json").read_text())
    del settings["batch_train"]
    (folder / "settings.json").write_text(json.dumps(settings))


def _lines(name: str, keep: int) -> Any:
    def damage(folder: Path) -> None:
        lines = (folder / name).read_text().splitlines(keepends=True)
        (folder / name).write_text("".join(lines[:keep]))

    return damage


REFERENCES = {
    "settings.json cut short": (_cut("settings.json", 40), "settings.json cannot be read as JSON"),
    "settings.json without batch_train": (_without_setting, "settings.json has no batch_train"),
    "pool.json cut short": (_cut("pool.json", 300), "pool.json cannot be read as JSON"),
    "pool.json an object": (
        lambda folder: (folder / "pool.json").write_text('{"a": 1}'),
        "pool.json holds a JSON dict, not the list the traced run writes",
    ),
    "episodes.jsonl cut in a line": (
        lambda folder: (folder / "episodes.jsonl").write_text(
            (folder / "episodes.jsonl").read_text()[:-20]
        ),
        "episodes.jsonl, line 4: not JSON",
    ),
    "episodes.jsonl with fewer episodes than the plan": (
        _lines("episodes.jsonl", 2),
        "episodes.jsonl has no episode 2 of the 4 to compare (2 traced: a run stopped early?); "
        "compare the 2 traced with --episodes 2",
    ),
    "scores.csv empty": (_cut("scores.csv", 0), "scores.csv cannot be read as CSV"),
    # the silent case: a cut scores.csv compared 3 of 12 scores and said `parity: OK`
    "scores.csv cut to 3 rows": (
        _lines("scores.csv", 4),
        "scores.csv holds 3 rows, not one finite score and rank for each of the 12 records",
    ),
    "scores.csv without pool_index": (
        lambda folder: (folder / "scores.csv").write_text("index,score,released_rank\n0,0.1,0\n"),
        "scores.csv has no column pool_index (it needs pool_index, score, released_rank)",
    ),
}


@pytest.mark.parametrize("case", list(REFERENCES))
def test_parity_on_an_incomplete_reference_is_one_line(
    case: str, tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Before: a traceback (JSONDecodeError, KeyError, EmptyDataError, AttributeError), 'the
    reference has no episode N' after scoring every episode, or `parity: OK` on 3 of 12
    scores. Now one line naming the file and the fix, exit 2, before any episode is scored."""
    from dwbench.bench.__main__ import main

    damage, expected = REFERENCES[case]
    reference = _reference(tmp_path / "reference")
    damage(reference)
    argv = ["parity", "--reference", str(reference), "--out", str(tmp_path / "out")]
    argv += ["-o", f"selector_model.path={tiny_llama_dir}", "-o", "selector_model.num_layers=2"]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not (tmp_path / "out").exists()


def test_reading_an_empty_store_file_leaves_it_empty(tmp_path: Path) -> None:
    """A 0-byte mlflow.db (a copy cut short, a `touch`): readers (status, plan, the report) see
    no runs and leave it as it was; MLflow would have written its tables into it."""
    from dwbench.sweep.progress import store_runs

    db = tmp_path / "mlflow.db"
    db.touch()
    assert store_runs(f"sqlite:///{db}").empty
    assert db.stat().st_size == 0 and sorted(tmp_path.iterdir()) == [db]
