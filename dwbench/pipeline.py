"""One sweep point, top to bottom: prepare -> score -> select -> train -> evaluate -> log.

Each stage is skipped when its output already exists under its key, so a killed job started
again only does what is left. A stage that is not in `stages` must already be cached.
Budget 0 is the paper's zero-shot reference row: prepare -> evaluate -> log, the untuned target.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dwbench import timing
from dwbench.artifacts import ArtifactStore
from dwbench.cell import cell_key, cell_title
from dwbench.context import RunContext, zero_shot
from dwbench.data.loading import load_task
from dwbench.errors import ConfigError
from dwbench.methods.registry import check_method
from dwbench.models import preflight, resolve_device
from dwbench.stages import evaluate, keys, log, prepare, score, select, train
from dwbench.stages.outputs import Prepared, Summary
from dwbench.tracking import ReadOnlyTracker, StageRun, Tracker
from dwbench.validate import check_method_options, validate_config

logger = logging.getLogger(__name__)
STAGES = ("score", "select", "train", "evaluate")


def validate(cfg: DictConfig, overrides: Sequence[str] | None = None) -> list[str]:
    """Check the config before any work; returns the stages to run, in pipeline order.

    `overrides` are the command line's (dwbench.validate.validate_config); a sweep passes each
    cell's."""
    validate_config(cfg, overrides)
    requested = [str(s) for s in cfg.stages]
    unknown = [s for s in requested if s not in STAGES]
    if unknown:
        raise ConfigError(
            f"stages={requested}: unknown stage(s) {unknown}; choose from {list(STAGES)}, "
            "e.g. stages=[score,select] to stop after selection."
        )
    if not requested:
        raise ConfigError("stages is empty; give at least one of " + ", ".join(STAGES))
    check_method(cfg.method)
    score.shard_count(cfg)
    budget = cfg.budget
    if not isinstance(budget, int | float) or not 0.0 <= float(budget) <= 1.0:
        raise ConfigError(
            f"budget={budget} is outside [0, 1]; pass a share such as budget=0.1 "
            "(budget=0: zero-shot, the target model without fine-tuning)."
        )
    if zero_shot(cfg):
        if "evaluate" not in requested:
            raise ConfigError(
                f"budget=0 (zero-shot) only evaluates the untuned target model, but stages="
                f"{requested} leaves out evaluate; drop the stages override."
            )
        return ["evaluate"]
    ft = cfg.finetune
    if int(ft.batch_size) % int(ft.runtime.micro_batch_size):
        raise ConfigError(
            f"finetune.batch_size={ft.batch_size} is not a multiple of "
            f"finetune.runtime.micro_batch_size={ft.runtime.micro_batch_size}; make it one."
        )
    return [s for s in STAGES if s in requested]


def check_models(cfg: DictConfig, stages: list[str], cache_dir: Path) -> None:
    """Say everything that stops this run (no GPU, no model access) before loading anything."""
    from dwbench.methods.registry import method_class

    method = method_class(cfg.method)
    models: dict[str, Any] = {}
    problems: list[str] = []
    if "score" in stages:
        if method.needs_selector:
            models["selector_model"] = cfg.selector_model
        problems += getattr(method, "config_problems", lambda _cfg: [])(cfg.method)
        for field in getattr(method, "extra_models", ()):  # e.g. STAFF's proxy model
            if cfg.method.get(field) is not None:
                models[f"method.{field}"] = cfg.method[field]
    if "train" in stages or "evaluate" in stages:
        models["target_model"] = cfg.target_model
    for role, model_cfg in models.items():
        problems += preflight(model_cfg, role, cache_dir)
    if problems:
        raise ConfigError("This run cannot start:\n- " + "\n- ".join(dict.fromkeys(problems)))


@dataclass
class Outcome:
    """Where the pipeline stopped, and the cell's summary when it went through evaluation."""

    ctx: RunContext
    last_stage: str
    last_key: str
    summary: Summary | None = None
    time_s: dict[str, float] | None = None  # seconds per phase of this process (dwbench.timing)

    @property
    def output_dir(self) -> Path:
        return self.ctx.store.stage_dir(self.last_stage, self.last_key)


