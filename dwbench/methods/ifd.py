"""IFD, Instruction-Following Difficulty (Li et al., NAACL 2024, "From Quantity to Quality"):
how much the instruction helps the untuned selector predict the response.

IFD = ppl(response | instruction) / ppl(response alone), both the mean response-token
perplexity under the selector. Li et al. keep the highest IFD (the instruction helps least, so
the example teaches most) and drop examples with IFD >= 1, where the instruction does not help at
all: the response does not follow from it. Here:
- Both perplexities go through the chat template every method uses (dwbench.chat): the
  conditioned one is the conversation with the prompt, the "alone" one the same conversation with
  an empty user turn, so both read the same response tokens the same way (the paper's code
  tokenised the bare response instead; the template is what fine-tuning sees here).
- Where `max_seq_len` cuts the conditioned response, the alone perplexity reads the same first
  response tokens, so the ratio compares like with like.
- Score: IFD below `max_ifd` (1.0: the paper's filter; null keeps all); an example at or above it
  scores -IFD, below every kept one, so a budget larger than what the filter keeps fills with
  the least misaligned of the rest.
One forward pass per example and encoding, two in all; no fine-tune.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods import lm_signals
from dwbench.methods.base import ScoringContext, top_k
from dwbench.methods.sharding import PerExampleShards
from dwbench.validate import POSITIVE, Rules, check_fields, optional, whole_at_least

OPTIONS: Rules = [
    ("max_ifd", optional(POSITIVE), "1.0"),
    ("max_seq_len", whole_at_least(1), "1024"),
    ("runtime.batch_size", whole_at_least(1), "8"),
]


def first_response_tokens(record: lm_signals.Record, n: int) -> lm_signals.Record:
    """The record cut after its first `n` response tokens (labels past position 0)."""
    seen = 0
    for position, label in enumerate(record["labels"]):
        if position > 0 and label != -100:
            seen += 1
            if seen == n:
                end = position + 1
                return {"input_ids": record["input_ids"][:end], "labels": record["labels"][:end]}
    return record


def ifd_score(ifd: np.ndarray, max_ifd: float | None) -> np.ndarray:
    """Higher = keep: the IFD where it is below `max_ifd`, else -IFD (after every kept one)."""
    if max_ifd is None:
        return ifd.copy()
    return np.where(ifd < max_ifd, ifd, -ifd)


class IFD(PerExampleShards):
    needs_selector = True

    @staticmethod
    def check_options(
        method_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], pool_size: int | None
    ) -> None:
        """Run before anything is written (dwbench.validate), and by the constructor."""
        check_fields(method_cfg, OPTIONS, "method.")
        if "max_ifd" not in method_cfg:
            raise ConfigError("method.max_ifd is missing; pass e.g. method.max_ifd=1.0 (or null).")

    def __init__(self, context: ScoringContext) -> None:
        self.check_options(context.method_cfg, context.task_cfg, None)
        self.context = context
        max_ifd = context.method_cfg["max_ifd"]
        self.max_ifd = None if max_ifd is None else float(max_ifd)
        self.stats: dict[str, float] = {}

    def unit_size(self) -> int:
        return int(self.context.method_cfg["runtime"]["batch_size"])

    def example_values(
        self, pool: list[Example], units: range | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ctx = self.context
        max_len = int(ctx.method_cfg["max_seq_len"])
        model, tokenizer = lm_signals.load_model(ctx.selector_cfg, ctx.cache_dir, ctx.device)
        records = lm_signals.encode(tokenizer, pool, max_len)
        given = lm_signals.token_stats(model, records, self.unit_size(), "IFD (instruction)", units)
        rows = given.positions
        nll_alone = np.zeros(len(pool))
        # the same batches as the conditioned pass, so a shard computes what a whole run does
        batches = lm_signals.batch_positions(records, self.unit_size(), units)
        for batch in tqdm(batches, desc="IFD (response alone)", unit="batch"):
            alone = lm_signals.encode(
                tokenizer, [replace(pool[i], prompt="") for i in batch], max_len
            )
            cut = [
                first_response_tokens(record, int(given.n_tokens[i]))
                for record, i in zip(alone, batch, strict=True)
            ]
            nll_alone[batch] = lm_signals.token_stats(model, cut, len(cut), "").mean_nll
        return rows, {
            "nll_given_prompt": given.mean_nll[rows],
            "nll_alone": nll_alone[rows],
            "n_tokens": given.n_tokens[rows],
        }

    def scores_from_values(
        self, pool: list[Example], values: dict[str, np.ndarray]
    ) -> pd.DataFrame:
        ifd = np.exp(values["nll_given_prompt"] - values["nll_alone"])
        kept = ifd < self.max_ifd if self.max_ifd is not None else np.ones(len(ifd), bool)
        self.stats = {"median_ifd": float(np.median(ifd)), "share_filtered": float(1 - kept.mean())}
        return pd.DataFrame(
            {
                "id": [ex.id for ex in pool],
                "score": ifd_score(ifd, self.max_ifd),
                "ifd": ifd,
                "ppl_given_prompt": np.exp(values["nll_given_prompt"]),
                "ppl_alone": np.exp(values["nll_alone"]),
                "n_response_tokens": values["n_tokens"].astype(int),
            }
        )

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k, self.context.seed)
