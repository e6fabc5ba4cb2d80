"""One-shot gain: how much one pool example, shown alone as the demonstration, raises the
selector's likelihood of other examples' gold answers. A published idea under its own name.

Each episode shows the selector one pool example and teacher-forces the gold answers of
`n_queries` examples from the other half of the pool (a row each), scoring each by its mean
gold-token probability minus that query's mean over the run (`query_baseline: mean`) or minus its
zero-shot score (`zero_shot`); over `passes` random shuffles. An example's score is the mean of
its queries' gains. With one demonstration nothing is generated, the attention weight is always
1 and no demonstration shares credit, so none of Data Whisperer's own parts is left: this is
Nuggets' one-shot-versus-baseline likelihood comparison (Li et al., "One Shot Learning as
Instruction Data Prospector") with random queries instead of fixed k-means anchors and a mean
gain instead of the share of anchors helped (docs/algorithm.md, "One-shot gain, Nuggets and
MIWV", lists every difference).

It runs on Data Whisperer's episode engine (one demonstration per episode, likelihood scoring),
so its episode log, sharding and resume are that engine's; the options fixed here are refused
at other values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dwbench.errors import ConfigError
from dwbench.methods.base import ScoringContext
from dwbench.methods.data_whisperer.method import DataWhisperer

# What makes the engine a one-shot gain: one demonstration, teacher-forced gold answers, one row
# per query, a gain over a baseline.
FIXED = {"n_demos": 1, "query_scoring": "likelihood", "query_layout": "separate"}
BASELINES = ("mean", "zero_shot")


class OneShotGain(DataWhisperer):
    """Scores as documented above; `stats` as Data Whisperer's (split-half reliability too)."""

    @staticmethod
    def check_options(
        method_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], pool_size: int | None
    ) -> None:
        """Run before anything is written (dwbench.validate), and by the engine's constructor."""
        for field, value in FIXED.items():
            if method_cfg.get(field) != value:
                raise ConfigError(
                    f"method.{field}={method_cfg.get(field)!r}: one_shot_gain needs "
                    f"method.{field}={value}; for other values use "
                    "method=data_whisperer_likelihood."
                )
        if method_cfg.get("query_baseline") not in BASELINES:
            raise ConfigError(
                f"method.query_baseline={method_cfg.get('query_baseline')!r} is not one of "
                f"{', '.join(BASELINES)}: a gain is measured against a baseline."
            )
        DataWhisperer.check_options(method_cfg, task_cfg, pool_size)

    def __init__(self, context: ScoringContext) -> None:
        self.check_options(context.method_cfg, context.task_cfg, None)
        super().__init__(context)
