"""Where stage outputs live: `results/artifacts/<stage>/<key>/`, complete or absent.

A stage writes into a private staging folder and renames it into place with `_SUCCESS.json`
already inside, so a folder that exists under its key is finished: a killed job never leaves a
half-written output that a later run could mistake for a result.

The marker lists every file of the output with its size, sha256 and, for line-based files, its
row count, and an output is only ever reused after they check out. A folder that fails the check
(a file cut short by a disk fault or a partial copy, edited by hand, missing, or a marker that
is not JSON) is reported with its path, moved aside to `.damaged-<key>-<time>` (nothing is
deleted), and computed again; a folder without a marker is replaced by the fresh output.
Outputs written before markers carried the list are trusted as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
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


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` (but the marker), by its path relative to it."""
    return {
        str(path.relative_to(folder)): file_record(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != SUCCESS_MARKER
    }


def damage(folder: Path) -> str | None:
    """What is wrong with a finished output folder, or None when it checks out."""
    marker_path = folder / SUCCESS_MARKER
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as error:
        return f"its marker {marker_path} cannot be read ({error})"
    listed = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(marker, dict):
        return f"its marker {marker_path} is not a JSON object"
    if listed is None:
        return None  # written before markers listed their files
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
    return None


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

    def reusable(self, stage: str, key: str) -> bool:
        """Finished and intact, checked once per process before a stage reuses its output; a
        damaged output is reported, moved aside and so not reusable."""
        folder = self.stage_dir(stage, key)
        if not (folder / SUCCESS_MARKER).is_file():
            return False
        if (stage, key) in self._checked:
            return True
        problem = damage(folder)
        if problem is None:
            self._checked.add((stage, key))
            return True
        self._set_aside(folder, problem)
        return False

    def marker(self, stage: str, key: str) -> dict[str, Any]:
        path = self.stage_dir(stage, key) / SUCCESS_MARKER
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise DataError(
                f"{path} cannot be read ({error}); run the cell again, which checks the stage "
                "output and computes it afresh."
            ) from error

    def _set_aside(self, folder: Path, problem: str) -> Path:
        if self.read_only:
            raise DwbenchError(
                f"{folder} is damaged ({problem}), and {self.root} is read-only, so it cannot be "
                "computed again; run it where the results folder can be written."
            )
        aside = folder.with_name(f".damaged-{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        logger.warning(
            "%s is damaged: %s. Moved to %s; computing it again.", folder, problem, aside
        )
        os.replace(folder, aside)
        return aside

    def markers(self, stage: str) -> Iterator[dict[str, Any]]:
        """Every finished output's marker (e.g. a measured full-pool fine-tune); reading them
        changes nothing, and an unreadable one is skipped (reusing that output checks it)."""
        for marker in sorted((self.root / stage).glob(f"*/{SUCCESS_MARKER}")):
            try:
                yield json.loads(marker.read_text())
            except (OSError, ValueError):
                logger.warning("%s cannot be read; skipped.", marker)

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
