"""Data Whisperer (Wang et al., ACL 2025): score examples by how much they help in-context.

An episode puts n_d pool examples as demonstrations and n_q queries in one chat prompt; the
selector model answers all queries in one greedy completion, and the episode's score s is the
mean task metric over the queries. Demonstration i gets s * w_i, where w_i comes from the
attention that the query block pays to demonstration i at one layer l; an example's score is the
mean over its appearances. ../shared/ALGORITHM.md has the method.

The prompt is one user turn: a header, the demonstrations ("Question: x\nAnswer:\ny"), the
instruction, then "Question k: x" for each query; the assistant turn is pre-filled with
"Answer 1:", which small models need to keep to the numbered format. The query block, whose
rows the weights read, runs from the instruction to the end of the prompt, as in the released
code; `first_token` reads only the last prompt token, the row that predicts the first answer
token (the paper's wording).

What differs from the authors' released code, on purpose:
- Scores accumulate in float64 and selection sorts stably (the code used float16: many ties).
- An unparsable answer scores 0 for its query only and counts towards `parse_failure_rate`; the
  code dropped the whole episode and gave its demonstrations nothing.
- Token spans come from one tokenisation of the whole chat-templated prompt with character
  offsets, so they are exact for any tokenizer (the code tokenised pieces separately and
  subtracted 1 for a BOS token: off by one on Llama, drifting on Qwen).
- Layer l's attention is taken from generate's own prefill, with public transformers APIs: the
  model runs a registered attention function that is plain SDPA for every layer, and, for the
  one prefill call of layer l (armed by hooks on that module), also computes softmax(QK^T) for
  the query rows only. No second forward pass, no other layer materialises attention weights,
  and the function sees post-RoPE queries and keys, so it works for any model that dispatches
  through the AttentionInterface (Llama, Qwen2, Mistral, Gemma 3, SmolLM2, ...). Logit
  soft-capping (Gemma 2) and attention sinks are not applied to the captured weights.
- Generation stops once all n_q answers are complete (a stopping criterion), not at a fixed cap.
- A prompt longer than the model's context drops demonstrations for that episode (counted).
- w_i = n * a_i / sum_j a_j over the episode's n demonstrations, i.e. the paper's normalised
  weight times n. For full episodes this is a constant factor (same ranking); it keeps the
  shorter last chunk and truncated episodes from inflating their demonstrations' weights, and
  makes "w/o Attn" (w_i = 1) the raw episode score on the same scale.

Episodes are planned up front from the seed, and each finished batch of episodes is appended to
`work_dir/episodes.jsonl` (with its completion, for inspection), so a killed scoring run resumes
where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import (
    AttentionInterface,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dwbench.chat import prompt_text, require_chat_template
from dwbench.data.answers import parse_predicted_number
from dwbench.data.metrics import get_metric
from dwbench.data.records import Example
from dwbench.errors import ConfigError, DataError, DwbenchError
from dwbench.keys import result_identity, stable_hash
from dwbench.methods.base import ScoringContext, top_k

logger = logging.getLogger(__name__)

ATTENTION_SPANS = ("query_block", "first_token")
EPISODE_ORDERS = ("sequential", "random")
QUERY_SOURCES = ("pool_kfold", "validation")
NUMERIC_METRIC = "exact_match_number"
CAPTURE_ATTENTION = "dwbench_dw_capture"  # name of the attention function registered below
CHECKPOINT_FILE = "episodes.jsonl"

DEMOS_HEADER = "Below are solved examples."
ANSWER_PREFILL = "Answer 1:"  # the reply starts here; completions are parsed with it in front
NUMERIC_INSTRUCTION = (
    "Now solve each of the questions below in the same way. Start each solution with "
    '"Answer k:" on its own line, where k is the number of the question, show the steps, and '
    'end the solution with a line "#### <number>" that gives the final answer.'
)
TEXT_INSTRUCTION = (
    "Now answer each of the questions below in the same way. Start each answer with "
    '"Answer k:" on its own line, where k is the number of the question, and write the answer '
    "as one paragraph."
)
# "Answer 3:", "**Answer 3:**", "answer 3 :"; digits right after the word, then a colon.
_ANSWER_MARKER = re.compile(r"\banswer\s*(\d+)\s*\**\s*:", re.IGNORECASE)
_FINAL_LINE = re.compile(r"####[^\n]*\n")
_PARAGRAPH_END = re.compile(r"\S\s*?\n\s*\n")


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The method config, checked: every bad value fails here, before any model is loaded."""

    n_demos: int
    n_queries: int
    attention_span: str
    attention_weighting: bool
    episode_order: str
    passes: int
    query_source: str
    instruction: str | None
    max_new_tokens_per_answer: int
    prompts_per_call: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Settings:
        def get(key: str, node: Mapping[str, Any] = cfg, prefix: str = "method") -> Any:
            if key not in node:
                raise ConfigError(
                    f"{prefix}.{key} is missing; conf/method/data_whisperer.yaml lists every key."
                )
            return node[key]

        def positive(key: str, value: Any, prefix: str = "method") -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{prefix}.{key}={value!r} must be a positive integer.")
            return value

        def choice(key: str, options: tuple[str, ...]) -> str:
            value = get(key)
            if value not in options:
                raise ConfigError(f"method.{key}={value!r} is not one of {', '.join(options)}.")
            return str(value)

        runtime = get("runtime")
        weighting = get("attention_weighting")
        if not isinstance(weighting, bool):
            raise ConfigError(f"method.attention_weighting={weighting!r} must be true or false.")
        instruction = get("instruction")
        if instruction is not None and not str(instruction).strip():
            raise ConfigError("method.instruction is empty; set it to null for the built-in one.")
        settings = cls(
            n_demos=positive("n_demos", get("n_demos")),
            n_queries=positive("n_queries", get("n_queries")),
            attention_span=choice("attention_span", ATTENTION_SPANS),
            attention_weighting=weighting,
            episode_order=choice("episode_order", EPISODE_ORDERS),
            passes=positive("passes", get("passes")),
            query_source=choice("query_source", QUERY_SOURCES),
            instruction=None if instruction is None else str(instruction).strip(),
            max_new_tokens_per_answer=positive(
                "max_new_tokens_per_answer", get("max_new_tokens_per_answer")
            ),
            prompts_per_call=positive(
                "prompts_per_call",
                get("prompts_per_call", runtime, "method.runtime"),
                "method.runtime",
            ),
        )
        if settings.episode_order == "sequential" and settings.passes != 1:
            raise ConfigError(
                f"method.passes={settings.passes} needs method.episode_order=random (sequential "
                "order walks one shuffle once, as the released code does)."
            )
        return settings

    def result_fields(self) -> dict[str, Any]:
        """What decides the scores: everything except the runtime batch size."""
        fields = asdict(self)
        del fields["prompts_per_call"]
        return fields


