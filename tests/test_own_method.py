"""docs/compare-your-method.md, run as written: a method package outside the repo, found
through hydra.searchpath, runs end to end on the embedded task and into the report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
