"""docs/compare-your-method.md, run as written: a method package outside the repo, found
through hydra.searchpath, runs end to end on the embedded task and into the report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import forked_cli
from test_cli import REPO, tiny_overrides

DOC = REPO / "docs" / "compare-your-method.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def _write_package(root: Path) -> Path:
    """The doc's class and YAML, at the paths their first comment lines name."""
    for block in [_blocks("python")[0], _blocks("yaml")[0]]:
        first = block.splitlines()[0]
        path = root / first.removeprefix("# ").strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block)
    (root / "my_selection" / "__init__.py").write_text("")
    return root / "my_conf"


def test_the_documented_method_runs_end_to_end_and_into_the_report(
    tmp_path: Path, tiny_llama_dir: Path, cache_dir: Path
) -> None:
    conf = _write_package(tmp_path / "mine")
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path / "mine"),
        "DWBENCH_CACHE": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
    }
    results = tmp_path / "results"
    tiny = [o for o in tiny_overrides(tiny_llama_dir) if not o.startswith("budget=")]
    grid = [
        "method=random,longest_answer",
        "seed=0",
        "budget=0.5",
        f"results_dir={results}",
        f"hydra.searchpath=[file://{conf}]",
        *tiny,
    ]
    sweep = subprocess.run(
        [sys.executable, "-m", "dwbench", "-m", "+experiment=embedded_table2", *grid],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "dwbench.report",
            "embedded_table2",
            *grid,
            "--allow-missing",
            "--out-dir",
            str(tmp_path / "figures"),
            "--resamples",
            "200",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    table = (tmp_path / "figures" / "embedded_table2" / "table2.md").read_text()
    assert "longest_answer" in table and "Random" in table
    snapshot = (results / "embedded_table2.csv").read_text()
    assert snapshot.count("longest_answer") == 1


def test_a_task_and_a_model_from_your_own_config_folder(
    tmp_path: Path, tiny_llama_dir: Path, cache_dir: Path
) -> None:
    """`task/` and `model/` YAMLs beside your methods: your data (a local path, a metric) and
    your model (a local folder), each inheriting the shipped config it resembles."""
    conf = tmp_path / "my_conf"
    (conf / "task").mkdir(parents=True)
    (conf / "model").mkdir(parents=True)
    data = tmp_path / "my_data"
    data.mkdir()
    rows = [
        {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
        for i in range(16)
    ]
    (data / "train.json").write_text(json.dumps(rows[:12]))
    (data / "test.json").write_text(json.dumps(rows[12:]))
    (conf / "task" / "my_sums.yaml").write_text(
        f"defaults:\n  - gsm8k\n  - _self_\nname: my_sums\npath: {data}\n"
        "metric: exact_match_number\nanswer_max_tokens: 8\n"
    )
    (conf / "model" / "my_model.yaml").write_text(
        f"defaults:\n  - smollm2_135m\n  - _self_\nname: my_model\npath: {tiny_llama_dir}\n"
        "embedded: null\nattention_layer: 1\nnum_layers: 2\n"
    )
    env = {**os.environ, "DWBENCH_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    tiny = [o for o in tiny_overrides(tiny_llama_dir) if o.startswith(("finetune.", "eval."))]
    done = forked_cli.run(  # your config folder is read when the cell composes, not at import
        [
            sys.executable,
            "-m",
            "dwbench",
            "task=my_sums",
            "model@selector_model=my_model",
            "model@target_model=my_model",
            "budget=0.5",
            f"results_dir={tmp_path / 'results'}",
            f"hydra.searchpath=[file://{conf}]",
            *tiny,
        ],
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "my_sums" in done.stdout and "my_model" in done.stdout
