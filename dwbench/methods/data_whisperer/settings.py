"""Data Whisperer's settings: the method config read and checked in one place.

Every bad value or clash between switches fails here, before any model loads or any file is
written (dwbench.validate runs it through `DataWhisperer.check_options`); the scoring run only
ever sees a checked `Settings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from dwbench.errors import ConfigError
from dwbench.methods.data_whisperer.episodes import (
    ACCUMULATION_SWITCHES,
    AGGREGATIONS,
    ATTENTION_CORRECTIONS,
    EPISODE_ORDERS,
    QUERY_BASELINES,
    READING_SWITCHES,
)
from dwbench.methods.data_whisperer.prompts import QUERY_LAYOUTS
from dwbench.methods.data_whisperer.runner import ATTENTION_SPANS

QUERY_SCORINGS = ("generate", "likelihood")
LIKELIHOOD_SPANS = ("answer", "final")  # the gold tokens a likelihood score averages over
# A likelihood query's score as accumulation reads it: the mean gold-token probability, or the
# span's log-probability (sum over its tokens). Both are logged, so it re-reads the same log.
LIKELIHOOD_SCORES = ("probability", "log_probability")
QUERY_SOURCES = ("pool_kfold", "validation")
PROMPT_STYLES = ("dwbench", "released")
SCORE_ARITHMETICS = ("float64", "float16")
FAILED_EPISODES = ("score_zero", "skip")
MAX_PASSES = 1000  # a typo's bound: 1,000 passes of a 200-example pool are 20,000 episodes
# Episodes per batch when method.runtime.prompts_per_call is null, by device type and scoring.
# cpu: measured on 2 cores with `python -m dwbench.bench selection` (docs/data-whisperer.md):
# decoding reads every weight once per step whatever the batch, so more rows per step pay off,
# while a teacher-forced pass is compute-bound and only pays for padding when batched.
# cuda / mps: stated, not measured here (room for 32 episodes of ~1.5k tokens with an 8B
# selector in bf16 on a 40 GB GPU; raise them on larger cards).
EPISODES_PER_CALL = {
    "cpu": {"generate": 8, "likelihood": 1},
    "cuda": {"generate": 32, "likelihood": 16},
    "mps": {"generate": 8, "likelihood": 4},
}


_SWITCHES = (
    "prompt_style",
    "prompt_family",
    "prompt_dataset",
    "max_token",
    "parallel_batches",
    "score_arithmetic",
    "failed_episodes",
    "leave_one_out",
)


@dataclass(frozen=True)
class Settings:
    """The method config, checked: every bad value fails here, before any model is loaded."""

    n_demos: int
    n_queries: int
    query_layout: str
    query_scoring: str
    likelihood_span: str
    attention_span: str
    attention_weighting: bool
    episode_order: str
    passes: int
    query_source: str
    instruction: str | None
    max_new_tokens_per_answer: int
    prompts_per_call: int | None  # None: EPISODES_PER_CALL for the device
    # switches that reproduce the released code (docs/algorithm.md, "Switches")
    prompt_style: str = "dwbench"
    prompt_family: str | None = None  # released prompts: llama3_8b | qwen | mistral
    prompt_dataset: str | None = None  # released prompts: dialogsum | gsm8k | bioinstruct
    max_token: int = 8192  # released prompts: prompt + new tokens
    parallel_batches: int = 1  # released prompts: episodes padded together (changes numbers)
    score_arithmetic: str = "float64"
    failed_episodes: str = "score_zero"
    # how the episode log is accumulated; the defaults are the paper's
    attention_correction: str = "none"
    query_baseline: str = "none"
    aggregation: str = "mean"
    likelihood_score: str = "probability"
    # each demonstration's paired effect: its episode's queries with and without it
    leave_one_out: bool = False

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
        per_call = get("prompts_per_call", runtime, "method.runtime")
        settings = cls(
            n_demos=positive("n_demos", get("n_demos")),
            n_queries=positive("n_queries", get("n_queries")),
            query_layout=choice("query_layout", QUERY_LAYOUTS),
            query_scoring=choice("query_scoring", QUERY_SCORINGS),
            likelihood_span=choice("likelihood_span", LIKELIHOOD_SPANS),
            attention_span=choice("attention_span", ATTENTION_SPANS),
            attention_weighting=weighting,
            episode_order=choice("episode_order", EPISODE_ORDERS),
            passes=positive("passes", get("passes")),
            query_source=choice("query_source", QUERY_SOURCES),
            instruction=None if instruction is None else str(instruction).strip(),
            max_new_tokens_per_answer=positive(
                "max_new_tokens_per_answer", get("max_new_tokens_per_answer")
            ),
            prompts_per_call=None
            if per_call is None
            else positive("prompts_per_call", per_call, "method.runtime"),
        )
        if settings.passes > MAX_PASSES:
            raise ConfigError(
                f"method.passes={settings.passes} is above {MAX_PASSES}: each pass scores the "
                "whole pool again (split-half reliability settles within tens); lower it."
            )
        if settings.episode_order in ("sequential", "released") and settings.passes != 1:
            raise ConfigError(
                f"method.passes={settings.passes} needs method.episode_order=random "
                f"({settings.episode_order} order walks the pool once, as the released code does)."
            )
        if settings.likelihood_span == "final" and settings.query_scoring != "likelihood":
            raise ConfigError(
                "method.likelihood_span=final chooses the gold tokens a likelihood score "
                "averages over; it needs method.query_scoring=likelihood."
            )
        released = settings._released_switches(get, positive, choice)
        return released._accumulation(choice)._leave_one_out(get("leave_one_out"))

    def _accumulation(self, choice: Any) -> Settings:
        """The attribution switches, checked against what they need."""
        fields = {
            "attention_correction": choice("attention_correction", ATTENTION_CORRECTIONS),
            "query_baseline": choice("query_baseline", QUERY_BASELINES),
            "aggregation": choice("aggregation", AGGREGATIONS),
            "likelihood_score": choice("likelihood_score", LIKELIHOOD_SCORES),
        }
        changed = [k for k, v in fields.items() if v != Settings.__dataclass_fields__[k].default]
        if changed and self.score_arithmetic == "float16":
            raise ConfigError(
                f"method.{changed[0]}={fields[changed[0]]} re-reads the episode log in float64; "
                "method.score_arithmetic=float16 reproduces the released accumulation as it is. "
                "Set one of them back to its default."
            )
        if fields["attention_correction"] == "position" and not self.attention_weighting:
            raise ConfigError(
                "method.attention_correction=position corrects the attention weights, but "
                "method.attention_weighting=false uses none; set attention_weighting=true or "
                "attention_correction=none."
            )
        if fields["likelihood_score"] != "probability" and self.query_scoring != "likelihood":
            raise ConfigError(
                f"method.likelihood_score={fields['likelihood_score']} reads teacher-forced gold "
                "answers; it needs method.query_scoring=likelihood."
            )
        if fields["query_baseline"] == "zero_shot" and self.query_layout != "separate":
            raise ConfigError(
                "method.query_baseline=zero_shot scores each query again without "
                "demonstrations, which is one row only in the separate layout; set "
                "method.query_layout=separate."
            )
        return replace(self, **fields)

    def _leave_one_out(self, value: Any) -> Settings:
        """Leave-one-out credits each demonstration with its own with-minus-without effect, so
        nothing is shared out by attention and a query's difficulty cancels in the pair."""
        if not isinstance(value, bool):
            raise ConfigError(f"method.leave_one_out={value!r} must be true or false.")
        if not value:
            return self
        needs = {
            "query_scoring": ("likelihood", "it scores each query twice by teacher forcing"),
            "query_layout": ("separate", "each query row must be its own to hide a demo from"),
            "attention_weighting": (False, "each demonstration's effect is measured, not shared"),
            "attention_correction": ("none", "there are no attention weights to correct"),
            "query_baseline": ("none", "a query's baseline cancels in the with/without pair"),
            "aggregation": ("mean", "the effects are per demonstration already"),
        }
        for key, (wanted, why) in needs.items():
            if getattr(self, key) != wanted:
                shown = str(wanted).lower() if isinstance(wanted, bool) else wanted
                raise ConfigError(
                    f"method.leave_one_out=true needs method.{key}={shown} ({why}); it is "
                    f"{getattr(self, key)}."
                )
        if self.prompt_style == "released" or self.score_arithmetic == "float16":
            raise ConfigError(
                "method.leave_one_out=true is a dwbench variant; set method.prompt_style=dwbench "
                "and method.score_arithmetic=float64."
            )
        return replace(self, leave_one_out=True)

    def _released_switches(self, get: Any, positive: Any, choice: Any) -> Settings:
        """The switches between dwbench's default and the released code, checked together."""
        style = choice("prompt_style", PROMPT_STYLES)
        fields: dict[str, Any] = {
            "prompt_style": style,
            "score_arithmetic": choice("score_arithmetic", SCORE_ARITHMETICS),
            "failed_episodes": choice("failed_episodes", FAILED_EPISODES),
        }
        if style == "released":
            needs = {
                "query_layout": "joint",
                "query_scoring": "generate",
                "attention_span": "query_block",
            }
            for key, value in needs.items():
                if getattr(self, key) != value:
                    raise ConfigError(
                        f"method.prompt_style=released answers every query in one generated "
                        f"completion read over the query block: set method.{key}={value} "
                        f"(it is {getattr(self, key)})."
                    )
            if self.instruction is not None:
                raise ConfigError(
                    "method.instruction is set, but method.prompt_style=released uses the "
                    "released instruction; set method.instruction=null."
                )
            family, dataset = get("prompt_family"), get("prompt_dataset")
            from dwbench.methods.data_whisperer.released import ReleasedPrompts

            ReleasedPrompts.load(str(family), str(dataset))  # both checked, with the fix
            fields.update(
                prompt_family=str(family),
                prompt_dataset=str(dataset),
                max_token=positive("max_token", get("max_token")),
                parallel_batches=positive("parallel_batches", get("parallel_batches")),
            )
        return replace(self, **fields)

    def result_fields(self) -> dict[str, Any]:
        """What decides the scores: everything except the runtime batch size."""
        fields = asdict(self)
        del fields["prompts_per_call"]
        defaults = Settings.__dataclass_fields__
        for key in _SWITCHES:  # at their defaults they leave the plan's id as it was before them
            if fields[key] == defaults[key].default:
                del fields[key]
        for key in READING_SWITCHES:  # they decide the scores, not the episodes
            del fields[key]
        return fields

    def accumulation(self) -> dict[str, str]:
        """The switches `accumulate` takes."""
        return {key: getattr(self, key) for key in ACCUMULATION_SWITCHES}

    def episodes_per_call(self, device: str) -> int:
        if self.prompt_style == "released":
            return self.parallel_batches
        if self.prompts_per_call is not None:
            return self.prompts_per_call
        defaults = EPISODES_PER_CALL.get(device.split(":")[0], EPISODES_PER_CALL["cpu"])
        return defaults[self.query_scoring]
