"""Plan files, the SLURM arrays that run them, and what SLURM says about the cells.

A plan is `plan.txt` (a line per job: `<key> <overrides>`, shell-quoted) beside `plan.json` (each
line's step, estimate and resources, the sweep's `slurm` settings). The lines come in the order
of the sweep's chain, `STEPS`: the unsplittable part of sharded scoring (`shared`), the score
shards, their merges, then the cells; each step present becomes one array job that starts when
the one before it has succeeded (`--dependency=afterok`; a failure cancels what waits on it).
Each submission freezes a copy of the plan next to its rendered script, so re-planning while an
array still runs never shifts the lines under it, and appends `<job>_<task>` per cell to
`sweeps/jobs.jsonl`, which `status` matches against `squeue --states=all`. That record is shared
by every sweep of a results folder: presets overlap (table1's cells are table2's), and a cell
running for one must not be planned again for the other.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from dwbench.errors import DwbenchError

TEMPLATE = Path(__file__).resolve().parent / "array.sbatch"
PLAN_FILE, PLAN_META, JOBS_FILE = "plan.txt", "plan.json", "jobs.jsonl"
# A sweep's chain: the unsplittable part of sharded scoring (a scorer fine-tune), the score
# shards, their merges (one per score key), then the cells, each step waiting for the one before.
STEPS = ("shared", "shards", "merge", "cells")


@dataclass
class PlannedCell:
    key: str  # the cell key; for a chain's earlier steps, the shard, score or shared-work key
    overrides: list[str]
    estimate_s: float | None
    requires_gpu: bool
    gpu_memory_gb: int
    step: str = "cells"


def write_plan(folder: Path, cells: list[PlannedCell], meta: Mapping[str, Any]) -> Path:
    cells = sorted(cells, key=lambda c: STEPS.index(c.step))  # stable: the chain's order
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / PLAN_FILE
    plan.write_text("".join(f"{c.key} {shlex.join(c.overrides)}\n" for c in cells))
    payload = {**meta, "cells": [c.__dict__ for c in cells]}
    (folder / PLAN_META).write_text(json.dumps(payload, indent=1))
    return plan


def read_plan(plan: Path) -> tuple[list[PlannedCell], dict[str, Any]]:
    meta_path = plan.with_name(PLAN_META)
    if not plan.is_file() or not meta_path.is_file():
        raise DwbenchError(
            f"{plan} (with {PLAN_META} beside it) does not exist; write it with "
            "python -m dwbench.sweep.plan +experiment=<name>"
        )
    try:
        meta = json.loads(meta_path.read_text())
        cells = [PlannedCell(**c) for c in meta.pop("cells")]
    except (ValueError, TypeError, KeyError) as error:
        raise DwbenchError(
            f"{meta_path} is damaged ({error}); write the plan again with "
            "python -m dwbench.sweep.plan"
        ) from None
    keys = [line.split(" ", 1)[0] for line in plan.read_text().splitlines()]
    if keys != [c.key for c in cells]:
        raise DwbenchError(f"{plan} does not match {meta_path}; write both again with plan")
    return cells, meta


def sbatch_options(cells: list[PlannedCell], slurm: Mapping[str, Any]) -> list[str]:
    """Resources for every task of the array: the largest GPU any cell's models need."""
    options = [f"--time={int(slurm['time_min'])}", f"--cpus-per-task={slurm['cpus_per_task']}"]
    options.append(f"--mem={int(slurm['mem_gb'])}G")
    for flag in ("partition", "account", "qos"):
        if slurm.get(flag):
            options.append(f"--{flag}={slurm[flag]}")
    gpu_cells = [c for c in cells if c.requires_gpu]
    if gpu_cells:
        options.append("--gres=gpu:1")
        need = max(c.gpu_memory_gb for c in gpu_cells)
        constraint = gpu_constraint(need, slurm.get("gpu_constraint") or {})
        if constraint:
            options.append(f"--constraint={constraint}")
    return options + [str(o) for o in slurm.get("extra") or []]


def gpu_constraint(need_gb: int, constraints: Mapping[str, str | None]) -> str | None:
    """The constraint of the smallest configured GPU size (`gb40`: 40 GB) that fits `need_gb`."""
    sizes = sorted((int(k.removeprefix("gb")), v) for k, v in constraints.items())
    return next((v for size, v in sizes if size >= need_gb), None)


