"""`python -m dwbench [overrides]`: compose the config with Hydra and run one sweep point."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dwbench.errors import DwbenchError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
logger = logging.getLogger("dwbench")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dwbench import pipeline
    from dwbench.results_table import evaluated_cells, print_table

    try:
        outcome = pipeline.run(cfg)
    except DwbenchError as error:
        print(f"dwbench: {error}", file=sys.stderr)
        sys.exit(2)
    ctx = outcome.ctx
    if outcome.summary is None:
        print(f"Stopped after stage '{outcome.last_stage}': {outcome.output_dir}")
        return
    cells = evaluated_cells(ctx.tracker, ctx.tags())
    metric = "exact match" if cfg.task.metric == "exact_match_number" else "ROUGE-L F1"
    print_table(cells, metric)
    print(f"Artifacts: {outcome.output_dir}")
    print(f"Open the MLflow UI: {mlflow_ui_command(str(cfg.tracking.uri))}")


def mlflow_ui_command(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return f"mlflow ui --backend-store-uri {uri} --port 5000"
