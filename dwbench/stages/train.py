"""train: LoRA fine-tuning of the target model on the selected subset, cached by key, and the
scorer fine-tunes selection methods ask for (ScorerTrainer), through the same cache.

The fine-tune itself (recipe, chat-template supervision, checkpoints, epoch snapshots) is
dwbench/lora.py; this stage decides what to train, caches it and logs it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from functools import partial
from typing import Any

from dwbench.content_hash import result_identity, stable_hash, stage_key
from dwbench.context import RunContext
from dwbench.data.records import Example
from dwbench.lora import MOMENTS_FILE, SNAPSHOT_LRS, Recipe, ScorerFineTune, Snapshot, fine_tune
from dwbench.memory import PeakMemory
from dwbench.models import model_identity
from dwbench.stages.keys import train_key
from dwbench.stages.left_open import finish_logging
from dwbench.stages.outputs import Prepared, Selected, Trained

logger = logging.getLogger(__name__)
# training-log fields logged per step: the loss curve, the schedule, the gradient norm
PER_STEP = {"loss": "train_loss_step", "learning_rate": "learning_rate", "grad_norm": "grad_norm"}


def recipe_group(
    prepare_key: str, model_cfg: Mapping[str, Any], finetune: Mapping[str, Any]
) -> str:
    """Fine-tunes that share data, model and recipe: a whole-pool member is STR's denominator."""
    return stable_hash(
        {
            "prepare": prepare_key,
            "target": model_identity(model_cfg),
            "finetune": result_identity(finetune),
        }
    )


def load(ctx: RunContext, key: str) -> Trained:
    folder = ctx.store.stage_dir("train", key)
    return Trained(key, folder / "adapter", ctx.store.marker("train", key))


def log_training(ctx: RunContext, key: str, mlflow_run: Any) -> None:
    """A finished fine-tune's numbers and loss curve on its run, from its output folder."""
    marker = ctx.store.marker("train", key)
    history = json.loads((ctx.store.stage_dir("train", key) / "train_log.json").read_text())
    mlflow_run.log_metrics({k: v for k, v in marker.items() if isinstance(v, int | float)})
    mlflow_run.log_history(history, PER_STEP)


def reuse(ctx: RunContext, key: str) -> None:
    """Log a reused fine-tune's run to the end where a kill left it open (stages.left_open)."""
    finish_logging(ctx, "train", key, partial(log_training, ctx, key))


def run(ctx: RunContext, prepared: Prepared, selected: Selected) -> Trained:
    key = train_key(ctx.cfg, selected.key)
    if ctx.store.reusable("train", key):
        logger.info("train: cached %s", key)
        reuse(ctx, key)
        return load(ctx, key)
    chosen = set(selected.ids)
    subset = [ex for ex in prepared.pool if ex.id in chosen]
    if len(subset) == len(prepared.pool):
        return _whole_pool(ctx, prepared, subset, key)
    params = {"finetune": ctx.cfg.finetune, "target_model": ctx.cfg.target_model}
    scratch = ctx.store.scratch_dir("train", key)
    with ctx.tracker.stage_run("train", key, ctx.tags(), params) as mlflow_run:
        with ctx.store.writing("train", key) as (out, marker):
            with PeakMemory() as memory:
                stats = fine_tune(Recipe.of_target(ctx), subset, scratch, out / "adapter")
            history = stats.pop("log_history")
            (out / "train_log.json").write_text(json.dumps(history, indent=1))
            marker.update(
                stats,
                group=recipe_group(prepared.key, ctx.cfg.target_model, ctx.cfg.finetune),
                n_pool=len(prepared.pool),
                budget=float(ctx.cfg.budget),
                **memory.as_metrics("train"),
            )
        log_training(ctx, key, mlflow_run)
    return load(ctx, key)


def _whole_pool(ctx: RunContext, prepared: Prepared, pool: list[Example], key: str) -> Trained:
    """The target fine-tuned on the whole pool, made through the scorer cache.

    It is the same computation as the scorer fine-tune of the same model, recipe and seed (the
    same examples in pool order; the epoch snapshots only save), so whichever comes first, this
    cell or a method that fine-tunes the target on the pool (S2L, GraNd, EL2N, ...), trains it
    and the other reads it. The train entry copies its adapter and records `scorer_key`.
    """
    run = scorer_fine_tune(ctx, prepared, pool, Recipe.of_target(ctx))
    source = ctx.store.stage_dir("train", run.key)
    scorer = ctx.store.marker("train", run.key)
    params = {"finetune": ctx.cfg.finetune, "target_model": ctx.cfg.target_model}
    with ctx.tracker.stage_run("train", key, ctx.tags(), params) as mlflow_run:
        with ctx.store.writing("train", key) as (out, marker):
            shutil.copytree(run.adapter_dir, out / "adapter")
            shutil.copy2(source / "train_log.json", out / "train_log.json")
            marker.update(
                {
                    k: v
                    for k, v in scorer.items()
                    if k in _WHOLE_POOL_FIELDS or k.startswith("train_")
                },
                scorer_key=run.key,
                budget=float(ctx.cfg.budget),
            )
        log_training(ctx, key, mlflow_run)
    return load(ctx, key)


