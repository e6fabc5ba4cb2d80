"""Bad input, one row each: a clear line naming the field or file and the fix, exit code 2,
no traceback, and nothing written, neither to the results folder nor to the working folder.
`plan`, `status` and `submit` refuse what a run refuses, naming the cell or plan line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import forked_cli
import pytest
from test_cli import REPO, run_cli

SMALL = ["task.generator.pool_size=20", "task.generator.eval_size=5", "stages=[score,select]"]
DW = "method=data_whisperer"
WHOLE_SEED = "is not a whole number in [0, 4294967295]"

ROWS = [
    (["seed=-1"], f"seed=-1 {WHOLE_SEED}"),
    (["seed=x"], f"seed='x' {WHOLE_SEED}"),
    (["seed=1.5"], f"seed=1.5 {WHOLE_SEED}"),
    (["seed=100000000000000000000"], f"seed=100000000000000000000 {WHOLE_SEED} (32 bits"),
    (["finetune.lr=-1"], "finetune.lr=-1 is not a number > 0"),
    (["finetune.lr=abc"], "finetune.lr='abc' is not a number > 0"),
    (["finetune.epochs=0"], "finetune.epochs=0 is not a whole number >= 1"),
    (["+buget=0.1"], "Did you mean: budget?"),
    ([DW, "+method.n_demo=3"], "Did you mean: n_demos?"),
    # `++` (Hydra's force-add) goes through the same check; without `+` Hydra's own refusal
    # would suggest the `+` that the line above refuses
    (["++buget=0.1"], "++buget: no config defines the key 'buget'"),
    ([DW, "++method.n_demo=3"], "Did you mean: n_demos?"),
    (
        ["buget=0.1"],
        "buget: no config defines the key 'buget', so there is nothing to set. "
        "Did you mean: budget?",
    ),
    ([DW, "method.n_demo=3"], "method.n_demo: no config defines the key 'method.n_demo'"),
    (["task.eval_limit=999"], "task.eval_limit=999 is above the 5 examples"),
    (["results_dir=/proc/dwbench"], "results_dir=/proc/dwbench cannot be created"),
    (["results_dir="], "results_dir='' is not a folder (left empty, the run would write"),
    # a model's name is a folder under the cache (its converted weights)
    (["selector_model.name=../../x"], "selector_model.name='../../x' is not one folder name"),
    (["target_model.name=a/b"], "target_model.name='a/b' is not one folder name"),
    (["task.metric=bogus"], "task.metric='bogus' is not one of exact_match_number, rouge_l"),
    (["device=bogus"], "device='bogus' is not one of auto, cpu, cuda, mps or cuda:N"),
    (
        ["task.generator.pool_size=1000000000000", "task.pool_limit=null"],
        "task.generator.pool_size=1000000000000 asks for 1,000,000,000,005 problems (pool and "
        "eval), above the 100,000 the embedded generator makes",
    ),
    (["score.shards=100000"], "score.shards=100000 is not a whole number in [1, 1000]"),
    (["eval.max_new_tokens=10000000000"], "eval.max_new_tokens=10000000000 is not a whole number"),
    # a method's own options (its check_options), checked before anything is written
    ([DW, "method.n_demos=0"], "method.n_demos=0 "),
    ([DW, "method.n_queries=-1"], "method.n_queries=-1 "),
    ([DW, "method.n_demos=5.5"], "method.n_demos=5.5 "),
    ([DW, "method.n_demos=1000"], "method.n_queries = 1005 is above the pool's 20 examples"),
    ([DW, "method.passes=0"], "method.passes=0 "),
    (
        [DW, "method.episode_order=random", "method.passes=100000"],
        "method.passes=100000 is above 1000",
    ),
    ([DW, "method.query_layout=bogus"], "method.query_layout='bogus' "),
    ([DW, "method.query_scoring=bogus"], "method.query_scoring='bogus' "),
    ([DW, "method.attention_span=bogus"], "method.attention_span='bogus' "),
    ([DW, "method.episode_order=bogus"], "method.episode_order='bogus' "),
    ([DW, "method.attention_weighting=maybe"], "method.attention_weighting='maybe' "),
    (["method=ccs", "method.beta=abc"], "method.beta='abc' is not a share in [0, 1)"),
    (["method=nuggets", "task.anchor_examples=50"], "method.n_anchors=50 (task.anchor_examples)"),
]


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize(("overrides", "message"), ROWS, ids=[" ".join(r[0]) for r in ROWS])
def test_bad_input_is_refused_before_any_work(
    overrides: list[str], message: str, tmp_path: Path, cache_dir: Path
) -> None:
    results, workdir = tmp_path / "results", tmp_path / "workdir"
    workdir.mkdir()
    done = run_cli([*SMALL, *overrides], results, cache_dir, cwd=workdir)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    # nothing written: no artifacts, no MLflow store, no logs, here or in the working folder
    assert _files(results) == [] and _files(workdir) == []


def _command(
    module: str, args: list[str], cwd: Path, cache_dir: Path
) -> subprocess.CompletedProcess:
    """`python -m <module> args`, offline on this test run's model cache (forked)."""
    return forked_cli.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**os.environ, "DWBENCH_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )


