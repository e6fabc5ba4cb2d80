"""The authors' released Data Whisperer, reproduced exactly (`method=data_whisperer_released`).

The released code (github gszfwsb/Data-Whisperer, commit 4e59bf60) differs from dwbench's
default in ways that change its numbers; each is a switch in conf/method/data_whisperer.yaml and
docs/algorithm.md tabulates them. This module holds what `prompt_style: released` means:
- the prompt strings per model family and dataset, kept as data in released_prompts/*.yaml;
- one tokenisation of the whole batch (longest, left-padded with the end-of-sequence token, to a
  multiple of 8 where the dataset's pruner asks for it), greedy `generate` up to the token cap
  `max_token` (prompt plus new tokens), the whole sequence decoded and split on "assistant";
- the dataset's answer regexes, and a fixed metric per dataset (ROUGE-L with the stemmer, or
  float equality of final numbers);
- the attention read-out: a forward pass with eager attention at positions 0..L-1 (padding
  included), layer l's weights summed over heads in float16, cropped after the last pad only
  when there are two pads or more, demonstration spans counted as `len(encode(segment)) - 1`;
- episode plans (2-fold KFold with random_state 42, or consecutive validation chunks) and the
  float16 accumulation with `torch.argsort` order, in episodes.py.
"""

from __future__ import annotations

import re
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import yaml
from rouge_score import rouge_scorer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dwbench.data.records import Example
from dwbench.errors import ConfigError, DwbenchError
from dwbench.methods.data_whisperer.attention import attention_module

PROMPTS_DIR = Path(__file__).with_name("released_prompts")
RELEASED_FAMILIES = ("llama3_8b", "qwen", "mistral")
RELEASED_DATASETS = ("dialogsum", "gsm8k", "bioinstruct")
# the bioinstruct pruner drops "Input:" from a query whose input, stripped and upper-cased, is in
# this list (two entries can never match an upper-cased string; kept as released)
_NO_INPUT = ("", "N/A", "Not applicable", "-", "(No input needed)")
_LAST_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")


@dataclass(frozen=True)
class ReleasedPrompts:
    """One (family, dataset) entry of the released prompt table, with its parser and metric."""

    family: str
    dataset: str
    instruction: str  # system block up to the demonstrations
    demonstration: str  # str.format over the record's fields
    query_instruction: str  # the format reminder before the numbered queries
    query: str  # one query line, str.format over {k} and the record's fields
    query_without_input: str | None  # bioinstruct: the line when the input is empty or N/A
    query_separator: str
    assistant_header: str
    pad_to_multiple_of: int | None
    patterns: tuple[re.Pattern[str], ...]  # tried in turn; the first that matches gives answers
    numbers: bool  # answers are numbers (commas removed, float)
    reference: str  # field: the response field | last_number: its last number
    metric: str  # rouge_l | exact_match
    prompt_fields: tuple[str, ...]
    response_field: str

    @classmethod
    def load(cls, family: str, dataset: str) -> ReleasedPrompts:
        if family not in RELEASED_FAMILIES:
            raise ConfigError(
                f"method.prompt_family={family!r} is not one of {', '.join(RELEASED_FAMILIES)} "
                "(the released code's model_type): llama3_8b for Llama 3, qwen for ChatML "
                "models (Qwen, SmolLM2), mistral for Mistral."
            )
        if dataset not in RELEASED_DATASETS:
            raise ConfigError(
                f"method.prompt_dataset={dataset!r}: the released code has prompts for "
                f"{', '.join(RELEASED_DATASETS)} only; set method.prompt_dataset to the closest "
                "(gsm8k for numeric answers, dialogsum or bioinstruct for text)."
            )
        return _load(family, dataset)

    def record(self, example: Example, prompt_template: str, task_fields: Sequence[str]) -> dict:
        """The raw fields the released templates format, recovered from a dwbench example."""
        if len(task_fields) != len(self.prompt_fields):
            raise ConfigError(
                f"the released {self.dataset} prompt formats the fields "
                f"{', '.join(self.prompt_fields)}, but task.fields.prompt has "
                f"{', '.join(task_fields)}; set method.prompt_dataset to a dataset with "
                f"{len(task_fields)} prompt field(s)."
            )
        values = fields_from_prompt(example.prompt, prompt_template, task_fields)
        record = dict(zip(self.prompt_fields, values, strict=True))
        record[self.response_field] = example.response
        return record

    def segments(
        self, demos: Sequence[Mapping[str, str]], queries: Sequence[Mapping[str, str]]
    ) -> tuple[str, list[str], str]:
        """(instruction, each demonstration's text, the query block): the prompt's three parts."""
        lines = []
        for k, query in enumerate(queries, 1):
            template = self.query
            if self.query_without_input is not None:
                given = query.get("input", "")
                if not (given and given.strip().upper() not in _NO_INPUT):
                    template = self.query_without_input
            lines.append(template.format(k=k, **query))
        block = self.query_instruction + self.query_separator.join(lines) + self.assistant_header
        return self.instruction, [self.demonstration.format(**d) for d in demos], block

    def parse(self, decoded: str) -> list[Any]:
        """The answers in a decoded sequence (prompt and completion): after the last "assistant"."""
        section = decoded.split("assistant")[-1].strip()
        for pattern in self.patterns:
            found = [m.strip() for m in pattern.findall(section)]
            if found:
                break
        if not self.numbers:
            return found
        numbers = []
        for text in found:
            try:
                numbers.append(float(text.replace(",", "")))
            except ValueError:
                continue
        return numbers

    def reference_of(self, record: Mapping[str, str]) -> str:
        value = record[self.response_field]
        if self.reference == "last_number":
            found = _LAST_NUMBER.findall(value)
            return found[-1] if found else ""
        return value

    def score(self, prediction: Any, reference: str) -> float:
        """The released metric: ROUGE-L F1 with the stemmer, or float equality (1.0 / 0.0)."""
        if self.metric == "rouge_l":
            return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)
        try:
            return float(float(reference) == float(prediction))
        except ValueError:
            return 0.0


