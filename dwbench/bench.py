"""Benchmarks that later work compares against: `python -m dwbench.bench selection | methods |
calibrate | gpu | parity | attribution` (`calibrate`: dwbench/calibrate.py; `gpu`:
dwbench/gpu_bench.py; `parity`: dwbench/parity.py, the released preset against a run of the
authors' code; `attribution`: dwbench/attribution.py, Data Whisperer's variants on one pool).

`selection` scores a task's pool with a selection method on the selector model (the embedded
task and SmolLM2-135M-Instruct unless overridden) at one or more pool sizes and prints a markdown
table: seconds per pool example (model loading excluded), new tokens per episode, parse-failure
rate, share of queries answered correctly, distinct scores, peak RSS and, where the task knows
its clean examples, the AUROC of the score against them (read only here, after scoring).
`--variants` runs Data Whisperer's layouts x scorings side by side and adds the Spearman
correlation of each variant's scores with the others'.

Each run is a fresh process, so its peak memory is its own. The config is the project's own,
composed with Hydra, so any override applies:
    python -m dwbench.bench selection --pool-sizes 64 128 256
    python -m dwbench.bench selection --pool-sizes 64 -o method.attention_weighting=false
    python -m dwbench.bench selection --task gsm8k --pool-sizes 120 --variants all \
        -o task.path=/data/gsm8k -o method.n_demos=5 -o method.n_queries=3 \
        -o selector_model.attention_layer=15

`methods` runs each method's cell of an experiment end to end (`python -m dwbench`, one process
each, a failure does not stop the others; finished stages are reused) and prints one table:
selection precision and AUROC of the score against the embedded task's clean flags, score after
fine-tuning, selection seconds (with the scorer fine-tune's share) and STR:
    python -m dwbench.bench methods --experiment embedded_table2 --budget 0.1 --seed 0 \
        --methods random oracle_clean perplexity_low less s2l rds_plus ifd data_whisperer
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dwbench.errors import DwbenchError

logger = logging.getLogger(__name__)
COLUMNS = (
    "pool",
    "method",
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


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    labels = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(scores, dtype="float64").rank(method="average").to_numpy()  # ties: half
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pool_size_override(task: str, pool_size: int) -> str:
    """The embedded task generates its pool; any other task keeps its first N examples."""
    if task.startswith("embedded"):
        return f"task.generator.pool_size={pool_size}"
    return f"task.pool_limit={pool_size}"


def compose(method: str, task: str, pool_size: int, seed: int, overrides: Sequence[str]) -> Any:
    """The project config for the task and method, as `python -m dwbench` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dwbench.config_files import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(
            config_name="config",
            overrides=[
                f"task={task}",
                f"method={method}",
                pool_size_override(task, pool_size),
                f"seed={seed}",
                *overrides,
            ],
        )