def render(
    plan: Path,
    cells: list[PlannedCell],
    meta: Mapping[str, Any],
    parallel: int,
    first_line: int = 0,
    step: str = "cells",
) -> str:
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    environment.filters["q"] = lambda value: shlex.quote(str(value))
    slurm = meta["slurm"]
    return environment.from_string(TEMPLATE.read_text()).render(
        name=f"dwbench-{meta['name']}" + ("" if step == "cells" else f"-{step}"),
        plan=plan,
        first_line=first_line,
        n=len(cells),
        parallel=parallel,
        log_dir=plan.parent / "logs",
        workdir=meta["workdir"],
        python=sys.executable,
        options=sbatch_options(cells, slurm),
        setup=list(slurm.get("setup") or []),
    )


def steps_of(cells: list[PlannedCell]) -> list[tuple[str, int, list[PlannedCell]]]:
    """(step, its first line, its cells) for each step present, in the chain's order."""
    out, line = [], 0
    for step in STEPS:
        mine = [c for c in cells if c.step == step]
        if mine:
            out.append((step, line, mine))
            line += len(mine)
    if [c.key for _, _, group in out for c in group] != [c.key for c in cells]:
        raise DwbenchError("the plan's lines are not in the chain's order; write it again")
    return out


@dataclass
class Submitted:
    """One submission: per step of the chain, its array job (none on a dry run) and script."""

    jobs: dict[str, str]
    scripts: dict[str, Path]

    @property
    def job(self) -> str:
        """The last step's job: the cells' array, which ends the chain."""
        return list(self.jobs.values())[-1] if self.jobs else ""

    @property
    def script(self) -> Path:
        return list(self.scripts.values())[-1]


def submit(plan: Path, parallel: int | None = None, dry_run: bool = False) -> Submitted:
    """Freeze the plan, render one array script per step of its chain beside it and sbatch them,
    each after the one before."""
    from dwbench.sweep.grid import check_jobs

    cells, meta = read_plan(plan)
    if not cells:
        raise DwbenchError(f"{plan} has no cells to run: every cell is done or running")
    check_jobs([c.overrides for c in cells], str(plan))
    folder = new_submission_folder(plan.parent / "submissions")
    frozen = folder / PLAN_FILE
    shutil.copy(plan, frozen)
    shutil.copy(plan.with_name(PLAN_META), folder / PLAN_META)
    width = int(meta["slurm"]["parallel"]) if parallel is None else parallel
    if width < 1:
        raise DwbenchError(f"--parallel={width}: give at least 1 array task at a time.")
    scripts = []
    for step, first_line, group in steps_of(cells):
        name = "array.sbatch" if step == "cells" else f"array-{step}.sbatch"
        script = folder / name
        script.write_text(render(frozen, group, meta, width, first_line, step))
        scripts.append((step, script, group))
    submitted = Submitted({}, {step: script for step, script, _ in scripts})
    if dry_run:
        return submitted
    if shutil.which("sbatch") is None:
        raise DwbenchError("sbatch is not on PATH: run this on a SLURM login node")
    job = ""
    for step, script, group in scripts:
        after = [f"--dependency=afterok:{job}", "--kill-on-invalid-dep=yes"] if job else []
        command = ["sbatch", "--parsable", *after, str(script)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise DwbenchError(f"sbatch refused {script}: {done.stderr.strip()}")
        job = done.stdout.strip().split(";")[0]
        submitted.jobs[step] = job
        with jobs_file(plan.parent).open("a") as records:
            for index, cell in enumerate(group):
                record = {"cell": cell.key, "job": f"{job}_{index}", "script": str(script)}
                records.write(json.dumps({**record, "step": step}) + "\n")
    return submitted


def new_submission_folder(root: Path) -> Path:
    """A folder of its own for each submission, even two in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        folder = root / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        (folder / "logs").mkdir()
        return folder
    raise DwbenchError(f"{root}: no free submission folder for {stamp}")


def jobs_file(sweep_dir: Path) -> Path:
    """The submissions of every sweep that shares this sweep's results folder."""
    return sweep_dir.parent / JOBS_FILE


def submitted_jobs(sweep_dir: Path) -> dict[str, str]:
    """cell key -> `<job>_<task>` of its latest submission."""
    path = jobs_file(sweep_dir)
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["cell"]: r["job"] for r in records}


def job_states() -> dict[str, str]:
    """`<job>_<task>` -> state for this user's array tasks SLURM still knows; {} without SLURM."""
    if shutil.which("squeue") is None:
        return {}
    command = ["squeue", "--me", "--states=all", "--array", "--noheader", "--format=%i|%T"]
    listed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if listed.returncode:
        return {}
    states = {}
    for line in listed.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        states[job] = state
    return states
