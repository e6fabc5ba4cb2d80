"""`python -m dwbench.sweep.plan [overrides]`: write the cells of a sweep not done yet, one a line.

The overrides are those of `python -m dwbench -m` (`+experiment=table2`, `seed=0,1`, ...). Cells
that are done, or that SLURM still runs, are left out, so planning again after failures lists
exactly the failed and missing cells. Also prints what the plan will cost, from the throughput
earlier runs of the same models logged. `python -m dwbench.sweep.submit <plan>` runs it on SLURM.

With `score.shards=S` the plan is a chain: before its cells, each score key still to compute
gets its shards not yet done (one job each), after the method's unsplittable part where it has
one (a scorer fine-tune, one job), and one merge job. A shard that failed or was cancelled is
planned again alone; its finished siblings are not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dwbench.sweep.command import run_sweep_command, sweep_parser


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def plan(overrides: list[str], name: str | None, console: Console) -> Path:
    from omegaconf import OmegaConf

    from dwbench.sweep.grid import load_sweep
    from dwbench.sweep.progress import (
        FAILED,
        MISSING,
        STATES,
        estimate_seconds,
        runs_by_store,
        survey,
    )
    from dwbench.sweep.slurm import PlannedCell, write_plan

    sweep = load_sweep(overrides, name)
    runs = runs_by_store(sweep.cells)
    progress = survey(sweep.cells, sweep.dir, runs)
    counts = {s: sum(p.state == s for p in progress) for s in STATES}
    console.print(
        f"Sweep [bold]{sweep.name}[/bold]: {len(sweep.cells)} cells, "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
    )
    scored: set[str] = set()
    planned, chained, waiting = [], {}, []
    active = active_jobs(sweep.dir)
    for cell, state in zip(sweep.cells, progress, strict=True):
        if state.state not in (FAILED, MISSING):
            continue
        models = (cell.cfg.selector_model, cell.cfg.target_model)
        resources = {
            "requires_gpu": any(bool(m.requires_gpu) for m in models),
            "gpu_memory_gb": max(int(m.gpu_memory_gb) for m in models),
        }
        chain = score_chain(cell, state.keys, chained, active)
        if chain is None:  # its score shards still run: planning them again would run them twice
            waiting.append(cell.key)
            continue
        planned.append(
            PlannedCell(
                key=cell.key,
                overrides=cell.overrides,
                estimate_s=estimate_seconds(
                    cell, state.keys, runs[str(cell.cfg.tracking.uri)], scored
                ),
                **resources,
            )
        )
        for job in chain:
            planned.append(PlannedCell(estimate_s=None, **job, **resources))
    meta = {
        "name": sweep.name,
        "workdir": os.getcwd(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "overrides": overrides,
        "slurm": OmegaConf.to_container(sweep.base.slurm, resolve=True),
    }
    path = write_plan(sweep.dir, planned, meta)
    _print_cost(sweep.cells, [p for p in planned if p.step == "cells"], console)
    _print_chain(planned, chained, console)
    if waiting:
        console.print(
            f"[yellow]Left out {len(waiting)} cell(s) whose score shards or merge still run on "
            "SLURM; plan again when those jobs have ended.[/yellow]"
        )
    cells = sum(p.step == "cells" for p in planned)
    before = len(planned) - cells
    console.print(
        f"Plan: {path} ({cells} cell{'' if cells == 1 else 's'} to run"
        + (f", after {before} scoring job{'' if before == 1 else 's'})" if before else ")")
    )
    if planned:
        console.print(f"Submit it: python -m dwbench.sweep.submit {path}")
    return path


def active_jobs(sweep_dir: Path) -> set[str]:
    """Keys (cells, shards, merges, shared parts) whose latest SLURM job is still active."""
    from dwbench.sweep.progress import SLURM_ACTIVE
    from dwbench.sweep.slurm import job_states, submitted_jobs

    jobs = submitted_jobs(sweep_dir)
    states = job_states() if jobs else {}
    return {key for key, job in jobs.items() if states.get(job) in SLURM_ACTIVE}


def score_chain(
    cell: Any, keys: dict[str, str], chained: dict[str, int], active: set[str]
) -> list[dict] | None:
    """The jobs that sharded scoring needs before this cell: its unsplittable part, the shards
    not done yet and the merge, once per score key (`chained` collects the keys planned); None
    while a job of that chain still runs (`active`)."""
    from dwbench.content_hash import stable_hash, task_identity
    from dwbench.context import zero_shot
    from dwbench.methods.registry import method_class
    from dwbench.stages import score
    from dwbench.stages.keys import cell_keys
    from dwbench.sweep.progress import store_of

    cfg = cell.cfg
    count = score.shard_count(cfg)
    if count == 1 and cfg.score.shards > 1:
        chained.setdefault(f"unsharded:{cfg.method.name}", 1)
    if count == 1 or zero_shot(cfg):
        return []
    # a task not prepared yet has no score key: a stand-in names its jobs until it is
    chain = keys or cell_keys(cfg, "unprepared-" + stable_hash(task_identity(cfg.task)))
    score_key, store = chain["score"], store_of(cfg)
    if score_key in chained or store.is_done("score", score_key):
        return []
    shard_keys = score.shard_keys(score_key, count)
    if active & {score_key, f"shared-{score_key}", *shard_keys}:
        return None
    chained[score_key] = count
    jobs = []
    if callable(getattr(method_class(cfg.method), "shared_work", None)):
        shared = [*cell.overrides, f"score.shards={count}", f"score.shard={score.SHARED}"]
        jobs.append({"key": f"shared-{score_key}", "overrides": shared, "step": "shared"})
    for index, shard_key in enumerate(shard_keys):
        if not store.is_done("score_shard", shard_key):
            shard = [*cell.overrides, f"score.shards={count}", f"score.shard={index}"]
            jobs.append({"key": shard_key, "overrides": shard, "step": "shards"})
    merge = [*cell.overrides, f"score.shards={count}", "stages=[score]"]
    jobs.append({"key": score_key, "overrides": merge, "step": "merge"})
    return jobs


def _print_chain(planned: list, chained: dict[str, int], console: Console) -> None:
    """What runs before the cells when scoring is sharded, and which methods cannot shard."""
    steps = {step: sum(p.step == step for p in planned) for step in ("shared", "shards", "merge")}
    if steps["merge"]:
        console.print(
            f"Sharded scoring first: {steps['shards']} shard job(s) for {steps['merge']} score "
            f"key(s), then a merge each."
        )
    shared = sorted({_method_of(p.overrides) for p in planned if p.step == "shared"})
    if shared:
        console.print(
            f"Run once before their shards, since it cannot be split (the scorer fine-tune or "
            f"warm-up): {', '.join(shared)}."
        )
    unsharded = sorted(k.removeprefix("unsharded:") for k in chained if k.startswith("unsharded:"))
    if unsharded:
        console.print(
            f"Scored in one piece inside their cells (the method cannot shard): "
            f"{', '.join(unsharded)}."
        )


def _method_of(overrides: list[str]) -> str:
    """The method a job's overrides select (the last `method=` wins, as in Hydra)."""
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("method=")]
    return names[-1] if names else "?"