def run_selection(
    method: str, task: str, pool_size: int, seed: int, overrides: Sequence[str]
) -> tuple[dict, list[float]]:
    """Score one pool in this process; returns one table row and the scores in pool order."""
    from dwbench.data.loading import load_task
    from dwbench.memory import PeakMemory
    from dwbench.methods.base import ScoringContext, method_stats
    from dwbench.methods.registry import method_class
    from dwbench.models import resolve_device, resolve_model_source

    logging.basicConfig(level=logging.WARNING)
    cfg = compose(method, task, pool_size, seed, overrides)
    splits = load_task(cfg.task)
    cache_dir = Path(str(cfg.cache_dir)).expanduser()
    method_type = method_class(cfg.method)
    if method_type.needs_selector:
        resolve_model_source(cfg.selector_model, cache_dir)  # a first conversion is not timed
    with tempfile.TemporaryDirectory() as work_dir:
        context = ScoringContext.for_cell(
            cfg, splits, resolve_device(str(cfg.device)), cache_dir, Path(work_dir)
        )
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


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def selection(args: argparse.Namespace) -> None:
    import torch

    variants = list(VARIANTS) if args.variants == ["all"] else args.variants
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise DwbenchError(f"unknown --variants {unknown}; choose from {', '.join(VARIANTS)}, all")
    runs = [(v, [*VARIANTS[v], *args.override]) for v in variants] or [
        (args.method, list(args.override))
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
            print(markdown_table(rows[-1:]), flush=True)
    print(
        f"Selection benchmark: method={args.method}, task={args.task}, seed={args.seed}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (f", overrides: {' '.join(args.override)}" if args.override else "")
    )
    print(markdown_table(rows))
    for start in range(0, len(rows), len(runs)) if len(runs) > 1 else ():
        group = range(start, start + len(runs))  # one pool size's variants
        print(f"\nSpearman correlation of the scores (pool {rows[start]['pool']}):")
        print(spearman_table([rows[i]["method"] for i in group], [scores[i] for i in group]))


METHOD_COLUMNS = (
    "method",
    "selection precision",
    "AUROC (clean)",
    "score",
    "selection s",
    "scorer train s",
    "full-pool train s",
    "STR",
    "scoring peak RSS MB",
)


def method_row(cell: Any, runs: pd.DataFrame) -> dict:
    """One finished cell's row, from its stage outputs and its MLflow evaluation run."""
    import json

    from dwbench.sweep.progress import DONE, cell_progress, store_of

    method = str(cell.cfg.method.name)
    progress = cell_progress(cell, runs)
    if progress.state != DONE:
        return {"method": method, "selection precision": f"({progress.state})"}
    store, keys = store_of(cell.cfg), progress.keys
    score_marker = store.marker("score", keys["score"])
    scores = pd.read_csv(store.stage_dir("score", keys["score"]) / "scores.csv", dtype={"id": str})
    labels_path = store.stage_dir("prepare", keys["prepare"]) / "labels.json"
    flags = json.loads(labels_path.read_text()) if labels_path.is_file() else {}
    run = runs[(runs["tags.stage"] == "evaluate") & (runs["tags.stage_key"] == keys["evaluate"])]
    metrics = run.iloc[0] if len(run) else pd.Series(dtype=object)
    return {
        "method": method,
        "selection precision": store.marker("select", keys["select"]).get("selection_precision"),
        "AUROC (clean)": auroc(scores["score"], [flags.get(i, False) for i in scores["id"]])
        if flags
        else None,
        "score": store.marker("evaluate", keys["evaluate"])["score"],
        "selection s": metrics.get("metrics.selection_s"),
        "scorer train s": score_marker.get("scorer_train_s", 0.0),
        "full-pool train s": metrics.get("metrics.full_train_s"),
        "STR": metrics.get("metrics.STR"),
        "scoring peak RSS MB": score_marker.get("peak_rss_mb"),
    }


def methods(args: argparse.Namespace) -> None:
    import subprocess

    from dwbench.sweep.grid import load_sweep
    from dwbench.sweep.progress import store_runs

    common = [f"+experiment={args.experiment}", f"budget={args.budget}", f"seed={args.seed}"]
    common += args.override
    for method in args.methods:
        if args.run:
            command = [sys.executable, "-m", "dwbench", *common, f"method={method}"]
            logger.warning("bench: %s", " ".join(command[1:]))
            done = subprocess.run(command, check=False)
            if done.returncode:
                logger.warning("bench: method %s failed (exit %d)", method, done.returncode)
    sweep = load_sweep([*common, f"method={','.join(args.methods)}"], progress=False)
    runs = store_runs(str(sweep.cells[0].cfg.tracking.uri))
    rows = [method_row(cell, runs) for cell in sweep.cells]
    print(
        f"Methods on {args.experiment}, budget={args.budget}, seed={args.seed}"
        + (f", overrides: {' '.join(args.override)}" if args.override else "")
    )
    print(markdown_table(rows, METHOD_COLUMNS))
    if args.csv:
        pd.DataFrame(rows, columns=list(METHOD_COLUMNS)).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")


def add_override_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra override of the composed config (repeatable)",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m dwbench.bench", description=__doc__.split("\n")[0]
    )
    commands = top.add_subparsers(dest="command", required=True)
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
    add_override_option(sel)
    sel.set_defaults(handler=selection)
    meth = commands.add_parser(
        "methods",
        help="run methods end to end as one experiment's cells; precision, AUROC, score, STR",
        description="Run each method's cell of an experiment, then tabulate the finished cells.",
    )
    meth.add_argument("--methods", nargs="+", required=True, help="registered method names")
    meth.add_argument("--experiment", default="embedded_table2", help="experiment preset")
    meth.add_argument("--budget", type=float, default=0.1, help="share of the pool kept")
    meth.add_argument("--seed", type=int, default=0, help="run seed")
    meth.add_argument(
        "--no-run", dest="run", action="store_false", help="only tabulate finished cells"
    )
    meth.add_argument("--csv", type=Path, help="also write the table as CSV here")
    add_override_option(meth)
    meth.set_defaults(handler=methods)
    from dwbench.attribution import add_parser as add_attribution
    from dwbench.calibrate import add_parser as add_calibrate
    from dwbench.gpu_bench import add_parser as add_gpu
    from dwbench.parity import add_parser as add_parity

    add_calibrate(commands, add_override_option)
    add_gpu(commands)
    add_parity(commands, add_override_option)
    add_attribution(commands, add_override_option)
    return top


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.handler(args)
    except DwbenchError as error:
        print(f"dwbench.bench: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
