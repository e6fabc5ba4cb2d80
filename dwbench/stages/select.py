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
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from dwbench.artifacts import SUCCESS_MARKER
from dwbench.context import RunContext
from dwbench.errors import ConfigError, DwbenchError
from dwbench.stages.keys import select_key
from dwbench.stages.left_open import finish_logging
from dwbench.stages.method_builder import build_method
from dwbench.stages.outputs import Prepared, Scored, Selected

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


def load(ctx: RunContext, key: str) -> Selected:
    """The cached selection (checked by `not_a_selection` before it is reused)."""
    marker = ctx.store.marker("select", key)
    ids = json.loads((ctx.store.stage_dir("select", key) / "selected_ids.json").read_text())
    return Selected(key, ids, marker["select_s"], marker["selection_precision"])


def not_a_selection(folder: Path, marker: dict[str, Any], pool_ids: set[str], k: int) -> str | None:
    """Why a selection folder is not k distinct pool ids with their timing, or None."""
    marker_path = folder / SUCCESS_MARKER
    if marker.get("k") != k or "select_s" not in marker or "selection_precision" not in marker:
        return f"its marker {marker_path} does not record k={k}, select_s and selection_precision"
    path = folder / "selected_ids.json"
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"{path} cannot be read ({error})"
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return f"{path} is not a JSON list of example ids"
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        return (
            f"{path} holds {len(ids)} ids but {len(set(ids))} distinct (repeated: {repeated[:3]})"
        )
    unknown = [i for i in ids if i not in pool_ids]
    if unknown:
        return f"{path} holds ids that are not in the pool ({unknown[:3]})"
    if len(ids) != k:
        return f"{path} holds {len(ids)} ids, not k={k}"
    return None


def run(ctx: RunContext, prepared: Prepared, scored: Scored) -> Selected:
    key = select_key(ctx.cfg, scored.key)
    k = subset_size(float(ctx.cfg.budget), len(prepared.pool))
    pool_ids = {ex.id for ex in prepared.pool}
    if ctx.store.reusable(
        "select", key, lambda folder, marker: not_a_selection(folder, marker, pool_ids, k)
    ):
        logger.info("select: cached %s", key)
        finish_logging(ctx, "select", key, partial(log_selection, ctx, key, scored))
        return load(ctx, key)
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
        log_selection(ctx, key, scored, mlflow_run)
    return Selected(key, ids, select_s, selection_precision)


def log_selection(ctx: RunContext, key: str, scored: Scored, mlflow_run: Any) -> None:
    """A finished selection's numbers and ids on its run, from its output folder."""
    marker = ctx.store.marker("select", key)
    mlflow_run.log_metrics(
        {
            "select_s": marker["select_s"],
            "k": marker["k"],
            "selection_precision": marker["selection_precision"],
            "distinct_scores": scored.scores["score"].nunique(),
        }
    )
    mlflow_run.log_artifact(ctx.store.stage_dir("select", key) / "selected_ids.json")
