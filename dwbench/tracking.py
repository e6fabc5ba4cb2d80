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

The store file is never half-written and never silently lost:
- a new store is made under a temporary name beside it and renamed into place, so a full disk or
  a kill leaves no half-copied `mlflow.db` that every later run would fail on;
- a store SQLite finds damaged (cut short, garbled, not a database) is moved aside with the runs
  it holds, in one line, and a new one is made;
- a run keeps the store file it opened open, and checks that the path still names that file
  before each stage and after its last write: a store deleted or replaced meanwhile (MLflow's
  pooled connections would go on writing into the unreachable old file) stops the cell with one
  line, and the next cell of the sweep logs into the store now at that path.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import sqlite3
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from dwbench import timing
from dwbench.artifacts import free_path
from dwbench.errors import DwbenchError
from dwbench.storage import exception_chain

logger = logging.getLogger(__name__)

CELL = "cell"  # the `stage` tag of a cell's parent run
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"  # the tag MLflow's UI nests runs by
_MAX_PARAM_CHARS = 6000
_LOCK_MESSAGES = ("database is locked", "database table is locked", "database is busy")
_RETRY_DEADLINE_S = 600.0
# File systems where SQLite's WAL mode is unsafe (it needs memory shared by all writers).
_NETWORK_FS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "beegfs", "ceph", "fuse.sshfs")
# What SQLite says of a database file that is not one, or not a whole one: never a transient
# state of a store on a local disk.
_DAMAGE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


@dataclass
class _Pin:
    """The store file a store path named when this process opened it, held open so that its
    inode cannot be reused by a new file at the path (which would look like the same store)."""

    fd: int
    file: tuple[int, int]  # (device, inode)
    said: bool = False  # its loss was said (StoreLost): the next cell need not say it again


_PINNED: dict[Path, _Pin] = {}


class StoreLost(DwbenchError):
    """The MLflow store a run logs into was deleted, replaced or found damaged meanwhile: the
    cell stops (its runs would be lost), and says how to log it again."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(
            f"{what} Run the same command again: finished stages are reused, and the cell is "
            "logged into the store at that path (a new one where there is none)."
        )


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
    under `cache_dir`; None where that folder cannot be written."""
    import mlflow

    template = cache_dir / "mlflow" / f"empty-store-{mlflow.__version__}.db"
    if template.is_file():
        return template
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=template.parent) as staging:
            made = Path(staging) / "store.db"
            _migrate_empty(made)
            made.replace(template)  # atomic: a racing process sees no half-written template
    except (OSError, sqlite3.Error) as error:  # a read-only or full cache: MLflow migrates anew
        logger.debug("No empty store in %s (%s)", cache_dir, error)
        return None
    return template


