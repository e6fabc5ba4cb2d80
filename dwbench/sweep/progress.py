"""Where each cell of a sweep stands, and what the cells still to run will cost.

Done-ness comes from the stage cache, without loading any data: a cell's stage keys start from
its prepare key, which hashes the task config and the data's fingerprint. Every prepared dataset
records its fingerprint in its `_SUCCESS.json`, so the prepared datasets of a task config are
found among those markers by recomputing their keys; from each, the cell's score, select, train
and evaluate keys follow (dwbench.stages.keys). A cell whose task was never prepared
cannot be done. (A hub dataset without a pinned `task.hub.revision` could change under a sweep:
the jobs always fingerprint what they load, but the plan trusts what is on disk, so pin it.)

Running and failed come from SLURM for submitted cells (`squeue --states=all`, which keeps
finished jobs for the cluster's MinJobAge), and from MLflow otherwise: a cell with a FAILED run
of one of its stages failed. Estimates use the throughput that earlier runs logged to MLflow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from dwbench.artifacts import ArtifactStore
from dwbench.pipeline import validate
from dwbench.stages import score
from dwbench.stages.keys import cell_keys, prepare_key
from dwbench.sweep.grid import Cell

logger = logging.getLogger(__name__)
DONE, RUNNING, FAILED, MISSING = "done", "running", "failed", "missing"
STATES = (DONE, RUNNING, FAILED, MISSING)
SLURM_ACTIVE = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}
)


@dataclass
class Progress:
    state: str
    detail: str = ""
    keys: dict[str, str] = field(default_factory=dict)  # stage -> key, when data was prepared
    time_s: dict[str, float] = field(default_factory=dict)  # its last process's phases


def store_of(cfg: DictConfig) -> ArtifactStore:
    return ArtifactStore(Path(str(cfg.results_dir)) / "artifacts")


def prepared_keys(cfg: DictConfig) -> list[str]:
    """Keys of the datasets already prepared for this cell's task config, newest last (a marker
    without the fields is left out, with a warning naming it: such a cell is not done)."""
    markers = list(store_of(cfg).markers("prepare", required=("fingerprint", "n_pool")))
    return [
        m["key"]
        for m in sorted(markers, key=lambda m: m.get("finished_at", ""))
        if prepare_key(cfg.task, m["fingerprint"]) == m["key"]
    ]


def store_runs(uri: str) -> pd.DataFrame:
    """Every run in an MLflow store, all experiments (empty when the store does not exist or is
    an empty file, which reading must not turn into a store), in
    `mlflow.search_runs`'s columns. Read through a client of this store alone: the fluent API's
    `set_tracking_uri` would also point every later MLflow call and child process
    (MLFLOW_TRACKING_URI) at it."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file() or db.stat().st_size == 0:  # reading would create MLflow's tables
            return pd.DataFrame()
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = pd.DataFrame([_run_row(run) for run in _all_runs(client, ids)])
    except Exception as error:  # noqa: BLE001 - a store that cannot be read: the cache still can
        logger.warning(
            "MLflow store %s cannot be read (%s); done-ness comes from the stage cache alone, "
            "and running or failed cells cannot be told apart from missing ones.",
            uri,
            str(error).splitlines()[0],
        )
        return pd.DataFrame()
    return runs if "tags.stage_key" in runs else pd.DataFrame()


