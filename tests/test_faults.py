"""Faults never turn into wrong results or stuck cells: checkpoints cut short are skipped, times
and losses add up across attempts, and two identical commands do the work once."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import forked_cli
import pytest
from test_cli import REPO, runs_of, start_cli, tiny_overrides, wait_until
from test_data_whisperer import _method, _pool

from dwbench.lora import CHECKPOINT_FILES, last_complete_checkpoint, mean_training_loss
from dwbench.methods.data_whisperer import episodes as ep


def _checkpoint(scratch: Path, step: int, files: tuple[str, ...] = CHECKPOINT_FILES) -> Path:
    folder = scratch / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_text("{}" if name.endswith(".json") else "x")
    return folder


def test_a_checkpoint_cut_short_is_set_aside_and_the_last_complete_one_used(tmp_path) -> None:
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4, files=("trainer_state.json",))  # a kill while saving
    (_checkpoint(tmp_path, 6) / "trainer_state.json").write_text('{"glob')  # a full disk
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".incomplete-checkpoint-4",
        ".incomplete-checkpoint-6",
        "checkpoint-2",
    ]
    assert last_complete_checkpoint(tmp_path / "none") is None


def test_the_training_loss_covers_every_step_of_every_attempt() -> None:
    history = [{"loss": 1.0, "step": 1}, {"loss": 0.5, "step": 2}, {"train_runtime": 3.0}]
    assert mean_training_loss(history, this_attempt=0.5) == 0.75
    assert mean_training_loss([], this_attempt=0.25) == 0.25


def test_a_resumed_data_whisperer_counts_the_earlier_attempts_episodes(
    tmp_path: Path, tiny_qwen2_dir: Path, tiny_model_cfg: Callable[..., dict[str, Any]]
) -> None:
    selector = tiny_model_cfg(tiny_qwen2_dir, "qwen2")
    settings = {
        "n_demos": 3,
        "n_queries": 2,
        "max_new_tokens_per_answer": 2,
        "runtime": {"prompts_per_call": 4},  # several episodes per generate call
    }
    _method(tmp_path, selector, **settings).score(_pool(12))
    log = tmp_path / ep.CHECKPOINT_FILE
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:3]) + "\n")  # a kill after two episodes of the call
    kept = [json.loads(line)["seconds"] for line in lines[1:3]]
    again = _method(tmp_path, selector, **settings)
    again.score(_pool(12))
    assert again.stats["resumed_episodes"] == 2
    assert again.stats["resumed_seconds"] == pytest.approx(sum(kept))


def test_two_identical_commands_do_the_work_once(tmp_path: Path, tiny_llama_dir, cache_dir):
    args = [
        *tiny_overrides(tiny_llama_dir),
        "method=data_whisperer_separate",
        "stages=[score,select]",
        "task.generator.pool_size=48",
        "method.n_demos=3",
        "method.n_queries=2",
        "task.answer_max_tokens=16",
    ]
    ended = "the command ended before the awaited moment"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    # The second command starts while the first is frozen mid-scoring (SIGSTOP), so it finds
    # the stage taken whatever the machine's load, and waits; then the first goes on.
    first = start_cli(args, tmp_path, cache_dir, stderr=logs[0].open("w"))
    episodes = tmp_path / "artifacts" / "score"
    wait_until(
        lambda: any(
            len(p.read_text().splitlines()) > 1 for p in episodes.glob(".partial-*/episodes.jsonl")
        ),
        first,
        ended,
    )
    first.send_signal(signal.SIGSTOP)
    try:
        second = start_cli(args, tmp_path, cache_dir, stderr=logs[1].open("w"))
        waiting = "being computed by another process"
        wait_until(lambda: waiting in logs[1].read_text(), second, ended)
    finally:
        first.send_signal(signal.SIGCONT)
    for process in (first, second):
        process.wait(timeout=600)
    outputs = [log.read_text() for log in logs]
    assert first.returncode == second.returncode == 0, outputs
    scores = [r for r in runs_of(tmp_path) if r.data.tags["stage"] == "score"]
    assert len(scores) == 1 and scores[0].info.status == "FINISHED"
    episodes = (next((tmp_path / "artifacts" / "score").glob("*/episodes.jsonl"))).read_text()
    assert len(episodes.splitlines()) == 1 + 16  # the header and each episode once


def test_a_read_only_results_folder_serves_finished_results(tmp_path: Path, cache_dir) -> None:
    """Mounted read-only (a bind mount; skipped where mounting is not allowed): the finished
    cell is served, status works, and a cell that needs computing says so in one line."""
    from test_cli import run_cli, run_in_process

    cell = [
        "method=random",
        "stages=[score,select]",
        "task.generator.pool_size=20",
        "task.generator.eval_size=5",
        "budget=0.5",
    ]
    results = tmp_path / "results"
    run_in_process(cell, results)
    view = tmp_path / "read_only"
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(results), str(view)]).returncode:
        pytest.skip("bind mounts are not allowed here")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(view)])
        if remount.returncode:
            pytest.skip("read-only remounts are not allowed here")
        served = run_cli(cell, view, cache_dir)
        assert served.returncode == 0, served.stderr[-2000:]
        assert "is read-only: finished results are served" in served.stderr
        missing = run_cli([*cell, "budget=0.25"], view, cache_dir)
        assert missing.returncode == 2
        assert "must be computed, but" in missing.stderr and "Traceback" not in missing.stderr
        status = forked_cli.run(
            [sys.executable, "-m", "dwbench.status", *cell, f"results_dir={view}"],
            cwd=REPO,
            env={**os.environ, "DWBENCH_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"},
            timeout=300,
        )
        assert status.returncode == 0, status.stderr[-2000:]
        assert "1 done" in status.stdout
    finally:
        subprocess.run(["umount", str(view)])


def test_a_full_disk_during_training_resumes_once_space_is_back(
    tmp_path: Path, tiny_llama_dir, cache_dir
) -> None:
    """A small tmpfs (skipped where mounting is not allowed) is filled up while the cell trains:
    the run stops with one line naming the full disk (not the checkpoint's OSError and MLflow's
    chained SQLite errors), and once space is back the rerun resumes from the last complete
    checkpoint and ends with the train_loss of an uninterrupted run."""
    from test_cli import (
        a_checkpoint_in,
        finished_keys,
        resumable_training,
        run_cli,
        run_in_process,
        start_cli,
    )

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    args = resumable_training(tiny_llama_dir)
    results = disk / "results"
    try:
        process = start_cli(
            args, results, cache_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_until(a_checkpoint_in(results), process, "finished before a checkpoint was seen")
        filler = disk / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
        failed = process.communicate(timeout=300)[1]
        assert process.returncode == 1, "training went on with a full disk"
        said = [line for line in failed.splitlines() if "dwbench:" in line]  # after a progress bar
        assert len(said) == 1 and "Traceback" not in failed, failed[-3000:]
        assert f"dwbench: the disk is full, writing under results_dir={results}" in said[0]
        assert "finished stages and complete checkpoints are kept" in said[0]
        assert not finished_keys(results, "train")
        filler.unlink()
        resumed = run_cli(args, results, cache_dir)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        marker = json.loads(next((results / "artifacts/train").glob("*/_SUCCESS.json")).read_text())
        assert marker["resumed"] is True and marker["steps"] == 16
    finally:
        subprocess.run(["umount", str(disk)])
    run_in_process(args, tmp_path / "clean")  # the reference: the same cell, uninterrupted
    uninterrupted = json.loads(
        next((tmp_path / "clean/artifacts/train").glob("*/_SUCCESS.json")).read_text()
    )
    assert marker["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-6)


def _raised(error: BaseException, during: BaseException | None = None) -> BaseException:
    """`error` as Python leaves it when raised while `during` was being handled."""
    try:
        try:
            if during is not None:
                raise during
        finally:
            raise error
    except BaseException as caught:  # noqa: BLE001 - the test wants the chained object
        return caught


def test_a_disk_problem_deep_in_a_chain_is_one_line_naming_the_path_and_the_fix(
    tmp_path: Path,
) -> None:
    """What a full disk raised in training: the checkpoint's OSError (no file name), then
    MLflow's SQLite error marking the run FAILED, wrapped twice, raised in its place."""
    import sqlite3

    from dwbench.storage import storage_problem

    results, cache = tmp_path / "results", tmp_path / "cache"
    folders = {"results_dir": results, "cache_dir": cache}
    database = results / "mlflow.db"

    def store_full() -> BaseException:  # MlflowException(OperationalError(sqlite3's error))
        wrapped = RuntimeError("(sqlite3.OperationalError) database or disk is full")
        wrapped.__cause__ = sqlite3.OperationalError("database or disk is full")
        return wrapped

    chain = _raised(store_full(), during=OSError(errno.ENOSPC, "No space left on device"))
    problem = str(storage_problem(chain, folders, database, resumes=True))
    assert problem.startswith(f"the disk is full, writing under results_dir={results} (no space")
    assert problem.endswith("so it goes on where it stopped.")
    # SQLite's text alone: the store is named
    assert f"writing {database} (no space" in str(storage_problem(store_full(), folders, database))
    denied = PermissionError(errno.EACCES, "Permission denied", str(cache / "models" / "x"))
    assert str(storage_problem(_raised(ValueError("x"), during=denied), folders)) == (
        f"cannot write {cache / 'models' / 'x'} (permission denied). Point cache_dir at a folder "
        "you can write, or make this one writable, and run the command again."
    )
    assert storage_problem(_raised(ValueError("a bug"), during=KeyError("k")), folders) is None
    assert storage_problem(OSError(errno.ENOENT, "No such file", "x"), folders) is None


def test_mlflows_logged_copy_of_a_disk_error_is_dropped() -> None:
    """MLflow logs a store error with its traceback, then raises it: the command says a disk
    problem once, so only that copy goes; any other store error is still logged."""
    import logging
    import sqlite3

    from dwbench.storage import DropRaisedStorageErrors

    def record(error: BaseException) -> logging.LogRecord:
        return logging.LogRecord("mlflow", logging.ERROR, "", 0, "x", None, (None, error, None))

    drop = DropRaisedStorageErrors()
    assert not drop.filter(record(sqlite3.OperationalError("database or disk is full")))
    assert drop.filter(record(sqlite3.OperationalError("no such table: runs")))
