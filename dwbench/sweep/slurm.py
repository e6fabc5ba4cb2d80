"""Plan files, the SLURM arrays that run them, and what SLURM says about the cells.

A plan is `plan.txt` (a line per job: `<key> <overrides>`, shell-quoted) beside `plan.json` (each
line's step, estimate and resources, the sweep's `slurm` settings). The lines come in the order
of the sweep's chain, `STEPS`: the unsplittable part of sharded scoring (`shared`), the score
shards, their merges, then the cells; each step present becomes one array job that starts when
the one before it has succeeded (`--dependency=afterok`; a failure cancels what waits on it).
The rendered script carries each job's overrides from `plan.json`, the ones `submit` checked,
shell-quoted (no `eval` of a plan line): `plan.txt` must match them line for line, and a copy of
both is kept beside the script as its record, so re-planning while an array still runs changes
nothing under it. Each submission appends `<job>_<task>` per cell to `sweeps/jobs.jsonl`, which
`status` matches against `squeue --states=all`. That record is shared by every sweep of a
results folder: presets overlap (table1's cells are table2's), and a cell running for one must
not be planned again for the other.
"""

from __future__ import annotations

import json
import logging
import os
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
from dwbench.validate import is_folder_name

logger = logging.getLogger(__name__)
TEMPLATE = Path(__file__).resolve().parent / "array.sbatch"
PLAN_FILE, PLAN_META, JOBS_FILE = "plan.txt", "plan.json", "jobs.jsonl"
# A sweep's chain: the unsplittable part of sharded scoring (a scorer fine-tune), the score
# shards, their merges (one per score key), then the cells, each step waiting for the one before.
STEPS = ("shared", "shards", "merge", "cells")
# What a plan.json must hold for `submit` to render its scripts.
META_KEYS = ("name", "workdir", "slurm", "cells")
SLURM_KEYS = ("parallel", "time_min", "cpus_per_task", "mem_gb")


@dataclass
class PlannedCell:
    key: str  # the cell key; for a chain's earlier steps, the shard, score or shared-work key
    overrides: list[str]
    estimate_s: float | None
    requires_gpu: bool
    gpu_memory_gb: int
    step: str = "cells"


def plan_line(cell: PlannedCell) -> str:
    """A cell's plan.txt line, which `read_plan` also holds against plan.json."""
    return f"{cell.key} {shlex.join(cell.overrides)}"


def write_plan(folder: Path, cells: list[PlannedCell], meta: Mapping[str, Any]) -> Path:
    cells = sorted(cells, key=lambda c: STEPS.index(c.step))  # stable: the chain's order
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / PLAN_FILE
    plan.write_text("".join(f"{plan_line(c)}\n" for c in cells), encoding="utf-8")
    payload = {**meta, "cells": [c.__dict__ for c in cells]}
    (folder / PLAN_META).write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return plan


def replan_command(meta: Any) -> str:
    """The command that writes this plan again, with its overrides when plan.json still has them."""
    command = "python -m dwbench.sweep.plan"
    overrides = meta.get("overrides") if isinstance(meta, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    known = isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)
    if not known or not is_folder_name(name):
        return f"{command} <the sweep's overrides>"
    return f"{command} {shlex.join([*overrides, '--name', name])}"


def damaged(path: Path, what: str, meta: Any = None) -> DwbenchError:
    return DwbenchError(
        f"{path} is damaged ({what}): write the plan again with {replan_command(meta)}"
    )


def _utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise damaged(path, f"not UTF-8 text: byte {error.start}") from None


def _planned_cells(meta: dict[str, Any], meta_path: Path) -> list[PlannedCell]:
    """plan.json's cells, each with the fields and types that rendering them needs."""
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise damaged(meta_path, f"no {', '.join(missing)}", meta)
    slurm = meta["slurm"]
    if not isinstance(slurm, dict):
        raise damaged(meta_path, "slurm is not a mapping", meta)
    for key in SLURM_KEYS:
        value = slurm.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise damaged(meta_path, f"slurm.{key} is {value!r}, not a number", meta)
    if not isinstance(meta["name"], str) or not isinstance(meta["workdir"], str):
        raise damaged(meta_path, "name or workdir is not a string", meta)
    if not isinstance(meta["cells"], list):
        raise damaged(meta_path, "cells is not a list", meta)
    cells = []
    for index, fields in enumerate(meta.pop("cells"), start=1):
        try:
            cell = PlannedCell(**fields)
        except TypeError as error:
            raise damaged(meta_path, f"cell {index}: {error}", meta) from None
        overrides = cell.overrides
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise damaged(meta_path, f"cell {index}: overrides is not a list of strings", meta)
        if not isinstance(cell.key, str) or cell.step not in STEPS:
            raise damaged(meta_path, f"cell {index}: key or step is not a plan's", meta)
        cells.append(cell)
    return cells


