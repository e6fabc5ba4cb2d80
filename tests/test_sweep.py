"""Plan and status on a tiny local sweep: a real `python -m dwbench -m` run, then the commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import forked_cli
import pytest
from rich.console import Console
from test_cli import REPO, tiny_overrides

from dwbench.errors import DwbenchError
from dwbench.stages.keys import cell_keys
from dwbench.sweep import plan as plan_command
from dwbench.sweep import slurm
from dwbench.sweep import status as status_command
from dwbench.sweep import submit as submit_command
from dwbench.sweep.grid import load_sweep
from dwbench.sweep.progress import cell_progress, prepared_keys, store_runs
from dwbench.tracking import Tracker


def sweep_args(model_dir: Path, results: Path) -> list[str]:
    """embedded_table2 shrunk to the tiny model, random only, one seed; budgets are added."""
    tiny = [o for o in tiny_overrides(model_dir) if not o.startswith("budget=")]
    return [
        "+experiment=embedded_table2",
        "method=random",
        "seed=0",
        f"results_dir={results}",
        *tiny,
    ]


def console() -> Console:
    return Console(record=True, width=250)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_llama_dir, cache_dir) -> list[str]:
    """Two cells run by Hydra's multirun; returns the sweep's overrides without its budgets."""
    results = tmp_path_factory.mktemp("sweep")
    args = sweep_args(tiny_llama_dir, results)
    done = forked_cli.run(
        [sys.executable, "-m", "dwbench", "-m", *args, "budget=0.25,0.5"],
        cwd=REPO,
        env={**os.environ, "DWBENCH_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return args


def test_status_of_a_finished_local_sweep(swept) -> None:
    out = console()
    counts = status_command.status([*swept, "budget=0.25,0.5"], None, out)
    assert counts == {"done": 2, "running": 0, "failed": 0, "missing": 0}
    text = out.export_text()
    assert "budget=0.25" in text and "budget=0.5" in text and text.count("evaluate/") == 2
    assert text.count("(total ") == 2  # each done cell's time breakdown (dwbench.timing)


def test_bench_methods_tabulates_each_cells_time_breakdown(swept, capsys) -> None:
    from dwbench.bench.__main__ import main as bench

    settings = [o for o in swept if not o.startswith(("+experiment=", "method=", "seed="))]
    bench(
        ["methods", "--methods", "random", "--budget", "0.25", "--no-run"]
        + [f"-o={o}" for o in settings]
    )
    printed = capsys.readouterr().out
    time_table = printed.split("spent its time")[1]
    header, _, row = time_table.strip().splitlines()[1:4]
    assert [c.strip() for c in header.strip("|").split("|")][-2:] == ["other", "total"]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "random" and float(cells[-1]) > 0  # the cell's wall time, in seconds


def test_plan_lists_exactly_the_missing_cells_with_an_estimate(swept) -> None:
    path = plan_command.plan([*swept, "budget=0.25,0.5,0.75"], None, console())
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    key, overrides = lines[0].split(" ", 1)
    assert "budget=0.75" in overrides.split()
    again = load_sweep(overrides.split(), progress=False)
    assert [c.key for c in again.cells] == [key]
    planned, meta = slurm.read_plan(path)
    assert planned[0].estimate_s is not None and planned[0].estimate_s > 0
    assert meta["name"] == "embedded_table2" and meta["slurm"]["parallel"] == 8


def test_a_method_that_never_scored_has_no_estimate(swept) -> None:
    """Its scoring may take minutes or hours, which only its first run tells: the plan says
    "no estimate" rather than one that leaves the scoring out."""
    others = [o for o in swept if o != "method=random"]
    path = plan_command.plan([*others, "method=perplexity_low", "budget=0.25"], None, console())
    planned, _ = slurm.read_plan(path)
    assert len(planned) == 1 and planned[0].estimate_s is None


def test_a_failed_stage_run_makes_the_cell_failed_and_planned_again(swept) -> None:
    cell = load_sweep([*swept, "budget=0.75"], progress=False).cells[0]
    keys = cell_keys(cell.cfg, prepared_keys(cell.cfg)[-1])
    results = Path(str(cell.cfg.results_dir))
    tracker = Tracker(str(cell.cfg.tracking.uri), str(cell.cfg.tracking.experiment), results)
    with pytest.raises(RuntimeError), tracker.stage_run("train", keys["train"], {}, {}):
        raise RuntimeError("killed")
    progress = cell_progress(cell, store_runs(str(cell.cfg.tracking.uri)))
    assert (progress.state, progress.detail) == ("failed", "mlflow: train run FAILED")
    path = plan_command.plan([*swept, "budget=0.25,0.5,0.75"], None, console())
    assert [line.split(" ", 1)[0] for line in path.read_text().splitlines()] == [cell.key]


def test_cells_slurm_still_runs_are_not_planned_again(swept, monkeypatch) -> None:
    sweep = load_sweep([*swept, "budget=0.6"], progress=False)
    sweep.dir.mkdir(parents=True, exist_ok=True)
    with slurm.jobs_file(sweep.dir).open("a") as records:
        records.write(json.dumps({"cell": sweep.cells[0].key, "job": "7_0"}) + "\n")
    monkeypatch.setattr(slurm, "job_states", lambda: {"7_0": "RUNNING"})
    out = console()
    assert status_command.status([*swept, "budget=0.6"], None, out)["running"] == 1
    assert "slurm 7_0 RUNNING" in out.export_text()
    path = plan_command.plan([*swept, "budget=0.6"], None, console())
    assert path.read_text() == ""
    with pytest.raises(DwbenchError, match="no cells to run"):
        slurm.submit(path, dry_run=True)
    monkeypatch.setattr(slurm, "job_states", lambda: {"7_0": "CANCELLED"})
    assert status_command.status([*swept, "budget=0.6"], None, console())["failed"] == 1
    assert len(plan_command.plan([*swept, "budget=0.6"], None, console()).read_text().split()) > 1


def test_submit_renders_the_array_over_a_frozen_plan(swept) -> None:
    path = plan_command.plan([*swept, "budget=0.25,0.5,0.75,0.8"], None, console())
    n = len(path.read_text().splitlines())
    script = slurm.submit(path, dry_run=True).script
    text = script.read_text()
    assert f"#SBATCH --array=0-{n - 1}%8" in text and "#SBATCH --cpus-per-task=8" in text
    assert str(script.parent / "plan.txt") in text and "--gres" not in text
    assert (script.parent / "plan.txt").read_text() == path.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    script = slurm.submit(path, parallel=3, dry_run=True).script
    assert f"#SBATCH --array=0-{n - 1}%3" in script.read_text()


def test_gpu_cells_ask_for_the_smallest_gpu_that_fits() -> None:
    def cell(gb: int, gpu: bool = True) -> slurm.PlannedCell:
        return slurm.PlannedCell("k", [], None, gpu, gb)

    settings = {"time_min": 60, "cpus_per_task": 4, "mem_gb": 32, "partition": "gpu"}
    settings["gpu_constraint"] = {"gb24": "a10", "gb40": "a100", "gb80": "h100"}
    options = slurm.sbatch_options([cell(24), cell(40)], settings)
    assert "--gres=gpu:1" in options and "--constraint=a100" in options
    assert "--partition=gpu" in options and "--mem=32G" in options
    assert "--constraint=h100" in slurm.sbatch_options([cell(80)], settings)
    assert not any("gres" in o for o in slurm.sbatch_options([cell(2, gpu=False)], settings))


def test_cell_key_ignores_runtime_knobs_and_paths(tiny_llama_dir, tmp_path) -> None:
    args = [*sweep_args(tiny_llama_dir, tmp_path), "budget=0.5"]
    (key,) = {c.key for c in load_sweep(args, progress=False).cells}
    moved = [*args, "eval.runtime.batch_size=2", "target_model.path=/elsewhere"]
    assert load_sweep(moved, progress=False).cells[0].key == key
    assert load_sweep([*args, "seed=1"], progress=False).cells[0].key != key


@pytest.mark.parametrize("command", [plan_command, submit_command, status_command])
def test_commands_have_help(command, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        command.main(["--help"])
    assert exit_info.value.code == 0 and "usage: python -m dwbench." in capsys.readouterr().out


def test_two_submissions_in_one_second_get_their_own_folders(tmp_path) -> None:
    from dwbench.sweep.slurm import new_submission_folder

    folders = {new_submission_folder(tmp_path) for _ in range(3)}
    assert len(folders) == 3 and all((f / "logs").is_dir() for f in folders)
