"""A sweep cell's identity and title: what `plan`, `status`, the report and MLflow call it."""

from __future__ import annotations

from omegaconf import DictConfig

from dwbench.content_hash import method_identity, result_identity, stable_hash, task_identity
from dwbench.models import model_identity


def cell_key(cfg: DictConfig, last_stage: str) -> str:
    """Identity of a cell's result, computable without data (paths and runtime knobs left out)."""
    return stable_hash(
        {
            "task": task_identity(cfg.task),
            "method": method_identity(cfg.method),
            "selector": result_identity(model_identity(cfg.selector_model)),
            "target": result_identity(model_identity(cfg.target_model)),
            "finetune": result_identity(cfg.finetune),
            "eval": result_identity(cfg.eval),
            "budget": float(cfg.budget),
            "seed": cfg.seed,
            "last_stage": last_stage,
        }
    )


def cell_title(cfg: DictConfig) -> str:
    """`task / method / budget / selector -> target / seed N`, the cell's MLflow run name."""
    method = "zero_shot" if float(cfg.budget) == 0.0 else str(cfg.method.name)
    models = f"{cfg.selector_model.name} -> {cfg.target_model.name}"
    return f"{cfg.task.name} / {method} / {float(cfg.budget):g} / {models} / seed {cfg.seed}"
