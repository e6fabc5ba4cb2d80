"""The selection method of a run, built with everything it may use: the score stage scores
with it, the select stage selects with it."""

from __future__ import annotations

from pathlib import Path

from dwbench.context import RunContext
from dwbench.methods.base import ScoringContext, SelectionMethod, reads_labels
from dwbench.methods.registry import method_class
from dwbench.stages.outputs import Prepared
from dwbench.stages.train import ScorerTrainer


def build_method(
    ctx: RunContext,
    prepared: Prepared,
    key: str,
    scorer_trainer: ScorerTrainer | None = None,
    work_dir: Path | None = None,
) -> SelectionMethod:
    method = method_class(ctx.cfg.method)
    scoring = ScoringContext.for_cell(
        ctx.cfg,
        prepared,
        work_dir or ctx.store.scratch_dir("score", key, create=False),
        device=ctx.device,
        cache_dir=ctx.cache_dir,
        fine_tune=scorer_trainer,
        reads_labels=reads_labels(method),
    )
    return method(scoring)
