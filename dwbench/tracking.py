"""MLflow logging: one parent run per sweep cell, one nested run per stage execution.

A cell's run is named for what it is (task / method / budget / selector -> target / seed),
carries its resolved config, selected ids, pool and evaluation data (as MLflow dataset inputs)
and its summary metrics; the stage runs it executes are nested under it. A stage run serves
every cell with the same stage key, so it nests under the cell that first ran it. A stage or
cell that is re-run after a kill reopens the run of its key instead of creating a second one
(and instead of failing on params, which MLflow refuses to change), so the store holds exactly
one run per finished stage output and one per cell.

Many sweep jobs share one SQLite store, so the default store is made safe for concurrent writers
(docs/slurm.md says why this and not a server or per-job stores):
- the first use of a new store (MLflow creates its tables then, racing other jobs into "table
  already exists") happens under a file lock next to the database; a new store starts as a copy
  of an empty one that MLflow migrated once per MLflow version (kept in the model cache), since
  running MLflow's schema migrations takes about a second for every new store;
- the database is switched to write-ahead logging, so readers never block the one writer;
  not on a network file system, where WAL is unsafe and a tracking server is the answer;
- every MLflow call that still meets a lock ("database is locked") is retried with backoff, and
  an experiment created by another job in the meantime is looked up instead.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import sqlite3
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from dwbench import timing

logger = logging.getLogger(__name__)

CELL = "cell"  # the `stage` tag of a cell's parent run
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"  # the tag MLflow's UI nests runs by
_MAX_PARAM_CHARS = 6000
_LOCK_MESSAGES = ("database is locked", "database table is locked", "database is busy")
_RETRY_DEADLINE_S = 600.0
# File systems where SQLite's WAL mode is unsafe (it needs memory shared by all writers).
_NETWORK_FS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "beegfs", "ceph", "fuse.sshfs")


@cache
def git_sha() -> str:
    """Commit of the dwbench checkout, with `-dirty` when it has local changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config to MLflow params: dotted keys, string values."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:_MAX_PARAM_CHARS]
    return flat


def _is_lock_error(error: BaseException) -> bool:
    text = str(error).lower()
    return any(message in text for message in _LOCK_MESSAGES)


def _filesystem_type(path: Path) -> str:
    """Type of the mount holding `path` (longest mount point that contains it), from /proc."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    resolved, best, kind = str(path.resolve()), "", "unknown"
    for line in mounts:
        fields = line.split()
        if len(fields) > 2 and resolved.startswith(fields[1]) and len(fields[1]) > len(best):
            best, kind = fields[1], fields[2]
    return kind


def empty_store(cache_dir: Path) -> Path | None:
    """A store with MLflow's whole schema and no experiment, made by MLflow once per version
    under `cache_dir`; None where that folder cannot be written.

    The Default experiment MLflow creates is deleted from it, so each copy gets its own (with
    that store's artifact root) when MLflow first opens it, as a store MLflow made would.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    template = cache_dir / "mlflow" / f"empty-store-{mlflow.__version__}.db"
    if template.is_file():
        return template
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=template.parent) as staging:
            made = Path(staging) / "store.db"
            MlflowClient(tracking_uri=f"sqlite:///{made}").search_experiments(max_results=1)
            with sqlite3.connect(made) as connection:
                connection.execute("DELETE FROM experiment_tags")
                connection.execute("DELETE FROM experiments")
            connection.close()
            made.replace(template)  # atomic: a racing process sees no half-written template
    except (OSError, sqlite3.Error) as error:  # a read-only or full cache: MLflow migrates anew
        logger.debug("No empty store in %s (%s)", cache_dir, error)
        return None
    return template


def _initialize_sqlite(db: Path, uri: str, cache_dir: Path | None = None) -> None:
    """Create a new store's schema (racing jobs would each try) with WAL on local disks; as a
    copy of `empty_store(cache_dir)` where a cache folder is given.

    Holds a file lock beside the database only for as long as it takes to see that the schema
    exists, so jobs using an initialized store do not wait for each other.
    """
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    with FileLock(f"{db}.lock"):
        with sqlite3.connect(db, timeout=60) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        connection.close()
        if {"experiments", "alembic_version"} <= tables:
            return
        template = empty_store(cache_dir) if cache_dir is not None else None
        if template is not None:  # no table yet: nothing of this store is lost
            for leftover in (Path(f"{db}-wal"), Path(f"{db}-shm")):
                leftover.unlink(missing_ok=True)
            shutil.copyfile(template, db)
        fs = _filesystem_type(db.parent)
        if fs in _NETWORK_FS:
            logger.warning(
                "The MLflow store %s is on %s, where SQLite locking is unreliable for concurrent "
                "jobs; run a tracking server and set tracking=server (docs/slurm.md).",
                db,
                fs,
            )
        else:
            with sqlite3.connect(db, timeout=60) as connection:
                connection.execute("PRAGMA journal_mode=WAL")
            connection.close()
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


class _RetryOnLock:
    """An MlflowClient whose calls are retried, with jittered backoff, while SQLite is locked."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        return lambda *args, **kwargs: _retry_on_lock(attribute, *args, **kwargs)


@timing.timed("log")  # every MLflow call, wherever it is made, is the cell's `log` time
def _retry_on_lock(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, retried while another writer holds the database lock."""
    deadline = time.monotonic() + _RETRY_DEADLINE_S
    delay = 0.05
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as error:
            if not _is_lock_error(error) or time.monotonic() > deadline:
                raise
            logger.debug("MLflow store locked; retrying in about %.2f s", delay)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)


