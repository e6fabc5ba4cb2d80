"""The shared command line of `dwbench.sweep.plan` and `dwbench.sweep.status`: sweep overrides
in, one clear line and exit 2 on a bad sweep (1 on a read-only or full disk)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import HydraException
from rich.console import Console

from dwbench.errors import DwbenchError
from dwbench.storage import storage_problem


def sweep_parser(prog: str, description: str, overrides_help: str) -> argparse.ArgumentParser:
    """`[overrides] [--name]`: a sweep as `python -m dwbench -m` would expand it."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"Example: {prog} +experiment=embedded_table2 seed=0",
    )
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    parser.add_argument("--name", help="sweep name (default: the +experiment's name)")
    return parser


def run_sweep_command(
    args: argparse.Namespace, action: Callable[[list[str], str | None, Console], Any], width: int
) -> int:
    """Run `action(overrides, name, console)`; 2 on bad input, 1 on a disk problem."""
    try:
        action(args.overrides, args.name, Console(width=width))
    except (DwbenchError, HydraException) as error:
        print(f"dwbench: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a read-only or full results_dir, met writing the plan
        problem = storage_problem(error)
        if problem is None:
            raise
        print(f"dwbench: {problem}", file=sys.stderr)
        return 1
    return 0