# --- episodes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Episode:
    """One ICL prompt: pool indices of its demonstrations, indices of its queries."""

    index: int
    demos: tuple[int, ...]
    queries: tuple[int, ...]  # into the pool (pool_kfold) or into the query split (validation)


def plan_episodes(
    n_pool: int, n_query_split: int | None, settings: Settings, seed: int
) -> list[Episode]:
    """Every episode of the run, from the seed alone, so a resumed run plans the same ones.

    With `n_query_split` None the pool is split into two shuffled folds: each fold's examples are
    demonstrations while the other fold supplies the queries (the released code's 2-fold KFold).
    """
    rng = np.random.default_rng(seed)
    if n_query_split is None:
        order = rng.permutation(n_pool)
        half = (n_pool + 1) // 2
        groups = [(order[:half], order[half:]), (order[half:], order[:half])]
    else:
        groups = [(np.arange(n_pool), np.arange(n_query_split))]
    episodes: list[Episode] = []
    n_d, n_q = settings.n_demos, settings.n_queries
    for _ in range(settings.passes):
        for demos, queries in groups:
            demo_order = rng.permutation(demos)
            query_order = rng.permutation(queries)
            pointer = 0
            for start in range(0, len(demo_order), n_d):
                if settings.episode_order == "sequential":
                    picked = [query_order[(pointer + j) % len(query_order)] for j in range(n_q)]
                    pointer += n_q
                else:
                    picked = list(rng.choice(queries, size=n_q, replace=False))
                episodes.append(
                    Episode(
                        index=len(episodes),
                        demos=tuple(int(i) for i in demo_order[start : start + n_d]),
                        queries=tuple(int(i) for i in picked),
                    )
                )
    return episodes


# --- prompts and token spans ------------------------------------------------------------------


