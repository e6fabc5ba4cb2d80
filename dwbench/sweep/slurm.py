"""Plan files, the SLURM array that runs them, and what SLURM says about the cells.

A plan is `plan.txt` (line i: `<cell key> <overrides>`, shell-quoted; array task i runs line
i + 1) beside `plan.json` (the cells' estimates and resources, the sweep's `slurm` settings).
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

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "array.sbatch"
PLAN_FILE, PLAN_META, JOBS_FILE = "plan.txt", "plan.json", "jobs.jsonl"


@dataclass
class PlannedCell:
    key: str
    overrides: list[str]
    estimate_s: float | None
    requires_gpu: bool
    gpu_memory_gb: int


def write_plan(folder: Path, cells: list[PlannedCell], meta: Mapping[str, Any]) -> Path:
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
            "python -m dwbench.plan +experiment=<name>"
        )
    meta = json.loads(meta_path.read_text())
    cells = [PlannedCell(**c) for c in meta.pop("cells")]
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


def render(plan: Path, cells: list[PlannedCell], meta: Mapping[str, Any], parallel: int) -> str:
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    environment.filters["q"] = lambda value: shlex.quote(str(value))
    slurm = meta["slurm"]
    return environment.from_string(TEMPLATE.read_text()).render(
        name=f"dwbench-{meta['name']}",
        plan=plan,
        n=len(cells),
        parallel=parallel,
        log_dir=plan.parent / "logs",
        workdir=meta["workdir"],
        python=sys.executable,
        options=sbatch_options(cells, slurm),
        setup=list(slurm.get("setup") or []),
    )


def submit(plan: Path, parallel: int | None = None, dry_run: bool = False) -> tuple[str, Path]:
    """Freeze the plan, render the array script beside it and sbatch it: (job id, script)."""
    cells, meta = read_plan(plan)
    if not cells:
        raise DwbenchError(f"{plan} has no cells to run: every cell is done or running")
    folder = plan.parent / "submissions" / time.strftime("%Y%m%d-%H%M%S")
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    frozen = folder / PLAN_FILE
    shutil.copy(plan, frozen)
    shutil.copy(plan.with_name(PLAN_META), folder / PLAN_META)
    script = folder / "array.sbatch"
    script.write_text(render(frozen, cells, meta, parallel or int(meta["slurm"]["parallel"])))
    if dry_run:
        return "", script
    if shutil.which("sbatch") is None:
        raise DwbenchError("sbatch is not on PATH: run this on a SLURM login node")
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode:
        raise DwbenchError(f"sbatch refused {script}: {done.stderr.strip()}")
    job = done.stdout.strip().split(";")[0]
    with jobs_file(plan.parent).open("a") as records:
        for index, cell in enumerate(cells):
            record = {"cell": cell.key, "job": f"{job}_{index}", "script": str(script)}
            records.write(json.dumps(record) + "\n")
    return job, script


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
