"""What users run first, as they get it: a regular (not editable) install carries its configs,
lm-eval tasks and SLURM template, and runs the embedded default (SmolLM2-135M, the generated
task, shrunk to seconds) end to end from an empty folder. (This test also holds what the former
test_embedded_default checked: every stage finished once, the SmolLM2 target, an adapter that
changes the logits, non-empty predictions.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_cli import REPO, finished_keys, runs_of


@pytest.mark.slow
def test_an_installed_copy_runs_the_embedded_default_from_an_empty_folder(
    tmp_path: Path, smollm2_dir: Path, cache_dir: Path
) -> None:
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-compile",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    assert (site / "dwbench" / "conf" / "config.yaml").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(site),  # ahead of the editable install in this venv
        "DWBENCH_CACHE": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
    }
    where = subprocess.run(
        [sys.executable, "-c", "import dwbench; print(dwbench.__file__)"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(site)), where.stdout
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dwbench",
            "task.generator.pool_size=16",
            "task.generator.eval_size=2",
            "budget=0.5",
            "finetune.max_steps=2",
            "finetune.batch_size=2",
            "finetune.runtime.micro_batch_size=2",
            "eval.max_new_tokens=32",
        ],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "embedded_gsm" in run.stdout and "random" in run.stdout
    results = empty / "results"
    for stage in ("prepare", "score", "select", "train", "evaluate"):
        assert len(finished_keys(results, stage)) == 1, stage
    evaluation = next(r for r in runs_of(results) if r.data.tags["stage"] == "evaluate")
    assert evaluation.data.tags["target"] == "smollm2_135m"
    assert evaluation.data.metrics["adapter_logit_change"] > 1e-4
    samples = next((results / "artifacts/evaluate").glob("*/samples.jsonl")).read_text()
    predictions = [json.loads(line)["prediction"] for line in samples.splitlines()]
    assert len(predictions) == 2 and all(p.strip() for p in predictions)
    plan = subprocess.run(
        [sys.executable, "-m", "dwbench.sweep.plan", "method=random", "seed=0,1"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    (plan_file,) = (empty / "results" / "sweeps").glob("*/plan.txt")
    dry = subprocess.run(
        [sys.executable, "-m", "dwbench.sweep.submit", str(plan_file), "--dry-run"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "Rendered" in dry.stdout


def test_the_wheel_ships_every_tracked_config_and_no_machine_settings(tmp_path: Path) -> None:
    """The configs live in the checkout's top-level conf/ and travel inside the wheel as
    conf/, which is where `config_files.config_dir()` looks first once installed."""
    from dwbench.config_files import config_dir

    assert config_dir() == REPO / "conf"  # a checkout (and an editable install) reads conf/
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "wheel"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("dwbench-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("dwbench/conf/")}
    tracked = subprocess.run(
        ["git", "ls-files", "conf"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked and shipped == {"dwbench/" + path for path in tracked}
