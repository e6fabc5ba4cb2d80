"""Running episodes on the selector: shared-prefix prefill, greedy decoding, teacher forcing.

A batch holds several episodes. Their demonstration prefixes are prefilled once (left-padded,
batch = episodes); the prefix cache is then copied to each of the episode's rows (one for the
joint layout, n_q for the separate one) and every row's suffix (its query block, right-aligned
after padding in the middle) runs in one forward pass, during which layer l's attention from
the query rows is captured. Positions come from the attention mask, so padding never shifts them.

`generate` then decodes greedily with its own loop rather than `model.generate`:
- greedy is argmax, so no `generation_config.json` of the model can turn it into sampling;
- each row stops on its own (end-of-turn token, its answer complete, or the cap), and a
  finished row leaves the batch and its cache, so it stops costing compute;
- the stop check sees only the newly decoded text (incremental detokenisation), not the whole
  completion at every step;
- an episode is handed back as soon as all its rows are done, so it can be logged at once.
`likelihood` generates nothing: the rows carry the gold answers after the query block, and the
same forward pass yields the probability of each gold token.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from dwbench.errors import DwbenchError
from dwbench.methods.data_whisperer.attention import LayerAttention, demonstration_attention
from dwbench.methods.data_whisperer.prompts import EncodedEpisode

ATTENTION_SPANS = ("query_block", "first_token")
GREEDY = {"decoding": "greedy (argmax, dwbench's own loop)", "do_sample": False, "num_beams": 1}


class RowStop(Protocol):
    def feed(self, piece: str) -> bool:
        """Take the next piece of decoded text; True once the row's answer is complete."""
        ...


@dataclass
class RowOutput:
    text: str = ""  # the decoded completion (generate)
    new_tokens: int = 0
    complete: bool = True  # ended by its own stop (answer done or end-of-turn), not the cap
    gold_probs: list[list[float]] = field(default_factory=list)  # per answer, per token
    number_match: list[bool | None] = field(default_factory=list)  # teacher-forced final number


@dataclass
class EpisodeOutput:
    attention: list[float]  # a_i per demonstration
    rows: list[RowOutput]
    seconds: float = 0.0  # wall time since the previous episode of the call finished


class IncrementalText:
    """Decoded text of a growing token list, one piece per token, without re-decoding it all.

    Decodes a short window before the new token and keeps what the new token adds; a piece that
    ends in an incomplete UTF-8 character waits for the next token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        after = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]


def _cache_argument(model: PreTrainedModel) -> str:
    """transformers >= 5.2x calls the cache `cache`; earlier 5.x releases `past_key_values`."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@dataclass
class _Rows:
    """The state after the rows' first forward pass (the suffixes)."""

    cache: DynamicCache
    mask: torch.Tensor  # (rows, keys) 1 = attend
    logits: torch.Tensor  # (rows, kept positions, vocab)
    owner: list[int]  # episode of each row
    suffix: torch.Tensor  # (rows, suffix width) right-aligned suffix ids
    attention: list[list[float]]  # per episode


