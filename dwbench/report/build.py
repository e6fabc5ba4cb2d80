"""The report, top to bottom: grid -> (MLflow -> snapshot) or snapshot -> check -> tables, figures.

A fresh freeze keeps the earlier snapshot's cells that MLflow lacks here (measured on another
machine or from an older store), so snapshots accumulate. The check comes before anything is
written, so an incomplete grid never leaves a snapshot or a table behind that could pass for
complete; `allow_missing` reports what there is (the tables then say how many cells they hold).
Tables and figures always come from the snapshot as read back from disk, which is what makes
`--from-snapshot` rebuild them identically.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from dwbench.errors import DataError, DwbenchError
from dwbench.report import bootstrap, figures, snapshot, standing, tables
from dwbench.report.cells import GRID, Missing, ReportGrid, load_report_grid
from dwbench.report.frame import build
from dwbench.report.paper import PAPER_CSV, Paper
from dwbench.report.table_render import to_latex, to_markdown
from dwbench.sweep.grid import varying_overrides

STANDING = "Against Random, setting by setting (this report's cells)"
STYLE = {"found": "green", "missing": "yellow", "failed": "red", "running": "cyan"}


class MissingCells(DwbenchError):
    """Grid cells without a finished evaluation: the report stops unless told to go on."""


@dataclass
class Options:
    experiment: str
    overrides: list[str]
    name: str | None = None
    allow_missing: bool = False
    from_snapshot: bool = False
    snapshot_dir: Path | None = None  # default: the experiment's results_dir
    out_dir: Path = Path("paper_figures")
    paper: Path = PAPER_CSV
    resamples: int = 10_000
    rng_seed: int = 0


def report(options: Options, console: Console) -> list[Path]:
    """Build the experiment's report; returns every file written."""
    if options.resamples < 100:
        raise DwbenchError(f"--resamples {options.resamples} is too few; use 1000 or more.")
    grid = load_report_grid(options.experiment, options.overrides, options.name)
    n_grid = len(grid.grid.cells)
    n_companions = len(grid.cells()) - n_grid
    console.print(
        f"Report [bold]{grid.name}[/bold] ({tables.TITLES[grid.kind]}): {n_grid} grid cells"
        + (f", {n_companions} companion cells" if n_companions else "")
    )
    folder = options.snapshot_dir or Path(str(grid.grid.base.results_dir))
    if options.from_snapshot:
        frozen = snapshot.read(folder, grid.name)
        missing = _not_in_snapshot(grid, frozen.runs)
        without: list[str] = []
        carried: set[str] = set()
    else:
        from dwbench.report.collect import collect

        collected = collect(grid)
        fresh, carried = snapshot.carry_over(
            folder,
            grid.name,
            snapshot.Snapshot(collected.runs, collected.examples),
            {gap.cell.key for gap in collected.missing},
        )
        missing = [gap for gap in collected.missing if gap.cell.key not in carried]
        without = collected.without_examples
    _print_cells(grid, missing, console, carried)
    _check(grid, missing, options)
    written: list[Path] = []
    if not options.from_snapshot:
        if carried:
            console.print(
                f"{len(carried)} cell(s) not in MLflow here kept from the earlier snapshot "
                f"{snapshot.paths(folder, grid.name)[0]}"
            )
        written += snapshot.write(folder, grid.name, fresh.runs, fresh.examples)
        frozen = snapshot.read(folder, grid.name)
    if without:
        console.print(
            f"[yellow]{len(without)} cell(s) have no per-example scores (no samples.jsonl in the "
            "stage cache or MLflow): no bootstrap interval for them.[/yellow]"
        )
    written += _render(grid, frozen, options)
    console.print("Wrote:")
    for path in written:
        console.print(f"  {path}")
    return written


def _not_in_snapshot(grid: ReportGrid, runs: pd.DataFrame) -> list[Missing]:
    have = set(runs["cell"])
    missing = [
        Missing(role, cell, "missing", "not in the snapshot")
        for role, cell in grid.cells()
        if cell.key not in have
    ]
    if have and len(missing) == len(grid.cells()):
        raise DataError(
            f"None of the snapshot's {len(have)} cells is a cell of {grid.name} as the configs "
            "now compose it: a preset or config changed since it was frozen, or the overrides "
            "differ from the ones it was frozen with. Freeze it again from MLflow."
        )
    return missing


