"""A plan run as a real SLURM array (single-node SLURM on localhost, slurm/local_cluster.sh).

One array task is cancelled while it runs: its sibling completes, and planning again must list
exactly the cancelled cell, whose resubmission then completes. A sharded scoring chain
(shards -> merge -> cell) loses one shard the same way and runs again only that shard.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from rich.console import Console
from test_cli import REPO, run_in_process
from test_sweep import sweep_args

from dwbench.sweep import plan as plan_command
from dwbench.sweep import slurm
from dwbench.sweep import status as status_command
from dwbench.sweep.grid import load_sweep
from dwbench.sweep.progress import SLURM_ACTIVE, runs_by_store, survey

CLUSTER = REPO / "slurm" / "local_cluster.sh"
TIMEOUT_S = 300


def _cluster(action: str, state_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if state_dir is not None:
        env["DWBENCH_SLURM_DIR"] = str(state_dir)
    return subprocess.run(
        ["bash", str(CLUSTER), action], capture_output=True, text=True, timeout=180, env=env
    )


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    """Start the local cluster (stopped again afterwards unless it was already running).

    A cluster this test starts keeps its state in a fresh folder: jobs queued in the default
    state folder by an earlier sweep would otherwise be recovered and run before the test's.
    """
    missing = [b for b in ("slurmctld", "slurmd", "munged") if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed: apt-get install -y slurm-wlm munge "
            "(.ci/run does, where it can)"
        )
    if os.geteuid() != 0:
        pytest.skip("starting munge and slurmd needs root")
    was_running = _cluster("status").returncode == 0
    state_dir = None if was_running else tmp_path_factory.mktemp("slurm-state")
    started = _cluster("start", state_dir)
    assert started.returncode == 0, started.stderr
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in started.stdout.splitlines()
        if line.startswith("export ")
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", exports["SLURM_CONF"])
        patch.setenv("PATH", exports["PATH"].replace("$PATH", os.environ["PATH"]))
        yield
        if not was_running:  # a cluster this test started: nothing of it may outlive the test
            subprocess.run(["scancel", "--me"], check=False)
            _cluster("stop", state_dir)


def _wait(job: str, until) -> dict[str, str]:
    """Poll this job's array tasks until `until(states)` holds."""
    deadline = time.time() + TIMEOUT_S
    while True:
        states = {k: v for k, v in slurm.job_states().items() if k.startswith(f"{job}_")}
        if until(states):
            return states
        assert time.time() < deadline, states
        time.sleep(1)


def _ended(states: dict[str, str]) -> bool:
    return bool(states) and not any(s in SLURM_ACTIVE for s in states.values())


def _progress(args: list[str]):
    sweep = load_sweep(args, progress=False)
    return sweep, survey(sweep.cells, sweep.dir, runs_by_store(sweep.cells))


def _finished_evaluations(results: Path) -> set[str]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results}/mlflow.db")
    experiment = client.get_experiment_by_name("embedded_paper")
    runs = client.search_runs(
        [experiment.experiment_id], "tags.stage = 'evaluate' and attributes.status = 'FINISHED'"
    )
    return {r.data.tags["stage_key"] for r in runs}


def _submit(args: list[str]) -> tuple[str, list[str]]:
    path = plan_command.plan(args, None, Console(quiet=True))
    keys = [line.split(" ", 1)[0] for line in path.read_text().splitlines()]
    job = slurm.submit(path).job
    return job, keys


