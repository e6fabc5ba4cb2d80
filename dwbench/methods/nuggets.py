"""Nuggets (Li et al., ACL 2024): does a candidate, as a one-shot demonstration, help the model
answer a fixed set of anchor tasks?

Anchors: `n_anchors` pool examples nearest to the k-means centroids of the scorer's mean-pooled
prompt embeddings (the task's spread, not its densest corner). For candidate z and anchor a,
zero-shot s0(a) = log p(y_a | x_a) and one-shot s1(a|z) = log p(y_a | z, x_a), with z given as an
earlier user/assistant exchange in the chat template. Golden score = share of anchors (other
than z itself) with s1 > s0. Keep the highest. That is |A| forwards per candidate, hence Nuggets'
high STR. By default the scorer is the selector fine-tuned on the pool (as the paper ran it);
`method.scorer=base` uses the untuned selector, as Nuggets itself did.

Per-candidate scores are appended to a log in the work folder, so a killed run resumes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods import lm_signals
from dwbench.methods.base import ScoringContext, top_k
from dwbench.methods.scorer_model import pick_snapshots, whole_pool_fine_tune
from dwbench.methods.sharding import PerExampleShards
from dwbench.validate import Rules, check_fields, one_of, whole_at_least

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SCORERS = ("fine_tuned", "base")
LOG_FILE = "nuggets_scores.jsonl"


def prompt_embeddings(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pool: list[Example], batch: int
) -> np.ndarray:
    """Mean of the last hidden states over each prompt's tokens (its chat-templated user turn)."""
    import torch

    from dwbench.chat import prompt_text

    decoder, _ = lm_signals._decoder_and_head(model)
    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for start in tqdm(range(0, len(pool), batch), desc="Nuggets anchors", unit="batch"):
            texts = [prompt_text(tokenizer, ex.prompt) for ex in pool[start : start + batch]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            hidden = decoder(**enc).last_hidden_state
            mask = enc["attention_mask"][..., None].to(hidden.dtype)
            rows.append(((hidden * mask).sum(1) / mask.sum(1)).float().cpu().numpy())
    return np.concatenate(rows)


def choose_anchors(embeddings: np.ndarray, n_anchors: int, seed: int) -> list[int]:
    """Positions of the examples nearest to each k-means centroid (distinct, sorted)."""
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=n_anchors, n_init=10, random_state=seed).fit(embeddings)
    distances = kmeans.transform(embeddings)  # (N, n_anchors)
    chosen: list[int] = []
    for cluster in range(n_anchors):
        for position in np.argsort(distances[:, cluster], kind="stable"):
            if int(position) not in chosen:
                chosen.append(int(position))
                break
    return sorted(chosen)


def golden_scores(zero_shot: np.ndarray, one_shot: np.ndarray, self_anchor: int | None) -> float:
    """Share of anchors whose answer log-prob rises with the candidate as demonstration."""
    helped = one_shot > zero_shot
    if self_anchor is not None:
        helped = np.delete(helped, self_anchor)
    return float(helped.mean()) if helped.size else 0.0


OPTIONS: Rules = [
    ("n_anchors", whole_at_least(1), "10"),
    ("scorer", one_of(*SCORERS), SCORERS[0]),
    ("runtime.batch_size", whole_at_least(1), "8"),
]