def _print_cells(
    grid: ReportGrid,
    missing: list[Missing],
    console: Console,
    carried: AbstractSet[str] = frozenset(),
) -> None:
    """Every cell with found / missing (and why): the grid's first, then its companions."""
    why = {gap.cell.key: gap for gap in missing}
    cells = grid.cells()
    axes = varying_overrides([cell for _, cell in cells])
    table = Table(title=f"Cells of {grid.name}")
    for column in ("#", "role", "state", "overrides", "detail"):
        table.add_column(column, justify="right" if column == "#" else "left")
    for index, ((role, cell), axis) in enumerate(zip(cells, axes, strict=True)):
        gap = why.get(cell.key)
        state = "found" if gap is None else gap.state
        style = STYLE.get(state, "yellow")
        detail = cell.key if gap is None else gap.detail
        if cell.key in carried:
            detail += " (from the earlier snapshot)"
        table.add_row(str(index), role, f"[{style}]{state}[/{style}]", " ".join(axis), detail)
    console.print(table)
    n_grid = len(grid.grid.cells)
    n_companions = len(cells) - n_grid
    grid_missing = sum(gap.role == GRID for gap in missing)
    summary = f"{n_grid - grid_missing} of {n_grid} grid cells found"
    if n_companions:
        found = n_companions - (len(missing) - grid_missing)
        summary += f"; {found} of {n_companions} companion cells (optional)"
    console.print(summary)


def _check(grid: ReportGrid, missing: list[Missing], options: Options) -> None:
    """Nothing found is an error; missing grid cells are one unless --allow-missing."""
    absent = [gap for gap in missing if gap.role == GRID]
    command = f"+experiment={grid.experiment} {' '.join(options.overrides)}".strip()
    if len(absent) == len(grid.grid.cells):
        source = "the snapshot" if options.from_snapshot else "MLflow and the stage cache"
        raise MissingCells(
            f"no cell of {grid.name} has a finished evaluation in {source}: nothing to report. "
            f"Run the sweep first: python -m dwbench -m {command}"
        )
    if absent and not options.allow_missing:
        raise MissingCells(
            f"{len(absent)} of {len(grid.grid.cells)} cells of {grid.name} are missing (listed "
            f"above). Run them (python -m dwbench.sweep.plan {command}, then "
            "dwbench.sweep.submit), or pass --allow-missing to report the cells there are."
        )


def _render(grid: ReportGrid, frozen: snapshot.Snapshot, options: Options) -> list[Path]:
    """Tables, bootstrap intervals and figures, from the snapshot alone."""
    frame = build(grid.frame(), frozen.runs, grid.kind)
    examples = frozen.examples[frozen.examples["cell"].isin(frame["cell"])]
    intervals = bootstrap.compare_to_random(
        frame,
        examples,
        resamples=options.resamples,
        seed=options.rng_seed,
        averages=tables.LAYOUTS[grid.kind] == "str",
    )
    paper = Paper(grid.kind, grid.embedded, options.paper)
    table = tables.build_table(
        frame, grid.kind, paper, intervals, options.resamples, options.rng_seed
    )
    out = options.out_dir / grid.name
    out.mkdir(parents=True, exist_ok=True)
    written = []
    versus_random = standing.summary(standing.outcomes(frame, intervals))
    markdown = to_markdown(table) + "\n" + standing.to_markdown(versus_random, STANDING)
    for path, text in (
        (out / f"{grid.kind}.md", markdown),
        (out / f"{grid.kind}.tex", to_latex(table)),
    ):
        path.write_text(text, encoding="utf-8")
        written.append(path)
    intervals_path = out / "bootstrap.csv"
    intervals.to_csv(intervals_path, index=False)
    written.append(intervals_path)
    written += figures.draw_all(frame, grid.kind, out)
    written += standing.draw(versus_random, out)
    return written
