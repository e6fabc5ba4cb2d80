"""What every stage of one sweep point shares: the resolved config, the store and the tracker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from dwbench.artifacts import ArtifactStore
from dwbench.tracking import Tracker


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
            "method": "zero_shot" if float(cfg.budget) == 0.0 else str(cfg.method.name),
            "budget": str(cfg.budget),
            "selector": str(cfg.selector_model.name),
            "target": str(cfg.target_model.name),
            "seed": str(cfg.seed),
        }
