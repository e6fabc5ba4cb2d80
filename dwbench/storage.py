"""A full, read-only or forbidden disk, said in one line wherever it strikes.

The write that meets it can be anywhere (a stage output, a training checkpoint, the MLflow
store, a sweep's plan), and what reaches the command is rarely the OSError itself: a full disk
fails a checkpoint, then MLflow's attempt to mark the run FAILED fails on the same disk and is
raised in its place, wrapped by SQLAlchemy and MLflow (`database or disk is full`). So each
command looks through the whole chain of the exception it caught (`storage_problem`) and, when a
disk is behind it, prints one line naming the path and the fix instead of the chained tracebacks.
Nothing is deleted on the way out: finished stages and complete checkpoints stay, so the same
command, run again once there is room, goes on where it stopped.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

from dwbench.errors import DwbenchError

FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
LOCKED = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}
# A write the disk failed: SQLite says so of a write-ahead log or shared memory file it cannot
# grow on a full disk (SQLITE_IOERR), where it says "database or disk is full" of the database.
FAILED = {errno.EIO: "disk I/O error"}
# What libraries that wrap the OS error keep of it, only its text: SQLite (through SQLAlchemy and
# MLflow) and safetensors' Rust errors.
TEXTS = {
    "database or disk is full": errno.ENOSPC,
    "no space left on device": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "read-only file system": errno.EROFS,
    "attempt to write a readonly database": errno.EROFS,
    "disk i/o error": errno.EIO,
}
SQLITE = ("database or disk is full", "attempt to write a readonly database", "disk i/o error")


class StorageError(DwbenchError):
    """A disk that is full, read-only or not writable by this user; the message names the path."""


def storage_problem(
    error: BaseException,
    folders: Mapping[str, Path] | None = None,
    database: Path | None = None,
    resumes: bool = False,
) -> StorageError | None:
    """The disk problem behind `error`, anywhere in its chain, as one line; None for any other
    error (which the command lets through, traceback and all).

    `folders` are the settings a path may lie under (`{"results_dir": ...}`), so the fix names
    the one to change; `database` is the MLflow store, named when only SQLite's text is left;
    `resumes` says that the same command, run again, goes on where it stopped.
    """
    code, path, said = _disk_error(error)
    if code is None:
        return None
    if path is None and said in SQLITE:
        path = database
    setting, root = _setting_of(path, folders or {})
    where = str(path) if path is not None else f"under {setting}={root}" if root else "a file"
    if code in FULL | FAILED:
        again = (
            ": finished stages and complete checkpoints are kept, so it goes on where it stopped."
            if resumes
            else "."
        )
        what = (
            f"the disk is full, writing {where} ({FULL[code]})"
            if code in FULL
            else f"the disk failed writing {where} ({FAILED[code]}: most often, it is full)"
        )
        return StorageError(
            f"{what}. Free space on it (df -h {root or path or '.'}) or point "
            f"{setting} at a larger disk, and run the same command again{again}"
        )
    return StorageError(
        f"cannot write {where} ({LOCKED[code]}). Point {setting} at a folder you can write, "
        "or make this one writable, and run the command again."
    )


def is_storage_error(error: BaseException) -> bool:
    return _disk_error(error)[0] is not None


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception it was raised from or while handling, each once."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__context__, current.__cause__]


def _disk_error(error: BaseException) -> tuple[int | None, Path | None, str | None]:
    """(errno, path, text found) of the disk error in the chain: an OSError naming its file
    first, then one that does not, then a wrapped error's text; Nones when there is none.

    An OSError of a copy or a rename names two files, the source first: a full or read-only
    disk is the one written, the second."""
    chain = list(exception_chain(error))
    oserrors = [e for e in chain if isinstance(e, OSError) and e.errno in FULL | LOCKED | FAILED]
    for found in sorted(oserrors, key=lambda e: e.filename is None):
        written = found.filename2 if found.errno != errno.EACCES else None
        named = written if written is not None else found.filename
        return found.errno, None if named is None else Path(str(named)), None
    for found in chain:
        text = str(found).lower()
        for said, code in TEXTS.items():
            if said in text:
                return code, None, said
    return None, None, None


def _setting_of(path: Path | None, folders: Mapping[str, Path]) -> tuple[str, Path | None]:
    """The setting whose folder holds `path` (the first one when the path is unknown)."""
    for setting, folder in folders.items():
        if path is None or path.resolve().is_relative_to(Path(folder).resolve()):
            return setting, Path(folder)
    return "results_dir", None


class DropRaisedStorageErrors(logging.Filter):
    """MLflow logs a failed store call with its traceback and then raises it; a disk problem is
    then said in one line by the command, so the logged copy only repeats it, at length."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[1] and is_storage_error(record.exc_info[1]))
