"""Faults never turn into wrong results or stuck cells: checkpoints cut short are skipped and the
rerun ends as an uninterrupted run, times and losses add up across attempts, and two identical
commands do the work once."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import forked_cli
import pytest
import torch
from test_cli import REPO, runs_of, start_cli, tiny_overrides, wait_until
from test_data_whisperer import _method, _pool

from dwbench import artifacts, lora
from dwbench.artifacts import SUCCESS_MARKER
from dwbench.data.records import Example
from dwbench.lora import Recipe, fine_tune, mean_training_loss
from dwbench.methods.data_whisperer import episodes as ep

# A fine-tune of 8 steps on the tiny Llama (4 per epoch, two micro-batches per step), sealing a
# checkpoint every 2 steps: seconds, yet every file the Trainer writes for a real resume.
FINETUNE = {
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
    "epochs": 2,
    "batch_size": 2,
    "lr": 1.0e-3,
    "scheduler": "cosine",
    "warmup_ratio": 0.1,
    "weight_decay": 0.0,
    "max_seq_len": 128,
    "max_steps": None,
    "runtime": {"micro_batch_size": 1, "bf16": False, "save_every_steps": 2},
}
STEPS = 8


@dataclass
class SealedRun:
    """An uninterrupted fine-tune: its adapter, and a copy of each checkpoint as sealed."""

    recipe: Recipe
    subset: list[Example]
    adapter: dict[str, torch.Tensor]
    checkpoints: Path  # checkpoint-2 ... checkpoint-8, each copied right after its seal


@pytest.fixture(scope="module")
def sealed_run(tmp_path_factory, tiny_llama_dir, tiny_model_cfg, cache_dir) -> SealedRun:
    from omegaconf import OmegaConf

    root = tmp_path_factory.mktemp("sealed_run")
    recipe = Recipe(tiny_model_cfg(tiny_llama_dir), OmegaConf.create(FINETUNE), 0, "cpu", cache_dir)
    subset = _pool(8)
    copies = root / "checkpoints"

    def seal_and_copy(folder: Path, marker: dict[str, Any]) -> None:
        artifacts.seal(folder, marker)
        shutil.copytree(folder, copies / folder.name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lora, "seal", seal_and_copy)
        stats = fine_tune(recipe, subset, root / "scratch", root / "adapter")
    assert stats["steps"] == STEPS and not stats["resumed"]
    assert [p.name for p in (root / "scratch").glob("checkpoint-*")] == [f"checkpoint-{STEPS}"]
    return SealedRun(recipe, subset, _adapter(root / "adapter"), copies)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _cut(path: Path) -> None:
    """Half the file is left, as after a power loss before the data reached the disk."""
    os.truncate(path, path.stat().st_size // 2)


def _flip(path: Path) -> None:
    """One byte changed in the middle, the size kept: a bad sector, a bad copy."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _unsealed(*gone: str) -> Callable[[Path], None]:
    """A kill while saving: no marker yet, and the files the Trainer had not written yet."""

    def damage(folder: Path) -> None:
        for name in (SUCCESS_MARKER, *gone):
            (folder / name).unlink()

    return damage


def _marker_of(step: int) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        marker = json.loads((folder / SUCCESS_MARKER).read_text())
        (folder / SUCCESS_MARKER).write_text(
            (folder.parent / f"checkpoint-{step}" / SUCCESS_MARKER).read_text()
        )
        assert marker["key"] == folder.name

    return damage


