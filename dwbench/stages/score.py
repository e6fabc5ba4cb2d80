"""score: the selection method gives every pool example a score.

Budget- and target-independent: one scoring run serves every budget and, for weak-to-strong,
every target model. Its wall time and peak memory are STR's numerator.

With `score.shards=S` (S > 1) a method whose scoring is a sum over independent units
(`ShardableMethod`) scores in S shards, each its own cached `score_shard` artifact that can run
as its own job (`score.shard=i`), and a merge writes the usual score output under the usual
key: the shard layout changes no result. Work that cannot be split (a scorer fine-tune) runs
once, before the shards. The merged selection time is the shards' scoring time plus the merge
and the scorer fine-tune; the peak memory is the largest of them.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from dwbench.content_hash import stage_key
from dwbench.context import RunContext
from dwbench.errors import ConfigError, DwbenchError
from dwbench.memory import PeakMemory
from dwbench.methods.base import (
    Shard,
    is_shardable,
    method_params,
    method_stats,
    shared_work,
)
from dwbench.methods.registry import method_class
from dwbench.models import resolved_dtype
from dwbench.stages.keys import score_key
from dwbench.stages.left_open import finish_logging
from dwbench.stages.method_builder import build_method
from dwbench.stages.outputs import Prepared, Scored
from dwbench.stages.train import ScorerTrainer
from dwbench.tracking import flatten

logger = logging.getLogger(__name__)


# score.shard=shared: only the part that cannot be split (a sharded SLURM chain's first job)
SHARED = "shared"


def shard_count(cfg: DictConfig) -> int:
    """The shards this cell's scoring takes: score.shards, checked with score.shard; 1 for a
    method that cannot shard (a sweep's score.shards applies to the methods that can)."""
    count, index = cfg.score.shards, cfg.score.shard
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"score.shards={count!r} must be a positive integer (1: no shards).")
    if index is not None and count == 1:
        raise ConfigError(f"score.shard={index} is set but score.shards=1; set score.shards > 1.")
    in_range = isinstance(index, int) and not isinstance(index, bool) and 0 <= index < count
    if index is not None and index != SHARED and not in_range:
        raise ConfigError(
            f"score.shard={index!r} must be a shard in 0..{count - 1} (score.shards={count}), "
            f"'{SHARED}' (the unsplittable part only), or null (every shard, then the merge)."
        )
    if count > 1 and not is_shardable(method_class(cfg.method)):
        if index is not None:
            raise ConfigError(
                f"score.shard={index}: method={cfg.method.name} cannot split its scoring into "
                "shards, so it has no parts to run; run the cell without score.shard."
            )
        return 1  # scored in one piece, as `plan` and the score stage say
    return count


def shard_key(score_key: str, shard: Shard) -> str:
    """A shard's key: its place in the score stage's layout, nothing else."""
    return stage_key("score_shard", score=score_key, index=shard.index, count=shard.count)


def shard_keys(score_key: str, count: int) -> list[str]:
    return [shard_key(score_key, Shard(i, count)) for i in range(count)]


def load(ctx: RunContext, key: str, prepared: Prepared) -> Scored:
    """The cached scores, checked against the pool: one finite score per example, in order."""
    marker = ctx.store.marker("score", key)
    scores = pd.read_csv(ctx.store.stage_dir("score", key) / "scores.csv", dtype={"id": str})
    check_scores(scores, prepared)
    return Scored(key, scores, marker["selection_s"], marker["peak_rss_mb"])


def run(ctx: RunContext, prepared: Prepared) -> Scored:
    key = score_key(ctx.cfg, prepared.key)
    if ctx.store.reusable("score", key, lambda folder, _: cached_scores_problem(folder, prepared)):
        logger.info("score: cached %s", key)
        finish_logging(ctx, "score", key, partial(log_scoring, ctx, key))
        return load(ctx, key, prepared)
    count = shard_count(ctx.cfg)
    if count == 1 and ctx.cfg.score.shards > 1:
        logger.warning(
            "score.shards=%s: method=%s cannot split its scoring into shards; scoring it in one "
            "piece.",
            ctx.cfg.score.shards,
            ctx.cfg.method.name,
        )
    if count > 1:
        shared_s = run_shared_work(ctx, prepared, key)
        for index in range(count):
            run_shard(ctx, prepared, key, Shard(index, count))
        return merge(ctx, prepared, key, count, shared_s)
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
            # time an interrupted attempt already spent on what is reused (Data Whisperer's
            # finished episodes) counts too, so a resumed cell reports an uninterrupted one's STR
            earlier_s = float(method_stats(method).get("resumed_seconds", 0.0))
            selection_s = (
                time.perf_counter() - start + scorer_trainer.seconds_not_spent_here() + earlier_s
            )
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
                # what selector_model.dtype (auto: per hardware) computed in
                selector_dtype=resolved_dtype(ctx.cfg.selector_model, ctx.device),
                peak_gpu_mb=memory.peak_gpu_mb,
            )
        log_scoring(ctx, key, mlflow_run)
    return Scored(key, scores, selection_s, memory.peak_rss_mb)


