"""log: the cell's summary metrics on its evaluation run (score, times, STR, memory, precision).

Re-run every time, because STR's denominator can improve after the fact: a full-pool fine-tune
(budget 1.0) finished later replaces the estimate from throughput by a measurement. A zero-shot
cell (budget 0) selects and trains nothing: its STR is 0 and it has no STR denominator.
"""

from __future__ import annotations

from dataclasses import asdict

from dwbench.context import RunContext
from dwbench.stages.evaluate import NO_TRAIN
from dwbench.stages.outputs import Evaluated, Prepared, Scored, Selected, Summary, Trained


def full_pool_train_seconds(ctx: RunContext, trained: Trained) -> tuple[float, str]:
    """STR's denominator: a measured whole-pool fine-tune of the same recipe, else an estimate."""
    group = trained.marker["group"]
    measured = [
        m["train_s"]
        for m in ctx.store.markers("train")
        if m.get("group") == group and m.get("n_examples") == m.get("n_pool")
    ]
    if measured:
        return sum(measured) / len(measured), "measured"
    marker = trained.marker
    return marker["n_pool"] * marker["epochs"] / marker["examples_per_s"], "estimated"


def summarize(
    ctx: RunContext, scored: Scored, selected: Selected, trained: Trained, evaluated: Evaluated
) -> tuple[Summary, str]:
    full_train_s, source = full_pool_train_seconds(ctx, trained)
    selection_s = scored.selection_s + selected.select_s
    peaks = [
        scored.peak_rss_mb,
        trained.marker["train_peak_rss_mb"],
        evaluated.marker["eval_peak_rss_mb"],
    ]
    summary = Summary(
        score=evaluated.marker["score"],
        selection_s=selection_s,
        train_s=trained.marker["train_s"],
        eval_s=evaluated.marker["eval_s"],
        full_train_s=full_train_s,
        STR=selection_s / full_train_s,
        peak_memory_mb=max(peaks),
        selection_precision=selected.selection_precision,
    )
    return summary, source


def run(
    ctx: RunContext, scored: Scored, selected: Selected, trained: Trained, evaluated: Evaluated
) -> Summary:
    summary, source = summarize(ctx, scored, selected, trained, evaluated)
    tags = {"score_key": scored.key, "select_key": selected.key, "train_key": trained.key}
    record(ctx, evaluated, trained.key, summary, {"full_train_s_source": source, **tags})
    return summary


def run_zero_shot(ctx: RunContext, prepared: Prepared, evaluated: Evaluated) -> Summary:
    """The untuned target's summary: nothing selected, nothing trained, so nothing spent on it."""
    summary = Summary(
        score=evaluated.marker["score"],
        selection_s=0.0,
        train_s=0.0,
        eval_s=evaluated.marker["eval_s"],
        full_train_s=None,
        STR=0.0,
        peak_memory_mb=evaluated.marker["eval_peak_rss_mb"],
        selection_precision=None,
    )
    tags = {"full_train_s_source": NO_TRAIN, "prepare_key": prepared.key}
    record(ctx, evaluated, NO_TRAIN, summary, tags)
    return summary


def record(
    ctx: RunContext, evaluated: Evaluated, train_key: str, summary: Summary, tags: dict[str, str]
) -> None:
    """The summary's metrics and `tags` (plus the metric's name) on the cell's evaluation run."""
    params = {"eval": ctx.cfg.eval, "train_key": train_key}
    with ctx.tracker.stage_run(
        "evaluate", evaluated.key, ctx.tags(), params, amend=True
    ) as mlflow_run:
        mlflow_run.log_metrics(asdict(summary))
        mlflow_run.set_tags({**tags, "metric": evaluated.marker["metric"]})
