"""Where stage outputs live: `results/artifacts/<stage>/<key>/`, complete or absent.

A stage writes into a private staging folder and renames it into place with `_SUCCESS.json`
already inside, so a folder that exists under its key is finished: a killed job never leaves a
half-written output that a later run could mistake for a result.

The marker names its stage and key and lists every file of the output with its size, sha256
and, for line-based files, its row count, and an output is only ever reused after they check
out, and after the stage's own check of its content (the prepared data's fingerprint, the
selected ids). A folder that fails (a file cut short by a disk fault or a partial copy, edited
by hand, missing or not listed; a marker that is not JSON, names another output or lists its
files in any other shape) is reported with its path, moved aside to `.damaged-<key>-<time>`
(nothing is deleted), and computed again; a folder without a marker is replaced by the fresh
output. Outputs written before markers carried the list are checked by their stage's content
check alone.

Training checkpoints are sealed the same way (`seal`): every file is flushed to disk before the
marker, so after a kill or a power loss a checkpoint with a matching marker is whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dwbench.errors import DataError, DwbenchError

logger = logging.getLogger(__name__)
SUCCESS_MARKER = "_SUCCESS.json"
LINE_FILES = (".csv", ".jsonl")  # files whose row count the marker records


def file_record(path: Path) -> dict[str, Any]:
    """Size, sha256 and (line-based files) row count of one output file."""
    digest = hashlib.sha256()
    rows = 0
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            rows += block.count(b"\n")
    record: dict[str, Any] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    if path.suffix in LINE_FILES:
        record["rows"] = max(rows - 1, 0) if path.suffix == ".csv" else rows  # a CSV's header
    return record


def manifest_names(folder: Path) -> list[str]:
    """Every file under `folder` (but the marker), by its path relative to it."""
    return [
        str(path.relative_to(folder))
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != SUCCESS_MARKER
    ]


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` (but the marker) with its record."""
    return {name: file_record(folder / name) for name in manifest_names(folder)}


def damage(folder: Path, stage: str | None = None, legacy: bool = True) -> str | None:
    """What is wrong with a finished folder, or None when it checks out.

    Its marker must name `stage` (the folder's parent by default) and the folder's name as its
    key. `legacy`: a marker with no file list at all (written before markers listed their
    files) passes; the stage's content check is then all that guards the output.
    """
    marker_path = folder / SUCCESS_MARKER
    if not marker_path.is_file():
        return f"its marker {marker_path} is missing"
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as error:
        return f"its marker {marker_path} cannot be read ({error})"
    problem = not_its_marker(marker, folder, stage)
    if problem is not None:
        return f"its marker {marker_path} {problem}"
    if "files" not in marker:
        return None if legacy else f"its marker {marker_path} lists no files"
    listed = marker["files"]
    shape = _file_list_problem(listed)
    if shape is not None:
        return f"its marker {marker_path} does not list the files as written ({shape})"
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        found = file_record(path)
        if (found["bytes"], found["sha256"]) != (expected["bytes"], expected["sha256"]):
            if "rows" in expected and found["rows"] != expected["rows"]:
                size = f"{found['rows']} rows, {expected['rows']} written"
            else:
                size = f"{found['bytes']} bytes, {expected['bytes']} written"
            return f"{path} changed since it was written ({size})"
    unlisted = sorted(set(manifest_names(folder)) - set(listed))
    if unlisted:
        return f"{folder / unlisted[0]} is not listed in its marker {marker_path}"
    return None


def not_its_marker(marker: Any, folder: Path, stage: str | None = None) -> str | None:
    """Why a parsed marker is not the marker of this folder, or None: it must be a JSON object
    naming the stage (the folder's parent by default) and the key (the folder's name)."""
    if not isinstance(marker, dict):
        return f"is not a JSON object but {type(marker).__name__}"
    stage = folder.parent.name if stage is None else stage
    found = (marker.get("stage"), marker.get("key"))
    if found != (stage, folder.name):
        return f"names stage {found[0]!r} and key {found[1]!r}, not {stage!r} and {folder.name!r}"
    return None


def _file_list_problem(listed: Any) -> str | None:
    """How a marker's `files` differs from {name: {"bytes": int, "sha256": str, ...}}."""
    if not isinstance(listed, dict):
        return f"files is {type(listed).__name__}, not an object"
    for name, record in listed.items():
        if not isinstance(record, dict):
            return f"{name} has {type(record).__name__}, not its size and sha256"
        size, digest = record.get("bytes"), record.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or not isinstance(digest, str):
            return f"{name} has no integer bytes and string sha256"
    return None


def aside_path(folder: Path) -> Path:
    """A free `.damaged-<name>-<time>` beside `folder`, where a damaged folder is kept."""
    return free_path(lambda stamp: folder.with_name(f".damaged-{folder.name}-{stamp}"))


