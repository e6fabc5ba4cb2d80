"""STAFF (Zhang et al., ICLR 2025): effort scores from a small same-family model, verified per
region on the large one, so budget flows to the regions the small model underrates.

1. The proxy (`method.proxy_model`) is LoRA-fine-tuned on the pool (train stage cache, shared
   with S2L) and gives each example an effort score: its gradient norm over the LoRA parameters.
2. The top `drop_share` hardest are dropped; the rest are cut into `n_regions` equal-width regions.
3. `verify_per_region` examples per region are scored on the selector model with a freshly
   initialised LoRA adapter of the run's recipe (the model about to be tuned, before tuning):
   V_i = sum of its effort / sum of the small effort over them.
4. Regions are visited from the smallest, each given min(|B_i|, floor(m_left * V_i / sum V left)),
   and filled with their highest small-effort examples (dwbench/methods/stratified.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods import lm_signals
from dwbench.methods.base import ScoringContext
from dwbench.methods.scorer_model import pick_snapshots
from dwbench.methods.stratified import (
    staff_allocate,
    staff_regions,
    staff_select,
    staff_verification_ratios,
    staff_verification_sample,
)

logger = logging.getLogger(__name__)


def proxy_problems(method_cfg: Mapping[str, Any]) -> list[str]:
    """What stops a proxy-model method before any work (no proxy configured)."""
    if method_cfg.get("proxy_model") is None:
        name = method_cfg["name"]
        return [
            f"method {name} needs a small same-family proxy model, and method.proxy_model is "
            "null: pass +model@method.proxy_model=<model config name> (a smaller sibling of the "
            "selector, e.g. qwen2_5_3b_instruct for qwen2_5_7b_instruct), or leave it at its "
            "default, the selector itself."
        ]
    return []


def proxy_is_selector(context: ScoringContext, method: str) -> bool:
    """Whether the proxy is the selector itself (the default): said in the log and the stats."""
    from dwbench.models import model_identity

    same = model_identity(context.method_cfg["proxy_model"]) == model_identity(context.selector_cfg)
    if same:
        logger.warning(
            "%s: the proxy model is the selector itself (no smaller sibling given with "
            "+model@method.proxy_model=...), so small and large efforts come from one model",
            method,
        )
    return same


def proxy_efforts(context: ScoringContext, pool: list[Example], method: str) -> np.ndarray:
    """Gradient norms of every pool example under the proxy fine-tuned on the pool."""
    cfg = context.method_cfg
    run = context.require_fine_tune(method)(pool, cfg["proxy_model"])
    (snapshot,) = pick_snapshots(run, None, "method")
    model, tokenizer = lm_signals.load_model(
        cfg["proxy_model"], context.cache_dir, context.device, snapshot.adapter_dir, trainable=True
    )
    params = lm_signals.gradient_parameters(model, "all")
    records = lm_signals.encode(tokenizer, pool, int(cfg["max_seq_len"]))
    return lm_signals.gradient_norms(model, records, params, desc=f"{method}: proxy effort")


class STAFF:
    needs_selector = True
    extra_models = ("proxy_model",)  # method fields holding models preflighted before any work
    config_problems = staticmethod(proxy_problems)

    def __init__(self, context: ScoringContext) -> None:
        cfg = context.method_cfg
        self.context = context
        self.drop_share = float(cfg["drop_share"])
        self.n_regions = int(cfg["n_regions"])
        self.per_region = int(cfg["verify_per_region"])
        problems = proxy_problems(cfg)
        if problems:
            raise ConfigError(problems[0])
        self.stats: dict[str, float] = {}

    def score(self, pool: list[Example]) -> pd.DataFrame:
        ctx, cfg = self.context, self.context.method_cfg
        small = proxy_efforts(ctx, pool, "staff")
        _, region_of = staff_regions(small, self.drop_share, self.n_regions)
        sample = staff_verification_sample(region_of, self.per_region, seed=ctx.seed)
        verified = sorted(p for positions in sample.values() for p in positions)
        model, tokenizer = lm_signals.load_model(ctx.selector_cfg, ctx.cache_dir, ctx.device)
        model = lm_signals.with_fresh_lora(model, cfg["lora"], ctx.seed)
        records = lm_signals.encode(tokenizer, [pool[p] for p in verified], int(cfg["max_seq_len"]))
        params = lm_signals.gradient_parameters(model, "all")
        norms = lm_signals.gradient_norms(model, records, params, desc="staff: target effort")
        target = dict(zip(verified, norms.tolist(), strict=True))
        ratios = staff_verification_ratios(sample, small, target, self.n_regions)
        target_column = np.full(len(pool), np.nan)
        target_column[verified] = norms
        self.stats = {
            "verified_examples": float(len(verified)),
            "regions": float(len(sample)),
            "proxy_is_selector": float(proxy_is_selector(ctx, "staff")),
        }
        return pd.DataFrame(
            {
                "id": [ex.id for ex in pool],
                "score": small,
                "region": region_of,
                "region_ratio": [ratios[r] if r >= 0 else np.nan for r in region_of],
                "target_effort": target_column,
            }
        )

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        region_of = scores["region"].to_numpy(dtype=np.int64)
        ratios = np.zeros(self.n_regions)
        sizes = np.bincount(region_of[region_of >= 0], minlength=self.n_regions)
        for region, ratio in zip(region_of, scores["region_ratio"], strict=True):
            if region >= 0:
                ratios[region] = ratio
        eligible = int(sizes.sum())
        if k > eligible:
            raise ConfigError(
                f"STAFF keeps {k} examples but only {eligible} remain after dropping the "
                f"hardest method.drop_share={self.drop_share}; lower the budget or drop_share."
            )
        budgets = staff_allocate(sizes.tolist(), ratios.tolist(), k)
        positions = staff_select(scores["score"].to_numpy(dtype=float), region_of, budgets)
        return scores["id"].iloc[positions].tolist()