def log_scoring(ctx: RunContext, key: str, mlflow_run: Any) -> None:
    """Finished scores' numbers, the method's resolved options and scores.csv on their run,
    from the output folder (whole or merged from shards)."""
    marker = ctx.store.marker("score", key)
    if "selector_dtype" in marker:
        mlflow_run.set_tags({"selector_dtype": marker["selector_dtype"]})
    mlflow_run.log_metrics(
        {
            "selection_s": marker["selection_s"],
            "scorer_train_s": marker["scorer_train_s"],
            "score_peak_rss_mb": marker["peak_rss_mb"],
            "score_peak_gpu_mb": marker.get("peak_gpu_mb"),
            **marker["method_stats"],
        }
    )
    mlflow_run.set_tags(flatten(marker["method_params"], "resolved."))
    mlflow_run.log_artifact(ctx.store.stage_dir("score", key) / "scores.csv")


def run_part(ctx: RunContext, prepared: Prepared) -> tuple[str, str]:
    """`score.shard=i` or `shared`: that part alone (one job of a SLURM chain); (stage, key)."""
    key = score_key(ctx.cfg, prepared.key)
    count, index = shard_count(ctx.cfg), ctx.cfg.score.shard
    if ctx.store.reusable("score", key, lambda folder, _: cached_scores_problem(folder, prepared)):
        logger.info("score: cached %s (merged), nothing to do for shard %s", key, index)
        return "score", key
    if index == SHARED:
        seconds = run_shared_work(ctx, prepared, key)
        logger.info("score: the unsplittable part of %s took %.1f s", key, seconds)
        return "score", key
    shard = Shard(int(index), count)
    with ctx.store.lock("score_shard", shard_key(key, shard)):
        return "score_shard", run_shard(ctx, prepared, key, shard)


def run_shared_work(ctx: RunContext, prepared: Prepared, key: str) -> float:
    """The unsplittable part of a sharded method's scoring, once, before its shards; seconds."""
    start = time.perf_counter()
    shared_work(build_method(ctx, prepared, key, ScorerTrainer(ctx, prepared)), prepared.pool)
    return time.perf_counter() - start


def run_shard(ctx: RunContext, prepared: Prepared, key: str, shard: Shard) -> str:
    """Score one shard of the pool's units into its own cached artifact; returns its key."""
    skey = shard_key(key, shard)
    if ctx.store.reusable("score_shard", skey):
        logger.info("score shard %d/%d: cached %s", shard.index + 1, shard.count, skey)
        finish_logging(ctx, "score_shard", skey, partial(log_shard, ctx, skey))
        return skey
    work_dir = ctx.store.scratch_dir("score_shard", skey, create=False)
    scorer_trainer = ScorerTrainer(ctx, prepared)
    method = build_method(ctx, prepared, key, scorer_trainer, work_dir)
    shared_work(method, prepared.pool)  # cached by now, unless this shard runs alone
    params = {"method": ctx.cfg.method, "selector_model": ctx.cfg.selector_model}
    tags = {**ctx.tags(), "score_key": key, "shard": f"{shard.index}/{shard.count}"}
    with ctx.tracker.stage_run("score_shard", skey, tags, params) as mlflow_run:
        with ctx.store.writing("score_shard", skey) as (out, marker):
            n_units = method.shard_units(prepared.pool)
            units = shard.units(n_units)
            logger.info(
                "score shard %d/%d: units %d-%d of %d",
                shard.index + 1,
                shard.count,
                units.start,
                units.stop - 1,
                n_units,
            )
            start = time.perf_counter()
            with PeakMemory() as memory:
                stats = method.score_units(prepared.pool, units, work_dir)
            seconds = time.perf_counter() - start + float(stats.get("resumed_seconds", 0.0))
            keep_work_files(work_dir, out, folders=True)
            marker.update(
                score_key=key,
                index=shard.index,
                count=shard.count,
                units=[units.start, units.stop],
                n_units=n_units,
                seconds=seconds,
                peak_rss_mb=memory.peak_rss_mb,
                peak_gpu_mb=memory.peak_gpu_mb,
                stats=stats,
            )
        log_shard(ctx, skey, mlflow_run)
    return skey


def log_shard(ctx: RunContext, skey: str, mlflow_run: Any) -> None:
    """A finished shard's numbers on its run, from its output folder."""
    marker = ctx.store.marker("score_shard", skey)
    mlflow_run.log_metrics(
        {
            "shard_s": marker["seconds"],
            "score_peak_rss_mb": marker["peak_rss_mb"],
            "score_peak_gpu_mb": marker["peak_gpu_mb"],
            **marker["stats"],
        }
    )