class Tracker:
    """A thin MLflow client for one experiment."""

    def __init__(
        self, uri: str, experiment: str, artifact_root: Path, cache_dir: Path | None = None
    ) -> None:
        """`cache_dir` keeps the empty store a new SQLite store is copied from (`empty_store`)."""
        import mlflow
        from mlflow.tracking import MlflowClient

        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            _initialize_sqlite(db, uri, cache_dir)
        mlflow.set_tracking_uri(uri)
        self.uri = uri
        self.client = _RetryOnLock(MlflowClient(tracking_uri=uri))
        self.experiment_id = self._experiment_id(experiment, artifact_root)
        self.cell_run_id: str | None = None  # new stage runs nest under it

    def _experiment_id(self, name: str, artifact_root: Path) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            location = (artifact_root / name).resolve().as_uri()
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # another process created it between the two calls
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def find_run(self, stage: str, key: str) -> Any | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.stage = '{stage}' and tags.stage_key = '{key}'",
            max_results=1,
        )
        return runs[0] if runs else None

    @contextmanager
    def cell_run(self, cell_key: str, title: str, tags: Mapping[str, str]) -> Iterator[StageRun]:
        """Open (or reopen) the parent run of one sweep cell; it ends FINISHED or FAILED."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.stage = '{CELL}' and tags.cell_key = '{cell_key}'",
            max_results=1,
        )
        new = not runs
        if runs:
            run_id = runs[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            all_tags = {**tags, "stage": CELL, "cell_key": cell_key, "git_sha": git_sha()}
            run_id = self.client.create_run(
                self.experiment_id, tags=all_tags, run_name=title
            ).info.run_id
        self.cell_run_id = run_id
        try:
            yield StageRun(self.client, run_id, new)
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        finally:
            self.cell_run_id = None
        self.client.set_terminated(run_id, status="FINISHED")

    @contextmanager
    def stage_run(
        self,
        stage: str,
        key: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
        amend: bool = False,
    ) -> Iterator[StageRun]:
        """Open the run of this stage key, reopening one a killed attempt left; it ends FINISHED
        or FAILED. A FINISHED run is reopened only to `amend` it (the log stage's summary);
        otherwise its output is being computed again, and it gets a new run, so nothing already
        logged is overwritten."""
        existing = self.find_run(stage, key)
        recomputed = {}
        if existing is not None and existing.info.status == "FINISHED" and not amend:
            # its output was damaged and is computed again: a new run, the old one kept as it is
            recomputed, existing = {"recomputes": existing.info.run_id}, None
        if existing is None:
            nested = {MLFLOW_PARENT_RUN_ID: self.cell_run_id} if self.cell_run_id else {}
            run = self.client.create_run(
                self.experiment_id,
                tags={
                    **tags,
                    **nested,
                    **recomputed,
                    "stage": stage,
                    "stage_key": key,
                    "git_sha": git_sha(),
                },
                run_name=f"{stage}-{key[:8]}",
            )
            run_id = run.info.run_id
            self._log_params(run_id, params)
        else:
            run_id = existing.info.run_id
            logger.debug("Reopening MLflow run %s of %s/%s", run_id, stage, key)
            self.client.update_run(run_id, status="RUNNING")
        handle = StageRun(self.client, run_id)
        try:
            yield handle
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status="FINISHED")

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, v) for k, v in sorted(flat.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])


class ReadOnlyTracker:
    """For a results folder that cannot be written: cached results are served, nothing is
    logged (the MLflow store cannot record anything there)."""

    uri = ""
    experiment_id = ""
    cell_run_id = None

    @contextmanager
    def cell_run(self, cell_key: str, title: str, tags: Mapping[str, str]) -> Iterator[Any]:
        yield _NoRun()

    @contextmanager
    def stage_run(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        yield _NoRun()


class _NoRun:
    """A run that records nothing (ReadOnlyTracker)."""

    new = False

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class StageRun:
    """Metrics, tags and artifacts of one open run."""

    def __init__(self, client: Any, run_id: str, new: bool = True) -> None:
        self.client = client
        self.run_id = run_id
        self.new = new  # created now, not reopened after an earlier attempt

    def log_metrics(self, metrics: Mapping[str, float | int | None]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(name, float(value), now, 0)
            for name, value in metrics.items()
            if value is not None and math.isfinite(float(value))
        ]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for name, value in tags.items():
            self.client.set_tag(self.run_id, name, str(value))

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_history(self, history: Sequence[Mapping[str, Any]], names: Mapping[str, str]) -> None:
        """Per-step values of a training log (`{"step": 3, "loss": 0.5, ...}` entries) as metric
        histories: `names` maps a log field to its metric name."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(metric, float(entry[field]), now, int(entry["step"]))
            for entry in history
            for field, metric in names.items()
            if field in entry and "step" in entry and math.isfinite(float(entry[field]))
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def log_dataset(self, frame: Any, name: str, digest: str, source: str, context: str) -> None:
        """A table the run used (the pool, the evaluation problems) as an MLflow dataset input."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # MLflow registers its local-file source twice
            warnings.filterwarnings("ignore", message="The specified dataset source can be")
            dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest)
        tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
        entity = DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags)
        self.client.log_inputs(self.run_id, datasets=[entity])