class EpisodeRunner:
    """Runs batches of encoded episodes on the selector with layer l's attention captured."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layer: int,
        attention_span: str,
        stop_ids: set[int],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.attention_span = attention_span
        self.capture = LayerAttention(model, layer)
        self.stop_ids = stop_ids
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
        )
        self.cache_argument = _cache_argument(model)

    def close(self) -> None:
        self.capture.close()

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, keep: int
    ) -> Any:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        device = self.model.device
        return self.model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            logits_to_keep=keep,
            **{self.cache_argument: cache},
        )

    def _rows(self, episodes: Sequence[EncodedEpisode], keep: int) -> _Rows:
        """Prefill each prefix once, copy it to the episode's rows, run the rows' suffixes."""
        width = max(len(e.prefix_ids) for e in episodes)
        prefix = torch.full((len(episodes), width), self.pad_id, dtype=torch.long)
        prefix_mask = torch.zeros((len(episodes), width), dtype=torch.long)
        for b, episode in enumerate(episodes):
            if episode.prefix_ids:
                prefix[b, width - len(episode.prefix_ids) :] = torch.tensor(episode.prefix_ids)
                prefix_mask[b, width - len(episode.prefix_ids) :] = 1
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            if width:
                self._forward(prefix, prefix_mask, cache, keep=1)
            owner = [b for b, e in enumerate(episodes) for _ in e.rows]
            rows = [row for e in episodes for row in e.rows]
            if width:
                cache.batch_select_indices(torch.tensor(owner, device=self.model.device))
            suffix_width = max(len(row.suffix_ids) for row in rows)
            suffix = torch.full((len(rows), suffix_width), self.pad_id, dtype=torch.long)
            suffix_mask = torch.zeros((len(rows), suffix_width), dtype=torch.long)
            spans = []
            for r, row in enumerate(rows):
                pad = suffix_width - len(row.suffix_ids)
                suffix[r, pad:] = torch.tensor(row.suffix_ids)
                suffix_mask[r, pad:] = 1
                if self.attention_span == "first_token":  # the last prompt token's row
                    spans.append((pad + row.query_tokens[1] - 1, pad + row.query_tokens[1]))
                else:
                    spans.append((pad + row.query_tokens[0], pad + row.query_tokens[1]))
            mask = torch.cat([prefix_mask[owner], suffix_mask], dim=1)
            self.capture.arm(spans)
            output = self._forward(suffix, mask, cache, keep=keep)
        masses = self.capture.column_mass
        if masses is None or len(masses[0]) != width + suffix_width:
            raise DwbenchError(
                "the selector model's forward pass did not give Data Whisperer the attention of "
                "its layer over the whole prompt (a sliding-window layer?); pick another "
                "selector_model.attention_layer"
            )
        attention = []
        for b, episode in enumerate(episodes):
            mine = [r for r, o in enumerate(owner) if o == b]
            shift = width - len(episode.prefix_ids)
            attention.append(
                demonstration_attention(
                    [masses[r] for r in mine],
                    [(shift + s, shift + e) for s, e in episode.demo_tokens],
                    sum(spans[r][1] - spans[r][0] for r in mine),
                )
            )
        return _Rows(cache, mask, output.logits, owner, suffix, attention)

    def likelihood(self, episodes: Sequence[EncodedEpisode]) -> list[EpisodeOutput]:
        """Teacher forcing: each gold token's probability, and whether argmax would write it."""
        start = time.perf_counter()
        suffix_width = max(len(row.suffix_ids) for e in episodes for row in e.rows)
        first = min(
            suffix_width - len(row.suffix_ids) + row.answer_tokens[0][0]
            for e in episodes
            for row in e.rows
        )
        keep = suffix_width - first + 1  # logits from the token before the first answer token
        state = self._rows(episodes, keep)
        log_probs = torch.log_softmax(state.logits.float(), dim=-1)
        predicted = log_probs.argmax(-1)
        outputs = [EpisodeOutput(attention, []) for attention in state.attention]
        rows = [row for e in episodes for row in e.rows]
        for r, row in enumerate(rows):
            pad = suffix_width - len(row.suffix_ids)

            def logit_index(position: int, pad: int = pad) -> int:
                return pad + position - 1 - (suffix_width - keep)  # logits at the previous token

            out = RowOutput()
            for (s, e), number in zip(row.answer_tokens, row.number_tokens, strict=True):
                tokens = torch.tensor(row.suffix_ids[s:e])
                index = torch.tensor([logit_index(p) for p in range(s, e)])
                out.gold_probs.append(log_probs[r, index, tokens].exp().tolist())
                if number is None:
                    out.number_match.append(None)
                else:
                    n_index = torch.tensor([logit_index(p) for p in range(*number)])
                    n_tokens = torch.tensor(row.suffix_ids[number[0] : number[1]])
                    out.number_match.append(bool((predicted[r, n_index] == n_tokens).all()))
            outputs[state.owner[r]].rows.append(out)
        seconds = (time.perf_counter() - start) / len(episodes)
        for output in outputs:
            output.seconds = seconds
        return outputs

    def generate(
        self,
        episodes: Sequence[EncodedEpisode],
        make_stop: Callable[[], RowStop],
        max_new_tokens: int,
        on_done: Callable[[int, EpisodeOutput], None],
    ) -> None:
        """Greedy completions; `on_done(batch index, output)` as each episode finishes."""
        last_done = time.perf_counter()
        state = self._rows(episodes, keep=1)
        n_rows = len(state.owner)
        outputs = [
            EpisodeOutput(attention, [RowOutput() for _ in e.rows])
            for attention, e in zip(state.attention, episodes, strict=True)
        ]
        row_slot = [state.owner[:r].count(state.owner[r]) for r in range(n_rows)]
        pending = [len(e.rows) for e in episodes]
        texts = [IncrementalText(self.tokenizer) for _ in range(n_rows)]
        stops = [make_stop() for _ in range(n_rows)]
        alive = list(range(n_rows))
        cache, mask, logits = state.cache, state.mask, state.logits[:, -1, :]
        step = 0
        while alive:
            step += 1
            next_ids = logits.float().argmax(-1).cpu()
            finished = []
            for j, r in enumerate(alive):
                token = int(next_ids[j])
                out = outputs[state.owner[r]].rows[row_slot[r]]
                out.new_tokens = step
                if token in self.stop_ids:
                    finished.append(j)
                    continue
                if stops[r].feed(texts[r].add(token)):
                    finished.append(j)
                elif step >= max_new_tokens:
                    out.complete = False
                    finished.append(j)
            for j in finished:
                r = alive[j]
                out = outputs[state.owner[r]].rows[row_slot[r]]
                out.text = self.tokenizer.decode(texts[r].ids, skip_special_tokens=True)
                pending[state.owner[r]] -= 1
                if pending[state.owner[r]] == 0:
                    now = time.perf_counter()
                    outputs[state.owner[r]].seconds = now - last_done
                    last_done = now
                    on_done(state.owner[r], outputs[state.owner[r]])
            if finished:
                keep = [j for j in range(len(alive)) if j not in finished]
                if not keep:
                    break
                index = torch.tensor(keep)
                cache.batch_select_indices(index.to(self.model.device))
                mask, next_ids = mask[index], next_ids[index]
                alive = [alive[j] for j in keep]
            mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype)], dim=1)
            with torch.inference_mode():
                logits = self._forward(next_ids[:, None], mask, cache, keep=1).logits[:, -1, :]