@pytest.mark.parametrize("typo", ["+buget=0.1", "buget=0.1"])
@pytest.mark.parametrize("module", ["dwbench.sweep.plan", "dwbench.sweep.status"])
def test_sweep_commands_refuse_a_typo_the_run_refuses(module, typo, tmp_path, cache_dir) -> None:
    """The issue's case: `plan` wrote a line per cell carrying `+buget`, each job failing at start
    (the grid's size is test_experiments' to check); without `+`, Hydra's refusal suggested it."""
    results = tmp_path / "results"
    args = ["+experiment=embedded_table2", typo, f"results_dir={results}"]
    done = _command(module, args, tmp_path, cache_dir)
    assert done.returncode == 2, done.stderr[-2000:]
    if typo.startswith("+"):  # found in the composed cells, and said for the first
        assert re.search(r"dwbench: cell 1 of \d+ \(", done.stderr) and typo in done.stderr
    else:  # found before any cell is composed
        assert "dwbench: buget: no config defines the key 'buget'" in done.stderr
    assert "Did you mean: budget?" in done.stderr and "Traceback" not in done.stderr
    assert not results.exists()


def test_plan_names_the_one_cell_whose_method_refuses_its_options(tmp_path, cache_dir) -> None:
    """A pool of 12 is too small for Data Whisperer's 10 + 5 examples an episode, and fine for
    the other methods: the cell refused is Data Whisperer's, by its own check."""
    results = tmp_path / "results"
    args = ["+experiment=embedded_table2", "seed=0", "budget=0.5", "task.pool_limit=12"]
    done = _command("dwbench.sweep.plan", [*args, f"results_dir={results}"], tmp_path, cache_dir)
    assert done.returncode == 2, done.stderr[-2000:]
    refused = r"dwbench: cell \d+ of \d+ \([^)]*method=data_whisperer\b[^)]*\): method.n_demos"
    assert re.search(refused, done.stderr), done.stderr[-2000:]
    assert "above the pool's 12 examples" in done.stderr and not results.exists()


def test_plan_on_a_read_only_results_folder_says_so_in_one_line(tmp_path, cache_dir) -> None:
    """Mounted read-only (a bind mount; skipped where mounting is not allowed)."""
    source, view = tmp_path / "source", tmp_path / "read_only"
    source.mkdir()
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(view)]).returncode:
        pytest.skip("bind mounts are not allowed here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(view)]).returncode:
            pytest.skip("read-only remounts are not allowed here")
        args = ["+experiment=embedded_table2", "method=random", "seed=0", "budget=0.1"]
        done = _command("dwbench.sweep.plan", [*args, f"results_dir={view}"], tmp_path, cache_dir)
    finally:
        subprocess.run(["umount", str(view)])
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("dwbench:")]
    assert lines == [
        f"dwbench: cannot write {view / 'sweeps'} (read-only file system). Point results_dir at "
        "a folder you can write, or make this one writable, and run the command again."
    ], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and _files(source) == []


def test_submit_refuses_a_plan_line_the_run_would_refuse(tmp_path, cache_dir) -> None:
    """A plan written before the check (or edited) is refused before any job is rendered."""
    line = ["+experiment=embedded_table2", "method=random", "seed=0", "budget=0.1", "+buget=0.1"]
    plan = tmp_path / "plan.txt"
    plan.write_text("abc " + " ".join(line) + "\n")
    cell = {"key": "abc", "overrides": line, "estimate_s": None, "requires_gpu": False}
    slurm = {"parallel": 8, "time_min": 60, "cpus_per_task": 2, "mem_gb": 8}
    meta = {"name": "x", "workdir": str(REPO), "slurm": slurm}
    (tmp_path / "plan.json").write_text(
        json.dumps({**meta, "cells": [{**cell, "gpu_memory_gb": 2, "step": "cells"}]})
    )
    done = _command("dwbench.sweep.submit", [str(plan), "--dry-run"], tmp_path, cache_dir)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"dwbench: {plan} line 1 (" in done.stderr and "Did you mean: budget?" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "submissions").exists()


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
        [sys.executable, "-m", "dwbench.sweep.submit", str(plan)],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "plan.json is damaged" in done.stderr and "Traceback" not in done.stderr