def test_plan_runs_as_an_array_and_only_a_cancelled_cell_runs_again(
    local_slurm, tiny_llama_dir, cache_dir, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # sbatch hands the environment to the jobs
    small = ["slurm.cpus_per_task=1", "slurm.mem_gb=2", "slurm.parallel=2"]
    args = [*sweep_args(tiny_llama_dir, tmp_path), *small, "budget=0.25,0.5"]

    job, keys = _submit(args)
    assert len(keys) == 2
    log = tmp_path / "sweeps" / "embedded_table2" / "submissions"
    _wait(job, lambda s: s.get(f"{job}_1") == "RUNNING")
    deadline = time.time() + TIMEOUT_S
    while not any("dwbench cell" in p.read_text() for p in log.glob(f"*/logs/{job}_1.log")):
        assert time.time() < deadline
        time.sleep(0.5)
    time.sleep(3)  # mid-way: the cell is loading or running its stages
    subprocess.run(["scancel", f"{job}_1"], check=True)
    states = _wait(job, _ended)
    assert (states[f"{job}_0"], states[f"{job}_1"]) == ("COMPLETED", "CANCELLED"), states
    _, progress = _progress(args)
    assert [p.state for p in progress] == ["done", "failed"]
    assert progress[1].detail == f"slurm {job}_1 CANCELLED"

    again, replanned = _submit(args)
    assert replanned == [keys[1]]
    states = _wait(again, _ended)
    assert states == {f"{again}_0": "COMPLETED"}, states
    out = Console(record=True, width=250)
    counts = status_command.status(args, None, out)
    assert counts == {"done": 2, "running": 0, "failed": 0, "missing": 0}, out.export_text()
    _, progress = _progress(args)
    for state in progress:
        assert (tmp_path / "artifacts" / "evaluate" / state.keys["evaluate"]).is_dir()
    assert {p.keys["evaluate"] for p in progress} <= _finished_evaluations(tmp_path)


def _scores_csv(results: Path) -> bytes:
    (path,) = (results / "artifacts" / "score").glob("*/scores.csv")
    return path.read_bytes()


def _shard_markers(results: Path) -> dict[str, float]:
    return {
        p.parent.name: p.stat().st_mtime
        for p in (results / "artifacts" / "score_shard").glob("*/_SUCCESS.json")
    }


def _chain_ended(jobs: list[str]) -> bool:
    states = slurm.job_states()
    mine = {k: v for k, v in states.items() if any(k.startswith(f"{j}_") for j in jobs)}
    return bool(mine) and not any(s in SLURM_ACTIVE for s in mine.values())


def _wait_chain(jobs: list[str]) -> dict[str, str]:
    deadline = time.time() + TIMEOUT_S
    while not _chain_ended(jobs):
        assert time.time() < deadline, slurm.job_states()
        time.sleep(1)
    return {k: v for k, v in slurm.job_states().items() if k.split("_")[0] in jobs}


def test_sharded_scoring_runs_as_a_chain_and_a_cancelled_shard_alone_runs_again(
    local_slurm, tiny_llama_dir, cache_dir, tmp_path, monkeypatch
) -> None:
    """Data Whisperer on the embedded task: S=2 through plan/submit, with the second shard
    cancelled while it runs and planned again alone, gives the unsharded scores byte for byte.
    (Five jobs run in all; S=3 would add a third shard and check nothing more: the shards'
    partition and merge for any S are tests/test_shards.py's.)"""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DWBENCH_CACHE", str(cache_dir))
    tiny = [
        a
        for a in sweep_args(tiny_llama_dir, tmp_path)
        if not a.startswith(("results_dir=", "method="))
    ]
    cell = [
        *tiny,
        "method=data_whisperer_separate",
        "budget=0.5",
        "task.generator.pool_size=100",
        "method.n_demos=3",
        "method.n_queries=2",
        "method.runtime.prompts_per_call=1",  # 34 episodes, one unit each: seconds per shard
        "task.answer_max_tokens=64",
        "stages=[score,select]",  # the chain's last step runs the cell: no need to train here
        "slurm.cpus_per_task=1",
        "slurm.mem_gb=2",
        "slurm.parallel=1",
    ]
    # the unsharded reference, scored in this process (under `make test` one thread, as the jobs)
    run_in_process(
        [*(a for a in cell if not a.startswith("stages=")), "stages=[score]"], tmp_path / "plain"
    )
    expected = _scores_csv(tmp_path / "plain")

    two = [*cell, f"results_dir={tmp_path / 'two'}", "score.shards=2"]
    path = plan_command.plan(two, None, Console(quiet=True))
    assert len(path.read_text().splitlines()) == 4  # two shards, a merge, the cell
    submitted = slurm.submit(path)
    assert list(submitted.jobs) == ["shards", "merge", "cells"]
    shards = submitted.jobs["shards"]
    _wait(shards, lambda s: s.get(f"{shards}_1") == "RUNNING")
    logs = submitted.script.parent / "logs"
    deadline = time.time() + TIMEOUT_S
    while not any("data_whisperer:" in p.read_text() for p in logs.glob(f"{shards}_1.log")):
        assert time.time() < deadline
        time.sleep(0.2)
    subprocess.run(["scancel", f"{shards}_1"], check=True)  # mid-way through its episodes
    states = _wait_chain(list(submitted.jobs.values()))
    assert states[f"{shards}_1"] == "CANCELLED", states
    assert states[f"{submitted.jobs['cells']}_0"] != "COMPLETED", states
    finished = _shard_markers(tmp_path / "two")
    assert len(finished) == 1
    assert not (tmp_path / "two" / "artifacts" / "score").is_dir()  # no part merges alone
    out = Console(record=True, width=250)
    status_command.status(two, None, out)
    assert "score shards 1/2 done" in out.export_text()

    path = plan_command.plan(two, None, Console(quiet=True))
    lines = path.read_text().splitlines()
    assert [line.split()[0] for line in lines][0] not in finished  # the cancelled shard only
    assert sum("score.shard=" in line for line in lines) == 1 and len(lines) == 3
    again = slurm.submit(path)
    states = _wait_chain(list(again.jobs.values()))
    assert set(states.values()) == {"COMPLETED"}, states
    assert _scores_csv(tmp_path / "two") == expected
    assert {k: v for k, v in _shard_markers(tmp_path / "two").items() if k in finished} == (
        finished
    )  # the siblings were not scored again
