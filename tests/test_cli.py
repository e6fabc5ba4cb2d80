"""The real CLI in subprocesses, on a tiny random-weight model built in the test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import forked_cli
import mlflow
import pytest

REPO = Path(__file__).resolve().parent.parent


def tiny_overrides(model_dir: Path) -> list[str]:
    """Point both model roles at the tiny model and shrink everything to seconds."""
    model = [
        f"path={model_dir}",
        "name=tiny_llama",
        "id=tiny/llama",
        "embedded=null",
        "attention_layer=1",
        "num_layers=2",
    ]
    return [
        *(f"selector_model.{m}" for m in model),
        *(f"target_model.{m}" for m in model),
        "task.generator.pool_size=24",
        "task.generator.eval_size=4",
        "budget=0.5",
        "finetune.batch_size=4",
        "finetune.runtime.micro_batch_size=4",
        "finetune.max_steps=3",
        "eval.max_new_tokens=8",
        "eval.runtime.batch_size=4",
    ]


def _cli(
    args: list[str], results: Path, cache_dir: Path, multirun: bool = False, cwd: Path = REPO
) -> dict:
    """What `python -m dwbench [-m]` needs to run offline on this test run's model cache."""
    flags = ["-m"] if multirun else []
    return {
        "command": [sys.executable, "-m", "dwbench", *flags, f"results_dir={results}", *args],
        "cwd": cwd,
        "env": {**os.environ, "DWBENCH_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"},
    }


def run_cli(
    args: list[str], results: Path, cache_dir: Path, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """`python -m dwbench` in `cwd`, its output captured (forked: tests/forked_cli.py)."""
    return forked_cli.run(**_cli(args, results, cache_dir, cwd=cwd), timeout=600)


def run_in_process(args: list[str], results: Path) -> Any:
    """A cell run by `pipeline.run` in this test process: what `python -m dwbench` runs, without
    a new process's imports, for tests whose subject comes after it (a damaged output, a rerun)."""
    from hydra import compose, initialize_config_dir

    from dwbench import pipeline
    from dwbench.config_files import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*args, f"results_dir={results}"])
    return pipeline.run(cfg)


def start_cli(args: list[str], results: Path, cache_dir: Path, **streams: Any) -> Any:
    """`python -m dwbench` in the background, for tests that interrupt it; `streams` are
    Popen's stdout and stderr (forked: tests/forked_cli.py)."""
    return forked_cli.popen(**_cli(args, results, cache_dir), **streams)


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, ended: str) -> None:
    """Poll until `condition()` holds; `ended` is the failure if the process ends first."""
    deadline = time.time() + 300
    while not condition():
        assert process.poll() is None, ended
        assert time.time() < deadline
        time.sleep(0.05)


def resumable_training(model_dir: Path) -> list[str]:
    """A cell whose training writes a checkpoint every two of its 16 steps; it stops after
    training, which is all the fault tests look at."""
    return [
        *tiny_overrides(model_dir),
        "stages=[score,select,train]",
        "finetune.max_steps=16",
        "finetune.runtime.save_every_steps=2",
        "task.generator.pool_size=64",
    ]


def a_checkpoint_in(results: Path) -> Callable[[], bool]:
    return lambda: bool(list((results / "artifacts" / "train").glob(".partial-*/checkpoint-*")))


def runs_of(results: Path) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results}/mlflow.db")
    experiment = client.get_experiment_by_name("dwbench")
    return client.search_runs([experiment.experiment_id])


