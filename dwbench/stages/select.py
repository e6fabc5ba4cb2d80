"""select: turn scores into the kept subset at budget rho (k = floor(rho * N)).

The method's own rule decides (top-k by default; CCS strata and the like override it). On the
embedded task this is also where selection precision is measured: the share of clean examples
among those kept, a ground truth that methods never see.
"""

from __future__ import annotations

import json
import logging
import math
import time

from dwbench.context import RunContext
from dwbench.errors import ConfigError, DataError, DwbenchError
from dwbench.stages.keys import select_key
from dwbench.stages.method import build_method
from dwbench.stages.records import Prepared, Scored, Selected

logger = logging.getLogger(__name__)


def subset_size(budget: float, pool_size: int) -> int:
    """k = floor(budget * N), refusing budgets that keep nothing."""
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"budget={budget} is outside (0, 1]; pass a share such as budget=0.1.")
    k = math.floor(budget * pool_size + 1e-9)
    if k == 0:
        raise ConfigError(
            f"budget={budget} of a pool of {pool_size} examples selects nothing; "
            f"use budget>={1 / pool_size:.4g} or a larger pool (task.pool_limit)."
        )
    return k


def precision(ids: list[str], clean_flags: dict[str, bool] | None) -> float | None:
    if clean_flags is None:
        return None
    return sum(clean_flags[i] for i in ids) / len(ids)


def load(ctx: RunContext, key: str, pool_ids: set[str]) -> Selected:
    """The cached selection, its ids checked against the pool they were chosen from."""
    marker = ctx.store.marker("select", key)
    path = ctx.store.stage_dir("select", key) / "selected_ids.json"
    try:
        ids = json.loads(path.read_text())
    except ValueError as error:
        raise DataError(f"{path} is not JSON ({error}); delete its folder and run again.") from None
    unknown = [i for i in ids if i not in pool_ids]
    if unknown:
        raise DataError(
            f"{path} holds ids that are not in the pool ({unknown[:3]}); delete its folder and "
            "run again."
        )
    return Selected(key, ids, marker["select_s"], marker["selection_precision"])


def run(ctx: RunContext, prepared: Prepared, scored: Scored) -> Selected:
    key = select_key(ctx.cfg, scored.key)
    if ctx.store.reusable("select", key):
        logger.info("select: cached %s", key)
        return load(ctx, key, {ex.id for ex in prepared.pool})
    k = subset_size(float(ctx.cfg.budget), len(prepared.pool))
    method = build_method(ctx, prepared, scored.key)
    params = {"budget": ctx.cfg.budget, "k": k, "score_key": scored.key}
    with ctx.tracker.stage_run("select", key, ctx.tags(), params) as mlflow_run:
        with ctx.store.writing("select", key) as (out, marker):
            start = time.perf_counter()
            ids = method.select(scored.scores, k)
            select_s = time.perf_counter() - start
            if len(ids) != k or len(set(ids)) != k:
                raise DwbenchError(
                    f"method {ctx.cfg.method.name} selected {len(ids)} examples "
                    f"({len(set(ids))} distinct) instead of k={k}"
                )
            selection_precision = precision(ids, prepared.clean_flags)
            (out / "selected_ids.json").write_text(json.dumps(ids))
            marker.update(
                k=k,
                n_pool=len(prepared.pool),
                select_s=select_s,
                selection_precision=selection_precision,
            )
        mlflow_run.log_metrics(
            {
                "select_s": select_s,
                "k": k,
                "selection_precision": selection_precision,
                "distinct_scores": scored.scores["score"].nunique(),
            }
        )
        mlflow_run.log_artifact(ctx.store.stage_dir("select", key) / "selected_ids.json")
    return Selected(key, ids, select_s, selection_precision)
