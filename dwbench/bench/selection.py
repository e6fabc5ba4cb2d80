"""`python -m dwbench.bench selection`: score a task's pool with a selection method on the
selector model (the embedded task and SmolLM2-135M-Instruct unless overridden) at one or more pool
sizes and print a markdown table: seconds per pool example (model loading excluded), new tokens
per episode, parse-failure rate, share of queries answered correctly, distinct scores, peak RSS
and, where the task knows its clean examples, the AUROC of the score against them (read only
here, after scoring). `--variants` runs Data Whisperer's layouts x scorings side by side and adds
the Spearman correlation of each variant's scores with the others'; `--dtypes float32 auto` runs
each in both selector dtypes, so that table also says how far bfloat16 moves the scores. Each
run is a fresh process, so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from dwbench.bench.common import add_override_option, auroc, compose, markdown_table
from dwbench.errors import DwbenchError

COLUMNS = (
    "pool",
    "method",
    "dtype",
    "score s",
    "load s",
    "s / example",
    "episodes",
    "new tokens / episode",
    "parse failures",
    "queries right",
    "distinct scores",
    "peak RSS MB",
    "AUROC (clean)",
)

# Data Whisperer's variants: (label, overrides); `--variants all` runs the four.
VARIANTS = {
    "joint-generate": ("method.query_layout=joint", "method.query_scoring=generate"),
    "separate-generate": ("method.query_layout=separate", "method.query_scoring=generate"),
    "joint-likelihood": ("method.query_layout=joint", "method.query_scoring=likelihood"),
    "separate-likelihood": ("method.query_layout=separate", "method.query_scoring=likelihood"),
}


def run_selection(
    method: str, task: str, pool_size: int, seed: int, overrides: Sequence[str]
) -> tuple[dict, list[float]]:
    """Score one pool in this process; returns one table row and the scores in pool order."""
    from dwbench.data.loading import load_task
    from dwbench.memory import PeakMemory
    from dwbench.methods.base import ScoringContext, method_stats
    from dwbench.methods.registry import method_class
    from dwbench.models import resolve_model_source, resolved_dtype

    logging.basicConfig(level=logging.WARNING)
    cfg = compose(method, task, pool_size, seed, overrides)
    splits = load_task(cfg.task)
    cache_dir = Path(str(cfg.cache_dir)).expanduser()
    method_type = method_class(cfg.method)
    if method_type.needs_selector:
        resolve_model_source(cfg.selector_model, cache_dir)  # a first conversion is not timed
    with tempfile.TemporaryDirectory() as work_dir:
        context = ScoringContext.for_cell(cfg, splits, Path(work_dir))
        instance = method_type(context)
        start = time.perf_counter()
        with PeakMemory() as memory:
            scores = instance.score(splits.pool)
        wall = time.perf_counter() - start
    stats = method_stats(instance)
    flags = splits.clean_flags or {}
    load_s = stats.get("load_seconds", 0.0)
    row = {
        "pool": len(splits.pool),
        "method": method,
        "dtype": resolved_dtype(cfg.selector_model, context.device),
        "score s": wall,
        "load s": load_s,
        "s / example": stats.get("seconds_per_example", (wall - load_s) / len(splits.pool)),
        "episodes": stats.get("episodes"),
        "new tokens / episode": stats.get("generated_tokens_per_episode"),
        "parse failures": stats.get("parse_failure_rate"),
        "queries right": stats.get("query_accuracy"),
        "distinct scores": int(scores["score"].nunique()),
        "peak RSS MB": memory.peak_rss_mb,
        "AUROC (clean)": auroc(scores["score"], [flags.get(i, False) for i in scores["id"]])
        if flags
        else None,
    }
    return row, scores["score"].tolist()


def spearman_table(labels: Sequence[str], scores: Sequence[Sequence[float]]) -> str:
    """Rank correlation of each variant's scores with every other's, as a markdown table."""
    frame = pd.DataFrame(dict(zip(labels, scores, strict=True))).corr(method="spearman")
    rows = [{"": label, **frame.loc[label].to_dict()} for label in labels]
    return markdown_table(rows, ["", *labels])


def selection(args: argparse.Namespace) -> None:
    import torch

    variants = list(VARIANTS) if args.variants == ["all"] else args.variants
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise DwbenchError(f"unknown --variants {unknown}; choose from {', '.join(VARIANTS)}, all")
    runs = [(v, [*VARIANTS[v], *args.override]) for v in variants] or [
        (args.method, list(args.override))
    ]
    if args.dtypes:  # each run once per selector dtype; Spearman then compares them too
        runs = [
            (f"{label} ({dtype})", [*overrides, f"selector_model.dtype={dtype}"])
            for label, overrides in runs
            for dtype in args.dtypes
        ]
    rows, scores = [], []
    context = multiprocessing.get_context("spawn")  # fresh interpreter: its own peak RSS
    for pool_size in args.pool_sizes:
        for label, overrides in runs:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                row, run_scores = pool.submit(
                    run_selection, args.method, args.task, pool_size, args.seed, overrides
                ).result()
            rows.append({**row, "method": label})
            scores.append(run_scores)
            print(markdown_table(rows[-1:], COLUMNS), flush=True)
    print(
        f"Selection benchmark: method={args.method}, task={args.task}, seed={args.seed}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (f", overrides: {' '.join(args.override)}" if args.override else "")
    )
    print(markdown_table(rows, COLUMNS))
    for start in range(0, len(rows), len(runs)) if len(runs) > 1 else ():
        group = range(start, start + len(runs))  # one pool size's variants
        print(f"\nSpearman correlation of the scores (pool {rows[start]['pool']}):")
        print(spearman_table([rows[i]["method"] for i in group], [scores[i] for i in group]))


def add_parser(commands: argparse._SubParsersAction) -> None:
    sel = commands.add_parser(
        "selection",
        help="score a pool at several sizes; time, tokens, answers, memory, AUROC",
        description="Score a task's pool with one method (or Data Whisperer's variants).",
    )
    sel.add_argument(
        "--pool-sizes", type=int, nargs="+", default=[64, 128, 256], help="pool sizes to time"
    )
    sel.add_argument("--method", default="data_whisperer", help="registered method name")
    sel.add_argument("--task", default="embedded_gsm", help="conf/task choice")
    sel.add_argument(
        "--variants",
        nargs="+",
        default=[],
        help=f"Data Whisperer variants to compare: {', '.join(VARIANTS)} or all",
    )
    sel.add_argument("--seed", type=int, default=0, help="run seed (episodes, shuffles)")
    sel.add_argument(
        "--dtypes",
        nargs="+",
        default=[],
        help="selector dtypes to run each variant in, e.g. float32 auto (auto: bfloat16 where "
        "native); the Spearman table then compares each with float32",
    )
    add_override_option(sel)
    sel.set_defaults(handler=selection)
