"""Running episodes on the selector: shared-prefix prefill, greedy decoding, teacher forcing.

Each episode is packed into one sequence: its demonstration prefix, then the suffix of each of
its rows (one row for the joint layout, n_q for the separate one). A 4D mask lets each row's
tokens see the prefix and their own row only, at positions continuing the prefix's, so the
prefix is computed once for all rows and no row is padded to another's length; layer l's
attention from the query rows is captured in that same forward pass. A batch holds several
episodes (left-padded to one width).

`generate` then gathers each row's cache (prefix + own suffix, in dwbench.decoding's
RowCacheLayer) and decodes greedily with its own loop rather than `model.generate`:
- greedy is argmax, so no `generation_config.json` of the model can turn it into sampling;
- each row stops on its own (end-of-turn token, its answer complete, or the cap), and a
  finished row leaves the batch and its cache, so it stops costing compute;
- the stop check sees only the newly decoded text (incremental detokenisation), not the whole
  completion at every step;
- an episode is handed back as soon as all its rows are done, so it can be logged at once.
`likelihood` generates nothing: each row carries a gold answer after its prompt, and the same
forward pass yields the probability of each gold token (logits only where one is needed). A
row's query block may begin in the shared prefix (the joint layout's teacher-forced rows share
the whole user turn); its prefix part is read from the prefix's own rows, which see exactly
what the row's would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicLayer

from dwbench.decoding import RowCacheLayer, cache_argument
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
    final_probs: list[list[float] | None] = field(default_factory=list)  # its final number's
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


@dataclass
class Packed:
    """A batch of episodes, each packed into one sequence: the prefix, then every row's suffix.

    A row's tokens attend to the prefix and to their own row only (a 4D mask), at positions that
    continue the prefix's, so each row sees exactly prefix + row: the prefix is computed once
    and no row is padded to another's length. A leave-one-out row also masks its hidden
    demonstration's tokens. Episodes are left-padded to one width.
    """

    ids: torch.Tensor  # (episodes, width)
    mask: torch.Tensor  # (episodes, 1, width, width), True = attend
    positions: torch.Tensor  # (episodes, width)
    prefix_start: list[int]  # where each episode's prefix starts (its left padding)
    row_start: list[list[int]]  # where each row's suffix starts


def pack(episodes: Sequence[EncodedEpisode], pad_id: int) -> Packed:
    lengths = [len(e.prefix_ids) + sum(len(r.suffix_ids) for r in e.rows) for e in episodes]
    width = max(lengths)
    ids = torch.full((len(episodes), width), pad_id, dtype=torch.long)
    segment = torch.full((len(episodes), width), -1, dtype=torch.long)  # pad -1, prefix 0, row r+1
    positions = torch.zeros((len(episodes), width), dtype=torch.long)
    prefix_start, row_start = [], []
    for b, (episode, length) in enumerate(zip(episodes, lengths, strict=True)):
        at, n_prefix = width - length, len(episode.prefix_ids)
        prefix_start.append(at)
        ids[b, at : at + n_prefix] = torch.tensor(episode.prefix_ids, dtype=torch.long)
        segment[b, at : at + n_prefix] = 0
        positions[b, at : at + n_prefix] = torch.arange(n_prefix)
        at += n_prefix
        starts = []
        for r, row in enumerate(episode.rows):
            n = len(row.suffix_ids)
            starts.append(at)
            ids[b, at : at + n] = torch.tensor(row.suffix_ids, dtype=torch.long)
            segment[b, at : at + n] = r + 1
            positions[b, at : at + n] = torch.arange(n_prefix, n_prefix + n)
            at += n
        row_start.append(starts)
    index = torch.arange(width)
    query, key = segment[:, :, None], segment[:, None, :]
    mask = ((key == 0) | (key == query)) & (key >= 0) & (index[None, :] <= index[:, None])
    for b, episode in enumerate(episodes):  # leave-one-out rows do not see their demonstration
        for row, at in zip(episode.rows, row_start[b], strict=True):
            if row.hidden_demo is not None:
                start, end = episode.demo_tokens[row.hidden_demo]
                shift = prefix_start[b]
                mask[b, at : at + len(row.suffix_ids), shift + start : shift + end] = False
    mask |= torch.eye(width, dtype=torch.bool)  # a pad token attends to itself: no empty softmax
    return Packed(ids, mask[:, None], positions, prefix_start, row_start)


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
        self.cache_argument = cache_argument(model)

    def close(self) -> None:
        self.capture.close()

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        keep: int | torch.Tensor,
        cache: Cache | None = None,
    ) -> Any:
        device = self.model.device
        with torch.inference_mode():
            return self.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=cache is not None,
                logits_to_keep=keep.to(device) if isinstance(keep, torch.Tensor) else keep,
                **({self.cache_argument: cache} if cache is not None else {}),
            )

    def _packed_forward(
        self,
        episodes: Sequence[EncodedEpisode],
        packed: Packed,
        keep: torch.Tensor,
        cache: Cache | None,
    ) -> tuple[Any, list[list[float]]]:
        """One forward over the packed episodes; a_i from each episode's query rows."""
        spans = []  # (episode, first row, end row) in packed coordinates
        for b, episode in enumerate(episodes):
            prefix_end = packed.prefix_start[b] + len(episode.prefix_ids)
            for row, at in zip(episode.rows, packed.row_start[b], strict=True):
                if row.query_tokens is None:
                    continue
                start, end = row.query_tokens
                if self.attention_span == "first_token":  # the last prompt token's row
                    start = end - 1
                if start < 0:  # the block's first rows are the shared prefix's
                    spans.append((b, prefix_end + start, prefix_end))
                    start = 0
                spans.append((b, at + start, at + end))
        self.capture.arm(spans)
        output = self._forward(packed.ids, packed.mask, packed.positions, keep, cache)
        masses = self.capture.column_mass
        if masses is None or len(masses[0]) != packed.ids.shape[1]:
            raise DwbenchError(
                "the selector model's forward pass did not give Data Whisperer the attention of "
                "its layer over the whole prompt (a sliding-window layer?); pick another "
                "selector_model.attention_layer"
            )
        attention = []
        for b, episode in enumerate(episodes):
            mine = [i for i, span in enumerate(spans) if span[0] == b]
            shift = packed.prefix_start[b]
            attention.append(
                demonstration_attention(
                    [masses[i] for i in mine],
                    [(shift + s, shift + e) for s, e in episode.demo_tokens],
                    sum(spans[i][2] - spans[i][1] for i in mine),
                )
            )
        return output, attention

    def _check_window(self, episodes: Sequence[EncodedEpisode]) -> None:
        """The packed forward's 4D mask is used as-is by every layer, so a sliding-window layer
        (Gemma 3: 5 of every 6) would attend past its window: refuse rows longer than it."""
        config = self.model.config
        window = getattr(config, "sliding_window", None)
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ())
        longest = max(episode.longest_row() for episode in episodes)
        if window and sliding and longest > window:
            raise DwbenchError(
                f"{type(self.model).__name__} has sliding-window layers ({window} tokens) and an "
                f"episode row is {longest} tokens long; Data Whisperer's packed forward would let "
                "those layers attend past their window (a different model). Shorten the episodes "
                "(method.n_demos) or use a selector with full attention only."
            )

    def likelihood(self, episodes: Sequence[EncodedEpisode]) -> list[EpisodeOutput]:
        """Teacher forcing: each gold token's probability, and whether argmax would write it."""
        start = time.perf_counter()
        self._check_window(episodes)
        packed = pack(episodes, self.pad_id)
        needed = sorted(
            {
                at + position - 1  # the logits at the token before each answer token
                for b, episode in enumerate(episodes)
                for row, at in zip(episode.rows, packed.row_start[b], strict=True)
                for s, e in row.answer_tokens
                for position in range(s, e)
            }
        )
        where = {position: i for i, position in enumerate(needed)}
        output, attention = self._packed_forward(episodes, packed, torch.tensor(needed), None)
        logits = output.logits.float()
        log_norm = torch.logsumexp(logits, dim=-1)  # (episodes, kept positions)
        predicted = logits.argmax(-1)
        outputs = [EpisodeOutput(a, []) for a in attention]
        for b, episode in enumerate(episodes):
            for row, at in zip(episode.rows, packed.row_start[b], strict=True):
                ids = torch.tensor(row.suffix_ids, dtype=torch.long)

                def kept(first: int, last: int, at: int = at) -> torch.Tensor:
                    return torch.tensor([where[at + p - 1] for p in range(first, last)])

                out = RowOutput()
                for (s, e), number in zip(row.answer_tokens, row.number_tokens, strict=True):
                    index = kept(s, e)
                    probs = (logits[b, index, ids[s:e]] - log_norm[b, index]).exp().tolist()
                    out.gold_probs.append(probs)
                    if number is None:
                        out.final_probs.append(None)
                        out.number_match.append(None)
                    else:
                        out.final_probs.append(probs[number[0] - s : number[1] - s])
                        hits = predicted[b, kept(*number)] == ids[number[0] : number[1]]
                        out.number_match.append(bool(hits.all()))
                outputs[b].rows.append(out)
        seconds = (time.perf_counter() - start) / len(episodes)
        for out in outputs:
            out.seconds = seconds
        return outputs

    def _row_cache(
        self,
        episodes: Sequence[EncodedEpisode],
        packed: Packed,
        prefill: DynamicCache,
        room: int,
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Each row's own cache (its prefix, then its suffix) gathered from the packed prefill,
        left-padded to one width, with `room` reserved for decoding; its mask and last position."""
        gathers, owners = [], []
        for b, episode in enumerate(episodes):
            first = packed.prefix_start[b]
            prefix = list(range(first, first + len(episode.prefix_ids)))
            for row, at in zip(episode.rows, packed.row_start[b], strict=True):
                gathers.append(prefix + list(range(at, at + len(row.suffix_ids))))
                owners.append(b)
        width = max(len(g) for g in gathers)
        index = torch.zeros((len(gathers), width), dtype=torch.long)
        mask = torch.zeros((len(gathers), width), dtype=torch.long)
        for r, gather in enumerate(gathers):
            index[r, width - len(gather) :] = torch.tensor(gather)
            mask[r, width - len(gather) :] = 1
        device = self.model.device
        owner, index = torch.tensor(owners, device=device), index.to(device)
        cache = DynamicCache(config=self.model.config)
        for i, layer in enumerate(prefill.layers):
            if type(layer) is not DynamicLayer:
                raise DwbenchError(
                    f"{type(self.model).__name__} caches some layers as {type(layer).__name__} "
                    "(a sliding window?); Data Whisperer's generation supports full attention only"
                )

            def rows(states: torch.Tensor) -> torch.Tensor:
                spread = index[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
                return states[owner].gather(2, spread)

            cache.layers[i] = RowCacheLayer(rows(layer.keys), rows(layer.values), room)
        last_position = torch.tensor([len(g) - 1 for g in gathers])
        return cache, mask, last_position

    def generate(
        self,
        episodes: Sequence[EncodedEpisode],
        make_stop: Callable[[], RowStop],
        max_new_tokens: int,
        on_done: Callable[[int, EpisodeOutput], None],
    ) -> None:
        """Greedy completions; `on_done(batch index, output)` as each episode finishes."""
        last_done = time.perf_counter()
        packed = pack(episodes, self.pad_id)
        owner = [b for b, e in enumerate(episodes) for _ in e.rows]
        row_ends = [
            at + len(row.suffix_ids) - 1
            for b, episode in enumerate(episodes)
            for row, at in zip(episode.rows, packed.row_start[b], strict=True)
        ]
        keep = sorted(set(row_ends))
        prefill = DynamicCache(config=self.model.config)
        output, attention = self._packed_forward(episodes, packed, torch.tensor(keep), prefill)
        cache, mask, positions = self._row_cache(episodes, packed, prefill, max_new_tokens)
        del prefill
        logits = output.logits[owner, [keep.index(p) for p in row_ends]]
        outputs = [
            EpisodeOutput(a, [RowOutput() for _ in e.rows])
            for a, e in zip(attention, episodes, strict=True)
        ]
        slot = [owner[:r].count(owner[r]) for r in range(len(owner))]
        pending = [len(e.rows) for e in episodes]
        texts = [IncrementalText(self.tokenizer) for _ in owner]
        stops = [make_stop() for _ in owner]
        alive = list(range(len(owner)))
        step = 0
        while alive:
            step += 1
            next_ids = logits.float().argmax(-1).cpu()
            finished = []
            for j, r in enumerate(alive):
                token = int(next_ids[j])
                out = outputs[owner[r]].rows[slot[r]]
                out.new_tokens = step
                if token in self.stop_ids:
                    finished.append(j)
                elif stops[r].feed(texts[r].add(token)):
                    finished.append(j)
                elif step >= max_new_tokens:
                    out.complete = False
                    finished.append(j)
            for j in finished:
                r = alive[j]
                out = outputs[owner[r]].rows[slot[r]]
                out.text = self.tokenizer.decode(texts[r].ids, skip_special_tokens=True)
                pending[owner[r]] -= 1
                if pending[owner[r]] == 0:
                    now = time.perf_counter()
                    outputs[owner[r]].seconds = now - last_done
                    last_done = now
                    on_done(owner[r], outputs[owner[r]])
            if finished:
                still = [j for j in range(len(alive)) if j not in finished]
                if not still:
                    break
                index = torch.tensor(still)
                cache.batch_select_indices(index.to(self.model.device))
                mask, next_ids, positions = mask[index], next_ids[index], positions[index]
                alive = [alive[j] for j in still]
            mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype)], dim=1)
            positions = positions + 1
            step_output = self._forward(next_ids[:, None], mask, positions[:, None], 1, cache)
            logits = step_output.logits[:, -1, :]
