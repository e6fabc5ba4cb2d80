"""What every stage of one sweep point shares: the resolved config, the store and the tracker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from dwbench.artifacts import ArtifactStore
from dwbench.content_hash import stable_hash, task_identity
from dwbench.tracking import Tracker

ZERO_SHOT_METHOD = "zero_shot"  # what a budget-0 cell is called in tags, snapshots, paper rows


def zero_shot(cfg: DictConfig) -> bool:
    """Budget 0: no selection, no fine-tune; the target model as it is (the method is unused)."""
    return float(cfg.budget) == 0.0


def method_name(cfg: DictConfig) -> str:
    """The cell's method, or `zero_shot` for a budget-0 cell (its configured method is unused)."""
    return ZERO_SHOT_METHOD if zero_shot(cfg) else str(cfg.method.name)


@dataclass
class RunContext:
    cfg: DictConfig
    store: ArtifactStore
    tracker: Tracker
    device: str
    cache_dir: Path

    def tags(self) -> dict[str, str]:
        """Tags that place a run in its sweep cell (MLflow filters and the report use them)."""
        cfg = self.cfg
        return {
            "task": str(cfg.task.name),
            # the task's whole config: one name can mean other data (the embedded difficulties)
            "task_config": stable_hash(task_identity(cfg.task))[:12],
            "method": method_name(cfg),
            "budget": str(cfg.budget),
            "selector": str(cfg.selector_model.name),
            "target": str(cfg.target_model.name),
            "seed": str(cfg.seed),
        }
