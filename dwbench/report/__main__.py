"""`python -m dwbench.report <experiment> [overrides] [--allow-missing] [--from-snapshot]`.

Freezes the experiment's finished evaluation runs from MLflow into `results/<name>.csv` (and
`<name>_examples.csv`), fails with the list of missing cells unless `--allow-missing`, and
writes its paper table (Markdown, LaTeX), bootstrap intervals and figures to
`paper_figures/<name>/`. `--from-snapshot` rebuilds them from the CSVs alone, without MLflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra.errors import HydraException
from rich.console import Console

from dwbench.errors import DwbenchError

PROG = "python -m dwbench.report"


def parser() -> argparse.ArgumentParser:
    command = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n", 1)[1],
        epilog=f"Example: {PROG} embedded_table2 budget=0.1 seed=0 --allow-missing",
    )
    command.add_argument(
        "experiment",
        help=(
            "a conf/experiment preset: table1..table6, fig3, their embedded_* twins, "
            "*_reference, *_zero_shot"
        ),
    )
    command.add_argument(
        "overrides", nargs="*", help="Hydra overrides, as for python -m dwbench -m"
    )
    command.add_argument(
        "--allow-missing",
        action="store_true",
        help="report the cells there are instead of failing on missing ones",
    )
    command.add_argument(
        "--from-snapshot",
        action="store_true",
        help="rebuild tables and figures from the CSV snapshots, without MLflow",
    )
    command.add_argument("--name", help="snapshot and output name (default: the experiment)")
    command.add_argument(
        "--snapshot-dir",
        type=Path,
        help="where the CSV snapshots are (default: the config's results_dir)",
    )
    command.add_argument(
        "--out-dir",
        type=Path,
        default=Path("paper_figures"),
        help="tables and figures go to OUT_DIR/<name>/ (default: paper_figures)",
    )
    command.add_argument(
        "--paper",
        type=Path,
        help="the paper's numbers (default: the paper_reported.csv installed with dwbench.report)",
    )
    command.add_argument(
        "--resamples", type=int, default=10_000, help="bootstrap resamples (default: 10000)"
    )
    command.add_argument(
        "--rng-seed", type=int, default=0, help="the bootstrap's RNG seed (default: 0)"
    )
    return command


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from dwbench.report.build import Options, report
    from dwbench.report.paper import PAPER_CSV

    options = Options(
        experiment=args.experiment,
        overrides=args.overrides,
        name=args.name,
        allow_missing=args.allow_missing,
        from_snapshot=args.from_snapshot,
        snapshot_dir=args.snapshot_dir,
        out_dir=args.out_dir,
        paper=args.paper or PAPER_CSV,
        resamples=args.resamples,
        rng_seed=args.rng_seed,
    )
    try:
        report(options, Console(width=200))
    except (DwbenchError, HydraException) as error:
        print(f"dwbench: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
