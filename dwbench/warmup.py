"""TrainingArguments whose warm-up is a share of the steps at every value.

transformers reads a `warmup_steps` of 1 or more as a step count, so the recipe's
`finetune.warmup_ratio: 1.0` (warm up over the whole run) would warm up for one step. A module of
its own, imported only where training runs: the Trainer pickles its arguments with each
checkpoint, so the class must be importable by name (and this import pulls in transformers).
"""

from __future__ import annotations

import math

from transformers import TrainingArguments


class RatioWarmupArguments(TrainingArguments):
    """`warmup_steps` read as a share of the training steps, 0 to 1 inclusive."""

    def get_warmup_steps(self, num_training_steps: int) -> int:
        return math.ceil(num_training_steps * self.warmup_steps)