def _all_runs(client: Any, experiment_ids: list[str]) -> Iterator[Any]:
    """Every run of these experiments, page by page."""
    token = None
    while experiment_ids:
        page = client.search_runs(experiment_ids, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _run_row(run: Any) -> dict[str, Any]:
    """One run as `mlflow.search_runs` writes it in its pandas output."""
    info, data = run.info, run.data
    return {
        "run_id": info.run_id,
        "experiment_id": info.experiment_id,
        "status": info.status,
        "artifact_uri": info.artifact_uri,
        "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True),
        "end_time": pd.to_datetime(info.end_time, unit="ms", utc=True),
        **{f"metrics.{name}": value for name, value in data.metrics.items()},
        **{f"params.{name}": value for name, value in data.params.items()},
        **{f"tags.{name}": value for name, value in data.tags.items()},
    }


def cell_progress(
    cell: Cell, runs: pd.DataFrame, slurm_state: tuple[str, str] | None = None
) -> Progress:
    """done / running / failed / missing; `slurm_state` is (job id, state) if it was submitted."""
    last = validate(cell.cfg)[-1]
    store = store_of(cell.cfg)
    chains = [cell_keys(cell.cfg, key) for key in prepared_keys(cell.cfg)]
    for keys in chains:
        if store.is_done(last, keys[last]):
            return Progress(DONE, f"{last}/{keys[last]}", keys, cell_time(cell.key, runs))
    keys = chains[-1] if chains else {}
    shards = shard_detail(cell.cfg, keys)
    if slurm_state is not None:
        job, state = slurm_state
        if state in SLURM_ACTIVE:
            return Progress(RUNNING, f"slurm {job} {state}{shards}", keys)
        return Progress(FAILED, f"slurm {job} {state}{shards}", keys)
    failed = _failed_stage(keys, runs)
    if failed:
        return Progress(FAILED, f"mlflow: {failed} run FAILED{shards}", keys)
    return Progress(MISSING, shards.removeprefix("; "), keys)


def cell_time(cell_key: str, runs: pd.DataFrame) -> dict[str, float]:
    """Where the cell's last process spent its time (dwbench.timing), from its MLflow cell run;
    empty for a cell logged before the breakdown existed."""
    from dwbench.timing import from_metrics

    if runs.empty or "tags.cell_key" not in runs:
        return {}
    cell = runs[(runs["tags.stage"] == "cell") & (runs["tags.cell_key"] == cell_key)]
    if cell.empty:
        return {}
    metrics = {
        str(name).removeprefix("metrics."): value
        for name, value in cell.iloc[0].items()
        if str(name).startswith("metrics.") and pd.notna(value)
    }
    return from_metrics(metrics)


def shard_detail(cfg: DictConfig, keys: dict[str, str]) -> str:
    """`; score shards 2/3 done` while a sharded score stage is not merged yet, else ''."""
    count = cfg.score.shards
    if not isinstance(count, int) or count < 2 or "score" not in keys:
        return ""
    store = store_of(cfg)
    if store.is_done("score", keys["score"]):
        return ""
    done = sum(store.is_done("score_shard", k) for k in score.shard_keys(keys["score"], count))
    return f"; score shards {done}/{count} done"


def _failed_stage(keys: dict[str, str], runs: pd.DataFrame) -> str | None:
    """The first stage of the chain whose MLflow run ended FAILED and has no output."""
    if runs.empty or not keys:
        return None
    failed = runs[runs["status"] == "FAILED"]
    for stage in ("score", "select", "train", "evaluate"):
        if stage not in keys:
            continue  # a zero-shot cell only evaluates
        hit = (failed["tags.stage"] == stage) & (failed["tags.stage_key"] == keys[stage])
        if hit.any():
            return stage
    return None


def _finished(runs: pd.DataFrame, stage: str, **tags: str) -> pd.DataFrame:
    if runs.empty:
        return runs
    mask = (runs["status"] == "FINISHED") & (runs["tags.stage"] == stage)
    for tag, value in tags.items():
        mask &= runs.get(f"tags.{tag}") == value
    return runs[mask]


def _mean(frame: pd.DataFrame, metric: str) -> float | None:
    column = f"metrics.{metric}"
    if frame.empty or column not in frame or frame[column].isna().all():
        return None
    return float(frame[column].mean())


def pool_size(cfg: DictConfig, keys: dict[str, str], runs: pd.DataFrame) -> int | None:
    """Training pool size: from the prepared data, the generator config, or earlier runs."""
    if keys:
        return int(store_of(cfg).marker("prepare", keys["prepare"])["n_pool"])
    task = cfg.task
    sizes = [task.pool_limit]
    if task.generator is not None:
        sizes.append(task.generator.pool_size)
    known = [int(s) for s in sizes if s is not None]
    if known:
        return min(known)
    logged = _mean(_finished(runs, "train", task=str(task.name)), "n_pool")
    return None if logged is None else int(logged)


def estimate_seconds(
    cell: Cell, keys: dict[str, str], runs: pd.DataFrame, scored: set[str]
) -> float | None:
    """Seconds this cell should take, from the same models' logged throughput; None if unknown.

    Stages already cached cost nothing, and a scoring run shared with an earlier cell of the
    plan (`scored` collects their score keys) is counted once.
    """
    cfg = cell.cfg
    store = store_of(cfg)
    target, selector = str(cfg.target_model.name), str(cfg.selector_model.name)
    task, method = str(cfg.task.name), str(cfg.method.name)
    chain = keys or cell_keys(cfg, f"unprepared-{cell.key}")
    seconds = 0.0
    if (  # a zero-shot chain has no score or train key: evaluation only
        "score" in chain
        and chain["score"] not in scored
        and not (keys and store.is_done("score", chain["score"]))
    ):
        scored.add(chain["score"])
        past = _finished(runs, "score", method=method, selector=selector, task=task)
        selection_s = _mean(past, "selection_s")
        if selection_s is None and _scores_with_a_model(cfg.method):
            return None  # its first run: a cost only that run can tell (minutes to hours)
        seconds += selection_s or 0.0
    if "train" in chain and not (keys and store.is_done("train", chain["train"])):
        trains = _finished(runs, "train", target=target)
        throughput, n_pool = _mean(trains, "examples_per_s"), pool_size(cfg, keys, runs)
        if throughput is None or n_pool is None:
            return None
        ft = cfg.finetune
        examples = math.floor(float(cfg.budget) * n_pool + 1e-9) * float(ft.epochs)
        if ft.max_steps is not None:
            examples = min(examples, int(ft.max_steps) * int(ft.batch_size))
        seconds += examples / throughput + (_mean(trains, "load_s") or 0.0)
    evals = _finished(runs, "evaluate", target=target, task=task)
    eval_s = _mean(evals, "eval_s")
    if eval_s is None:
        return None
    return seconds + eval_s


def _scores_with_a_model(method_cfg: Any) -> bool:
    """Whether scoring loads a model (selector, proxy, ...); Random and the oracle do not."""
    from dwbench.methods.registry import method_class

    found = method_class(method_cfg)
    return bool(getattr(found, "needs_selector", True) or getattr(found, "extra_models", ()))


def runs_by_store(cells: list[Cell]) -> dict[str, pd.DataFrame]:
    """The runs of every MLflow store the cells log to, by tracking URI."""
    return {uri: store_runs(uri) for uri in {str(c.cfg.tracking.uri) for c in cells}}


def survey(cells: list[Cell], sweep_dir: Path, runs: dict[str, pd.DataFrame]) -> list[Progress]:
    """Each cell's progress: the stage cache, then SLURM for submitted cells, then MLflow."""
    from dwbench.sweep.slurm import job_states, submitted_jobs

    jobs = submitted_jobs(sweep_dir)
    states = job_states() if jobs else {}
    progress = []
    for cell in cells:
        job = jobs.get(cell.key)
        slurm_state = (job, states[job]) if job in states else None
        progress.append(cell_progress(cell, runs[str(cell.cfg.tracking.uri)], slurm_state))
    return progress