@dataclass(frozen=True)
class EpisodePrompt:
    """The chat-templated prompt text with the character ranges that the weights read."""

    text: str
    demo_chars: tuple[tuple[int, int], ...]  # each demonstration's text, [start, end)
    query_chars: tuple[int, int]  # from the instruction before the questions to the end


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one prompt and the token ranges of its demonstrations and query block."""

    input_ids: tuple[int, ...]
    demo_tokens: tuple[tuple[int, int], ...]
    query_tokens: tuple[int, int]


def demonstration_text(example: Example) -> str:
    return f"Question: {example.prompt.strip()}\nAnswer:\n{example.response.strip()}"


def default_instruction(metric: str) -> str:
    return NUMERIC_INSTRUCTION if metric == NUMERIC_METRIC else TEXT_INSTRUCTION


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    demos: Sequence[Example],
    queries: Sequence[Example],
    instruction: str,
) -> EpisodePrompt:
    """Demonstrations, the instruction and numbered questions as one user turn.

    The user message is assembled from pieces with their character ranges recorded, then placed
    in the model's chat template; the ranges are shifted by where the message lands there. The
    assistant turn starts with the first answer's marker (`ANSWER_PREFILL`): small models
    follow the numbered format far more reliably when their reply already begins with it.
    """
    pieces = [DEMOS_HEADER]
    cursor = len(DEMOS_HEADER)
    demo_chars = []
    for demo in demos:
        text = demonstration_text(demo)
        cursor += 2
        demo_chars.append((cursor, cursor + len(text)))
        pieces.append(text)
        cursor += len(text)
    query_start = cursor + 2
    pieces.append(instruction)
    pieces += [f"Question {k}: {query.prompt.strip()}" for k, query in enumerate(queries, 1)]
    message = "\n\n".join(pieces)
    text = prompt_text(tokenizer, message) + ANSWER_PREFILL
    offset = text.find(message)
    if offset < 0:
        raise ConfigError(
            "the model's chat template changes the user message it renders, so Data Whisperer "
            "cannot locate the demonstrations in the prompt; use another selector model."
        )
    return EpisodePrompt(
        text=text,
        demo_chars=tuple((offset + s, offset + e) for s, e in demo_chars),
        query_chars=(offset + query_start, len(text)),
    )


def char_to_token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """The tokens that overlap characters [start, end); empty-width tokens never count."""
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not inside:
        raise DwbenchError(f"no token covers characters {start}..{end} of the prompt")
    return inside[0], inside[-1] + 1


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: EpisodePrompt) -> EncodedPrompt:
    """One tokenisation of the whole prompt; spans come from its character offsets."""
    encoded = tokenizer(prompt.text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(pair) for pair in encoded["offset_mapping"]]
    return EncodedPrompt(
        input_ids=tuple(encoded["input_ids"]),
        demo_tokens=tuple(char_to_token_span(offsets, s, e) for s, e in prompt.demo_chars),
        query_tokens=char_to_token_span(offsets, *prompt.query_chars),
    )


# --- answers -----------------------------------------------------------------------------------


def split_answers(
    text: str, n_queries: int, numeric: bool, finished: bool = True
) -> list[str | None]:
    """Each answer's text, or None where the completion has none.

    Numeric tasks: an answer is a block ending with a completed `#### ...` line (the first such
    line after its start is the number it commits to, as in GSM8K's strict match). A block is
    answer k when its last "Answer k:" marker says so (k above the previous answer's number),
    else it is the answer after the previous one, so a model that drops the markers after the
    pre-filled "Answer 1:" is still read in order, as the released code read its `####` lines.
    `finished` says generation has ended, so a `####` line at the very end is complete too.
    Other tasks: answer k runs from its marker to the next accepted marker (increasing k).
    """
    answers: list[str | None] = [None] * n_queries
    if numeric:
        body = text + "\n" if finished else text
        number = begin = 0
        for line in _FINAL_LINE.finditer(body):
            block = body[begin : line.end()]
            begin = line.end()
            markers = list(_ANSWER_MARKER.finditer(block))
            marked = int(markers[-1].group(1)) if markers else 0
            number = marked if marked > number else number + 1
            if number > n_queries:
                break
            answers[number - 1] = block[markers[-1].end() :] if markers else block
        return answers
    starts: list[tuple[int, int, int]] = []  # (k, marker start, marker end)
    for match in _ANSWER_MARKER.finditer(text):
        k = int(match.group(1))
        if (starts[-1][0] if starts else 0) < k <= n_queries:
            starts.append((k, match.start(), match.end()))
    for j, (k, _, body_start) in enumerate(starts):
        body_end = starts[j + 1][1] if j + 1 < len(starts) else len(text)
        answers[k - 1] = text[body_start:body_end]
    return answers


def answers_complete(text: str, n_queries: int, numeric: bool) -> bool:
    """Whether the last answer is finished: its `####` line ended, or its paragraph did."""
    last = split_answers(text, n_queries, numeric, finished=False)[-1]
    if last is None:
        return False
    return numeric or _PARAGRAPH_END.search(last) is not None


def score_answers(
    text: str,
    queries: Sequence[Example],
    metric: Callable[[str, Sequence[str]], float],
    numeric: bool,
) -> tuple[list[float], int]:
    """Per-query scores and the number of answers that could not be parsed (they score 0)."""
    scores, failures = [], 0
    for answer, query in zip(split_answers(text, len(queries), numeric), queries, strict=True):
        if (
            answer is None
            or not answer.strip()
            or (numeric and parse_predicted_number(answer) is None)
        ):
            scores.append(0.0)
            failures += 1
        else:
            scores.append(float(metric(answer.strip(), query.references)))
    return scores, failures


# --- accumulation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contribution:
    """What one episode gives its demonstrations."""

    demos: Sequence[int]  # pool indices
    score: float  # mean metric over the episode's queries
    attention: Sequence[float]  # a_i per demonstration (any positive scale)


@dataclass
class ScoreTable:
    score: np.ndarray  # final score: mean of s * w_i over appearances
    appearances: np.ndarray
    mean_episode_score: np.ndarray  # mean raw s: the "w/o Attn" score
    mean_weight: np.ndarray


def episode_weights(attention: Sequence[float]) -> np.ndarray:
    """w_i = n * a_i / sum_j a_j: the paper's normalised weight on a mean-1 scale."""
    a = np.asarray(attention, dtype=np.float64)
    total = a.sum()
    if not np.isfinite(total) or total <= 0:
        return np.ones_like(a)
    return a * (len(a) / total)


def accumulate(
    n_examples: int, contributions: Iterable[Contribution], weighting: bool
) -> ScoreTable:
    """S[i] += s * w_i over episodes, in float64; the score is S[i] / appearances (0 if none)."""
    total = np.zeros(n_examples, dtype=np.float64)
    raw = np.zeros(n_examples, dtype=np.float64)
    weights = np.zeros(n_examples, dtype=np.float64)
    count = np.zeros(n_examples, dtype=np.int64)
    for c in contributions:
        demos = np.asarray(c.demos, dtype=np.int64)
        w = episode_weights(c.attention) if weighting else np.ones(len(demos))
        np.add.at(total, demos, c.score * w)
        np.add.at(raw, demos, c.score)
        np.add.at(weights, demos, w)
        np.add.at(count, demos, 1)
    seen = np.maximum(count, 1)
    return ScoreTable(
        score=total / seen,
        appearances=count,
        mean_episode_score=raw / seen,
        mean_weight=weights / seen,
    )


# --- attention capture -------------------------------------------------------------------------

_ACTIVE_CAPTURE: ContextVar[PrefillAttention | None] = ContextVar(
    "dwbench_dw_capture", default=None
)


def _attention_with_capture(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA, plus the query rows' softmax(QK^T) while a capture is active (layer l, prefill)."""
    output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    capture = _ACTIVE_CAPTURE.get()
    if capture is not None:
        capture.record(query, key, attention_mask, kwargs.get("scaling"))
    return output


def use_capture_attention(model: PreTrainedModel) -> None:
    """Switch the model to SDPA-with-capture through transformers' public attention registry."""
    AttentionInterface.register(CAPTURE_ATTENTION, _attention_with_capture)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(CAPTURE_ATTENTION)
    if model.config._attn_implementation != CAPTURE_ATTENTION:
        raise ConfigError(
            f"{type(model).__name__} does not dispatch attention through transformers' "
            "AttentionInterface, so Data Whisperer cannot read its attention during generation; "
            "use another selector model."
        )


def attention_module(model: PreTrainedModel, layer: int) -> torch.nn.Module:
    """Layer `layer`'s self-attention module (the one module with that `layer_idx`)."""
    found = [
        module
        for module in model.modules()
        if getattr(module, "layer_idx", None) == layer and "Attention" in type(module).__name__
    ]
    if len(found) != 1:
        raise ConfigError(
            f"found {len(found)} attention modules for selector_model.attention_layer={layer} "
            f"in {type(model).__name__}; pick a layer with ordinary self-attention."
        )
    return found[0]


class PrefillAttention:
    """Layer l's attention from chosen rows, captured once: in the next forward of that layer.

    Hooks on layer l's attention module make the capture active only inside that module's
    forward; `arm` before `generate` targets the prefill, and the capture disarms after it.
    `column_mass[b][t]` is the attention that row span b pays to token t, summed over heads and
    rows; softmax runs in float32 over exactly what SDPA attends to (causal, padding, window).
    """

    def __init__(self, model: PreTrainedModel, layer: int) -> None:
        module = attention_module(model, layer)
        self._rows: list[tuple[int, int]] | None = None
        self._token: Token[PrefillAttention | None] | None = None
        self.column_mass: list[np.ndarray] | None = None
        self._handles = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._exit),
        ]

    def arm(self, rows: list[tuple[int, int]]) -> None:
        self._rows = rows
        self.column_mass = None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        if self._rows is not None:
            self._token = _ACTIVE_CAPTURE.set(self)

    def _exit(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._token is not None:
            _ACTIVE_CAPTURE.reset(self._token)
            self._token = None
            self._rows = None

    def record(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        assert self._rows is not None  # only an armed capture is ever active
        n_keys, n_new = key.shape[2], query.shape[2]
        groups = query.shape[1] // key.shape[1]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        columns = torch.arange(n_keys, device=query.device)
        masses = []
        for b, (start, end) in enumerate(self._rows):
            keys = key[b].float().repeat_interleave(groups, dim=0)  # (heads, keys, dim)
            logits = query[b, :, start:end].float() @ keys.transpose(-1, -2) * scale
            if mask is None:  # SDPA's causal shortcut: no padding, plain causal mask
                rows = torch.arange(start, end, device=query.device) + (n_keys - n_new)
                logits = logits.masked_fill(columns[None, :] > rows[:, None], -math.inf)
            elif mask.dtype == torch.bool:
                logits = logits.masked_fill(~mask[b, :, start:end], -math.inf)
            else:
                logits = logits + mask[b, :, start:end].float()
            probs = torch.softmax(logits, dim=-1)
            masses.append(probs.sum(dim=(0, 1)).double().cpu().numpy())
        self.column_mass = masses


def demonstration_attention(
    column_mass: np.ndarray, demo_tokens: Sequence[tuple[int, int]], n_rows: int
) -> list[float]:
    """a_i = attention from the rows to demonstration i's tokens / (len(demo i) * rows)."""
    return [float(column_mass[s:e].sum()) / ((e - s) * n_rows) for s, e in demo_tokens]


# --- generation --------------------------------------------------------------------------------


class AnswersComplete(StoppingCriteria):
    """Stops each row once its n_q-th answer is complete or it emitted an end-of-turn token.

    Decoding is most of the cost, so a completion must not run on to the token cap once its
    answers are there. `lengths[b]` is how many new tokens row b used.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_length: int,
        n_queries: int,
        numeric: bool,
        stop_ids: set[int],
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.n_queries = n_queries
        self.numeric = numeric
        self.stop_ids = stop_ids
        self.lengths: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_length :]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for b in range(input_ids.shape[0]):
            if b in self.lengths:
                done[b] = True
                continue
            last = int(new[b, -1])
            text = ANSWER_PREFILL + self.tokenizer.decode(new[b], skip_special_tokens=True)
            if last in self.stop_ids or answers_complete(text, self.n_queries, self.numeric):
                self.lengths[b] = new.shape[1]
                done[b] = True
        return done


@dataclass
class Generation:
    text: str
    attention: list[float]  # a_i per demonstration
    new_tokens: int
    complete: bool  # stopped by the criterion rather than the token cap


class EpisodeRunner:
    """Runs batches of episode prompts: one generate call each, attention from its prefill."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layer: int,
        attention_span: str,
        n_queries: int,
        numeric: bool,
        max_new_tokens: int,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.attention_span = attention_span
        self.n_queries = n_queries
        self.numeric = numeric
        self.capture = PrefillAttention(model, layer)
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.stop_ids = eos_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
        self.generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=sorted(eos_ids),
            pad_token_id=self.pad_id,
        )

    def close(self) -> None:
        self.capture.close()

    def run(self, prompts: Sequence[EncodedPrompt]) -> list[Generation]:
        """Generate for left-padded prompts; spans shift by each prompt's padding."""
        if not prompts:
            return []
        width = max(len(p.input_ids) for p in prompts)
        device = self.model.device
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        rows = []
        for b, prompt in enumerate(prompts):
            pad = width - len(prompt.input_ids)
            input_ids[b, pad:] = torch.tensor(prompt.input_ids)
            attention_mask[b, pad:] = 1
            if self.attention_span == "first_token":  # the row that predicts the first token
                rows.append((width - 1, width))
            else:
                rows.append((pad + prompt.query_tokens[0], pad + prompt.query_tokens[1]))
        criterion = AnswersComplete(
            self.tokenizer, width, self.n_queries, self.numeric, self.stop_ids
        )
        self.capture.arm(rows)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=self.generation_config,
                stopping_criteria=StoppingCriteriaList([criterion]),
            )
        masses = self.capture.column_mass
        if masses is None:
            raise DwbenchError(
                "the selector model's prefill did not run the attention layer that Data "
                "Whisperer reads; report this with the model's name"
            )
        results = []
        new = output[:, width:].cpu()
        for b, prompt in enumerate(prompts):
            pad = width - len(prompt.input_ids)
            used = criterion.lengths.get(b, new.shape[1])
            start, end = rows[b]
            results.append(
                Generation(
                    text=ANSWER_PREFILL
                    + self.tokenizer.decode(new[b, :used], skip_special_tokens=True),
                    attention=demonstration_attention(
                        masses[b],
                        [(pad + s, pad + e) for s, e in prompt.demo_tokens],
                        end - start,
                    ),
                    new_tokens=used,
                    complete=b in criterion.lengths,
                )
            )
        return results


# --- checkpoint --------------------------------------------------------------------------------


class EpisodeLog:
    """Finished episodes as JSON lines after a header naming the plan; resumable after a kill.

    A header that does not match this run's plan (other config, pool or seed) means the file
    belongs to another run: it is started afresh. A torn last line from a kill is ignored.
    """

    def __init__(self, path: Path, plan_id: str) -> None:
        self.path = path
        self.plan_id = plan_id
        self.records: dict[int, dict[str, Any]] = {}
        if path.is_file():
            self._load()
        if not self.records:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"plan": plan_id}) + "\n", encoding="utf-8")

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if header.get("plan") != self.plan_id:
            logger.warning("%s belongs to another scoring run; starting afresh.", self.path)
            return
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.records[int(record["episode"])] = record
        # Rewrite without torn lines, so later appends start on a fresh line.
        self.path.write_text(
            "\n".join([lines[0], *(json.dumps(r) for r in self.records.values())]) + "\n",
            encoding="utf-8",
        )

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
                self.records[int(record["episode"])] = record
            f.flush()
            os.fsync(f.fileno())


