"""prepare: load the task's pool, query and evaluation splits and freeze them as JSONL.

The key hashes the task config (`task.noise` only while it plants noise) and a fingerprint of
the data's content, so every later key
changes when the data does, and never when only its location does. A folder under the key is
reused only when it holds that data: its marker's fingerprint and sizes, and its split files
read back, must match what was loaded (evaluation reads eval.jsonl from there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dwbench.artifacts import SUCCESS_MARKER, ArtifactStore
from dwbench.data.loading import TaskSplits, load_task
from dwbench.data.records import Example, fingerprint, read_jsonl, write_jsonl
from dwbench.errors import DataError
from dwbench.stages.keys import prepare_key
from dwbench.stages.outputs import Prepared


def run(task_cfg: DictConfig, store: ArtifactStore, splits: TaskSplits | None = None) -> Prepared:
    """Freeze the splits (loaded here unless the caller already checked them)."""
    splits = load_task(task_cfg) if splits is None else splits
    data_fingerprint = fingerprint(splits)
    key = prepare_key(task_cfg, data_fingerprint)
    with store.lock("prepare", key):
        if not store.reusable(
            "prepare",
            key,
            lambda folder, marker: not_this_data(folder, marker, splits, data_fingerprint),
        ):
            write_prepared(store, key, splits, data_fingerprint)
    folder = store.stage_dir("prepare", key)
    return Prepared(
        key=key,
        dir=folder,
        fingerprint=data_fingerprint,
        pool=splits.pool,
        queries=splits.queries,
        eval_path=folder / "eval.jsonl",
        clean_flags=splits.clean_flags,
    )


def write_prepared(store: ArtifactStore, key: str, splits: Any, data_fingerprint: str) -> None:
    """The splits as the files later stages read."""
    with store.writing("prepare", key) as (out, marker):
        write_jsonl(out / "pool.jsonl", splits.pool)
        write_jsonl(out / "eval.jsonl", splits.eval)
        if splits.queries is not None:
            write_jsonl(out / "queries.jsonl", splits.queries)
        if splits.clean_flags is not None:
            (out / "labels.json").write_text(json.dumps(splits.clean_flags, indent=0))
        if getattr(splits, "corruptions", None) is not None:
            (out / "corruptions.json").write_text(json.dumps(splits.corruptions, indent=0))
        marker.update(
            fingerprint=data_fingerprint,
            n_pool=len(splits.pool),
            n_eval=len(splits.eval),
            n_queries=None if splits.queries is None else len(splits.queries),
        )


def not_this_data(
    folder: Path, marker: dict[str, Any], splits: TaskSplits, data_fingerprint: str
) -> str | None:
    """Why a prepared folder does not hold the data loaded now, or None."""
    expected = {
        "fingerprint": data_fingerprint,
        "n_pool": len(splits.pool),
        "n_eval": len(splits.eval),
    }
    for field, value in expected.items():
        if marker.get(field) != value:
            return (
                f"its marker {folder / SUCCESS_MARKER} records {field}={marker.get(field)!r}, "
                f"not {value!r} as the data loaded"
            )
    files: dict[str, list[Example]] = {"pool.jsonl": splits.pool, "eval.jsonl": splits.eval}
    if splits.queries is not None:
        files["queries.jsonl"] = splits.queries
    for name, examples in files.items():
        path = folder / name
        try:
            found = read_jsonl(path)
        except (OSError, ValueError, DataError) as error:
            reason = error.strerror if isinstance(error, OSError) else "a line is not an example"
            return f"{path} cannot be read ({reason})"
        if found != examples:
            return f"{path} does not hold the {len(examples)} examples loaded ({len(found)} found)"
    if splits.clean_flags is not None:
        path = folder / "labels.json"
        try:
            flags = json.loads(path.read_text())
        except (OSError, ValueError):
            flags = None
        if flags != splits.clean_flags:
            return f"{path} does not hold the clean flags of the data loaded"
    return None