def run(cfg: DictConfig) -> Outcome:
    """The cell, with where its time went (dwbench.timing) logged on its MLflow run."""
    with timing.cell_clock() as clock:
        with timing.phase("prepare"):
            stages = validate(cfg)
            cache_dir = Path(str(cfg.cache_dir)).expanduser()
            check_models(cfg, stages, cache_dir)
            splits = load_task(cfg.task)  # read and checked before anything is written
            check_method_options(cfg, len(splits.pool))  # its options against the pool it scores
            if "select" in stages and not zero_shot(cfg):
                select.subset_size(float(cfg.budget), len(splits.pool))  # a budget keeping nothing
            device = resolve_device(str(cfg.device))  # a device this machine lacks, before writes
            results_dir, read_only = results_folder(Path(str(cfg.results_dir)))
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            ctx = RunContext(
                cfg=cfg,
                store=ArtifactStore(results_dir / "artifacts", read_only=read_only),
                tracker=ReadOnlyTracker()
                if read_only
                else Tracker(
                    str(cfg.tracking.uri),
                    str(cfg.tracking.experiment),
                    results_dir / "mlartifacts",
                    cache_dir,
                ),
                device=device,
                cache_dir=cache_dir,
            )
            prepared = prepare.run(cfg.task, ctx.store, splits)
        logger.info("prepare: %d pool examples (%s)", len(prepared.pool), prepared.key)
        if not zero_shot(cfg) and cfg.score.shard is not None:  # a part of a sharded score stage
            require(ctx, stages, "score", keys.score_key(cfg, prepared.key))
            return Outcome(ctx, *score.run_part(ctx, prepared))
        key = cell_key(cfg, stages[-1])
        with (
            ctx.store.lock("cell", key),
            ctx.tracker.cell_run(key, cell_title(cfg), ctx.tags()) as cell,
        ):
            if cell.new:
                with timing.phase("log"):
                    log_cell_inputs(cell, cfg, prepared)
            outcome = run_stages(ctx, stages, prepared, cell)
            metrics = asdict(outcome.summary) if outcome.summary is not None else {}
            with timing.phase("log"):
                cell.log_metrics({k: v for k, v in metrics.items() if v is not None})
            outcome.time_s = clock.breakdown()
            cell.log_metrics(clock.as_metrics())
    logger.info("time: %s", timing.describe(outcome.time_s))
    return outcome


def log_cell_inputs(cell: StageRun, cfg: DictConfig, prepared: Prepared) -> None:
    """What a researcher browsing MLflow wants on the cell: its resolved config, and the pool
    and evaluation problems as dataset inputs (named by task, digested by the prepare key)."""
    import pandas as pd

    from dwbench.data.records import read_jsonl

    cell.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    name = str(cfg.task.name)
    pool = pd.DataFrame([asdict(ex) for ex in prepared.pool])
    problems = pd.DataFrame([asdict(ex) for ex in read_jsonl(prepared.eval_path)])
    for frame, role, context in ((pool, "pool", "training"), (problems, "eval", "evaluation")):
        source = str(prepared.dir.resolve())
        cell.log_dataset(frame, f"{name}-{role}", prepared.key, source, context)


def run_stages(ctx: RunContext, stages: list[str], prepared: Prepared, cell: StageRun) -> Outcome:
    """The stages after prepare, each cached by its key and computed by one process at a time
    (a second identical command waits, then reuses the output)."""
    cfg, store = ctx.cfg, ctx.store
    if zero_shot(cfg):
        logger.info("budget=0: zero-shot evaluation of the untuned target model")
        with (
            store.lock("evaluate", keys.zero_shot_key(cfg, prepared.key)),
            timing.phase("evaluate"),
        ):
            evaluated = evaluate.run(ctx, prepared, None)
        with timing.phase("log"):
            summary = log.run_zero_shot(ctx, prepared, evaluated)
        return Outcome(ctx, "evaluate", evaluated.key, summary)
    last = stages[-1]
    score_key = keys.score_key(cfg, prepared.key)
    require(ctx, stages, "score", score_key)
    with store.lock("score", score_key), timing.phase("score"):
        scored = score.run(ctx, prepared)
    if last == "score":
        return Outcome(ctx, "score", scored.key)
    select_key = keys.select_key(cfg, scored.key)
    require(ctx, stages, "select", select_key)
    with store.lock("select", select_key), timing.phase("select"):
        selected = select.run(ctx, prepared, scored)
    with timing.phase("log"):
        cell.log_artifact(store.stage_dir("select", selected.key) / "selected_ids.json")
    if last == "select":
        return Outcome(ctx, "select", selected.key)
    train_key = keys.train_key(cfg, selected.key)
    require(ctx, stages, "train", train_key)
    with store.lock("train", train_key), timing.phase("train"):
        trained = train.run(ctx, prepared, selected)
    if last == "train":
        return Outcome(ctx, "train", trained.key)
    with store.lock("evaluate", keys.evaluate_key(cfg, trained.key)), timing.phase("evaluate"):
        evaluated = evaluate.run(ctx, prepared, trained)
    with timing.phase("log"):
        summary = log.run(ctx, scored, selected, trained, evaluated)
    return Outcome(ctx, "evaluate", evaluated.key, summary)


def results_folder(results_dir: Path) -> tuple[Path, bool]:
    """results_dir, created if needed, and whether it is read-only (then cached results are
    served and nothing is logged); a clear error when it cannot be created."""
    if results_dir.is_dir() and not os.access(results_dir, os.W_OK):
        logger.warning(
            "results_dir=%s is read-only: finished results are served, nothing is logged to "
            "MLflow, and a stage that is not finished stops the run.",
            results_dir,
        )
        return results_dir, True
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"results_dir={results_dir} cannot be created ({error.strerror}); point results_dir "
            "at a folder you can write."
        ) from None
    if not results_dir.is_dir():
        raise ConfigError(f"results_dir={results_dir} is not a folder; point it at one.")
    return results_dir, False


def require(ctx: RunContext, stages: list[str], stage: str, key: str) -> None:
    """A stage left out of `stages` may only be passed through when its output is cached."""
    if stage not in stages and not ctx.store.is_done(stage, key):
        raise ConfigError(
            f"stage '{stage}' is not in stages={stages} and has no cached output "
            f"({stage}/{key}); add it to stages."
        )