# --- the method --------------------------------------------------------------------------------


class DataWhisperer:
    """Registered as `data_whisperer`; config in conf/method/data_whisperer.yaml.

    After `score`, `stats` holds the run's diagnostics: attention_layer, episodes,
    truncated_episodes / dropped_demonstrations / skipped_episodes (context overflow),
    parse_failure_rate, capped_episodes (hit the token cap), generated_tokens_per_episode,
    seconds_per_episode, seconds_per_example (this call, model loading excluded), load_seconds,
    resumed_episodes, mean_episode_score, unscored_examples (no appearance left) and
    distinct_scores (1 means no signal: every episode scored the same, a warning says so).
    """

    needs_selector = True  # scores with the selector model

    def __init__(self, context: ScoringContext) -> None:
        self.context = context
        self.settings = Settings.from_config(context.method_cfg)
        metric_name = context.task_cfg.get("metric")
        if not metric_name:
            raise ConfigError(
                f"task {context.task_cfg.get('name')!r} has no metric (task.metric); Data "
                "Whisperer scores answers with it: set exact_match_number or rouge_l."
            )
        self.metric_name = str(metric_name)
        self.metric = get_metric(self.metric_name)
        self.numeric = self.metric_name == NUMERIC_METRIC
        self.instruction = self.settings.instruction or default_instruction(self.metric_name)
        self.layer = self._configured_layer()
        self.stats: dict[str, float] = {}

    def _configured_layer(self) -> int | None:
        """selector_model.attention_layer, checked against num_layers when the config has it."""
        cfg = self.context.selector_cfg
        layer, layers = cfg.get("attention_layer"), cfg.get("num_layers")
        if layer is None:
            return None
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ConfigError(
                f"selector_model.attention_layer={layer!r} must be an integer or null."
            )
        if layers is not None:
            _check_layer(layer, int(layers))
        return layer

    def _queries(self, pool: list[Example]) -> list[Example] | None:
        """The query split, or None when queries come from the pool's folds; sizes checked."""
        s = self.settings
        if len(pool) < s.n_demos + s.n_queries:
            raise DataError(
                f"the pool has {len(pool)} examples, fewer than method.n_demos + method.n_queries "
                f"= {s.n_demos + s.n_queries}; lower them or use a larger pool."
            )
        if s.query_source == "validation":
            queries = self.context.queries
            if not queries:
                raise ConfigError(
                    "method.query_source=validation, but the task has no query split; set "
                    "method.query_source=pool_kfold."
                )
            if len(queries) < s.n_queries:
                raise DataError(
                    f"the query split has {len(queries)} examples, fewer than "
                    f"method.n_queries={s.n_queries}."
                )
            _check_examples(queries, "query")
            return list(queries)
        if len(pool) // 2 < s.n_queries:
            raise DataError(
                f"with method.query_source=pool_kfold each half of the pool ({len(pool) // 2}) "
                f"must hold method.n_queries={s.n_queries} queries; lower n_queries."
            )
        return None

    def score(self, pool: list[Example]) -> pd.DataFrame:
        start = time.perf_counter()
        _check_examples(pool, "pool")
        query_split = self._queries(pool)
        queries = pool if query_split is None else query_split
        s = self.settings
        plan = plan_episodes(
            len(pool), None if query_split is None else len(query_split), s, self.context.seed
        )
        log = EpisodeLog(
            Path(self.context.work_dir) / CHECKPOINT_FILE,
            self._plan_id(pool, query_split, plan),
        )
        pending = [e for e in plan if e.index not in log.records]
        resumed = len(plan) - len(pending)
        if resumed:
            logger.info("Resuming Data Whisperer: %d of %d episodes done.", resumed, len(plan))
        load_s = 0.0
        if pending:
            load_s = self._run(pool, queries, pending, log)
        records = [log.records[e.index] for e in plan]
        index = {ex.id: i for i, ex in enumerate(pool)}
        table = accumulate(
            len(pool),
            (
                Contribution([index[i] for i in r["demo_ids"]], r["score"], r["attention"])
                for r in records
                if r["demo_ids"]
            ),
            s.attention_weighting,
        )
        self.stats = _summarise(records, table, len(pool), s.n_queries)
        self.stats.update(
            attention_layer=float(records[0]["attention_layer"]),
            resumed_episodes=float(resumed),
            load_seconds=load_s,
            seconds_per_example=(time.perf_counter() - start - load_s) / len(pool),
        )
        logger.info("Data Whisperer: %s", ", ".join(f"{k}={v:.4g}" for k, v in self.stats.items()))
        if self.stats["distinct_scores"] == 1:
            logger.warning(
                "Data Whisperer: every pool example got the same score (%.4g): the selector model "
                "answered no query correctly (parse_failure_rate=%.2f), so the selection is the "
                "pool's seeded order, no better than random. Use a stronger selector model.",
                float(table.score[0]),
                self.stats["parse_failure_rate"],
            )
        return pd.DataFrame(
            {
                "id": [ex.id for ex in pool],
                "score": table.score,
                "appearances": table.appearances,
                "mean_episode_score": table.mean_episode_score,
                "mean_weight": table.mean_weight,
            }
        )

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k)

    def _plan_id(
        self, pool: list[Example], query_split: list[Example] | None, plan: list[Episode]
    ) -> str:
        return stable_hash(
            {
                "settings": self.settings.result_fields(),
                "instruction": self.instruction,
                "metric": self.metric_name,
                "selector": result_identity(self.context.selector_cfg),
                "pool": [asdict(ex) for ex in pool],
                "queries": None if query_split is None else [asdict(ex) for ex in query_split],
                "plan": [(e.demos, e.queries) for e in plan],
            }
        )

    def _load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """Tokenizer first (a missing chat template fails before the weights load), then model."""
        from dwbench.models import load_causal_lm, load_tokenizer

        cfg, cache_dir = self.context.selector_cfg, Path(self.context.cache_dir)
        tokenizer = load_tokenizer(cfg, cache_dir)
        require_chat_template(tokenizer, str(cfg.get("name")))
        if not tokenizer.is_fast:
            raise ConfigError(
                f"selector_model={cfg.get('name')} has no fast tokenizer, so token offsets "
                "(exact demonstration spans) are unavailable; use a model with tokenizer.json."
            )
        model = load_causal_lm(cfg, cache_dir, self.context.device)
        layers = int(model.config.get_text_config().num_hidden_layers)
        if self.layer is None:
            self.layer = layers // 2
        _check_layer(self.layer, layers)
        use_capture_attention(model)
        return model, tokenizer

    def _run(
        self,
        pool: list[Example],
        queries: list[Example],
        pending: list[Episode],
        log: EpisodeLog,
    ) -> float:
        """Run the pending episodes in batches, appending each batch to the log; load seconds."""
        load_start = time.perf_counter()
        model, tokenizer = self._load()
        load_s = time.perf_counter() - load_start
        s = self.settings
        max_new = s.max_new_tokens_per_answer * s.n_queries
        context = (
            getattr(model.config.get_text_config(), "max_position_embeddings", None)
            or tokenizer.model_max_length
        )
        logger.info(
            "Data Whisperer: %d episodes, layer %d, %s, up to %d new tokens per episode.",
            len(pending),
            self.layer,
            s.attention_span,
            max_new,
        )
        runner = EpisodeRunner(
            model, tokenizer, int(self.layer), s.attention_span, s.n_queries, self.numeric, max_new
        )
        try:
            with tqdm(total=len(pending), desc="data_whisperer", unit="episode") as progress:
                for batch in _batches(pending, s.prompts_per_call):
                    batch_start = time.perf_counter()
                    fitted = [
                        self._fit(tokenizer, pool, queries, e, int(context) - max_new)
                        for e in batch
                    ]
                    outputs = iter(runner.run([enc for _, enc in fitted if enc is not None]))
                    seconds = (time.perf_counter() - batch_start) / len(batch)
                    log.append(
                        [
                            self._record(
                                episode,
                                kept,
                                None if enc is None else next(outputs),
                                pool,
                                queries,
                                seconds,
                            )
                            for episode, (kept, enc) in zip(batch, fitted, strict=True)
                        ]
                    )
                    progress.update(len(batch))
        finally:
            runner.close()
        return load_s

    def _fit(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pool: list[Example],
        queries: list[Example],
        episode: Episode,
        budget: int,
    ) -> tuple[list[int], EncodedPrompt | None]:
        """The episode's prompt with as many demonstrations as fit the context (None if none)."""
        demos = list(episode.demos)
        query_examples = [queries[i] for i in episode.queries]
        while demos:
            prompt = build_prompt(
                tokenizer, [pool[i] for i in demos], query_examples, self.instruction
            )
            encoded = encode_prompt(tokenizer, prompt)
            if len(encoded.input_ids) <= budget:
                return demos, encoded
            demos.pop()
        return [], None

    def _record(
        self,
        episode: Episode,
        kept: list[int],
        out: Generation | None,
        pool: list[Example],
        queries: list[Example],
        seconds: float,
    ) -> dict[str, Any]:
        """One episode's log line: everything accumulation and the statistics need."""
        query_examples = [queries[i] for i in episode.queries]
        if out is None:
            scores, failures = [0.0] * len(query_examples), 0
        else:
            scores, failures = score_answers(out.text, query_examples, self.metric, self.numeric)
        return {
            "episode": episode.index,
            "attention_layer": self.layer,
            "demo_ids": [pool[i].id for i in kept],
            "dropped": len(episode.demos) - len(kept),
            "query_ids": [q.id for q in query_examples],
            "completion": None if out is None else out.text,
            "query_scores": scores,
            "score": float(np.mean(scores)),
            "parse_failures": failures,
            "attention": [] if out is None else out.attention,
            "new_tokens": 0 if out is None else out.new_tokens,
            "complete": out is not None and out.complete,
            "seconds": seconds,
        }