def finished_keys(results: Path, stage: str) -> dict[str, float]:
    """stage key -> time its marker was written."""
    return {
        p.parent.name: p.stat().st_mtime
        for p in (results / "artifacts" / stage).glob("*/_SUCCESS.json")
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama_dir, cache_dir):
    results = tmp_path_factory.mktemp("results")
    first = run_cli(tiny_overrides(tiny_llama_dir), results, cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    return results, first


def test_end_to_end_writes_artifacts_runs_and_table(finished_run) -> None:
    results, first = finished_run
    for stage in ("prepare", "score", "select", "train", "evaluate"):
        assert len(finished_keys(results, stage)) == 1, stage
    evaluate_dir = next((results / "artifacts" / "evaluate").glob("*/"))
    lm_eval = json.loads((evaluate_dir / "lm_eval_results.json").read_text())
    assert "results" in lm_eval
    selected = json.loads(
        next((results / "artifacts/select").glob("*/selected_ids.json")).read_text()
    )
    assert len(selected) == 12
    runs = runs_of(results)
    stages = sorted(r.data.tags["stage"] for r in runs)
    assert stages == ["cell", "evaluate", "score", "select", "train"]
    evaluation = next(r for r in runs if r.data.tags["stage"] == "evaluate")
    assert evaluation.info.status == "FINISHED"
    for tag in ("task", "method", "budget", "selector", "target", "seed", "stage_key", "git_sha"):
        assert evaluation.data.tags[tag], tag
    assert evaluation.data.tags["full_train_s_source"] == "estimated"
    metrics = evaluation.data.metrics
    assert 0.0 <= metrics["score"] <= 1.0 and 0.0 <= metrics["selection_precision"] <= 1.0
    assert metrics["STR"] == pytest.approx(metrics["selection_s"] / metrics["full_train_s"])
    assert metrics["adapter_logit_change"] > 0
    assert "random" in first.stdout and "selection precision" in first.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in first.stdout


def test_mlflow_groups_a_cell_under_one_named_parent(finished_run) -> None:
    """The parent run: its name, nested stage runs, config, selected ids, datasets, summary;
    the train run's loss and learning rate per step."""
    results, _ = finished_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results}/mlflow.db")
    runs = runs_of(results)
    (cell,) = [r for r in runs if r.data.tags["stage"] == "cell"]
    assert cell.info.run_name == "embedded_gsm / random / 0.5 / tiny_llama -> tiny_llama / seed 0"
    assert cell.info.status == "FINISHED" and cell.data.tags["cell_key"]
    for run in runs:
        if run is not cell:
            assert run.data.tags["mlflow.parentRunId"] == cell.info.run_id
    artifacts = {a.path for a in client.list_artifacts(cell.info.run_id)}
    assert {"config.yaml", "selected_ids.json"} <= artifacts
    inputs = {(d.dataset.name, d.tags[0].value) for d in cell.inputs.dataset_inputs}
    assert inputs == {("embedded_gsm-pool", "training"), ("embedded_gsm-eval", "evaluation")}
    assert 0.0 <= cell.data.metrics["score"] <= 1.0 and "STR" in cell.data.metrics
    train = next(r for r in runs if r.data.tags["stage"] == "train")
    losses = client.get_metric_history(train.info.run_id, "train_loss_step")
    rates = client.get_metric_history(train.info.run_id, "learning_rate")
    assert [m.step for m in losses] == [1, 2, 3] and len(rates) == 3  # finetune.max_steps=3


def test_the_cell_run_says_where_its_time_went(finished_run) -> None:
    """Every phase of dwbench.timing on the cell run; they add up to the cell's wall time, and
    the phases a fresh cell cannot skip took time."""
    from dwbench.timing import PHASES, from_metrics

    results, first = finished_run
    (cell,) = [r for r in runs_of(results) if r.data.tags["stage"] == "cell"]
    seconds = from_metrics(cell.data.metrics)
    assert set(seconds) == {*PHASES, "total"}
    assert sum(seconds[p] for p in PHASES) == pytest.approx(seconds["total"], abs=0.01)
    for phase in ("startup", "prepare", "load", "train", "evaluate", "log"):
        assert seconds[phase] > 0, phase
    assert "time: " in first.stderr and "total" in first.stderr


