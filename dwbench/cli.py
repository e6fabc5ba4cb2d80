"""`python -m dwbench [overrides]`: compose the config with Hydra and run one sweep point."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from dwbench.config_files import CONF_DIR
from dwbench.errors import DwbenchError
from dwbench.methods.registry import register_installed_methods
from dwbench.storage import DropRaisedStorageErrors, storage_problem

register_installed_methods()  # entry-point methods compose as method=<name> (dwbench.methods)
# MLflow logs a failed store call with its traceback before raising it; a disk problem is said
# once, in one line, by main.
logging.getLogger("mlflow.store.db.utils").addFilter(DropRaisedStorageErrors())
logger = logging.getLogger("dwbench")


def run() -> None:
    """`python -m dwbench [overrides]`: a key set without `+` that no config defines is refused
    with a did-you-mean first (exit 2); Hydra's own refusal would suggest adding it with `+`."""
    try:
        refuse_unknown_changed_keys(sys.argv[1:])
    except DwbenchError as error:
        print(f"dwbench: {error}", file=sys.stderr)
        sys.exit(2)
    main()


def refuse_unknown_changed_keys(argv: list[str]) -> None:
    """validate.check_changed_keys on the command line's overrides, composed as `main` will
    compose them; where that composition fails otherwise (an unknown option, a config folder of
    your own), Hydra then says why, as it always does."""
    from hydra import initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException

    from dwbench.validate import check_changed_keys

    args, _ = get_args_parser().parse_known_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    if args.config_dir or args.config_path or args.config_name or args.experimental_rerun:
        return
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            check_changed_keys(args.overrides)
    except HydraException:
        return


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dwbench import pipeline
    from dwbench.results_table import evaluated_cells, print_table, summary_row

    try:
        outcome = pipeline.run(cfg)
    except DwbenchError as error:
        print(f"dwbench: {error}", file=sys.stderr)
        if not in_local_multirun():  # a single run, or a SLURM job that SLURM marks failed
            sys.exit(2)
        # a local multirun goes on with the other cells and lists this one at its end
        overrides = HydraConfig.get().overrides.task
        FAILED_CELLS.append((" ".join(overrides), str(error).splitlines()[0]))
        return
    except Exception as error:  # a full or read-only disk: one line; anything else: a traceback
        problem = storage_problem(error, *run_storage(cfg), resumes=True)
        if problem is None:
            raise
        print(f"dwbench: {problem}", file=sys.stderr)
        sys.exit(1)  # a multirun stops too: every later cell would meet the same disk
    ctx = outcome.ctx
    if outcome.summary is None:
        print(f"Stopped after stage '{outcome.last_stage}': {outcome.output_dir}")
        return
    if ctx.store.read_only:  # no MLflow to read the other cells from: this cell alone
        cells = summary_row(ctx.tags(), outcome.summary)
    else:
        cells = evaluated_cells(ctx.tracker, ctx.tags())
    metric = "exact match" if cfg.task.metric == "exact_match_number" else "ROUGE-L F1"
    print_table(cells, metric)
    print(f"Artifacts: {outcome.output_dir}")
    print(f"Open the MLflow UI: {mlflow_ui_command(str(cfg.tracking.uri))}")


def run_storage(cfg: DictConfig) -> tuple[dict[str, Path], Path | None]:
    """Where a run writes, for a disk problem's message: its folders by setting, and the MLflow
    store's SQLite file (None for a tracking server)."""
    folders = {
        "results_dir": Path(str(cfg.results_dir)),
        "cache_dir": Path(str(cfg.cache_dir)).expanduser(),
    }
    uri = str(cfg.tracking.uri)
    database = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    return folders, database


FAILED_CELLS: list[tuple[str, str]] = []  # (overrides, first line of the error) of this multirun


def in_local_multirun() -> bool:
    """A multirun whose cells run in this process (Hydra's basic launcher), one after another."""
    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    return hydra_cfg.mode == RunMode.MULTIRUN and launcher.endswith(".BasicLauncher")


class FailedCells(Callback):
    """At the end of a local multirun, lists the cells stopped by bad input and exits 2."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not FAILED_CELLS:
            return
        print(f"dwbench: {len(FAILED_CELLS)} cell(s) stopped on bad input:", file=sys.stderr)
        for overrides, error in FAILED_CELLS:
            print(f"  {overrides}: {error}", file=sys.stderr)
        sys.exit(2)


def mlflow_ui_command(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return f"mlflow ui --backend-store-uri {uri} --port 5000"