def read_plan(plan: Path) -> tuple[list[PlannedCell], dict[str, Any]]:
    """plan.json's cells and settings, once plan.txt is found to list exactly those cells: the
    scripts run plan.json's overrides, the ones `submit` checks, so an edited plan.txt line (the
    file a user reads and might edit) is refused rather than run unchecked or ignored."""
    meta_path = plan.with_name(PLAN_META)
    if not plan.is_file() or not meta_path.is_file():
        raise DwbenchError(
            f"{plan} (with {PLAN_META} beside it) does not exist; write it with "
            "python -m dwbench.sweep.plan +experiment=<name>"
        )
    try:
        meta = json.loads(_utf8(meta_path))
    except ValueError as error:
        raise damaged(meta_path, f"not JSON: {error}") from None
    if not isinstance(meta, dict):
        raise damaged(meta_path, "not a JSON object")
    cells = _planned_cells(meta, meta_path)
    lines = _utf8(plan).splitlines()
    for number in range(1, max(len(lines), len(cells)) + 1):
        line = lines[number - 1] if number <= len(lines) else None
        expected = plan_line(cells[number - 1]) if number <= len(cells) else None
        if line != expected:
            found = "is missing" if line is None else f"({line!r}) is not in {PLAN_META}"
            raise DwbenchError(
                f"{plan} line {number} {found}, the plan that submit checks and runs: write the "
                f"plan again with {replan_command(meta)}"
            )
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
    """The array script of one step: task i runs plan line first_line + i + 1, with the
    overrides of plan.json (those `submit` checked) written into the script, each shell-quoted:
    nothing is read from the plan or evaluated when the job starts."""
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    environment.filters["q"] = lambda value: shlex.quote(str(value))
    slurm = meta["slurm"]
    name = f"dwbench-{meta['name']}" + ("" if step == "cells" else f"-{step}")
    log_dir, workdir, options = plan.parent / "logs", meta["workdir"], sbatch_options(cells, slurm)
    for value in (name, str(log_dir), workdir, *options):
        if "\n" in value or "\r" in value:
            raise DwbenchError(
                f"{value!r} (an #SBATCH value, from {plan.with_name(PLAN_META)} or the plan's "
                "folder) holds a line break, which would end the #SBATCH block and run the rest "
                f"as shell: fix it and write the plan again with {replan_command(meta)}"
            )
    return environment.from_string(TEMPLATE.read_text()).render(
        name=name,
        plan=plan,
        cells=cells,
        first_line=first_line,
        n=len(cells),
        parallel=parallel,
        log_dir=log_dir,
        workdir=workdir,
        python=sys.executable,
        options=options,
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
    width = int(meta["slurm"]["parallel"]) if parallel is None else parallel
    if width < 1:
        raise DwbenchError(f"--parallel={width}: give at least 1 array task at a time.")
    steps = steps_of(cells)
    folder = new_submission_folder(plan.parent / "submissions")
    frozen = folder / PLAN_FILE
    try:  # a script refused (a line break in an #SBATCH value) leaves no submission behind
        rendered = [
            (step, group, render(frozen, group, meta, width, first_line, step))
            for step, first_line, group in steps
        ]
    except DwbenchError:
        shutil.rmtree(folder)
        raise
    shutil.copy(plan, frozen)
    shutil.copy(plan.with_name(PLAN_META), folder / PLAN_META)
    scripts = []
    for step, group, text in rendered:
        script = folder / ("array.sbatch" if step == "cells" else f"array-{step}.sbatch")
        script.write_text(text)
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
        append_records(
            jobs_file(plan.parent),
            [
                {"cell": cell.key, "job": f"{job}_{index}", "script": str(script), "step": step}
                for index, cell in enumerate(group)
            ],
        )
    return submitted


def append_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Append in one write, on a line of its own: a submission killed while appending leaves a
    torn last line, which must not swallow the next submission's first record."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    with path.open("a+b") as out:
        if out.seek(0, os.SEEK_END):
            out.seek(-1, os.SEEK_END)
            if out.read(1) != b"\n":
                text = "\n" + text
        out.write(text.encode("utf-8"))


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
    jobs = {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            jobs[str(record["cell"])] = str(record["job"])
        except (ValueError, TypeError, KeyError, IndexError) as error:
            logger.warning(
                "%s line %d is not a job record (%s), skipped: a submission killed while "
                "appending leaves such a line, and the job it was writing is not known here.",
                path,
                number,
                error,
            )
    return jobs


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
