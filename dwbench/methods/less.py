"""LESS (Xia et al., ICML 2024): pick the examples whose Adam update points where the target
task's gradients point.

1. Warm-up: LoRA on a seeded random `warmup_share` of the pool for `warmup_epochs` epochs, through
   the train stage's cache, with a snapshot (adapter, Adam moments, mean lr) after every epoch.
   LESS's own adapter placement (`warmup_lora.target_modules`, q/k/v/o) keeps gradients small.
2. Per snapshot and pool example: the LoRA gradient (batch size 1), Adam-preconditioned with the
   snapshot's moments, Rademacher-projected to `proj_dim`, L2-normalised; written in shards of
   `runtime.examples_per_shard` examples, so the pool's gradients never sit in memory and a
   killed run resumes at the next unwritten shard.
3. Targets: the task's query split when it has one (held-out task examples), else `n_targets`
   seeded pool examples; plain gradients, same projection. A pool example that is itself a
   target is scored against the other targets only.
4. Score = sum over snapshots of mean lr x mean cosine to the targets. Keep the highest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dwbench.data.records import Example
from dwbench.errors import DwbenchError
from dwbench.methods import lm_signals
from dwbench.methods.base import ScoringContext, check_target_count, target_examples, top_k
from dwbench.methods.gradient_features import (
    FeatureShards,
    RademacherProjector,
    adam_preconditioned,
    less_scores,
    read_blocks,
    unit_rows,
)
from dwbench.validate import SHARE_ABOVE_ZERO, Rules, check_fields, whole_at_least

FEATURES = "less_features"  # the pool's projected gradients, one file per block and snapshot

if TYPE_CHECKING:
    import torch

    from dwbench.lora import Snapshot


def flat_moments(
    snapshot: Snapshot, params: Sequence[tuple[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The snapshot's Adam moments, flattened in the order of `params`."""
    import torch

    moments = torch.load(snapshot.moments_path, weights_only=True)
    missing = [name for name, _ in params if name not in moments]
    if missing:
        raise DwbenchError(
            f"the warm-up snapshot {snapshot.moments_path} has no Adam moments for {missing[:2]}"
        )
    exp_avg = torch.cat([moments[n]["exp_avg"].reshape(-1).float() for n, _ in params])
    exp_avg_sq = torch.cat([moments[n]["exp_avg_sq"].reshape(-1).float() for n, _ in params])
    return exp_avg, exp_avg_sq, int(moments[params[0][0]]["step"])


OPTIONS: Rules = [
    ("warmup_share", SHARE_ABOVE_ZERO, "0.05"),
    ("warmup_epochs", whole_at_least(1), "4"),
    ("proj_dim", whole_at_least(1), "8192"),
    ("n_targets", whole_at_least(1), "8"),
    ("runtime.examples_per_shard", whole_at_least(1), "64"),
    ("runtime.gradient_batch_size", whole_at_least(1), "8"),
]