def free_path(named: Callable[[str], Path]) -> Path:
    """`named(stamp)` for the current time, with `-2`, `-3`, ... added until no file has it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, count = named(stamp), 1
    while path.exists():
        count += 1
        path = named(f"{stamp}-{count}")
    return path


def seal(folder: Path, marker: dict[str, Any]) -> None:
    """Write `folder`'s marker, listing its files, once they are all on disk.

    Every file and folder is flushed first, the marker goes through a flushed temporary file
    renamed into place, and the parent folder is flushed last: after a kill or a power loss a
    marker exists only beside the complete files it lists.
    """
    listed = manifest(folder)
    for name in listed:
        _fsync(folder / name)
    for sub in sorted({(folder / name).parent for name in listed}, reverse=True):
        _fsync(sub)
    staging = folder / f".{SUCCESS_MARKER}.tmp"
    with staging.open("w") as handle:
        json.dump({**marker, "files": listed}, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, folder / SUCCESS_MARKER)
    _fsync(folder)
    _fsync(folder.parent)


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ArtifactStore:
    """Content-addressed stage outputs under one root folder."""

    def __init__(self, root: Path, read_only: bool = False) -> None:
        self.root = Path(root)
        self.read_only = read_only  # serve finished outputs; computing anything is an error
        self._checked: set[tuple[str, str]] = set()  # outputs verified in this process

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def is_done(self, stage: str, key: str) -> bool:
        """Finished: its marker exists (cheap, for status and plans; `reusable` checks it)."""
        return (self.stage_dir(stage, key) / SUCCESS_MARKER).is_file()

    def reusable(
        self,
        stage: str,
        key: str,
        check: Callable[[Path, dict[str, Any]], str | None] | None = None,
    ) -> bool:
        """Finished and intact, checked once per process before a stage reuses its output; a
        damaged output is reported, moved aside and so not reusable.

        `check(folder, marker)` is the stage's own check of the content (what is wrong, or
        None), run once the files match their marker.
        """
        folder = self.stage_dir(stage, key)
        if not (folder / SUCCESS_MARKER).is_file():
            return False
        if (stage, key) in self._checked:
            return True
        problem = damage(folder)
        if problem is None and check is not None:
            problem = check(folder, json.loads((folder / SUCCESS_MARKER).read_text()))
        if problem is None:
            self._checked.add((stage, key))
            return True
        self._set_aside(folder, problem)
        return False

    def marker(self, stage: str, key: str) -> dict[str, Any]:
        path = self.stage_dir(stage, key) / SUCCESS_MARKER
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise DataError(
                f"{path} cannot be read ({error}); run the cell again, which checks the stage "
                "output and computes it afresh."
            ) from error
        problem = not_its_marker(marker, path.parent)
        if problem is not None:
            raise DataError(
                f"{path} {problem}; run the cell again, which checks the stage output and "
                "computes it afresh."
            )
        return marker

    def _set_aside(self, folder: Path, problem: str) -> Path:
        if self.read_only:
            raise DwbenchError(
                f"{folder} is damaged ({problem}), and {self.root} is read-only, so it cannot be "
                "computed again; run it where the results folder can be written."
            )
        aside = aside_path(folder)
        logger.warning(
            "%s is damaged: %s. Moved to %s; computing it again.", folder, problem, aside
        )
        os.replace(folder, aside)
        return aside

    def markers(self, stage: str, required: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
        """Every finished output's marker (e.g. a measured full-pool fine-tune) that names its
        stage and key and holds the `required` fields; reading them changes nothing, and any
        other is skipped with a warning (reusing that output checks it and computes it again)."""
        for path in sorted((self.root / stage).glob(f"*/{SUCCESS_MARKER}")):
            try:
                marker = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                problem: str | None = f"cannot be read ({error})"
            else:
                problem = not_its_marker(marker, path.parent)
                missing = [f for f in required if problem is None and f not in marker]
                if missing:
                    problem = f"has no {', '.join(missing)}"
            if problem is not None:
                logger.warning(
                    "%s %s; its output is left out. Run its cell again: that checks the output "
                    "and computes it afresh.",
                    path,
                    problem,
                )
                continue
            yield marker

    @contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """One process at a time computes a stage key: a second identical command waits here,
        then finds the output finished and reuses it, instead of doing the work twice."""
        from filelock import FileLock

        if self.read_only:  # nothing can be written, so nothing is computed: no lock needed
            yield
            return
        folder = self.root / stage
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / f".lock-{key}"))
        try:
            lock.acquire(blocking=False)
        except TimeoutError:
            logger.info("%s/%s is being computed by another process; waiting for it.", stage, key)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def scratch_dir(self, stage: str, key: str, create: bool = True) -> Path:
        """Work in progress that survives a kill (training checkpoints), removed on success.

        `create=False` only names it, for work that may never write there.
        """
        path = self.root / stage / f".partial-{key}"
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def writing(self, stage: str, key: str) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Yield (staging folder, marker dict); on success the folder becomes the stage output.

        The caller fills the marker dict with what later stages and the log need (timings, sizes);
        it is written last, then the folder is renamed into place in one step.
        """
        if self.read_only:
            raise DwbenchError(
                f"{stage}/{key} is not in the results folder and must be computed, but "
                f"{self.root} is read-only; run it where the results folder can be written "
                "(results_dir=...)."
            )
        stage_root = self.root / stage
        stage_root.mkdir(parents=True, exist_ok=True)
        for stale in stage_root.glob(f".tmp-{key}-*"):
            if not _pid_alive(int(stale.name.rsplit("-", 1)[1])):
                shutil.rmtree(stale, ignore_errors=True)
        staging = stage_root / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        marker: dict[str, Any] = {"stage": stage, "key": key}
        try:
            yield staging, marker
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        marker["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        marker["files"] = manifest(staging)
        (staging / SUCCESS_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
        final = self.stage_dir(stage, key)
        if final.exists() and self.reusable(stage, key):
            shutil.rmtree(staging, ignore_errors=True)  # another job finished it first: keep it
        else:
            if final.exists():  # no marker: an interrupted copy or a hand edit, never a result
                self._set_aside(final, "it has no marker")
            os.replace(staging, final)
            self._checked.add((stage, key))
        shutil.rmtree(stage_root / f".partial-{key}", ignore_errors=True)
