"""The MLflow run of a finished stage output that a kill left open, logged to the end.

A stage commits its output, then logs it to its MLflow run (metrics, the loss curve, files). A
kill between the two left the output finished and its run RUNNING without them; a re-run
reuses the output, so nothing logged them, ever: the train run kept no loss curve, the
evaluation run no samples. A stage that reuses its output calls `finish_logging`, which, where
the key's newest run is not FINISHED, logs the output from disk into that run through `Missing`:
only what the run lacks, as the killed attempt may have logged part of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dwbench.context import RunContext

logger = logging.getLogger(__name__)


class Missing:
    """A stage's run, logged into only where it lacks a metric (by name) or a file (by name and
    size), so a second logging repeats no value in a metric's history."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.metrics = set(run.client.get_run(run.run_id).data.metrics)
        self.files = {f.path: f.file_size for f in run.client.list_artifacts(run.run_id)}

    def log_metrics(self, metrics: Mapping[str, float | int | None]) -> None:
        self.run.log_metrics({k: v for k, v in metrics.items() if k not in self.metrics})

    def log_history(self, history: Sequence[Mapping[str, Any]], names: Mapping[str, str]) -> None:
        self.run.log_history(history, {f: m for f, m in names.items() if m not in self.metrics})

    def log_artifact(self, path: Path) -> None:
        if self.files.get(path.name) != path.stat().st_size:
            self.run.log_artifact(path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.run.set_tags(tags)


def finish_logging(ctx: RunContext, stage: str, key: str, log: Callable[[Any], None]) -> None:
    """`log(run)` into the run of this reused output if an attempt left it open."""
    find_run = getattr(ctx.tracker, "find_run", None)  # a read-only results folder logs nothing
    found = None if find_run is None else find_run(stage, key)
    if found is None or found.info.status == "FINISHED":
        return
    logger.info(
        "%s/%s is finished, but its MLflow run %s is %s (an attempt stopped before logging it): "
        "logging what it lacks.",
        stage,
        key,
        found.info.run_id,
        found.info.status,
    )
    with ctx.tracker.stage_run(stage, key, ctx.tags(), {}, amend=True) as run:
        log(Missing(run))