class LESS:
    needs_selector = True

    @staticmethod
    def check_options(
        method_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], pool_size: int | None
    ) -> None:
        """Run before anything is written (dwbench.validate), and by the constructor."""
        check_fields(method_cfg, OPTIONS, "method.")
        check_target_count(method_cfg, task_cfg, pool_size)

    def __init__(self, context: ScoringContext) -> None:
        cfg = context.method_cfg
        self.check_options(cfg, context.task_cfg, None)
        self.context = context
        self.share = float(cfg["warmup_share"])
        self.proj_dim = int(cfg["proj_dim"])
        self.n_targets = int(cfg["n_targets"])
        self.stats: dict[str, float] = {}

    def _warmup(self, pool: list[Example]) -> Any:
        cfg = self.context.method_cfg
        n = max(1, math.floor(self.share * len(pool) + 1e-9))
        chosen = np.random.default_rng(self.context.seed).choice(len(pool), n, replace=False)
        overrides = {"epochs": int(cfg["warmup_epochs"]), "lora": dict(cfg["warmup_lora"])}
        fine_tune = self.context.require_fine_tune("less")
        return fine_tune([pool[i] for i in sorted(chosen)], None, overrides)

    def _targets(self, pool: list[Example]) -> tuple[list[Example], list[int]]:
        """Target examples, and the pool positions that are targets themselves."""
        return target_examples(pool, self.context.queries, self.n_targets, self.context.seed)

    def score(self, pool: list[Example]) -> pd.DataFrame:
        folder = self.context.work_dir
        self.score_units(pool, range(self.shard_units(pool)), folder)
        return self.merge_units(pool, [folder])

    # Sharded scoring (dwbench.methods.base.ShardableMethod): a unit is one feature block of
    # `runtime.examples_per_shard` pool examples, in every snapshot; the warm-up fine-tune is
    # the unsplittable part, and the merge adds the targets' gradients and the scores.
    def shared_work(self, pool: list[Example]) -> None:
        self._warmup(pool)

    def shard_units(self, pool: list[Example]) -> int:
        return -(-len(pool) // self._per_block())

    def score_units(self, pool: list[Example], units: range, work_dir: Path) -> dict[str, float]:
        """Each block's gradients at every snapshot, projected in one call: the projection
        matrix is regenerated per call (too large to keep), so one call per block rather than
        one per block and snapshot. A block's features are written together, per snapshot."""
        import torch

        start = time.perf_counter()
        run = self._warmup(pool)
        model, params, projector = self._gradient_model(run)
        records = self._encode(model, pool)
        features = FeatureShards(Path(work_dir) / FEATURES)
        per_block = self._per_block()
        moments = {s.epoch: flat_moments(s, params) for s in run.snapshots}
        names = {s.epoch: f"pool-epoch{s.epoch}" for s in run.snapshots}
        for index in units:
            if all(features.done(name, index) for name in names.values()):
                continue
            block = records[index * per_block : (index + 1) * per_block]
            grads = []
            for snapshot in run.snapshots:
                lm_signals.swap_adapter(model, snapshot.adapter_dir)
                name = names[snapshot.epoch]
                desc = f"LESS {name} {index * per_block}-{index * per_block + len(block)}"
                grads.append(
                    self._gradients(model, block, params, desc, snapshot, moments[snapshot.epoch])
                )
            projected = unit_rows(projector.project(torch.cat(grads)))
            for snapshot, part in zip(run.snapshots, projected.split(len(block)), strict=True):
                features.write(names[snapshot.epoch], index, part)
        return {"feature_blocks": float(len(units)), "seconds": time.perf_counter() - start}

    def merge_units(self, pool: list[Example], shard_dirs: list[Path]) -> pd.DataFrame:
        import torch

        run = self._warmup(pool)
        targets, target_positions = self._targets(pool)
        model, params, projector = self._gradient_model(run)
        target_records = self._encode(model, targets)
        pool_features, target_grads, lrs = [], [], []
        for snapshot in run.snapshots:
            lm_signals.swap_adapter(model, snapshot.adapter_dir)
            desc = f"LESS targets-epoch{snapshot.epoch}"
            target_grads.append(
                self._gradients(model, target_records, params, desc, snapshot, None)
            )
            name = f"pool-epoch{snapshot.epoch}"
            pool_features.append(
                read_blocks([FeatureShards(Path(d) / FEATURES) for d in shard_dirs], name)
            )
            lrs.append(snapshot.mean_lr)
        projected = unit_rows(projector.project(torch.cat(target_grads)))  # one call, as above
        target_features = list(projected.split(len(target_records)))
        if len(pool_features[0]) != len(pool):
            raise DwbenchError(
                f"LESS features hold {len(pool_features[0])} pool examples, not {len(pool)}: "
                "score the missing shard again (python -m dwbench.sweep.plan lists it)."
            )
        scores = less_scores(pool_features, target_features, lrs).numpy().astype(float)
        for j, position in enumerate(target_positions):  # a target is not its own evidence
            others = [t[torch.arange(len(t)) != j] for t in target_features]
            own = [p[position : position + 1] for p in pool_features]
            scores[position] = float(less_scores(own, others, lrs)[0])
        self.stats = {
            "gradient_dim": float(sum(p.numel() for _, p in params)),
            "proj_dim": float(self.proj_dim),
            "checkpoints": float(len(run.snapshots)),
            "warmup_examples": float(max(1, math.floor(self.share * len(pool) + 1e-9))),
            "targets_from_pool": float(len(target_positions)),
        }
        return pd.DataFrame(
            {
                "id": [ex.id for ex in pool],
                "score": scores,
                "is_target": [i in target_positions for i in range(len(pool))],
            }
        )

    def _per_block(self) -> int:
        return int(self.context.method_cfg["runtime"]["examples_per_shard"])

    def _gradient_model(self, run: Any) -> tuple[Any, list, RademacherProjector]:
        """The selector with the warm-up adapter, its LoRA parameters and the projection."""
        ctx = self.context
        model, tokenizer = lm_signals.load_model(
            ctx.selector_cfg, ctx.cache_dir, ctx.device, run.snapshots[0].adapter_dir, True
        )
        self._tokenizer = tokenizer
        params = lm_signals.gradient_parameters(model, "all")
        dim = sum(p.numel() for _, p in params)
        projector = RademacherProjector(dim, self.proj_dim, ctx.seed, generator_device="cpu")
        return model, params, projector

    def _encode(self, model: Any, examples: list[Example]) -> list:
        return lm_signals.encode(
            self._tokenizer, examples, int(self.context.method_cfg["max_seq_len"])
        )

    def _gradients(
        self, model: Any, records: list, params: list, desc: str, snapshot: Any, moments: Any
    ) -> torch.Tensor:
        """The examples' LoRA gradients, Adam-preconditioned when `moments` are given."""
        import torch

        batch = int(self.context.method_cfg["runtime"]["gradient_batch_size"])
        grads = torch.stack(list(lm_signals.example_gradients(model, records, params, desc, batch)))
        if moments is None:
            return grads
        exp_avg, exp_avg_sq, step = moments
        beta1, beta2 = snapshot.betas
        return adam_preconditioned(
            grads,
            exp_avg.expand_as(grads),
            exp_avg_sq.expand_as(grads),
            step,
            beta1,
            beta2,
            snapshot.eps,
        )

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k, self.context.seed)
