"""Where stage outputs live: `results/artifacts/<stage>/<key>/`, complete or absent.

A stage writes into a private staging folder and renames it into place with `_SUCCESS.json`
already inside, so a folder that exists under its key is finished: a killed job never leaves a
half-written output that a later run could mistake for a result.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SUCCESS_MARKER = "_SUCCESS.json"


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

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def is_done(self, stage: str, key: str) -> bool:
        return (self.stage_dir(stage, key) / SUCCESS_MARKER).is_file()

    def marker(self, stage: str, key: str) -> dict[str, Any]:
        return json.loads((self.stage_dir(stage, key) / SUCCESS_MARKER).read_text())

    def markers(self, stage: str) -> Iterator[dict[str, Any]]:
        """Every finished output of a stage (used to find, e.g., a measured full-pool fine-tune)."""
        for marker in sorted((self.root / stage).glob(f"*/{SUCCESS_MARKER}")):
            yield json.loads(marker.read_text())

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
        (staging / SUCCESS_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
        final = self.stage_dir(stage, key)
        if final.exists():  # another job finished the same key first: keep its output
            shutil.rmtree(staging, ignore_errors=True)
        else:
            os.replace(staging, final)
        shutil.rmtree(stage_root / f".partial-{key}", ignore_errors=True)