@cache
def _load(family: str, dataset: str) -> ReleasedPrompts:
    data = yaml.safe_load((PROMPTS_DIR / f"{family}_{dataset}.yaml").read_text(encoding="utf-8"))
    flags = {"DOTALL": re.DOTALL, "IGNORECASE": re.IGNORECASE}
    patterns = tuple(
        re.compile(p["regex"], sum((flags[f] for f in p["flags"]), 0))
        for p in data["parser"]["patterns"]
    )
    return ReleasedPrompts(
        family=data["family"],
        dataset=data["dataset"],
        instruction=data["instruction"],
        demonstration=data["demonstration"],
        query_instruction=data["query_instruction"],
        query=data["query"],
        query_without_input=data["query_without_input"],
        query_separator=data["query_separator"],
        assistant_header=data["assistant_header"],
        pad_to_multiple_of=data["pad_to_multiple_of"],
        patterns=patterns,
        numbers=bool(data["parser"]["numbers"]),
        reference=data["reference"],
        metric=data["metric"],
        prompt_fields=tuple(data["fields"]["prompt"]),
        response_field=data["fields"]["response"],
    )


@cache
def _rouge() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def fields_from_prompt(prompt: str, template: str, names: Sequence[str]) -> list[str]:
    """Invert `template.format(**fields)`: the values of `names` in a formatted prompt.

    A task's loader drops an empty later field and keeps the first alone (BioInstruct without
    input), so a prompt that does not match the template is the first field, the rest empty.
    """
    pattern = ""
    for literal, field, _, _ in string.Formatter().parse(template):
        pattern += re.escape(literal)
        if field is not None:
            if field not in names:
                raise ConfigError(
                    f"task.prompt_template uses {{{field}}}, which is not in task.fields.prompt."
                )
            pattern += f"(?P<{field}>.*?)" if pattern else f"(?P<{field}>.*)"
    found = re.fullmatch(pattern, prompt, re.DOTALL)
    if found is None:
        return [prompt.strip(), *[""] * (len(names) - 1)]
    return [found.group(name) for name in names]


@dataclass
class ReleasedOutput:
    """What the released code computes for one episode."""

    prompt_ids: list[int]  # without padding
    generated_ids: list[int]
    generated_text: str  # the new tokens decoded, special tokens skipped
    max_new_tokens: int
    hit_cap: bool
    predictions: list[Any]  # parsed, before truncation to the number of queries
    attention: list[float]  # raw a_i (float16 values)
    seconds: float


