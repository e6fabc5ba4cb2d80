"""MLflow and the stage cache -> the report's rows: one per finished cell, and per-example scores.

A cell is found the way `dwbench.sweep.status` finds it: its stage keys follow from the prepared
data in the stage cache (`cell_progress`), and its evaluation run is the FINISHED MLflow run tagged
`stage=evaluate` with its evaluate key. That also tells apart ablation cells, which share every
other tag. Per-example scores come from `samples.jsonl` in the stage cache, else from the run's
MLflow artifacts (`samples.jsonl`, or `lm_eval_results.json` for runs logged before that file
was an artifact), so a store whose artifact folder lives elsewhere still reports.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dwbench.report.cells import Missing, ReportGrid, describe
from dwbench.report.snapshot import METRICS, TAGS
from dwbench.sweep.progress import DONE, runs_by_store, store_of, survey


@dataclass
class Collected:
    runs: pd.DataFrame  # one row per found cell: descriptors, metrics, provenance
    examples: pd.DataFrame  # cell, example_id, score
    missing: list[Missing]
    without_examples: list[str]  # cells found whose per-example scores were nowhere


def collect(report: ReportGrid) -> Collected:
    """Every cell of the report that has a finished, logged evaluation, with its samples."""
    sweeps = [report.grid, *report.companions]
    stores = runs_by_store([cell for sweep in sweeps for cell in sweep.cells])
    progress = {}
    for sweep in sweeps:
        for cell, state in zip(sweep.cells, survey(sweep.cells, sweep.dir, stores), strict=True):
            progress[cell.key] = state
    rows, examples, missing, without = [], [], [], []
    for role, cell in report.cells():
        state = progress[cell.key]
        uri = str(cell.cfg.tracking.uri)
        if state.state != DONE:
            missing.append(Missing(role, cell, state.state, state.detail))
            continue
        key = state.keys["evaluate"]
        run = _evaluation_run(stores[uri], key)
        if run is None:
            detail = (
                f"evaluate/{key} is cached but no FINISHED MLflow run in {uri} carries its "
                "metrics (the log stage did not finish): run the cell again"
            )
            missing.append(Missing(role, cell, "not logged", detail))
            continue
        rows.append({**describe(cell, role), **_measurements(run, key)})
        scores = per_example_scores(store_of(cell.cfg).stage_dir("evaluate", key), run, uri)
        if scores is None:
            without.append(cell.key)
        else:
            examples.append(scores.assign(cell=cell.key))
    frame = pd.DataFrame(rows)
    if examples:
        samples = pd.concat(examples, ignore_index=True)[["cell", "example_id", "score"]]
    else:
        samples = pd.DataFrame(columns=["cell", "example_id", "score"])
    return Collected(frame, samples, missing, without)


def _evaluation_run(runs: pd.DataFrame, key: str) -> pd.Series | None:
    """The newest FINISHED evaluate run of this key that has the log stage's metrics."""
    if runs.empty or not {"metrics.score", "metrics.STR"} <= set(runs.columns):
        return None
    hits = runs[
        (runs["tags.stage"] == "evaluate")
        & (runs["tags.stage_key"] == key)
        & (runs["status"] == "FINISHED")
        & runs["metrics.score"].notna()
        & runs["metrics.STR"].notna()
    ]
    if hits.empty:
        return None
    return hits.sort_values("end_time").iloc[-1]


def _measurements(run: pd.Series, key: str) -> dict[str, Any]:
    values: dict[str, Any] = {m: run.get(f"metrics.{m}") for m in METRICS}
    values.update({t: run.get(f"tags.{t}") for t in TAGS})
    end = run.get("end_time")
    values.update(
        evaluate_key=key,
        run_id=run["run_id"],
        finished=None if pd.isna(end) else pd.Timestamp(end).isoformat(),
    )
    return values


def per_example_scores(stage_dir: Path, run: pd.Series, uri: str) -> pd.DataFrame | None:
    """(example_id, score) of one evaluation: the stage cache first, MLflow second."""
    local = stage_dir / "samples.jsonl"
    if local.is_file():
        return read_samples(local)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("samples.jsonl", "lm_eval_results.json"):
            path = _download(run["run_id"], name, uri, Path(tmp))
            if path is not None:
                return read_samples(path)
    return None


def _download(run_id: str, name: str, uri: str, folder: Path) -> Path | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=name, dst_path=str(folder), tracking_uri=uri
        )
    except (MlflowException, OSError):
        return None
    return Path(path) if Path(path).is_file() else None


def read_samples(path: Path) -> pd.DataFrame:
    """samples.jsonl (one {"id", "prediction", "score"} a line) or lm_eval_results.json."""
    if path.suffix == ".json":
        samples = json.loads(path.read_text(encoding="utf-8"))["samples"]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        samples = [json.loads(line) for line in lines if line.strip()]
    frame = pd.DataFrame(samples, columns=["id", "score"])
    return frame.rename(columns={"id": "example_id"}).astype({"example_id": str, "score": float})
