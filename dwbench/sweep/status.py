"""`python -m dwbench.sweep.status [overrides]`: each cell of a sweep, done, running, failed or
missing.

Takes the overrides the sweep was planned with. Done comes from the stage cache, running and
failed from SLURM for submitted cells (and from MLflow's FAILED runs otherwise).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from dwbench.sweep.command import run_sweep_command, sweep_parser

STYLE = {"done": "green", "running": "cyan", "failed": "red", "missing": "yellow"}


def status(overrides: list[str], name: str | None, console: Console) -> dict[str, int]:
    """Print the sweep's cells with their state; returns the count of each state."""
    from dwbench.sweep.grid import load_sweep, varying_overrides
    from dwbench.sweep.progress import STATES, runs_by_store, survey

    sweep = load_sweep(overrides, name, progress=False)
    progress = survey(sweep.cells, sweep.dir, runs_by_store(sweep.cells))
    table = Table(title=f"Sweep {sweep.name}")
    from dwbench.timing import describe

    for column in ("#", "cell", "state", "detail", "time (last run)", "overrides"):
        table.add_column(column, justify="right" if column == "#" else "left")
    axes = varying_overrides(sweep.cells)
    for index, (cell, state) in enumerate(zip(sweep.cells, progress, strict=True)):
        style = STYLE[state.state]
        table.add_row(
            str(index),
            cell.key,
            f"[{style}]{state.state}[/{style}]",
            state.detail,
            describe(state.time_s) if state.time_s else "",
            " ".join(axes[index]),
        )
    console.print(table)
    counts = {s: sum(p.state == s for p in progress) for s in STATES}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" (of {len(progress)})")
    return counts


def parser() -> argparse.ArgumentParser:
    return sweep_parser(
        "python -m dwbench.sweep.status",
        "Show every cell of a sweep as done, running, failed or missing.",
        "the overrides the sweep was planned with",
    )


def main(argv: list[str] | None = None) -> int:
    return run_sweep_command(parser().parse_args(argv), status, 200)


if __name__ == "__main__":
    sys.exit(main())
