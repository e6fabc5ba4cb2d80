"""Plans and job records that were edited, torn or damaged, and sweep names that would escape the
sweep's folder: `submit` runs only what it checked, and every command refuses or skips the damage
in one line instead of a traceback."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dwbench.sweep import plan as plan_command
from dwbench.sweep import slurm
from dwbench.sweep import status as status_command
from dwbench.sweep import submit as submit_command

SWEEP = ["+experiment=embedded_table2", "method=random", "seed=0"]
# A value Hydra takes as one quoted string, full of what a shell would run if it parsed it again.
HOSTILE = "tracking.experiment='x $(touch {0}/dollar); echo \"hi\" `touch {0}/backtick`'"
REPLAN = "write the plan again with python -m dwbench.sweep.plan"


def write_plan(folder: Path, jobs: list[list[str]]) -> Path:
    """A plan as `sweep.plan` writes it (plan.txt and plan.json), one cell per job."""
    cells = [
        slurm.PlannedCell(f"key{index}", job, None, False, 2) for index, job in enumerate(jobs)
    ]
    settings = {"parallel": 2, "time_min": 60, "cpus_per_task": 2, "mem_gb": 8, "setup": []}
    meta = {"name": "faults", "workdir": str(folder), "overrides": SWEEP, "slurm": settings}
    return slurm.write_plan(folder / "sweeps" / "faults", cells, meta)


def cell_jobs(results: Path, *budgets: str) -> list[list[str]]:
    return [[*SWEEP, f"budget={b}", f"results_dir={results}"] for b in budgets]


def refusal(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a command printed on stderr."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dwbench: "), lines
    return lines[0]


# --- submit runs plan.json's checked overrides, never a plan.txt line -------------------------


def _budget_raised(lines: list[str], file: Path) -> list[str]:
    return [lines[0].replace("budget=0.1", "budget=0.9"), lines[1]]


def _command_appended(lines: list[str], file: Path) -> list[str]:
    return [lines[0], f"{lines[1]} $(touch {file})"]


def _line_dropped(lines: list[str], file: Path) -> list[str]:
    return lines[:1]


@pytest.mark.parametrize(
    ("edit", "line", "found"),
    [
        (_budget_raised, 1, "('key0 "),
        (_command_appended, 2, "$(touch "),
        (_line_dropped, 2, "is missing"),
    ],
)
def test_submit_refuses_a_plan_line_that_plan_json_does_not_hold(
    edit, line: int, found: str, tmp_path: Path, capsys
) -> None:
    """The issue's case: plan.txt edited, plan.json untouched, was submitted with exit 0 (only
    each line's key was compared), and the array job ran the edited line through `eval`."""
    plan = write_plan(tmp_path, cell_jobs(tmp_path / "results", "0.1", "0.2"))
    touched = tmp_path / "touched"
    plan.write_text("\n".join(edit(plan.read_text().splitlines(), touched)) + "\n")
    assert submit_command.main([str(plan), "--dry-run"]) == 2
    message = refusal(capsys)
    assert message.startswith(f"dwbench: {plan} line {line} ") and found in message
    assert REPLAN in message and "--name faults" in message
    assert not (plan.parent / "submissions").exists() and not touched.exists()


def _fake_python(folder: Path) -> Path:
    """Stands in for the job's python: records the arguments it was given."""
    fake = folder / "python"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "open(os.environ['ARGS_OUT'], 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    fake.chmod(0o755)
    return fake


