"""Bad input, one row each: a clear line naming the field or file and the fix, exit code 2,
no traceback, and nothing written to the results folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import REPO, run_cli

SMALL = ["task.generator.pool_size=20", "task.generator.eval_size=5", "stages=[score,select]"]

ROWS = [
    (["seed=-1"], "seed=-1 is not a whole number >= 0"),
    (["seed=x"], "seed='x' is not a whole number >= 0"),
    (["seed=1.5"], "seed=1.5 is not a whole number >= 0"),
    (["finetune.lr=-1"], "finetune.lr=-1 is not a number > 0"),
    (["finetune.lr=abc"], "finetune.lr='abc' is not a number > 0"),
    (["finetune.epochs=0"], "finetune.epochs=0 is not a whole number >= 1"),
    (["+buget=0.1"], "Did you mean: budget?"),
    (["method=data_whisperer", "+method.n_demo=3"], "Did you mean: n_demos?"),
    (["task.eval_limit=999"], "task.eval_limit=999 is above the 5 examples"),
    (["results_dir=/proc/dwbench"], "results_dir=/proc/dwbench cannot be created"),
]


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize(("overrides", "message"), ROWS, ids=[" ".join(r[0]) for r in ROWS])
def test_bad_input_is_refused_before_any_work(
    overrides: list[str], message: str, tmp_path: Path, cache_dir: Path
) -> None:
    results = tmp_path / "results"
    done = run_cli([*SMALL, *overrides], results, cache_dir)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert _files(results) == []  # nothing written: no artifacts, no MLflow store, no logs


def test_a_data_file_that_is_not_utf8_is_named(tmp_path: Path, cache_dir: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_bytes(
        '[{"question": "caf\xe9", "answer": "#### 1"}]'.encode("latin1")
    )
    (data / "test.json").write_text('[{"question": "q", "answer": "#### 1"}]')
    done = run_cli(
        ["task=gsm8k", f"task.path={data}", "stages=[score,select]"], tmp_path / "r", cache_dir
    )
    assert done.returncode == 2
    assert f"{data / 'train.json'}: not UTF-8 text" in done.stderr


def test_submit_names_a_damaged_plan(tmp_path: Path) -> None:
    plan = tmp_path / "plan.txt"
    plan.write_text("abc method=random\n")
    (tmp_path / "plan.json").write_text('{"name": "x", "cells": [{"key": ')
    done = subprocess.run(
        [sys.executable, "-m", "dwbench.submit", str(plan)],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "plan.json is damaged" in done.stderr and "Traceback" not in done.stderr
