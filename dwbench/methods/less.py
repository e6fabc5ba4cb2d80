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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dwbench.data.records import Example
from dwbench.errors import ConfigError, DwbenchError
from dwbench.methods import lm_signals
from dwbench.methods.base import ScoringContext, top_k
from dwbench.methods.gradient_features import (
    FeatureShards,
    RademacherProjector,
    adam_preconditioned,
    less_scores,
    unit_rows,
)

if TYPE_CHECKING:
    import torch

    from dwbench.stages.train import Snapshot


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


class LESS:
    needs_selector = True

    def __init__(self, context: ScoringContext) -> None:
        cfg = context.method_cfg
        self.context = context
        self.share = float(cfg["warmup_share"])
        self.proj_dim = int(cfg["proj_dim"])
        self.n_targets = int(cfg["n_targets"])
        if not 0.0 < self.share <= 1.0:
            raise ConfigError(f"method.warmup_share={self.share} must be in (0, 1].")
        if self.proj_dim < 1 or self.n_targets < 1:
            raise ConfigError("method.proj_dim and method.n_targets must be positive.")
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
        queries = self.context.queries
        if queries:
            rng = np.random.default_rng(self.context.seed)
            picked = rng.choice(len(queries), min(self.n_targets, len(queries)), replace=False)
            return [queries[i] for i in sorted(picked)], []
        if self.n_targets >= len(pool):
            raise ConfigError(f"method.n_targets={self.n_targets} must be below the pool size.")
        rng = np.random.default_rng(self.context.seed + 1)
        positions = sorted(rng.choice(len(pool), self.n_targets, replace=False).tolist())
        return [pool[i] for i in positions], positions

    def score(self, pool: list[Example]) -> pd.DataFrame:
        import torch

        ctx, cfg = self.context, self.context.method_cfg
        run = self._warmup(pool)
        targets, target_positions = self._targets(pool)
        model, tokenizer = lm_signals.load_model(
            ctx.selector_cfg, ctx.cache_dir, ctx.device, run.snapshots[0].adapter_dir, True
        )
        params = lm_signals.gradient_parameters(model, "all")
        dim = sum(p.numel() for _, p in params)
        projector = RademacherProjector(dim, self.proj_dim, ctx.seed, generator_device="cpu")
        max_len = int(cfg["max_seq_len"])
        pool_records = lm_signals.encode(tokenizer, pool, max_len)
        target_records = lm_signals.encode(tokenizer, targets, max_len)
        shards = FeatureShards(ctx.work_dir / "less_features")
        per_shard = int(cfg["runtime"]["examples_per_shard"])
        pool_features, target_features, lrs = [], [], []
        for snapshot in run.snapshots:
            lm_signals.swap_adapter(model, snapshot.adapter_dir)
            moments = flat_moments(snapshot, params)
            beta1, beta2 = snapshot.betas
            for name, records, moment in (
                (f"pool-epoch{snapshot.epoch}", pool_records, moments),
                (f"targets-epoch{snapshot.epoch}", target_records, None),
            ):
                for index, start in enumerate(range(0, len(records), per_shard)):
                    if shards.done(name, index):
                        continue
                    block = records[start : start + per_shard]
                    desc = f"LESS {name} {start}-{start + len(block)}"
                    grads = torch.stack(
                        list(lm_signals.example_gradients(model, block, params, desc))
                    )
                    if moment is not None:
                        exp_avg, exp_avg_sq, step = moment
                        grads = adam_preconditioned(
                            grads,
                            exp_avg.expand_as(grads),
                            exp_avg_sq.expand_as(grads),
                            step,
                            beta1,
                            beta2,
                            snapshot.eps,
                        )
                    shards.write(name, index, unit_rows(projector.project(grads)))
            pool_features.append(shards.read(f"pool-epoch{snapshot.epoch}"))
            target_features.append(shards.read(f"targets-epoch{snapshot.epoch}"))
            lrs.append(snapshot.mean_lr)
        scores = less_scores(pool_features, target_features, lrs).numpy().astype(float)
        for j, position in enumerate(target_positions):  # a target is not its own evidence
            others = [t[torch.arange(len(t)) != j] for t in target_features]
            own = [p[position : position + 1] for p in pool_features]
            scores[position] = float(less_scores(own, others, lrs)[0])
        self.stats = {
            "gradient_dim": float(dim),
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

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k, self.context.seed)