def _migrate_empty(db: Path) -> None:
    """MLflow's schema in the new file `db`, without the Default experiment MLflow creates: each
    store gets its own (with that store's artifact root) when MLflow first opens it, as a store
    MLflow made would."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments(max_results=1)
    _forget_engines(db)  # the file is renamed away from this path
    with closing(sqlite3.connect(db)) as connection, connection:
        connection.execute("DELETE FROM experiment_tags")
        connection.execute("DELETE FROM experiments")


def _initialize_sqlite(db: Path, uri: str, cache_dir: Path | None = None) -> None:
    """Create a new store's schema (racing jobs would each try) with WAL on local disks; as a
    copy of `empty_store(cache_dir)` where a cache folder is given. A store SQLite finds damaged
    is moved aside (`_set_aside`) and a new one made in its place.

    Holds a file lock beside the database only for as long as it takes to see that the schema
    exists, so jobs using an initialized store do not wait for each other.
    """
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    with FileLock(f"{db}.lock"):
        try:
            if {"experiments", "alembic_version"} <= _tables(db):
                return
        except sqlite3.DatabaseError as error:
            said = _damage(error)
            if said is None:
                raise
            aside = _set_aside(db)
            logger.warning(
                "%s is damaged: moved to %s; runs logged so far are in it (SQLite: %s). A new "
                "store is made at %s.",
                db.name,
                aside,
                said,
                db,
            )
        _create_store(db, cache_dir)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # the Default experiment


def _tables(db: Path) -> set[str]:
    """The tables of the store at `db` (none where there is no file yet)."""
    if not db.exists():
        return set()
    with closing(sqlite3.connect(db, timeout=60)) as connection:
        return {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}


def _create_store(db: Path, cache_dir: Path | None) -> None:
    """An empty store renamed into place at `db`: made beside it under a temporary name, so a
    full disk or a kill never leaves a half-written store there. A write that fails names `db`
    (a copy's error names the file it copied from)."""
    template = empty_store(cache_dir) if cache_dir is not None else None
    # created with the permissions any new file gets here (a shared store stays shared); the
    # lock held keeps other processes from making one meanwhile, so one found is a killed one's
    for stale in db.parent.glob(f".{db.name}.*.new*"):
        stale.unlink(missing_ok=True)
    new = db.with_name(f".{db.name}.{os.getpid()}.new")
    try:
        try:
            if template is not None:
                shutil.copyfile(template, new)
            else:
                _migrate_empty(new)
        except OSError as error:  # named as the store, where writing the new file failed
            written = error.filename2 if error.filename2 is not None else error.filename
            if written is None or os.fspath(written) != str(new):
                raise
            raise OSError(error.errno, error.strerror, str(db)) from error
        fs = _filesystem_type(db.parent)
        if fs in _NETWORK_FS:
            logger.warning(
                "The MLflow store %s is on %s, where SQLite locking is unreliable for concurrent "
                "jobs; run a tracking server and set tracking=server (docs/slurm.md).",
                db,
                fs,
            )
        else:  # kept in the file's header, so the store is renamed into place in WAL mode
            with closing(sqlite3.connect(new, timeout=60)) as connection:
                connection.execute("PRAGMA journal_mode=WAL")
        for leftover in (Path(f"{db}-wal"), Path(f"{db}-shm")):  # of a store no longer there
            leftover.unlink(missing_ok=True)
        new.replace(db)
    finally:
        for made in (new, Path(f"{new}-wal"), Path(f"{new}-shm")):
            made.unlink(missing_ok=True)
    _forget_engines(db)  # a connection MLflow keeps open is on the file that was there


def _damage(error: BaseException) -> str | None:
    """What SQLite said, anywhere in `error`'s chain (MLflow and SQLAlchemy wrap it), of a
    database file that is damaged; None for any other error."""
    for found in exception_chain(error):
        code = getattr(found, "sqlite_errorcode", None)
        if isinstance(found, sqlite3.DatabaseError) and code is not None:
            if code & 0xFF in _DAMAGE_CODES:
                return str(found)
    return None


def _set_aside(db: Path) -> Path:
    """Move the damaged store at `db` (and its write-ahead log, which holds its latest runs) to
    `mlflow.damaged-<time>.db` beside it, where `mlflow ui` can still read what is readable."""
    aside = free_path(lambda stamp: db.with_name(f"{db.stem}.damaged-{stamp}{db.suffix}"))
    for suffix in ("-wal", "-shm"):
        part = Path(f"{db}{suffix}")
        if part.exists():
            part.replace(f"{aside}{suffix}")
    db.replace(aside)
    return aside


def _file_id(path: Path) -> tuple[int, int] | None:
    """The file `path` names now (device, inode); None where there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _pin(db: Path) -> tuple[int, int]:
    """Hold the store file at `db` open for this process (`_PINNED`); its (device, inode)."""
    pin = _PINNED.get(db)
    if pin is not None and pin.file == _file_id(db):
        return pin.file
    _unpin(db)
    fd = os.open(db, os.O_RDONLY)
    held = os.fstat(fd)
    _PINNED[db] = _Pin(fd, (held.st_dev, held.st_ino))
    return _PINNED[db].file


def _unpin(db: Path) -> None:
    """Let go of the store file this process opened at `db`, and of MLflow's connections to it."""
    pin = _PINNED.pop(db, None)
    if pin is not None:
        os.close(pin.fd)
    _forget_engines(db)


def _forget_engines(db: Path) -> None:
    """Drop MLflow's cached engines (and the stores that use them) on the SQLite file `db`.

    MLflow keeps one SQLAlchemy engine per store URI for the life of the process, its pooled
    connections open on the file they first opened: once another file is at that path (the
    store was deleted, moved aside, or made anew), they would go on writing into the old one.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    target = os.path.abspath(db)
    with SqlAlchemyStore._engine_map_lock:
        for uri, engine in list(SqlAlchemyStore._engine_map.items()):
            database = engine.url.database
            if database and os.path.abspath(database) == target:
                del SqlAlchemyStore._engine_map[uri]
                engine.dispose()
    _tracking_store_registry._get_store_with_resolved_uri.cache_clear()


class _RetryOnLock:
    """An MlflowClient whose calls are retried, with jittered backoff, while SQLite is locked;
    `explain` sees any other error first, to say it in one line where the store is behind it."""

    def __init__(self, client: Any, explain: Callable[[Exception], None] | None = None) -> None:
        self._client = client
        self._explain = explain

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        return lambda *args, **kwargs: self._call(attribute, *args, **kwargs)

    def _call(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return _retry_on_lock(call, *args, **kwargs)
        except Exception as error:
            if self._explain is not None:
                self._explain(error)
            raise


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

        self.uri = uri
        self.cell_run_id: str | None = None  # new stage runs nest under it
        self._db: Path | None = None  # the SQLite store file, and the file it named when opened
        self._opened: tuple[int, int] | None = None
        if uri.startswith("sqlite:///"):
            self._db = Path(os.path.abspath(uri.removeprefix("sqlite:///")))
            self._db.parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        try:
            self._open(experiment, artifact_root, cache_dir)
        except StoreLost as lost:  # damage SQLite saw only now: nothing of this run is in it yet
            logger.warning("%s A new store is made at %s.", lost.what, self._db)
            self._open(experiment, artifact_root, cache_dir)

    def _open(self, experiment: str, artifact_root: Path, cache_dir: Path | None) -> None:
        """The store at the path, made where there is none, and this run's experiment in it."""
        from mlflow.tracking import MlflowClient

        db = self._db
        if db is not None:
            pin = _PINNED.get(db)
            if pin is None or pin.file != _file_id(db):
                if pin is not None and not pin.said:  # an earlier cell logged into that file
                    logger.warning(
                        "The MLflow store %s was deleted or replaced since an earlier cell of "
                        "this sweep logged into it: the runs logged before are not in the store "
                        "at that path, which this cell logs into.",
                        db,
                    )
                _unpin(db)
            _initialize_sqlite(db, self.uri, cache_dir)
            self._opened = _pin(db)
        self.client = _RetryOnLock(MlflowClient(tracking_uri=self.uri), self._explain)
        self.experiment_id = self._experiment_id(experiment, artifact_root)

    def check_store(self) -> None:
        """Raise StoreLost where the store path no longer names the file this run opened: what
        the run logged since went into a file no one will read (MLflow keeps writing into it)."""
        db = self._db
        if db is None or _file_id(db) == self._opened:
            return
        self._said()
        raise StoreLost(
            f"the MLflow store {db} was deleted or replaced while this run logged into it: what "
            "it logged is not in the store at that path."
        )

    def _explain(self, error: Exception) -> None:
        """Raise StoreLost where `error` comes from the store file: one deleted or replaced
        meanwhile, or one SQLite finds damaged, which is moved aside first (`_set_aside`)."""
        from filelock import FileLock

        self.check_store()
        said = _damage(error)
        if said is None or self._db is None:
            return
        with FileLock(f"{self._db}.lock"):
            self.check_store()  # another job moved it aside first
            aside = _set_aside(self._db)
        self._said()
        raise StoreLost(
            f"{self._db.name} is damaged: moved to {aside}; runs logged so far are in it "
            f"(SQLite: {said})."
        ) from error

    def _said(self) -> None:
        """The loss of the store file this run opened is said: the next cell of the sweep opens
        the store at the path without saying it again. (MLflow's connections stay on the lost
        file until then, so marking this run FAILED on the way out writes there, not into an
        empty file it would create at the path.)"""
        pin = _PINNED.get(self._db) if self._db is not None else None
        if pin is not None and pin.file == self._opened:
            pin.said = True

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
        """Open (or reopen) the parent run of one sweep cell; it ends FINISHED or FAILED, and
        StoreLost where the store file it went into is no longer the one at the store path."""
        self.check_store()
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
        self.check_store()  # after the cell's last write: all of it is in the store

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
        self.check_store()  # before a stage's work, not after it
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
        self.check_store()

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
