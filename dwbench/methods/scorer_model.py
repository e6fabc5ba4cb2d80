"""The fine-tuned scorer that GraNd, EL2N, CCS and Nuggets read, and its epoch snapshots.

One LoRA fine-tune of the selector model on the whole pool, with the run's fine-tuning recipe,
made through the train stage's cache (dwbench/stages/train.py: ScorerTrainer): the first method
that needs it pays for it, the others reuse it, and every one of them counts its training time
as selection time (STR), as the paper did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods.base import ScoringContext

if TYPE_CHECKING:
    from dwbench.lora import ScorerFineTune, Snapshot


def whole_pool_fine_tune(
    context: ScoringContext, pool: list[Example], method: str
) -> ScorerFineTune:
    """The selector fine-tuned on the whole pool (a ScorerFineTune, cached by key)."""
    return context.require_fine_tune(method)(pool)


def pick_snapshots(run: ScorerFineTune, epochs: Sequence[int] | None, field: str) -> list[Snapshot]:
    """The snapshots after the given epochs (None: the last one), checked against what exists."""
    snapshots = list(run.snapshots)
    if not snapshots:
        raise ConfigError("the scorer fine-tune kept no epoch snapshots; delete it and rerun")
    if epochs is None:
        return [snapshots[-1]]
    available = {s.epoch: s for s in snapshots}
    missing = [e for e in epochs if e not in available]
    if missing or not epochs:
        raise ConfigError(
            f"{field}={list(epochs)}: the scorer fine-tune has epochs {sorted(available)}; "
            f"pick some of those (finetune.epochs sets how many there are)."
        )
    return [available[e] for e in epochs]
