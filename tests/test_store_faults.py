"""The MLflow store's file meets a full disk, damage or deletion: one line each, never a
half-written store left behind, a traceback, or runs logged into a file no one will read."""

from __future__ import annotations

import errno
import runpy
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import forked_cli
import pytest
from test_cli import REPO, _cli, run_cli

# One quick cell per seed: random selection, no model is loaded.
CELL = [
    "method=random",
    "stages=[score,select]",
    "task.generator.pool_size=20",
    "task.generator.eval_size=2",
    "budget=0.5",
]


def cells_in_store(results: Path) -> dict[str, str]:
    """seed -> status of the cell runs in the store at `results/mlflow.db` (none: no store).
    Read with sqlite3: an MLflow client of this process could still be on an earlier file."""
    db = results / "mlflow.db"
    if not db.exists():
        return {}
    with closing(sqlite3.connect(db)) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        if "runs" not in tables:  # an empty file: no store was made in it
            return {}
        rows = connection.execute(
            "SELECT seed.value, runs.status FROM runs"
            " JOIN experiments USING (experiment_id)"
            " JOIN tags AS stage ON stage.run_uuid = runs.run_uuid AND stage.key = 'stage'"
            " JOIN tags AS seed ON seed.run_uuid = runs.run_uuid AND seed.key = 'seed'"
            " WHERE experiments.name = 'dwbench' AND stage.value = 'cell'"
        ).fetchall()
    return dict(rows)


def store_files(results: Path) -> list[str]:
    """The store's files in `results`: the database, its log and shared memory, its lock, and
    any temporary or set-aside store beside it."""
    return sorted(p.name for p in results.iterdir() if "mlflow" in p.name)


def a_store_with_one_run(results: Path, cache: Path) -> Path:
    """A store holding one finished run, its write-ahead log folded into the database file."""
    from dwbench.tracking import Tracker

    tracker = Tracker(f"sqlite:///{results}/mlflow.db", "dwbench", results / "mlartifacts", cache)
    with tracker.stage_run("score", "before", {"seed": "0"}, {"method": {"name": "random"}}):
        pass
    db = results / "mlflow.db"
    with closing(sqlite3.connect(db)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


def cut_short(db: Path) -> None:
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])


def garbled(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[:512] = b"not a database " * 34 + b"xx"
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [cut_short, garbled])
def test_a_damaged_store_is_moved_aside_in_one_line_and_a_new_one_made(
    damage, tmp_path: Path, cache_dir: Path
) -> None:
    """A store cut short or garbled (SQLite: malformed, not a database), as a disk or a copy
    can leave it: the run moves it aside, says so in one line, and logs into a new store."""
    results = tmp_path / "results"
    db = a_store_with_one_run(results, cache_dir)
    damage(db)
    damaged = db.read_bytes()
    done = run_cli([*CELL, "seed=1"], results, cache_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "is damaged" in line]
    assert len(said) == 1, done.stderr[-3000:]
    (aside,) = results.glob("mlflow.damaged-*.db")
    assert f"mlflow.db is damaged: moved to {aside}; runs logged so far are in it" in said[0]
    assert aside.read_bytes() == damaged
    assert cells_in_store(results) == {"1": "FINISHED"}