def _print_cost(cells: list, planned: list, console: Console) -> None:
    """Cells to run and their estimated time, per target model."""
    target_of = {c.key: str(c.cfg.target_model.name) for c in cells}
    table = Table(
        title="What the plan will cost (from earlier runs' throughput; start-up not counted)"
    )
    for column in ("target model", "cells", "estimated", "per cell", "total"):
        table.add_column(column, justify="left" if column == "target model" else "right")
    for target in dict.fromkeys(target_of[p.key] for p in planned):
        mine = [p for p in planned if target_of[p.key] == target]
        known = [p.estimate_s for p in mine if p.estimate_s is not None]
        table.add_row(
            target,
            str(len(mine)),
            str(len(known)),
            _duration(sum(known) / len(known) if known else None),
            _duration(sum(known) if known else None),
        )
    console.print(table)


def parser() -> argparse.ArgumentParser:
    return sweep_parser(
        "python -m dwbench.sweep.plan",
        "Write the cells of a sweep that are not done yet to "
        "<results_dir>/sweeps/<name>/plan.txt (one `<cell key> <overrides>` a line) and say "
        "what they will cost.",
        "Hydra overrides, as for python -m dwbench -m",
    )


def main(argv: list[str] | None = None) -> int:
    return run_sweep_command(parser().parse_args(argv), plan, 160)


if __name__ == "__main__":
    sys.exit(main())
