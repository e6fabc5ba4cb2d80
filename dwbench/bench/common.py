"""What the benchmark commands share: the config as `python -m dwbench` composes it, the AUROC of
scores against clean flags, markdown tables and the `-o KEY=VALUE` option."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


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


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Rows as a markdown table with the given columns; missing values print as "-"."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def add_override_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra override of the composed config (repeatable)",
    )