def test_a_store_copy_that_fills_the_disk_names_results_dir_and_leaves_no_store(
    tmp_path: Path, cache_dir: Path
) -> None:
    """A new results folder on a disk too small for the store (a tmpfs; skipped where mounting
    is not allowed): one line naming the store and results_dir, no half-written mlflow.db, and
    the same command goes through once there is room."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        full = run_cli([*CELL, "seed=1"], disk, cache_dir)
        assert full.returncode == 1, full.stderr[-3000:]
        said = [line for line in full.stderr.splitlines() if line.startswith("dwbench:")]
        assert len(said) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
        assert said[0].startswith(f"dwbench: the disk is full, writing {disk}/mlflow.db ")
        assert f"(df -h {disk}) or point results_dir at a larger disk" in said[0]
        assert store_files(disk) == ["mlflow.db.lock"]  # no store, whole or half
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        again = run_cli([*CELL, "seed=1"], disk, cache_dir)
        assert again.returncode == 0, again.stderr[-3000:]
        assert cells_in_store(disk) == {"1": "FINISHED"}
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_failed_store_copy_names_the_store_not_the_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """shutil.copyfile's error of a full disk names the file copied from (the empty store in
    cache_dir) first: the message names the store and results_dir, and nothing is left."""
    from dwbench.storage import storage_problem
    from dwbench.tracking import Tracker

    results, cache = tmp_path / "results", tmp_path / "cache"
    folders = {"results_dir": results, "cache_dir": cache}
    copy = shutil.copyfile

    def fills_the_disk(source: str | Path, target: str | Path) -> None:
        Path(target).write_bytes(Path(source).read_bytes()[:4096])
        error = OSError(errno.ENOSPC, "No space left on device")
        error.filename, error.filename2 = str(source), str(target)  # as os.sendfile's is
        raise error

    monkeypatch.setattr(shutil, "copyfile", fills_the_disk)
    with pytest.raises(OSError) as raised:
        Tracker(f"sqlite:///{results}/mlflow.db", "dwbench", results / "mlartifacts", cache)
    problem = str(storage_problem(raised.value, folders, results / "mlflow.db", resumes=True))
    assert problem.startswith(f"the disk is full, writing {results / 'mlflow.db'} (no space")
    assert f"(df -h {results}) or point results_dir at a larger disk" in problem
    assert store_files(results) == ["mlflow.db.lock"]
    monkeypatch.setattr(shutil, "copyfile", copy)
    Tracker(f"sqlite:///{results}/mlflow.db", "dwbench", results / "mlartifacts", cache)
    assert cells_in_store(results) == {}  # a whole store, its experiment made


def test_sqlites_disk_errors_are_one_line_naming_the_full_disk(tmp_path: Path) -> None:
    """SQLite says "disk I/O error" where a full disk stops its write-ahead log (wrapped by
    SQLAlchemy and MLflow); a copy's or a rename's OSError names the file written second."""
    from dwbench.storage import storage_problem

    results, cache = tmp_path / "results", tmp_path / "cache"
    folders = {"results_dir": results, "cache_dir": cache}
    database = results / "mlflow.db"
    wrapped = RuntimeError("(sqlite3.OperationalError) disk I/O error")
    wrapped.__cause__ = sqlite3.OperationalError("disk I/O error")
    problem = str(storage_problem(wrapped, folders, database))
    assert problem.startswith(f"the disk failed writing {database} (disk I/O error")
    assert f"(df -h {results}) or point results_dir at a larger disk" in problem
    copied = OSError(errno.ENOSPC, "No space left on device")
    copied.filename, copied.filename2 = str(cache / "template.db"), str(results / "copy.db")
    assert str(storage_problem(copied, folders)).startswith(
        f"the disk is full, writing {results / 'copy.db'} (no space left on device). Free space "
        f"on it (df -h {results}) or point results_dir"
    )


def test_a_store_deleted_between_two_runs_of_one_process_is_made_anew(tmp_path: Path) -> None:
    """MLflow keeps its connections to the store file it first opened: a later run of the same
    process (the next cell of a local sweep) logs into the store at the path, not the deleted
    file, and says so; a run whose store is deleted under it stops in one line."""
    from dwbench.tracking import Tracker

    results = tmp_path / "results"
    db = results / "mlflow.db"

    def cell(seed: int) -> None:
        tracker = Tracker(f"sqlite:///{db}", "dwbench", results / "mlartifacts")
        with tracker.cell_run(f"cell-{seed}", f"seed {seed}", {"seed": str(seed)}):
            with tracker.stage_run("score", f"score-{seed}", {"seed": str(seed)}, {}) as run:
                run.log_metrics({"score_s": 1.0})

    def delete_the_store() -> None:
        for part in ("", "-wal", "-shm"):
            Path(f"{db}{part}").unlink(missing_ok=True)

    cell(1)
    delete_the_store()
    cell(2)
    assert cells_in_store(results) == {"2": "FINISHED"}
    from dwbench.tracking import StoreLost

    tracker = Tracker(f"sqlite:///{db}", "dwbench", results / "mlartifacts")
    with pytest.raises(StoreLost, match="was deleted or replaced while this run logged"):
        with tracker.cell_run("cell-3", "seed 3", {"seed": "3"}):
            delete_the_store()
            with tracker.stage_run("score", "score-3", {"seed": "3"}, {}):
                pass
    cell(4)
    assert cells_in_store(results) == {"4": "FINISHED"}


def _sweep_losing_its_store(results: Path, seeds: str, when: str) -> None:
    """`python -m dwbench -m <CELL> seed=<seeds>` whose store is deleted before the second cell
    (`when="between cells"`) or in it, after its score stage (`when="in a cell"`)."""
    from dwbench import pipeline
    from dwbench.stages import select

    started = []
    run_cell, run_select = pipeline.run, select.run

    def delete_the_store() -> None:
        for part in ("", "-wal", "-shm"):
            (results / f"mlflow.db{part}").unlink(missing_ok=True)

    def cell(cfg, *args, **kwargs):
        started.append(cfg.seed)
        if len(started) == 2 and when == "between cells":
            delete_the_store()
        return run_cell(cfg, *args, **kwargs)

    def selection(ctx, *args, **kwargs):
        if len(started) == 2 and when == "in a cell":
            delete_the_store()
        return run_select(ctx, *args, **kwargs)

    pipeline.run, select.run = cell, selection
    sys.argv = ["dwbench", "-m", *CELL, f"seed={seeds}", f"results_dir={results}"]
    runpy.run_module("dwbench", run_name="__main__", alter_sys=True)


def _sweep(results: Path, cache_dir: Path, when: str) -> subprocess.CompletedProcess:
    """`_sweep_losing_its_store` in a process of its own (tests/forked_cli.py), as the CLI runs."""
    env = _cli([], results, cache_dir)["env"]
    process = forked_cli.start(
        _sweep_losing_its_store,
        (results, "1,2,3", when),
        REPO,
        env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess([], process.returncode, stdout, stderr)


def test_a_store_deleted_between_cells_of_a_sweep_gets_the_later_cells(
    tmp_path: Path, cache_dir: Path
) -> None:
    """The store deleted after the first of three cells: the later two are in the store at the
    path (not the deleted file), and one line says the first one's runs went with it."""
    results = tmp_path / "results"
    done = _sweep(results, cache_dir, "between cells")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "was deleted or replaced" in line]
    assert len(said) == 1, done.stderr[-3000:]
    assert cells_in_store(results) == {"2": "FINISHED", "3": "FINISHED"}


def test_a_store_deleted_in_a_cell_stops_that_cell_in_one_line(
    tmp_path: Path, cache_dir: Path
) -> None:
    """The store deleted while the second of three cells runs: that cell stops with one line
    (its runs would be in no store), the third logs into the store at the path, the sweep ends
    non-zero; run again, every cell is in the store."""
    results = tmp_path / "results"
    done = _sweep(results, cache_dir, "in a cell")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if line.startswith("dwbench: the MLflow")]
    assert len(said) == 1, done.stderr[-3000:]
    assert f"the MLflow store {results / 'mlflow.db'} was deleted or replaced while" in said[0]
    assert "seed=2" in done.stderr.split("stopped on")[-1]
    assert cells_in_store(results) == {"3": "FINISHED"}
    again = forked_cli.run(**_cli([*CELL, "seed=1,2,3"], results, cache_dir, True), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert cells_in_store(results) == {"1": "FINISHED", "2": "FINISHED", "3": "FINISHED"}
