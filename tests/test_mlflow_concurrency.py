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


def _schema_and_rows(db: Path) -> tuple[list[tuple], dict[str, int], str]:
    """Each table's and index's definition (its lines in sorted order: MLflow's migrations emit a
    table's constraints in an order that varies from one store to the next), each table's row
    count, and the schema version."""
    with sqlite3.connect(db) as connection:
        schema = [
            (kind, name, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))
            for kind, name, sql in connection.execute(
                "SELECT type, name, sql FROM sqlite_master ORDER BY type, name"
            )
        ]
        tables = [name for kind, name, _ in schema if kind == "table"]
        rows = {t: connection.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}
        (version,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    connection.close()
    return schema, rows, version


def test_a_store_copied_from_the_empty_store_is_the_store_mlflow_makes(tmp_path: Path) -> None:
    """A new store starts as a copy of an empty store MLflow migrated once (tracking.empty_store):
    same tables, indexes, rows and schema version as a store MLflow creates itself, and its own
    Default experiment."""
    from dwbench.tracking import Tracker

    made, copied, cache = tmp_path / "made", tmp_path / "copied", tmp_path / "cache"
    Tracker(f"sqlite:///{made}/mlflow.db", "sweep", made / "mlartifacts")
    Tracker(f"sqlite:///{copied}/mlflow.db", "sweep", copied / "mlartifacts", cache)
    (template,) = (cache / "mlflow").glob("empty-store-*.db")
    assert mlflow.__version__ in template.name
    assert _schema_and_rows(template)[1]["experiments"] == 0
    assert _schema_and_rows(copied / "mlflow.db") == _schema_and_rows(made / "mlflow.db")
    defaults = []
    for store in (made, copied):
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
        names = {e.name: e.artifact_location for e in client.search_experiments()}
        assert set(names) == {"Default", "sweep"}
        assert names["sweep"] == (store / "mlartifacts" / "sweep").resolve().as_uri()
        defaults.append(names["Default"])
    assert defaults[0] == defaults[1]  # where MLflow puts the Default experiment's artifacts
    Tracker(f"sqlite:///{tmp_path}/third/mlflow.db", "sweep", tmp_path / "mlartifacts", cache)
    assert [template] == list((cache / "mlflow").glob("*"))  # made once, then copied