def _on(name: str, fault: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda folder: fault(folder / name)


# The checkpoints a kill (or a fault after it) leaves: step -> what happened to it (None:
# sealed and intact), and the step a rerun must resume from (None: the start).
FAULTS = {
    "the issue's case: latest optimizer.pt cut": ({6: _on("optimizer.pt", _cut)}, None),
    "killed before trainer_state.json": ({4: None, 6: _unsealed("trainer_state.json")}, 4),
    "killed before its marker": ({4: None, 6: _unsealed()}, 4),
    "killed while the optimizer was written": (
        {4: None, 6: _unsealed("trainer_state.json", "rng_state.pth", "scheduler.pt")},
        4,
    ),
    "latest adapter cut, the earlier one whole": (
        {4: None, 6: _on("adapter_model.safetensors", _cut)},
        4,
    ),
    "latest marker torn": ({6: None, 8: _on(SUCCESS_MARKER, _cut)}, 6),
    "a marker copied from another checkpoint": ({4: None, 6: _marker_of(4)}, 4),
    "a byte flipped in the latest rng state": ({2: None, 4: _on("rng_state.pth", _flip)}, 2),
    "latest scheduler.pt deleted": ({2: None, 4: _on("scheduler.pt", os.unlink)}, 2),
    "every checkpoint damaged": (
        {
            2: _on("scheduler.pt", os.unlink),
            4: _on("trainer_state.json", _flip),
            6: _unsealed("optimizer.pt"),
        },
        None,
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_rerun_after_a_fault_ends_with_the_uninterrupted_adapter(
    fault: str, sealed_run: SealedRun, tmp_path: Path, caplog
) -> None:
    """Whatever a kill or a fault left of the checkpoints, the rerun resumes from the newest
    complete one (or the start), sets the others aside, and ends with the very adapter of an
    uninterrupted run; before checkpoints were sealed, a cut optimizer.pt failed every rerun."""
    damaged, resume_step = FAULTS[fault]
    scratch = tmp_path / "scratch"
    for step in damaged:
        shutil.copytree(
            sealed_run.checkpoints / f"checkpoint-{step}", scratch / f"checkpoint-{step}"
        )
    for step, fault_of in damaged.items():
        if fault_of is not None:
            fault_of(scratch / f"checkpoint-{step}")
    with caplog.at_level(logging.INFO, logger="dwbench.lora"):
        stats = fine_tune(sealed_run.recipe, sealed_run.subset, scratch, tmp_path / "adapter")
    assert stats["steps"] == STEPS
    resumed = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    if resume_step is None:
        assert not stats["resumed"] and not resumed
    else:
        assert stats["resumed"] and f"checkpoint-{resume_step} " in resumed[0]
    newer = [s for s in damaged if resume_step is None or s > resume_step]
    assert len(list(scratch.glob(".damaged-checkpoint-*"))) == len(newer)
    incomplete = [r for r in caplog.records if "is incomplete" in r.getMessage()]
    assert len(incomplete) == len(newer)
    adapter = _adapter(tmp_path / "adapter")
    assert adapter.keys() == sealed_run.adapter.keys()
    for name, weight in sealed_run.adapter.items():
        assert torch.equal(adapter[name], weight), name


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


def test_a_data_whisperer_killed_mid_batch_resumes_to_the_same_bytes(
    tmp_path: Path, tiny_qwen2_dir: Path, tiny_model_cfg: Callable[..., dict[str, Any]]
) -> None:
    """Two episodes per call, killed when the second batch had finished one of its episodes:
    the resumed run's scores.csv is byte for byte the uninterrupted one's (it used to batch
    the pending episodes afresh, and 40 of 80 rows moved by up to 1e-6 of their value)."""
    selector = tiny_model_cfg(tiny_qwen2_dir, "qwen2")
    settings = {
        "n_demos": 3,
        "n_queries": 2,
        "max_new_tokens_per_answer": 2,
        "runtime": {"prompts_per_call": 2},
    }
    pool = _pool(24)  # 8 episodes: batches [0, 1], [2, 3], [4, 5], [6, 7]
    uninterrupted = _method(tmp_path / "whole", selector, **settings)
    whole = uninterrupted.score(pool)
    log = tmp_path / "whole" / ep.CHECKPOINT_FILE
    header, *records = log.read_text().splitlines()
    by_episode = {json.loads(line)["episode"]: line for line in records}
    killed = tmp_path / "killed"
    killed.mkdir()
    # what a kill leaves: the first batch, and of the second the episode that finished first
    kept = [by_episode[0], by_episode[1], by_episode[3]]
    (killed / ep.CHECKPOINT_FILE).write_text("\n".join([header, *kept]) + "\n")
    again = _method(killed, selector, **settings)
    resumed = again.score(pool)
    assert again.stats["resumed_episodes"] == 3
    assert resumed.to_csv(index=False) == whole.to_csv(index=False)
    assert again.select(resumed, 5) == uninterrupted.select(whole, 5)
    lines = (killed / ep.CHECKPOINT_FILE).read_text().splitlines()[1:]
    assert sorted(json.loads(line)["episode"] for line in lines) == list(range(8))  # each once
    assert len(whole["mean_weight"].unique()) > 3  # attention weights that batching could move


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
            [sys.executable, "-m", "dwbench.sweep.status", *cell, f"results_dir={view}"],
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
        # whichever file met the full disk first (a checkpoint, the store, a log): named, or
        # its setting named, on the full disk
        disk_line = r"dwbench: the disk (?:is full, writing|failed writing) (?:under \w+=)?(.+?) \("
        written = re.search(disk_line, said[0])
        assert written and Path(written.group(1)).resolve().is_relative_to(disk.resolve()), said
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


@pytest.mark.parametrize(("ratio", "warmup_steps"), [(0.0, 0), (0.5, 4), (1.0, 8)])
def test_warmup_ratio_is_a_share_of_the_steps_at_every_value(
    ratio, warmup_steps, tmp_path, tiny_llama_dir, tiny_model_cfg, cache_dir
) -> None:
    """transformers reads a warm-up of 1 or more as a step count; 1.0 must warm up all 8 steps.

    Read from the learning rates the Trainer logged (the rate each step used): a linear rise
    from 0 over the warm-up steps, then the cosine decay starting at the peak."""
    from omegaconf import OmegaConf

    finetune = {**FINETUNE, "warmup_ratio": ratio, "scheduler": "cosine"}
    recipe = Recipe(tiny_model_cfg(tiny_llama_dir), OmegaConf.create(finetune), 0, "cpu", cache_dir)
    stats = fine_tune(recipe, _pool(8), tmp_path / "scratch", tmp_path / "adapter")
    rates = [e["learning_rate"] for e in stats["log_history"] if "learning_rate" in e]
    assert len(rates) == STEPS
    peak = FINETUNE["lr"]
    warming = [peak * step / warmup_steps for step in range(warmup_steps)]
    assert rates[:warmup_steps] == pytest.approx(warming)
    decaying = rates[warmup_steps:]
    assert decaying[:1] == pytest.approx([peak][: len(decaying)])
    assert all(later < earlier for earlier, later in zip(decaying, decaying[1:], strict=False))
