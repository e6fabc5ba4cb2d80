"""prepare: load the task's pool, query and evaluation splits and freeze them as JSONL.

The key hashes the task config and a fingerprint of the data's content, so every later key
changes when the data does, and never when only its location does.
"""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig

from dwbench.artifacts import ArtifactStore
from dwbench.data.loading import TaskSplits, load_task
from dwbench.data.records import fingerprint, write_jsonl
from dwbench.keys import stage_key
from dwbench.stages.records import Prepared


def run(task_cfg: DictConfig, store: ArtifactStore, splits: TaskSplits | None = None) -> Prepared:
    """Freeze the splits (loaded here unless the caller already checked them)."""
    splits = load_task(task_cfg) if splits is None else splits
    data_fingerprint = fingerprint(splits)
    key = stage_key("prepare", task=task_cfg, data=data_fingerprint)
    with store.lock("prepare", key):
        if not store.reusable("prepare", key):
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
        marker.update(
            fingerprint=data_fingerprint,
            n_pool=len(splits.pool),
            n_eval=len(splits.eval),
            n_queries=None if splits.queries is None else len(splits.queries),
        )