class Nuggets(PerExampleShards):
    needs_selector = True

    @staticmethod
    def check_options(
        method_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], pool_size: int | None
    ) -> None:
        """Run before anything is written (dwbench.validate), and by the constructor."""
        check_fields(method_cfg, OPTIONS, "method.")
        n_anchors = method_cfg.get("n_anchors")
        if pool_size is not None and n_anchors is not None and n_anchors > pool_size:
            raise ConfigError(
                f"method.n_anchors={n_anchors} (task.anchor_examples) is above the pool's "
                f"{pool_size} examples, which the anchors are chosen from; lower it."
            )

    def __init__(self, context: ScoringContext) -> None:
        cfg = context.method_cfg
        self.check_options(cfg, context.task_cfg, None)
        self.context = context
        self.n_anchors = int(cfg["n_anchors"])
        self.scorer = str(cfg["scorer"])
        self.stats: dict[str, float] = {}

    def _model(self, pool: list[Example]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        ctx = self.context
        adapter = None
        if self.scorer == "fine_tuned":
            (snapshot,) = pick_snapshots(whole_pool_fine_tune(ctx, pool, "nuggets"), None, "")
            adapter = snapshot.adapter_dir
        return lm_signals.load_model(ctx.selector_cfg, ctx.cache_dir, ctx.device, adapter)

    # Sharded scoring (PerExampleShards): a unit is one candidate; every shard finds the same
    # anchors and their zero-shot scores (cheap next to the candidates' one-shot passes), and
    # the fine-tuned scorer, where used, is the unsplittable part.
    def shared_work(self, pool: list[Example]) -> None:
        if self.scorer == "fine_tuned":
            whole_pool_fine_tune(self.context, pool, "nuggets")

    def unit_size(self) -> int:
        return 1

    def example_values(
        self, pool: list[Example], units: range | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ctx, cfg = self.context, self.context.method_cfg
        if self.n_anchors >= len(pool):
            raise ConfigError(
                f"method.n_anchors={self.n_anchors} is not below the pool size {len(pool)}; "
                "lower it."
            )
        model, tokenizer = self._model(pool)
        batch = int(cfg["runtime"]["batch_size"])
        embeddings = prompt_embeddings(model, tokenizer, pool, batch)
        anchors = choose_anchors(embeddings, self.n_anchors, ctx.seed)
        anchor_examples = [pool[i] for i in anchors]
        max_len = int(cfg["max_seq_len"])
        zero_shot = lm_signals.token_stats(
            model, lm_signals.encode(tokenizer, anchor_examples, max_len), batch, "zero-shot"
        ).sum_logprob
        rows = np.arange(len(pool)) if units is None else np.arange(units.start, units.stop)
        done = self._resume(anchors)
        log = self._log_path().open("a") if self._log_path() else None
        scores = dict(done)
        todo = [int(i) for i in rows if pool[i].id not in scores]
        for position in tqdm(todo, desc="Nuggets one-shot", unit="candidate"):
            candidate = pool[position]
            history = [(candidate.prompt, candidate.response)]
            records = lm_signals.encode(tokenizer, anchor_examples, 2 * max_len, history)
            one_shot = lm_signals.token_stats(model, records, batch, desc="").sum_logprob
            self_anchor = anchors.index(position) if position in anchors else None
            scores[candidate.id] = golden_scores(zero_shot, one_shot, self_anchor)
            if log:
                log.write(json.dumps({"id": candidate.id, "score": scores[candidate.id]}) + "\n")
                log.flush()
        if log:
            log.close()
        self.stats = {"n_anchors": float(len(anchors)), "resumed_candidates": float(len(done))}
        golden = np.array([scores[pool[i].id] for i in rows], dtype=float)
        return rows, {"golden": golden, "is_anchor": np.isin(rows, anchors)}

    def scores_from_values(
        self, pool: list[Example], values: dict[str, np.ndarray]
    ) -> pd.DataFrame:
        if not self.stats:  # a merge
            self.stats = {"n_anchors": float(values["is_anchor"].sum())}
        return pd.DataFrame(
            {
                "id": [ex.id for ex in pool],
                "score": values["golden"],
                "is_anchor": values["is_anchor"].astype(bool),
            }
        )

    def _log_path(self) -> Path | None:
        work = self.context.work_dir
        if work is None:
            return None
        work.mkdir(parents=True, exist_ok=True)
        return work / LOG_FILE

    def _resume(self, anchors: list[int]) -> dict[str, Any]:
        """Scores logged by a killed run with the same anchors (the log starts with them)."""
        path = self._log_path()
        if path is None or not path.is_file():
            if path is not None:
                path.write_text(json.dumps({"anchors": anchors}) + "\n")
            return {}
        lines = []
        for line in path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:  # the line a kill cut short
                continue
        if not lines or lines[0].get("anchors") != anchors:
            path.write_text(json.dumps({"anchors": anchors}) + "\n")
            return {}
        return {row["id"]: row["score"] for row in lines[1:] if "id" in row}

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k, self.context.seed)