def _check_layer(layer: int, layers: int) -> None:
    if not 0 <= layer < layers:
        raise ConfigError(
            f"selector_model.attention_layer={layer} is outside the model's layers "
            f"0..{layers - 1}; set it in range, or null for the middle layer."
        )


def _check_examples(examples: Sequence[Example], role: str) -> None:
    """Empty prompts or answers would make meaningless demonstrations or references."""
    for ex in examples:
        if not ex.prompt.strip() or not ex.response.strip():
            part = "prompt" if not ex.prompt.strip() else "answer"
            raise DataError(
                f"{role} example {ex.id!r} has an empty {part}; Data Whisperer needs every "
                "example to have a question and an answer. Remove it from the data."
            )


def _batches(items: Sequence[Episode], size: int) -> Iterator[Sequence[Episode]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _summarise(
    records: Sequence[dict[str, Any]], table: ScoreTable, n_pool: int, n_queries: int
) -> dict[str, float]:
    """Run diagnostics for the score stage's log; rates are over all episodes of the plan."""
    ran = [r for r in records if r["demo_ids"]]
    answers = max(len(ran) * n_queries, 1)
    return {
        "episodes": float(len(records)),
        "truncated_episodes": float(sum(r["dropped"] > 0 for r in records)),
        "skipped_episodes": float(len(records) - len(ran)),
        "dropped_demonstrations": float(sum(r["dropped"] for r in records)),
        "parse_failure_rate": sum(r["parse_failures"] for r in ran) / answers,
        "capped_episodes": float(sum(not r["complete"] for r in ran)),
        "generated_tokens_per_episode": float(np.mean([r["new_tokens"] for r in ran] or [0])),
        "seconds_per_episode": float(np.mean([r["seconds"] for r in ran] or [0])),
        "mean_episode_score": float(np.mean([r["score"] for r in ran] or [0])),
        "unscored_examples": float(np.sum(table.appearances == 0)),
        "distinct_scores": float(len(np.unique(table.score))),
        "pool_size": float(n_pool),
    }
