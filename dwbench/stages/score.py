"""score: the selection method gives every pool example a score.

Budget- and target-independent: one scoring run serves every budget and, for weak-to-strong,
every target model. Its wall time and peak memory are STR's numerator.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dwbench.context import RunContext
from dwbench.errors import DwbenchError
from dwbench.keys import stage_key
from dwbench.memory import PeakMemory
from dwbench.methods.base import ScoringContext, SelectionMethod, method_params, method_stats
from dwbench.methods.registry import get_method
from dwbench.models import model_identity
from dwbench.stages.prepare import Prepared
from dwbench.stages.train import ScorerTrainer
from dwbench.tracking import flatten

logger = logging.getLogger(__name__)


@dataclass
class Scored:
    key: str
    scores: pd.DataFrame
    selection_s: float  # wall time of scoring, as first measured (a cached result keeps it)
    peak_rss_mb: float


def key_for(ctx: RunContext, prepared: Prepared) -> str:
    cfg = ctx.cfg
    return stage_key(
        "score",
        prepare=prepared.key,
        method=cfg.method,
        selector=model_identity(cfg.selector_model),
        seed=cfg.seed,
    )


def build_method(
    ctx: RunContext, prepared: Prepared, key: str, scorer_trainer: ScorerTrainer | None = None
) -> SelectionMethod:
    cfg = ctx.cfg
    scoring = ScoringContext(
        method_cfg=cfg.method,
        task_cfg=cfg.task,
        selector_cfg=cfg.selector_model,
        queries=prepared.queries,
        seed=int(cfg.seed),
        device=ctx.device,
        cache_dir=ctx.cache_dir,
        work_dir=ctx.store.scratch_dir("score", key, create=False),
        fine_tune=scorer_trainer,
        clean_flags=prepared.clean_flags,
    )
    return get_method(str(cfg.method.name))(scoring)


def load(ctx: RunContext, key: str) -> Scored:
    marker = ctx.store.marker("score", key)
    scores = pd.read_csv(ctx.store.stage_dir("score", key) / "scores.csv", dtype={"id": str})
    return Scored(key, scores, marker["selection_s"], marker["peak_rss_mb"])


def run(ctx: RunContext, prepared: Prepared) -> Scored:
    key = key_for(ctx, prepared)
    if ctx.store.is_done("score", key):
        logger.info("score: cached %s", key)
        return load(ctx, key)
    scorer_trainer = ScorerTrainer(ctx, prepared)
    method = build_method(ctx, prepared, key, scorer_trainer)
    params = {"method": ctx.cfg.method, "selector_model": ctx.cfg.selector_model}
    with ctx.tracker.stage_run("score", key, ctx.tags(), params) as mlflow_run:
        with ctx.store.writing("score", key) as (out, marker):
            start = time.perf_counter()
            with PeakMemory() as memory:
                scores = method.score(prepared.pool)
            # a scorer fine-tune made earlier (and shared) is still this method's cost (STR)
            scorer_train_s = sum(run.train_s for run in scorer_trainer.runs)
            selection_s = time.perf_counter() - start + scorer_trainer.seconds_not_spent_here()
            check_scores(scores, prepared)
            scores.to_csv(out / "scores.csv", index=False)
            keep_work_files(ctx.store.scratch_dir("score", key, create=False), out)
            stats = method_stats(method)
            resolved = method_params(method)
            marker.update(
                method_params=resolved,
                selection_s=selection_s,
                peak_rss_mb=memory.peak_rss_mb,
                n_pool=len(scores),
                method_stats=stats,
                scorer_train_s=scorer_train_s,
                scorer_train_keys=[run.key for run in scorer_trainer.runs],
            )
        mlflow_run.log_metrics(
            {
                "selection_s": selection_s,
                "scorer_train_s": scorer_train_s,
                **memory.as_metrics("score"),
                **stats,
            }
        )
        mlflow_run.set_tags(flatten(resolved, "resolved."))
        mlflow_run.log_artifact(ctx.store.stage_dir("score", key) / "scores.csv")
    return Scored(key, scores, selection_s, memory.peak_rss_mb)


def keep_work_files(work_dir: Path, out: Path) -> None:
    """The method's own records (e.g. Data Whisperer's episodes) stay inspectable."""
    if not work_dir.is_dir():
        return
    for path in sorted(work_dir.iterdir()):
        if path.is_file():
            shutil.move(str(path), out / path.name)


def check_scores(scores: pd.DataFrame, prepared: Prepared) -> None:
    """A method must score every pool example, in pool order, with a finite number."""
    ids = [ex.id for ex in prepared.pool]
    if list(scores.columns[:2]) != ["id", "score"] or scores["id"].tolist() != ids:
        raise DwbenchError("selection method returned scores that do not match the pool's ids")
    bad = [i for i, s in zip(ids, scores["score"], strict=True) if not math.isfinite(float(s))]
    if bad:
        raise DwbenchError(f"selection method returned non-finite scores for {bad[:5]}")