def merge(ctx: RunContext, prepared: Prepared, key: str, count: int, shared_s: float) -> Scored:
    """Every shard's output -> the score stage's output, under the unsharded key."""
    keys = shard_keys(key, count)
    missing = [i for i, k in enumerate(keys) if not ctx.store.reusable("score_shard", k)]
    if missing:
        raise DwbenchError(
            f"score shard(s) {missing} of {count} are not done (score_shard/{keys[missing[0]]}); "
            "run them first (score.shard=i, or python -m dwbench.sweep.plan lists them)."
        )
    markers = [ctx.store.marker("score_shard", k) for k in keys]
    n_units = {m["n_units"] for m in markers}
    if len(n_units) > 1:
        raise DwbenchError(
            f"the score shards of {key} split the pool into different unit counts {n_units} "
            "(run on different devices?); delete the shard folders and score them again."
        )
    scorer_trainer = ScorerTrainer(ctx, prepared)
    method = build_method(ctx, prepared, key, scorer_trainer)
    shared_work(method, prepared.pool)  # cached: this only finds the scorer fine-tunes
    params = {"method": ctx.cfg.method, "selector_model": ctx.cfg.selector_model}
    with ctx.tracker.stage_run("score", key, ctx.tags(), params) as mlflow_run:
        with ctx.store.writing("score", key) as (out, marker):
            start = time.perf_counter()
            with PeakMemory() as memory:
                dirs = [ctx.store.stage_dir("score_shard", k) for k in keys]
                scores = method.merge_units(prepared.pool, dirs)
            merge_s = time.perf_counter() - start
            check_scores(scores, prepared)
            scorer_train_s = sum(run.train_s for run in scorer_trainer.runs)
            shards_s = sum(float(m["seconds"]) for m in markers)
            selection_s = shards_s + merge_s + scorer_train_s
            peak_rss_mb = max([memory.peak_rss_mb, *(float(m["peak_rss_mb"]) for m in markers)])
            gpu = [g for g in (memory.peak_gpu_mb, *(m["peak_gpu_mb"] for m in markers)) if g]
            peak_gpu_mb = max(gpu) if gpu else None
            scores.to_csv(out / "scores.csv", index=False)
            stats = {**method_stats(method), "shards": float(count), "shards_s": shards_s}
            resolved = method_params(method)
            marker.update(
                method_params=resolved,
                selection_s=selection_s,
                peak_rss_mb=peak_rss_mb,
                n_pool=len(scores),
                method_stats=stats,
                scorer_train_s=scorer_train_s,
                scorer_train_keys=[run.key for run in scorer_trainer.runs],
                shard_keys=keys,
                shared_work_s=shared_s,
                peak_gpu_mb=peak_gpu_mb,
            )
        log_scoring(ctx, key, mlflow_run)
    return Scored(key, scores, selection_s, peak_rss_mb)


def keep_work_files(work_dir: Path, out: Path, folders: bool = False) -> None:
    """The method's own records (e.g. Data Whisperer's episodes) stay inspectable; a shard keeps
    its folders too (LESS's feature blocks), which its merge reads."""
    if not work_dir.is_dir():
        return
    for path in sorted(work_dir.iterdir()):
        if path.is_file() or folders:
            shutil.move(str(path), out / path.name)


def check_scores(scores: pd.DataFrame, prepared: Prepared) -> None:
    """A method must score every pool example, in pool order, with a finite number."""
    problem = scores_problem(scores, prepared)
    if problem is not None:
        raise DwbenchError(f"selection method returned {problem}")


def scores_problem(scores: pd.DataFrame, prepared: Prepared) -> str | None:
    """What keeps `scores` from being the pool's: other ids or order, a score not finite."""
    ids = [ex.id for ex in prepared.pool]
    if list(scores.columns[:2]) != ["id", "score"] or scores["id"].tolist() != ids:
        return "scores that do not match the pool's ids"
    values = pd.to_numeric(scores["score"], errors="coerce")
    bad = [i for i, v in zip(ids, values, strict=True) if not math.isfinite(float(v))]
    return f"non-finite scores for {bad[:5]}" if bad else None


def cached_scores_problem(folder: Path, prepared: Prepared) -> str | None:
    """A cached scores.csv that matches its marker yet is not the pool's finite scores (edited
    with its marker, or written by an older dwbench): damage, computed again, never blamed on
    the method."""
    try:
        scores = pd.read_csv(folder / "scores.csv", dtype={"id": str})
    except (OSError, ValueError) as error:
        return f"scores.csv cannot be read ({error})"
    problem = scores_problem(scores, prepared)
    return None if problem is None else f"scores.csv holds {problem}"