def test_the_array_job_runs_the_checked_overrides_quoted_without_eval(tmp_path: Path) -> None:
    """The rendered script is run by bash as SLURM would run each task, after the frozen plan.txt
    beside it is edited: each task gets exactly its plan.json overrides, as separate arguments,
    and nothing in a value or in the edited plan is executed."""
    results, run = tmp_path / "results", tmp_path / "run"
    run.mkdir()
    jobs = cell_jobs(results, "0.1", "0.2")
    jobs[0].append(HOSTILE.format(run))
    plan = write_plan(tmp_path, jobs)
    script = slurm.submit(plan, dry_run=True).script
    text = script.read_text()
    assert not re.search(r"\beval\b", text) and "sed " not in text
    assert shlex.quote(HOSTILE.format(run)) in text
    frozen = script.parent / "plan.txt"
    edited = [f"{line} $(touch {run}/edited)" for line in frozen.read_text().splitlines()]
    frozen.write_text("\n".join(edited) + "\n")
    python = f"exec {shlex.quote(sys.executable)} -m dwbench"
    assert python in text
    script.write_text(text.replace(python, f"exec {_fake_python(tmp_path)} -m dwbench"))
    for task, job in enumerate(jobs):
        out = tmp_path / f"args{task}.json"
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_JOB_ID": "7"}
        done = subprocess.run(
            ["bash", str(script)],
            cwd=run,
            env={**env, "ARGS_OUT": str(out)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert list(run.iterdir()) == []  # no `touch` of the value or of the edit ran
        assert json.loads(out.read_text()) == ["-m", "dwbench", *job]
        assert f"dwbench cell key{task} ({frozen} line {task + 1}," in done.stdout


def test_a_line_break_in_an_sbatch_value_is_refused_and_leaves_no_script(
    tmp_path: Path, capsys
) -> None:
    """plan.json's name ends up in `#SBATCH --job-name=`: a line break there would end the
    #SBATCH block and run the rest of the line as shell, before `set -euo pipefail`."""
    plan = write_plan(tmp_path, cell_jobs(tmp_path / "results", "0.1"))
    meta = json.loads(plan.with_name("plan.json").read_text())
    meta["name"] = "x\ntouch /tmp/dwbench-injected"
    plan.with_name("plan.json").write_text(json.dumps(meta))
    assert submit_command.main([str(plan), "--dry-run"]) == 2
    message = refusal(capsys)
    assert "'dwbench-x\\ntouch /tmp/dwbench-injected'" in message and "line break" in message
    assert list((plan.parent / "submissions").rglob("*")) == []


BAD_NAMES = ["../../../x", "a/b", "..", ".", "", "a b", "x\n#SBATCH --wrap=touch /tmp/y"]


@pytest.mark.parametrize("command", [plan_command, status_command])
@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n) for n in BAD_NAMES])
def test_a_sweep_name_that_is_not_one_folder_name_is_refused(
    command, name: str, tmp_path: Path, capsys
) -> None:
    """`--name ../../../x` wrote the plan outside results_dir, and a name with a line break
    injected shell lines into the array script."""
    results = tmp_path / "results"
    assert command.main([*SWEEP, "budget=0.1", f"results_dir={results}", "--name", name]) == 2
    message = refusal(capsys)
    assert message == (
        f"dwbench: --name {name!r} is not a sweep name: use one folder name of letters, "
        "digits, '.', '_' and '-' (not starting with '.')"
    )
    assert list(tmp_path.iterdir()) == []


# --- damaged plan files and job records ---------------------------------------------------------


def _json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


DAMAGE = {
    "plan.json torn": ("plan.json", "not JSON: ", lambda t, j: j.write_text('{"cells": [{"k')),
    "plan.json not UTF-8": (
        "plan.json",
        "not UTF-8 text: byte 13",
        lambda t, j: j.write_bytes(b'{"name": "caf\xe9"}'),
    ),
    "plan.json a list": ("plan.json", "not a JSON object", lambda t, j: j.write_text("[]")),
    "no slurm": ("plan.json", "no slurm", lambda t, j: _json(j, lambda m: m.pop("slurm"))),
    "no slurm.parallel": (
        "plan.json",
        "slurm.parallel is None, not a number",
        lambda t, j: _json(j, lambda m: m["slurm"].pop("parallel")),
    ),
    "a cell without overrides": (
        "plan.json",
        "cell 1: ",
        lambda t, j: _json(j, lambda m: m["cells"][0].pop("overrides")),
    ),
    "overrides not strings": (
        "plan.json",
        "cell 1: overrides is not a list of strings",
        lambda t, j: _json(j, lambda m: m["cells"][0].update(overrides=[1])),
    ),
    "plan.txt not UTF-8": (
        "plan.txt",
        "not UTF-8 text: byte 8",
        lambda t, j: t.write_bytes(b"key0 caf\xe9\n"),
    ),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=list(DAMAGE))