class ReleasedRunner:
    """A batch of episodes as the released `predict_batch` runs it (`parallel_batches` wide)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layer: int,
        prompts: ReleasedPrompts,
        max_token: int,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ConfigError("the selector's tokenizer has no end-of-sequence token to pad with")
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.max_token = max_token
        self.pad_id = int(tokenizer.eos_token_id)
        model.set_attn_implementation("eager")  # the released code loads the model so
        self.module = attention_module(model, layer)

    def run(
        self, episodes: Sequence[tuple[Sequence[Mapping[str, str]], Sequence[Mapping[str, str]]]]
    ) -> list[ReleasedOutput] | None:
        """Each (demos, queries) episode's output; None when the padded prompt leaves no room
        for new tokens (the released code crashes there; dwbench records a failed episode)."""
        start = time.perf_counter()
        parts = [self.prompts.segments(demos, queries) for demos, queries in episodes]
        texts = [inst + "".join(demos) + block for inst, demos, block in parts]
        ids, mask = self._encode(texts)
        max_new = self.max_token - ids.shape[1]
        if max_new <= 0:
            return None
        generated = self._generate(ids, mask, max_new)
        decoded = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        heads = self._layer_attention(ids, mask)
        outputs = []
        for b, (inst, demos, block) in enumerate(parts):
            new = generated[b, ids.shape[1] :].tolist()
            outputs.append(
                ReleasedOutput(
                    prompt_ids=ids[b][mask[b].bool()].tolist(),
                    generated_ids=new,
                    generated_text=self.tokenizer.decode(new, skip_special_tokens=True),
                    max_new_tokens=max_new,
                    hit_cap=len(new) == max_new and self.pad_id not in new,
                    predictions=self.prompts.parse(decoded[b]),
                    attention=self._demo_attention(heads[b], mask[b], inst, demos, block),
                    seconds=0.0,
                )
            )
        for out in outputs:
            out.seconds = (time.perf_counter() - start) / len(outputs)
        return outputs

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        side, pad = self.tokenizer.padding_side, self.tokenizer.pad_token
        self.tokenizer.padding_side, self.tokenizer.pad_token = "left", self.tokenizer.eos_token
        try:
            enc = self.tokenizer(
                texts,
                return_tensors="pt",
                truncation=False,
                padding="longest",
                pad_to_multiple_of=self.prompts.pad_to_multiple_of,
            )
        finally:
            self.tokenizer.padding_side, self.tokenizer.pad_token = side, pad
        return enc["input_ids"], enc["attention_mask"]

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new: int) -> torch.Tensor:
        device = self.model.device
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=self.pad_id,
            )
        return out.cpu()

    def _layer_attention(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Layer l's eager attention summed over heads, in float16: (batch, L, L).

        Positions run 0..L-1 over the padding too, as the released manual forward sets them;
        the forward stops once layer l has run.
        """
        captured: list[torch.Tensor] = []

        def grab(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured.append(output[1])
            raise _LayerDone

        handle = self.module.register_forward_hook(grab)
        device = self.model.device
        positions = torch.arange(ids.shape[1])[None, :]
        try:
            with torch.inference_mode():
                self.model.model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=positions.to(device),
                    use_cache=False,
                )
        except _LayerDone:
            pass
        finally:
            handle.remove()
        if not captured or captured[0] is None:
            raise DwbenchError(
                f"{type(self.model).__name__}'s eager attention returned no weights; the "
                "released read-out needs them"
            )
        return torch.sum(captured[0], dim=1).to(dtype=torch.float16).cpu()

    def _demo_attention(
        self, attn: torch.Tensor, mask: torch.Tensor, inst: str, demos: list[str], block: str
    ) -> list[float]:
        """a_i with the released span arithmetic, in float16 (see the module docstring)."""
        pads = int((mask == 0).sum())
        if pads >= 2:  # with 0 or 1 pad the released crop raises and the full matrix is used
            attn = attn[pads:, pads:]

        def length(text: str) -> int:
            return len(self.tokenizer.encode(text)) - 1

        n_i, n_d, n_r = length(inst), length("".join(demos)), length(block)
        to_demos = attn[n_i + n_d : n_i + n_d + n_r, n_i : n_i + n_d]
        weights, start = [], 0
        for demo in demos:
            n = length(demo)
            weights.append(float(to_demos[:, start : start + n].sum() / (n * n_r)))
            start += n
        return weights


class _LayerDone(Exception):
    """Raised from the hook on layer l: nothing after it is needed."""