def test_the_rerun_benchmark_finds_a_cells_selection_with_or_without_its_cache(
    finished_run, tmp_path
) -> None:
    """`bench rerun --stores` reads the ids the select stage wrote and, once that cache is
    cleared, the select run's MLflow copy of them; reading a store leaves MLflow's global
    tracking URI alone (it is exported to every later child process)."""
    from dwbench.bench.rerun import Selections

    results, _ = finished_run
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    evaluation = next(r for r in runs_of(results) if r.data.tags["stage"] == "evaluate")
    written = results / "artifacts/select" / evaluation.data.tags["select_key"]
    chosen = sorted(json.loads((written / "selected_ids.json").read_text()))
    assert len(chosen) == 12
    assert Selections(results).of(evaluation.info.run_id) == chosen
    cleared = tmp_path / "results"
    shutil.copytree(results, cleared, ignore=shutil.ignore_patterns("select", "mlflow.db*"))
    # The live store through SQLite's backup: a plain file copy would open and close the
    # database file beside this process's open connection, and POSIX drops that connection's
    # locks with it, so the next cell's writes to the store were lost.
    with (
        sqlite3.connect(results / "mlflow.db") as live,
        sqlite3.connect(cleared / "mlflow.db") as copy,
    ):
        live.backup(copy)
    live.close()
    copy.close()
    assert not (cleared / "artifacts/select").exists()
    assert Selections(cleared).of(evaluation.info.run_id) == chosen
    assert Selections(cleared).of("not-a-run") is None
    assert Selections(tmp_path / "empty").of(evaluation.info.run_id) is None
    assert os.environ.get("MLFLOW_TRACKING_URI") == exported


def test_rerun_skips_finished_stages_and_reuses_runs(
    finished_run, tiny_llama_dir, cache_dir
) -> None:
    results, _ = finished_run
    before = {s: finished_keys(results, s) for s in ("score", "select", "train", "evaluate")}
    again = run_cli(tiny_overrides(tiny_llama_dir), results, cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {s: finished_keys(results, s) for s in before} == before
    assert len(runs_of(results)) == 5  # the cell's parent run and its four stage runs


def test_budget_one_measures_str_denominator(finished_run, tiny_llama_dir, cache_dir) -> None:
    results, _ = finished_run
    full = run_cli([*tiny_overrides(tiny_llama_dir), "budget=1.0"], results, cache_dir)
    assert full.returncode == 0, full.stderr[-3000:]
    evaluations = [r for r in runs_of(results) if r.data.tags["stage"] == "evaluate"]
    full_run = next(r for r in evaluations if r.data.tags["budget"] == "1.0")
    assert full_run.data.tags["full_train_s_source"] == "measured"
    assert full_run.data.metrics["full_train_s"] == pytest.approx(full_run.data.metrics["train_s"])


def test_budget_zero_evaluates_the_untuned_model(finished_run, tiny_llama_dir, cache_dir) -> None:
    """Zero-shot: one new evaluation of the base model; nothing scored, selected or trained."""
    results, _ = finished_run
    before = {s: finished_keys(results, s) for s in ("score", "select", "train", "evaluate")}
    zero = run_cli([*tiny_overrides(tiny_llama_dir), "budget=0"], results, cache_dir)
    assert zero.returncode == 0, zero.stderr[-3000:]
    after = {s: finished_keys(results, s) for s in before}
    assert {s: after[s] for s in ("score", "select", "train")} == {
        s: before[s] for s in ("score", "select", "train")
    }
    (new_key,) = set(after["evaluate"]) - set(before["evaluate"])
    marker = json.loads((results / "artifacts/evaluate" / new_key / "_SUCCESS.json").read_text())
    assert "adapter_logit_change" not in marker  # no adapter to check
    evaluation = next(
        r
        for r in runs_of(results)
        if r.data.tags["stage"] == "evaluate" and r.data.tags["stage_key"] == new_key
    )
    assert evaluation.data.tags["method"] == "zero_shot"
    assert evaluation.data.params["train_key"] == "none (zero-shot)"
    metrics = evaluation.data.metrics
    assert metrics["STR"] == 0.0 and metrics["train_s"] == 0.0 and "full_train_s" not in metrics
    assert metrics["score"] == marker["score"] and metrics["eval_s"] > 0
    assert "zero_shot" in zero.stdout
    again = run_cli([*tiny_overrides(tiny_llama_dir), "budget=0"], results, cache_dir)
    assert again.returncode == 0 and finished_keys(results, "evaluate") == after["evaluate"]


def test_stages_list_stops_after_selection(tmp_path, tiny_llama_dir, cache_dir) -> None:
    done = run_cli([*tiny_overrides(tiny_llama_dir), "stages=[score,select]"], tmp_path, cache_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Stopped after stage 'select'" in done.stdout
    assert finished_keys(tmp_path, "select") and not (tmp_path / "artifacts" / "train").exists()
    scores = next((tmp_path / "artifacts/score").glob("*/scores.csv")).read_text().splitlines()
    assert scores[0] == "id,score" and len(scores) == 25


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("budget=1.5", "budget=1.5 is not a share in [0, 1]"),
        ("budget=0.01", "selects nothing"),
        ("budget=0", "leaves out evaluate"),  # with stages=[score,select] below
        ("method.name=randon", "Did you mean: random"),
        ("stages=[score,trian]", "unknown stage"),
        ("task.generator.corrupt_share=1.5", "task.generator.corrupt_share"),
    ],
)
def test_bad_input_is_one_clear_message(
    finished_run, tiny_llama_dir, cache_dir, override, message
) -> None:
    results, _ = finished_run
    before = {s: finished_keys(results, s) for s in ("score", "select", "train", "evaluate")}
    extra = ["stages=[score,select]"] if override == "budget=0" else []
    bad = run_cli([*tiny_overrides(tiny_llama_dir), override, *extra], results, cache_dir)
    assert bad.returncode != 0
    assert message in bad.stderr and "Traceback" not in bad.stderr
    assert {s: finished_keys(results, s) for s in before} == before


