"""Benchmarks that later work compares against: `python -m dwbench.bench selection`.

`selection` scores the embedded task's pool with a selection method on the embedded model
(SmolLM2-135M-Instruct) at several pool sizes and prints a markdown table: wall time, seconds
per pool example (model loading excluded), tokens generated per episode, peak RSS, and the
AUROC of the score against the pool's known clean flags (read only here, after scoring).

Each pool size runs in a fresh process, so its peak memory is its own. The config is the
project's own, composed with Hydra, so any override applies:
    python -m dwbench.bench selection --pool-sizes 64 128 256
    python -m dwbench.bench selection --pool-sizes 64 -o method.attention_weighting=false
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
    "new tokens / episode",
    "episodes",
    "peak RSS MB",
    "AUROC (clean)",
)


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    labels = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(scores, dtype="float64").rank(method="average").to_numpy()  # ties: half
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def compose(method: str, pool_size: int, seed: int, overrides: Sequence[str]) -> Any:
    """The project config for the embedded task and model, as `python -m dwbench` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dwbench.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(
            config_name="config",
            overrides=[
                "task=embedded_gsm",
                f"method={method}",
                f"task.generator.pool_size={pool_size}",
                f"seed={seed}",
                *overrides,
            ],
        )


def run_selection(method: str, pool_size: int, seed: int, overrides: Sequence[str]) -> dict:
    """Score one pool in this process; returns one table row."""
    from dwbench.data.loading import load_task
    from dwbench.memory import PeakMemory
    from dwbench.methods.base import ScoringContext, method_stats
    from dwbench.methods.registry import get_method
    from dwbench.models import resolve_device, resolve_model_source

    logging.basicConfig(level=logging.WARNING)
    cfg = compose(method, pool_size, seed, overrides)
    splits = load_task(cfg.task)
    cache_dir = Path(str(cfg.cache_dir)).expanduser()
    method_class = get_method(method)
    if method_class.needs_selector:
        resolve_model_source(cfg.selector_model, cache_dir)  # a first conversion is not timed
    with tempfile.TemporaryDirectory() as work_dir:
        context = ScoringContext(
            method_cfg=cfg.method,
            task_cfg=cfg.task,
            selector_cfg=cfg.selector_model,
            queries=splits.queries,
            seed=int(cfg.seed),
            device=resolve_device(str(cfg.device)),
            cache_dir=cache_dir,
            work_dir=Path(work_dir),
        )
        instance = method_class(context)
        start = time.perf_counter()
        with PeakMemory() as memory:
            scores = instance.score(splits.pool)
        wall = time.perf_counter() - start
    stats = method_stats(instance)
    flags = splits.clean_flags or {}
    load_s = stats.get("load_seconds", 0.0)
    return {
        "pool": len(splits.pool),
        "method": method,
        "score s": wall,
        "load s": load_s,
        "s / example": stats.get("seconds_per_example", (wall - load_s) / len(splits.pool)),
        "new tokens / episode": stats.get("generated_tokens_per_episode"),
        "episodes": stats.get("episodes"),
        "peak RSS MB": memory.peak_rss_mb,
        "AUROC (clean)": auroc(scores["score"], [flags.get(i, False) for i in scores["id"]])
        if flags
        else None,
    }


def markdown_table(rows: Sequence[dict]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def selection(args: argparse.Namespace) -> None:
    import torch

    rows = []
    context = multiprocessing.get_context("spawn")  # fresh interpreter: its own peak RSS
    for pool_size in args.pool_sizes:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            rows.append(
                pool.submit(
                    run_selection, args.method, pool_size, args.seed, args.override
                ).result()
            )
    print(
        f"Selection benchmark: method={args.method}, embedded task and model, seed={args.seed}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (f", overrides: {' '.join(args.override)}" if args.override else "")
    )
    print(markdown_table(rows))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m dwbench.bench", description=__doc__.split("\n")[0]
    )
    commands = top.add_subparsers(dest="command", required=True)
    sel = commands.add_parser(
        "selection",
        help="score the embedded pool at several sizes; time, tokens, memory, AUROC",
        description="Score the embedded task's pool with one method on the embedded model.",
    )
    sel.add_argument(
        "--pool-sizes", type=int, nargs="+", default=[64, 128, 256], help="pool sizes to time"
    )
    sel.add_argument("--method", default="data_whisperer", help="registered method name")
    sel.add_argument("--seed", type=int, default=0, help="run seed (episodes, shuffles)")
    sel.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra override for the composed config (repeatable)",
    )
    sel.set_defaults(handler=selection)
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
