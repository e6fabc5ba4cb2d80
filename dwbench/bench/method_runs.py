"""`python -m dwbench.bench methods`: run each method's cell of an experiment end to end
(`python -m dwbench`, one process each, a failure does not stop the others; finished stages are
reused) and print one table: selection precision and AUROC of the score against the embedded
task's clean flags, score after fine-tuning, selection seconds (with the scorer fine-tune's
share) and STR; then where each cell's last process spent its time (dwbench.timing).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from dwbench.bench.common import add_override_option, auroc, markdown_table

logger = logging.getLogger(__name__)

METHOD_COLUMNS = (
    "method",
    "selection precision",
    "AUROC (clean)",
    "score",
    "selection s",
    "scorer train s",
    "full-pool train s",
    "STR",
    "scoring peak RSS MB",
)


def time_row(cell: Any, runs: pd.DataFrame) -> dict:
    """Seconds per phase of the cell's last process, from its MLflow cell run."""
    from dwbench.sweep.progress import cell_progress
    from dwbench.timing import PHASES

    progress = cell_progress(cell, runs)
    row: dict[str, Any] = {"method": str(cell.cfg.method.name)}
    if not progress.time_s:
        return {**row, PHASES[0]: f"({progress.state}; no breakdown logged)"}
    return {**row, **{p: round(progress.time_s.get(p, 0.0), 1) for p in (*PHASES, "total")}}


def method_row(cell: Any, runs: pd.DataFrame) -> dict:
    """One finished cell's row, from its stage outputs and its MLflow evaluation run."""
    import json

    from dwbench.sweep.progress import DONE, cell_progress, store_of

    method = str(cell.cfg.method.name)
    progress = cell_progress(cell, runs)
    if progress.state != DONE:
        return {"method": method, "selection precision": f"({progress.state})"}
    store, keys = store_of(cell.cfg), progress.keys
    score_marker = store.marker("score", keys["score"])
    scores = pd.read_csv(store.stage_dir("score", keys["score"]) / "scores.csv", dtype={"id": str})
    labels_path = store.stage_dir("prepare", keys["prepare"]) / "labels.json"
    flags = json.loads(labels_path.read_text()) if labels_path.is_file() else {}
    run = runs[(runs["tags.stage"] == "evaluate") & (runs["tags.stage_key"] == keys["evaluate"])]
    metrics = run.iloc[0] if len(run) else pd.Series(dtype=object)
    return {
        "method": method,
        "selection precision": store.marker("select", keys["select"]).get("selection_precision"),
        "AUROC (clean)": auroc(scores["score"], [flags.get(i, False) for i in scores["id"]])
        if flags
        else None,
        "score": store.marker("evaluate", keys["evaluate"])["score"],
        "selection s": metrics.get("metrics.selection_s"),
        "scorer train s": score_marker.get("scorer_train_s", 0.0),
        "full-pool train s": metrics.get("metrics.full_train_s"),
        "STR": metrics.get("metrics.STR"),
        "scoring peak RSS MB": score_marker.get("peak_rss_mb"),
    }


def methods(args: argparse.Namespace) -> None:
    import subprocess

    from dwbench.sweep.grid import load_sweep
    from dwbench.sweep.progress import store_runs

    common = [f"+experiment={args.experiment}", f"budget={args.budget}", f"seed={args.seed}"]
    common += args.override
    for method in args.methods:
        if args.run:
            command = [sys.executable, "-m", "dwbench", *common, f"method={method}"]
            logger.warning("bench: %s", " ".join(command[1:]))
            done = subprocess.run(command, check=False)
            if done.returncode:
                logger.warning("bench: method %s failed (exit %d)", method, done.returncode)
    sweep = load_sweep([*common, f"method={','.join(args.methods)}"], progress=False)
    runs = store_runs(str(sweep.cells[0].cfg.tracking.uri))
    rows = [method_row(cell, runs) for cell in sweep.cells]
    print(
        f"Methods on {args.experiment}, budget={args.budget}, seed={args.seed}"
        + (f", overrides: {' '.join(args.override)}" if args.override else "")
    )
    print(markdown_table(rows, METHOD_COLUMNS))
    from dwbench.timing import PHASES

    print("\nWhere each cell's last run spent its time (seconds; dwbench.timing)")
    print(
        markdown_table([time_row(cell, runs) for cell in sweep.cells], ["method", *PHASES, "total"])
    )
    if args.csv:
        pd.DataFrame(rows, columns=list(METHOD_COLUMNS)).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")


def add_parser(commands: argparse._SubParsersAction) -> None:
    meth = commands.add_parser(
        "methods",
        help="run methods end to end as one experiment's cells; precision, AUROC, score, STR",
        description="Run each method's cell of an experiment, then tabulate the finished cells.",
    )
    meth.add_argument("--methods", nargs="+", required=True, help="registered method names")
    meth.add_argument("--experiment", default="embedded_table2", help="experiment preset")
    meth.add_argument("--budget", type=float, default=0.1, help="share of the pool kept")
    meth.add_argument("--seed", type=int, default=0, help="run seed")
    meth.add_argument(
        "--no-run", dest="run", action="store_false", help="only tabulate finished cells"
    )
    meth.add_argument("--csv", type=Path, help="also write the table as CSV here")
    add_override_option(meth)
    meth.set_defaults(handler=methods)
