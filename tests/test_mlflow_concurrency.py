"""Eight processes log different cells into one fresh SQLite store at once, as sweep jobs do.

Before the store was made safe, seven of eight such processes died on their first MLflow call
("table experiments already exists", then "database is locked" under load).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from pathlib import Path

import forked_cli
import mlflow

PROCESSES = 8
CELLS = 3
STAGES = ("score", "select", "train", "evaluate")


def log_cells(root: Path, worker: int, cells: int) -> None:
    """One sweep job: wait for the others, then log its cells' stage runs into the shared store."""
    from dwbench.tracking import Tracker

    while not (root / "go").exists():  # start together
        time.sleep(0.01)
    tracker = Tracker(f"sqlite:///{root}/mlflow.db", "sweep", root / "mlartifacts")
    artifact = root / f"scores-{worker}.csv"
    artifact.write_text("id,score\n")
    for cell in range(cells):
        for stage in STAGES:
            key = f"{stage}-{worker}-{cell}"
            tags = {"cell": f"{worker}-{cell}", "seed": str(cell)}
            params = {"finetune": {"lr": 1e-4, "lora": {"r": 8}}, "worker": worker}
            with tracker.stage_run(stage, key, tags, params) as run:
                run.log_metrics({"score": 0.5, "train_s": 1.0 + cell})
                run.set_tags({"full_train_s_source": "estimated"})
                run.log_artifact(artifact)


def test_eight_processes_log_into_one_store(tmp_path: Path) -> None:
    """Eight forked processes (tests/forked_cli.py: separate processes, their imports done)."""
    workers = [
        forked_cli.start(
            log_cells,
            (tmp_path, i, CELLS),
            tmp_path,
            dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(PROCESSES)
    ]
    time.sleep(1.0)
    (tmp_path / "go").touch()
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-3000:]
        assert "database is locked" not in stderr and "Traceback" not in stderr, stderr[-3000:]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("sweep")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    expected = {f"{s}-{w}-{c}" for s in STAGES for w in range(PROCESSES) for c in range(CELLS)}
    assert sorted(r.data.tags["stage_key"] for r in runs) == sorted(expected)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["finetune.lora.r"] == "8" and run.data.metrics["score"] == 0.5
        assert client.list_artifacts(run.info.run_id)
    with sqlite3.connect(tmp_path / "mlflow.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
