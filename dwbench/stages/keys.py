"""Every stage's key as a pure function of the config and the keys of the stages it reads.

The pipeline, `plan`, `status`, the report and the calibration all compute a cell's keys here,
from its config and its prepare key alone, so nothing needs a stage's output to know where that
output lives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from dwbench.content_hash import method_identity, stage_key, task_identity
from dwbench.context import zero_shot
from dwbench.models import model_identity

TIE_BREAK = "run_seed"  # ties in the scores are broken by the run seed (methods.base.top_k)


def prepare_key(task_cfg: Mapping[str, Any], data_fingerprint: str) -> str:
    """The task config (dwbench.content_hash.task_identity) and the data's fingerprint."""
    return stage_key("prepare", task=task_identity(task_cfg), data=data_fingerprint)


def score_key(cfg: DictConfig, prepare_key: str) -> str:
    return stage_key(
        "score",
        prepare=prepare_key,
        method=method_identity(cfg.method),
        selector=model_identity(cfg.selector_model),
        seed=cfg.seed,
    )


def select_key(cfg: DictConfig, score: str) -> str:
    return stage_key("select", score=score, budget=float(cfg.budget), ties=TIE_BREAK)


def train_key(cfg: DictConfig, select: str) -> str:
    return stage_key(
        "train",
        select=select,
        target=model_identity(cfg.target_model),
        finetune=cfg.finetune,
        seed=cfg.seed,
    )


def evaluate_key(cfg: DictConfig, train: str) -> str:
    return stage_key("evaluate", train=train, eval=cfg.eval, task=cfg.task.lm_eval_task)


def zero_shot_key(cfg: DictConfig, prepare_key: str) -> str:
    """The untuned target on the prepared evaluation split: no train key to inherit those from."""
    return stage_key(
        "evaluate",
        zero_shot=True,
        prepare=prepare_key,
        target=model_identity(cfg.target_model),
        eval=cfg.eval,
        task=cfg.task.lm_eval_task,
    )


def cell_keys(cfg: DictConfig, prepare_key: str) -> dict[str, str]:
    """Every stage key of a cell in one call, from its prepare key (what plan, status and the
    report need); a zero-shot cell has only prepare and evaluate."""
    if zero_shot(cfg):
        return {"prepare": prepare_key, "evaluate": zero_shot_key(cfg, prepare_key)}
    keys = {"prepare": prepare_key, "score": score_key(cfg, prepare_key)}
    keys["select"] = select_key(cfg, keys["score"])
    keys["train"] = train_key(cfg, keys["select"])
    keys["evaluate"] = evaluate_key(cfg, keys["train"])
    return keys