def test_missing_local_task_folder_names_the_file(tmp_path, tiny_llama_dir, cache_dir) -> None:
    bad = run_cli(["task=gsm8k", f"task.path={tmp_path}/nope"], tmp_path, cache_dir)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


def test_unknown_names_and_keys_are_rejected(tmp_path, cache_dir) -> None:
    for override, message in [("task=gsm9k", "gsm9k"), ("bugdet=0.1", "bugdet")]:
        bad = run_cli([override], tmp_path, cache_dir)
        assert bad.returncode != 0 and message in bad.stderr


def test_headline_experiment_fails_fast_without_gpu(tmp_path, cache_dir) -> None:
    start = time.perf_counter()
    result = run_cli(["+experiment=gsm8k_10pct"], tmp_path, cache_dir)
    assert result.returncode == 2
    assert "GPU" in result.stderr and "Traceback" not in result.stderr
    assert "Meta-Llama-3-8B-Instruct" in result.stderr
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "artifacts").exists()


def test_cfg_job_prints_the_resolved_config(tmp_path, cache_dir) -> None:
    shown = run_cli(["+experiment=gsm8k_10pct", "--cfg", "job"], tmp_path, cache_dir)
    assert shown.returncode == 0
    assert "meta-llama/Meta-Llama-3-8B-Instruct" in shown.stdout and "budget: 0.1" in shown.stdout


def test_sigkill_mid_training_resumes_without_redoing_work(
    tmp_path, tiny_llama_dir, cache_dir
) -> None:
    args = resumable_training(tiny_llama_dir)
    process = start_cli(
        args, tmp_path, cache_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_until(a_checkpoint_in(tmp_path), process, "finished before a checkpoint was seen")
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not finished_keys(tmp_path, "train")
    scored_before = finished_keys(tmp_path, "score")
    assert scored_before

    resumed = run_cli(args, tmp_path, cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert finished_keys(tmp_path, "score") == scored_before
    train_marker = json.loads(
        next((tmp_path / "artifacts/train").glob("*/_SUCCESS.json")).read_text()
    )
    assert train_marker["resumed"] is True and train_marker["steps"] == 16
    train_runs = [r for r in runs_of(tmp_path) if r.data.tags["stage"] == "train"]
    assert len(train_runs) == 1 and train_runs[0].info.status == "FINISHED"
    assert not list((tmp_path / "artifacts" / "train").glob(".partial-*"))


def test_a_bad_cell_of_a_local_multirun_does_not_stop_the_others(tmp_path, cache_dir) -> None:
    """The bad cell comes first; the good one still runs; the end lists the bad one, exit 2."""
    cells = [
        "method=random",
        "budget=0.0001,0.5",
        "task.generator.pool_size=20",
        "task.generator.eval_size=2",
        "stages=[score,select]",
    ]
    done = forked_cli.run(**_cli(cells, tmp_path, cache_dir, multirun=True), timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "1 cell(s) stopped on bad input" in done.stderr
    listed = done.stderr.split("stopped on bad input:")[1]
    assert "budget=0.0001" in listed and "budget=0.5" not in listed
    assert len(list((tmp_path / "artifacts" / "select").glob("*/_SUCCESS.json"))) == 1
    assert "Traceback" not in done.stderr