def test_a_damaged_plan_is_named_in_one_line(damage, tmp_path: Path, capsys) -> None:
    """plan.json without `slurm` ended in `KeyError: 'slurm'`, a plan.txt that is not UTF-8 in
    `UnicodeDecodeError`."""
    file, what, damage_it = damage
    plan = write_plan(tmp_path, cell_jobs(tmp_path / "results", "0.1"))
    damage_it(plan, plan.with_name("plan.json"))
    assert submit_command.main([str(plan), "--dry-run"]) == 2
    message = refusal(capsys)
    assert message.startswith(f"dwbench: {plan.with_name(file)} is damaged ({what}"), message
    assert f"): {REPLAN} " in message
    assert not (plan.parent / "submissions").exists()


def test_a_damaged_plan_that_still_names_its_sweep_says_how_to_plan_it_again(
    tmp_path: Path, capsys
) -> None:
    plan = write_plan(tmp_path, cell_jobs(tmp_path / "results", "0.1"))
    _json(plan.with_name("plan.json"), lambda m: m.pop("slurm"))
    assert submit_command.main([str(plan), "--dry-run"]) == 2
    assert refusal(capsys).endswith(f"{REPLAN} {shlex.join(SWEEP)} --name faults")


TORN = '{"cell": "gone", "jo'


def _jobs_file(results: Path, *lines: str) -> Path:
    path = results / "sweeps" / "jobs.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_job_records_skip_a_torn_or_foreign_line_with_a_warning(tmp_path: Path, caplog) -> None:
    good = json.dumps({"cell": "a", "job": "7_0"})
    path = _jobs_file(tmp_path, good, TORN, "[1]", "", json.dumps({"cell": "b", "job": "8_1"}))
    path.write_bytes(path.read_bytes() + b"\xff\xfe\n")
    with caplog.at_level(logging.WARNING, logger="dwbench.sweep.slurm"):
        assert slurm.submitted_jobs(path.parent / "any") == {"a": "7_0", "b": "8_1"}
    warned = [r.getMessage() for r in caplog.records]
    assert [w.split(" is not a job record")[0] for w in warned] == [
        f"{path} line {n}" for n in (2, 3, 6)
    ]


@pytest.mark.parametrize("command", [plan_command, status_command])
def test_plan_and_status_read_past_a_torn_job_record(
    command, tmp_path: Path, monkeypatch, caplog
) -> None:
    """A kill while `submit` appends leaves a torn line; the records around it still count
    (the cell SLURM runs is reported running, and not planned again)."""
    from dwbench.sweep.grid import load_sweep

    results = tmp_path / "results"
    args = [*SWEEP, "budget=0.1", f"results_dir={results}"]
    (cell,) = load_sweep(args, progress=False).cells
    path = _jobs_file(results, TORN, json.dumps({"cell": cell.key, "job": "7_0"}))
    monkeypatch.setattr(slurm, "job_states", lambda: {"7_0": "RUNNING"})
    with caplog.at_level(logging.WARNING, logger="dwbench.sweep.slurm"):
        assert command.main(args) == 0
    assert f"{path} line 1 is not a job record" in caplog.text
    if command is plan_command:
        assert (results / "sweeps" / "embedded_table2" / "plan.txt").read_text() == ""


def test_a_submission_after_a_torn_record_starts_on_a_line_of_its_own(
    tmp_path: Path, monkeypatch
) -> None:
    """Appended right after the torn line, the next submission's first record was torn too."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    plan = write_plan(tmp_path, cell_jobs(tmp_path / "results", "0.1", "0.2"))
    records = slurm.jobs_file(plan.parent)
    records.write_text(json.dumps({"cell": "old", "job": "1_0"}) + "\n" + TORN)
    assert slurm.submit(plan).job == "4242"
    assert slurm.submitted_jobs(plan.parent) == {
        "old": "1_0",
        "key0": "4242_0",
        "key1": "4242_1",
    }