# what a whole-pool train entry takes from the scorer fine-tune's marker, besides every train_*
_WHOLE_POOL_FIELDS = (
    "load_s",
    "n_examples",
    "epochs",
    "steps",
    "examples_per_s",
    "resumed",
    "group",
    "n_pool",
)


class ScorerTrainer:
    """Fine-tunes that selection methods ask for, through this stage's cache.

    The key hashes the examples, model, recipe and seed, not the method: GraNd, EL2N, CCS and
    Nuggets share one whole-pool fine-tune, and its marker joins the target's recipe group, so
    it also measures STR's denominator when the scorer is the target. `runs` records every
    fine-tune handed out, so the score stage can count its training time as selection time.
    """

    def __init__(self, ctx: RunContext, prepared: Prepared) -> None:
        self.ctx = ctx
        self.prepared = prepared
        self.runs: list[ScorerFineTune] = []

    def __call__(
        self,
        subset: list[Example],
        model_cfg: Mapping[str, Any] | None = None,
        finetune_overrides: Mapping[str, Any] | None = None,
    ) -> ScorerFineTune:
        from omegaconf import OmegaConf

        cfg = self.ctx.cfg
        model_cfg = cfg.selector_model if model_cfg is None else model_cfg
        finetune = OmegaConf.merge(cfg.finetune, dict(finetune_overrides or {}))
        recipe = Recipe(model_cfg, finetune, int(cfg.seed), self.ctx.device, self.ctx.cache_dir)
        run = scorer_fine_tune(self.ctx, self.prepared, subset, recipe)
        self.runs.append(run)
        return run

    def seconds_not_spent_here(self) -> float:
        """Training time of cached fine-tunes: selection time that an earlier run paid."""
        return sum(run.train_s for run in self.runs if run.cached)


def scorer_key(prepared: Prepared, subset: list[Example], recipe: Recipe) -> str:
    return stage_key(
        "train",
        role="scorer",
        prepare=prepared.key,
        examples=stable_hash(sorted(ex.id for ex in subset)),
        target=model_identity(recipe.model_cfg),
        finetune=recipe.finetune,
        seed=recipe.seed,
    )


def load_scorer(ctx: RunContext, key: str, cached: bool) -> ScorerFineTune:
    folder = ctx.store.stage_dir("train", key)
    marker = ctx.store.marker("train", key)
    snapshots = []
    for meta_path in sorted(
        folder.glob("snapshots/epoch-*/snapshot.json"), key=lambda p: int(p.parent.name[6:])
    ):
        meta = json.loads(meta_path.read_text())
        snapshots.append(
            Snapshot(
                epoch=meta["epoch"],
                adapter_dir=meta_path.parent / "adapter",
                moments_path=meta_path.parent / MOMENTS_FILE,
                mean_lr=meta["mean_lr"],
                betas=tuple(meta["betas"]),
                eps=meta["eps"],
            )
        )
    return ScorerFineTune(key, folder / "adapter", snapshots, marker["train_s"], cached)


def scorer_fine_tune(
    ctx: RunContext, prepared: Prepared, subset: list[Example], recipe: Recipe
) -> ScorerFineTune:
    key = scorer_key(prepared, subset, recipe)
    with ctx.store.lock("train", key):  # methods sharing one fine-tune never train it twice
        return _scorer_fine_tune(ctx, prepared, subset, recipe, key)


def _scorer_fine_tune(
    ctx: RunContext, prepared: Prepared, subset: list[Example], recipe: Recipe, key: str
) -> ScorerFineTune:
    if ctx.store.reusable("train", key):
        logger.info("train: cached scorer fine-tune %s", key)
        reuse(ctx, key)
        return load_scorer(ctx, key, cached=True)
    logger.info(
        "train: scorer fine-tune of %s on %d examples (%s)",
        recipe.model_cfg["name"],
        len(subset),
        key,
    )
    scratch = ctx.store.scratch_dir("train", key)
    params = {"finetune": recipe.finetune, "target_model": recipe.model_cfg}
    tags = {
        **ctx.tags(),
        "role": "scorer",
        "target": str(recipe.model_cfg["name"]),
        "budget": f"{len(subset) / len(prepared.pool):.4g}",
    }
    with ctx.tracker.stage_run("train", key, tags, params) as mlflow_run:
        with ctx.store.writing("train", key) as (out, marker):
            with PeakMemory() as memory:
                stats = fine_tune(
                    recipe, subset, scratch / "trainer", out / "adapter", scratch / "snapshots"
                )
            (scratch / "snapshots" / SNAPSHOT_LRS).unlink(missing_ok=True)
            (scratch / "snapshots").rename(out / "snapshots")
            history = stats.pop("log_history")
            (out / "train_log.json").write_text(json.dumps(history, indent=1))
            marker.update(
                stats,
                role="scorer",
                group=recipe_group(prepared.key, recipe.model_cfg, recipe.finetune),
                n_pool=len(prepared.pool),
                budget=len(subset) / len(prepared.pool),
                **memory.as_metrics("train"),
            )
        log_training(ctx, key, mlflow_run)
    return load_scorer(ctx, key, cached=False)
