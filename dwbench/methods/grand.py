"""GraNd (Paul et al., NeurIPS 2021): the norm of each example's loss gradient, batch size 1,
with respect to the LoRA parameters of the selector fine-tuned on the pool. Keep the highest.

`method.parameters` chooses the parameters: `all` LoRA matrices, or `last_v_proj_b` (the last
layer's v_proj LoRA-B only), which is what the code behind the paper's GraNd numbers likely took.
The choice and the parameter count are recorded in the method's stats.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dwbench.data.records import Example
from dwbench.methods import lm_signals
from dwbench.methods.base import ScoringContext, top_k
from dwbench.methods.scorer_model import pick_snapshots, whole_pool_fine_tune
from dwbench.methods.sharding import PerExampleShards


class GraNd(PerExampleShards):
    needs_selector = True

    def __init__(self, context: ScoringContext) -> None:
        self.context = context
        self.stats: dict[str, float] = {}

    def shared_work(self, pool: list[Example]) -> None:
        whole_pool_fine_tune(self.context, pool, "grand")

    def unit_size(self) -> int:
        """A unit is one backward pass: `runtime.gradient_batch_size` consecutive pool examples
        (each still gets its own batch-size-1 gradient), so a shard runs the passes an
        unsharded run would."""
        return int(self.context.method_cfg["runtime"]["gradient_batch_size"])

    def example_values(
        self, pool: list[Example], units: range | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ctx, cfg = self.context, self.context.method_cfg
        run = whole_pool_fine_tune(ctx, pool, "grand")
        (snapshot,) = pick_snapshots(run, None, "method")
        model, tokenizer = lm_signals.load_model(
            ctx.selector_cfg, ctx.cache_dir, ctx.device, snapshot.adapter_dir, trainable=True
        )
        params = lm_signals.gradient_parameters(model, str(cfg["parameters"]))
        records = lm_signals.encode(tokenizer, pool, int(cfg["max_seq_len"]))
        size = self.unit_size()
        units = range(self.shard_units(pool)) if units is None else units
        passes = [range(u * size, min((u + 1) * size, len(pool))) for u in units]
        rows = np.array([i for rows in passes for i in rows], dtype=np.int64)
        with tqdm(total=len(rows), desc="GraNd", unit="ex") as progress:
            norms = []
            for pass_rows in passes:
                batch = [records[i] for i in pass_rows]
                norms.append(lm_signals.gradient_norms(model, batch, params, "", size))
                progress.update(len(batch))
        norms = np.concatenate(norms) if norms else np.zeros(0)
        self.stats = {
            "gradient_parameters": float(sum(p.numel() for _, p in params)),
            "gradient_tensors": float(len(params)),
            "checkpoint_epoch": float(snapshot.epoch),
        }
        return rows, {"grad_norm": norms}

    def scores_from_values(
        self, pool: list[Example], values: dict[str, np.ndarray]
    ) -> pd.DataFrame:
        norms = values["grad_norm"]
        if not self.stats:  # a merge: the settings, without loading the model
            run = whole_pool_fine_tune(self.context, pool, "grand")
            (snapshot,) = pick_snapshots(run, None, "method")
            self.stats = {"checkpoint_epoch": float(snapshot.epoch)}
        return pd.DataFrame({"id": [ex.id for ex in pool], "score": norms, "grad_norm": norms})

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k, self.context.seed)
