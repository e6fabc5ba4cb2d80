"""The method: settings, the scoring run (plan, resume, run, accumulate) and selection.

Registered as `data_whisperer` (and `data_whisperer_likelihood`, the same class with
`query_scoring=likelihood`); config in dwbench/conf/method/.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dwbench.chat import require_chat_template
from dwbench.data.metrics import get_metric
from dwbench.data.records import Example
from dwbench.errors import ConfigError, DataError, DwbenchError
from dwbench.keys import result_identity, stable_hash
from dwbench.methods.base import ScoringContext, top_k
from dwbench.methods.data_whisperer.attention import use_capture_attention
from dwbench.methods.data_whisperer.episodes import (
    ACCUMULATION_SWITCHES,
    AGGREGATIONS,
    ATTENTION_CORRECTIONS,
    CHECKPOINT_FILE,
    EPISODE_ORDERS,
    QUERY_BASELINES,
    READING_SWITCHES,
    Contribution,
    Episode,
    EpisodeLog,
    ScoreTable,
    accumulate,
    accumulate_float16,
    plan_episodes,
    read_episode_log,
    split_half_reliability,
)
from dwbench.methods.data_whisperer.prompts import (
    NUMERIC_METRIC,
    QUERY_LAYOUTS,
    EncodedEpisode,
    JointStop,
    SeparateStop,
    answer_failed,
    build_joint_prompt,
    build_separate_prompt,
    default_instruction,
    encode_episode,
    has_final_answer,
    joint_reply,
    separate_answer,
    split_answers,
)
from dwbench.methods.data_whisperer.released import (
    ReleasedOutput,
    ReleasedPrompts,
    ReleasedRunner,
)
from dwbench.methods.data_whisperer.runner import (
    ATTENTION_SPANS,
    GREEDY,
    EpisodeOutput,
    EpisodeRunner,
    RowOutput,
)

logger = logging.getLogger(__name__)

QUERY_SCORINGS = ("generate", "likelihood")
LIKELIHOOD_SPANS = ("answer", "final")  # the gold tokens a likelihood score averages over
# A likelihood query's score as accumulation reads it: the mean gold-token probability, or the
# span's log-probability (sum over its tokens). Both are logged, so it re-reads the same log.
LIKELIHOOD_SCORES = ("probability", "log_probability")
ZERO_SHOT_FILE = "zero_shot.jsonl"  # query_baseline=zero_shot: each query without demonstrations
ZERO_SHOT_ROWS_PER_CALL = 8  # zero-shot rows are short; a runtime choice, not in any key
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
                    f"{prefix}.{key} is missing; dwbench/conf/method/data_whisperer.yaml lists "
                    "every key."
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


class DataWhisperer:
    """Data Whisperer's scoring; `stats` holds the run's diagnostics after `score`.

    attention_layer, episodes, truncated_episodes / dropped_demonstrations / skipped_episodes
    (context overflow), parse_failure_rate, query_accuracy (share of queries answered right;
    teacher-forced final-number match for likelihood), capped_episodes (a row hit the token cap),
    generated_tokens_per_episode, seconds_per_episode, seconds_per_example (this call, model
    loading excluded), load_seconds, resumed_episodes, episodes_per_call, mean_episode_score,
    unscored_examples (no appearance left), distinct_scores (1: no signal, a warning says so)
    and, with episode_order=random and 2+ passes, split_half_reliability (Spearman between the
    scores of the even and the odd passes: label-free).
    """

    needs_selector = True  # scores with the selector model

    @staticmethod
    def check_options(
        method_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], pool_size: int | None
    ) -> None:
        """Run before anything is written (dwbench.validate), so every Settings check, those of
        options added later included, stops a run before it leaves files or a FAILED run."""
        s = Settings.from_config(method_cfg)
        if pool_size is not None and pool_size < s.n_demos + s.n_queries:
            raise ConfigError(
                f"method.n_demos + method.n_queries = {s.n_demos + s.n_queries} is above the "
                f"pool's {pool_size} examples; lower them or use a larger pool."
            )

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
        if self.settings.likelihood_span == "final" and not self.numeric:
            raise ConfigError(
                f"method.likelihood_span=final scores the gold answer's final `#### n` number, "
                f"which task {context.task_cfg.get('name')!r} (metric {self.metric_name}) does "
                "not have; use method.likelihood_span=answer."
            )
        if self.settings.query_layout == "joint":
            self.instruction = self.settings.instruction or default_instruction(self.metric_name)
        else:
            self.instruction = self.settings.instruction  # a system message only when given
        self.layer = self._configured_layer()
        self.stats: dict[str, float] = {}
        self.params: dict[str, Any] = {}
        self._single_score = 0.0  # the score every example shares, when they all share one
        self.resumed_seconds = 0.0  # decoding time of episodes an earlier attempt finished
        self.resumed_zero_shot_seconds = 0.0  # of it, zero-shot rows an earlier attempt scored

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
        plan, queries, plan_id = self._plan(pool)
        work_dir = Path(self.context.work_dir)
        log, load_s, resumed = self._run_episodes(pool, queries, plan, plan, plan_id, work_dir)
        load_s += self._zero_shot(queries, plan, plan_id, work_dir)
        scores = self._scores(pool, plan, log.records, self._zero_shot_scores(work_dir, plan_id))
        self.stats.update(
            resumed_seconds=self.resumed_seconds,
            resumed_zero_shot_seconds=self.resumed_zero_shot_seconds,
            resumed_episodes=float(resumed),
            load_seconds=load_s,
            seconds_per_example=(time.perf_counter() - start - load_s) / len(pool),
        )
        self._report()
        return scores

    # Sharded scoring (dwbench.methods.base.ShardableMethod): a unit is one batch of episodes,
    # `episodes_per_call` of them, so every shard generates exactly the batches an unsharded run
    # would, and the merged scores are the same numbers.
    def shard_units(self, pool: list[Example]) -> int:
        plan, _, _ = self._plan(pool)
        per_call = self.settings.episodes_per_call(self.context.device)
        return -(-len(plan) // per_call)

    def score_units(self, pool: list[Example], units: range, work_dir: Path) -> dict[str, float]:
        start = time.perf_counter()
        plan, queries, plan_id = self._plan(pool)
        per_call = self.settings.episodes_per_call(self.context.device)
        episodes = plan[units.start * per_call : units.stop * per_call]
        _, load_s, resumed = self._run_episodes(pool, queries, plan, episodes, plan_id, work_dir)
        return {
            "episodes": float(len(episodes)),
            "resumed_seconds": self.resumed_seconds,
            "resumed_episodes": float(resumed),
            "load_seconds": load_s,
            "seconds": time.perf_counter() - start,
        }

    def merge_units(self, pool: list[Example], shard_dirs: list[Path]) -> pd.DataFrame:
        plan, queries, plan_id = self._plan(pool)
        records: dict[int, dict[str, Any]] = {}
        for folder in shard_dirs:
            records.update(read_episode_log(folder / CHECKPOINT_FILE, plan_id))
        missing = [e.index for e in plan if e.index not in records]
        if missing:
            raise DataError(
                f"the score shards in {shard_dirs[0].parent} hold no record of episode(s) "
                f"{missing[:5]} of {len(plan)}: score the missing shard again (python -m "
                "dwbench.plan lists it)."
            )
        work_dir = Path(self.context.work_dir)
        self._zero_shot(queries, plan, plan_id, work_dir)
        scores = self._scores(pool, plan, records, self._zero_shot_scores(work_dir, plan_id))
        self.stats["shards"] = float(len(shard_dirs))
        self._report()
        return scores

    def _plan(self, pool: list[Example]) -> tuple[list[Episode], list[Example], str]:
        """Every episode of the run (from the seed alone), the queries and the plan's id."""
        _check_examples(pool, "pool")
        query_split = self._queries(pool)
        queries = pool if query_split is None else query_split
        s = self.settings
        plan = plan_episodes(
            len(pool),
            None if query_split is None else len(query_split),
            s.n_demos,
            s.n_queries,
            s.episode_order,
            s.passes,
            self.context.seed,
        )
        if s.likelihood_span == "final":
            _check_final_answers([queries[i] for i in sorted({q for e in plan for q in e.queries})])
        return plan, queries, self._plan_id(pool, query_split, plan)

    def _run_episodes(
        self,
        pool: list[Example],
        queries: list[Example],
        plan: list[Episode],
        episodes: list[Episode],
        plan_id: str,
        work_dir: Path,
    ) -> tuple[EpisodeLog, float, int]:
        """Run the episodes the log in `work_dir` lacks: (log, load seconds, episodes resumed)."""
        log = EpisodeLog(work_dir / CHECKPOINT_FILE, plan_id)
        pending = [e for e in episodes if e.index not in log.records]
        resumed = len(episodes) - len(pending)
        if resumed:
            logger.info("Resuming Data Whisperer: %d of %d episodes done.", resumed, len(episodes))
        # what the finished episodes cost an earlier attempt: selection time, so STR, counts it
        self.resumed_seconds += sum(
            float(log.records[e.index].get("seconds", 0.0))
            for e in episodes
            if e.index in log.records
        )
        load_s = self._run(pool, queries, episodes, log) if pending else 0.0
        return log, load_s, resumed

    def _scores(
        self,
        pool: list[Example],
        plan: list[Episode],
        done: Mapping[int, dict[str, Any]],
        zero_shot: Mapping[str, float] | None = None,
    ) -> pd.DataFrame:
        """Accumulate the episodes' records in plan order into the pool's scores."""
        s = self.settings
        records = [done[e.index] for e in plan]
        index = {ex.id: i for i, ex in enumerate(pool)}
        counted = [
            r
            for r in records
            if r["demo_ids"] and not (s.failed_episodes == "skip" and r["parse_failures"] > 0)
        ]
        contributions = []
        for r in counted:
            values = self._query_values(r)
            score = r["score"] if s.likelihood_score == "probability" else float(np.mean(values))
            contributions.append(
                Contribution(
                    [index[i] for i in r["demo_ids"]],
                    score,
                    r["attention"],
                    r.get("query_ids", ()),
                    values,
                    self._effects(r, values) if s.leave_one_out else None,
                )
            )
        table = accumulate(
            len(pool), contributions, s.attention_weighting, zero_shot=zero_shot, **s.accumulation()
        )
        if s.score_arithmetic == "float16":
            table.score, _ = accumulate_float16(
                len(pool),
                (
                    (
                        [index[i] for i in r["demo_ids"]],
                        r["query_scores"],
                        r["attention"] if s.attention_weighting else [1.0] * len(r["demo_ids"]),
                    )
                    for r in counted
                ),
            )
        self.stats = _summarise(records, table, len(pool), s.n_queries)
        self.stats.update(
            attention_layer=float(records[0]["attention_layer"]),
            episodes_per_call=float(s.episodes_per_call(self.context.device)),
        )
        if s.episode_order == "random" and s.passes >= 2:
            per_pass = len(plan) // s.passes  # the plan lists its passes one after another
            passes = {e.index: e.index // per_pass for e in plan}
            self.stats["split_half_reliability"] = split_half_reliability(
                len(pool),
                contributions,
                [passes[int(r["episode"])] for r in counted],
                s.attention_weighting,
                zero_shot=zero_shot,
                **s.accumulation(),
            )
        self.params = {
            "query_layout": s.query_layout,
            "query_scoring": s.query_scoring,
            **({"generation": GREEDY} if s.query_scoring == "generate" else {}),
        }
        self._single_score = float(table.score[0])
        return pd.DataFrame(
            {
                "id": [ex.id for ex in pool],
                "score": table.score,
                "appearances": table.appearances,
                "mean_episode_score": table.mean_episode_score,
                "mean_weight": table.mean_weight,
            }
        )

    def _query_values(self, record: Mapping[str, Any], prefix: str = "") -> list:
        """A record's per-query values as `likelihood_score` reads them (`prefix="blind_"`:
        per demonstration, its queries' values with that demonstration hidden)."""
        if self.settings.likelihood_score == "probability":
            return list(record.get(f"{prefix}query_scores", ()))
        if f"{prefix}query_log_probs" not in record:
            raise DataError(
                "method.likelihood_score=log_probability reads each query's log-probability, "
                "which this episode log lacks (written by an older dwbench): score it again."
            )
        return list(record[f"{prefix}query_log_probs"])

    def _effects(self, record: Mapping[str, Any], values: Sequence[float]) -> list[float]:
        """Per demonstration: mean over the episode's queries of value with it - without it."""
        blind = self._query_values(record, "blind_")
        if len(blind) != len(record["demo_ids"]):
            raise DataError(
                f"episode {record['episode']} has no leave-one-out rows for each of its "
                "demonstrations (a log written without method.leave_one_out?): score it again."
            )
        full = np.asarray(values, dtype=np.float64)
        return [float(np.mean(full - np.asarray(b, dtype=np.float64))) for b in blind]

    def _zero_shot(
        self, queries: list[Example], plan: list[Episode], plan_id: str, work_dir: Path
    ) -> float:
        """With query_baseline=zero_shot, score each query asked without demonstrations, once;
        the rows go to their own resumable log beside the episodes'. Returns load seconds."""
        if self.settings.query_baseline != "zero_shot":
            return 0.0
        log = EpisodeLog(work_dir / ZERO_SHOT_FILE, plan_id)
        asked = sorted({q for e in plan for q in e.queries})
        pending = [q for q in asked if q not in log.records]
        # rows an earlier call scored are selection time all the same (STR counts them)
        earlier = sum(float(log.records[q].get("seconds", 0.0)) for q in asked if q in log.records)
        self.resumed_seconds += earlier
        self.resumed_zero_shot_seconds = earlier
        if not pending:
            return 0.0
        load_start = time.perf_counter()
        model, tokenizer = self._load()
        load_s = time.perf_counter() - load_start
        runner = EpisodeRunner(
            model,
            tokenizer,
            int(self.layer),
            self.settings.attention_span,
            _stop_ids(model, tokenizer),
        )
        per_call = ZERO_SHOT_ROWS_PER_CALL
        try:
            for start in tqdm(range(0, len(pending), per_call), desc="zero-shot", unit="batch"):
                chunk = pending[start : start + per_call]
                batch_start = time.perf_counter()
                encoded = [self._prompt(tokenizer, [], [queries[q]]) for q in chunk]
                if self.settings.query_scoring == "likelihood":
                    outs = runner.likelihood(encoded)
                else:
                    outs = [None] * len(chunk)

                    def keep(b: int, out: EpisodeOutput, outs: list = outs) -> None:
                        outs[b] = out

                    runner.generate(encoded, self._stop_factory(), self._max_new_tokens(), keep)
                records, seconds = [], (time.perf_counter() - batch_start) / len(chunk)
                for q, out in zip(chunk, outs, strict=True):
                    values, _, _, _, log_probs = self._query_scores(out, [queries[q]])
                    records.append(
                        {
                            "episode": q,
                            "query_id": queries[q].id,
                            "query_scores": values,
                            "query_log_probs": log_probs,
                            "seconds": seconds,
                        }
                    )
                log.append(records)
        finally:
            runner.close()
        return load_s

    def _zero_shot_scores(self, work_dir: Path, plan_id: str) -> dict[str, float] | None:
        """query id -> zero-shot value as `likelihood_score` reads it; None unless asked for."""
        if self.settings.query_baseline != "zero_shot":
            return None
        records = read_episode_log(work_dir / ZERO_SHOT_FILE, plan_id)
        return {r["query_id"]: self._query_values(r)[0] for r in records.values()}

    def _report(self) -> None:
        logger.info("Data Whisperer: %s", ", ".join(f"{k}={v:.4g}" for k, v in self.stats.items()))
        if self.stats["distinct_scores"] == 1:
            logger.warning(
                "Data Whisperer: every pool example got the same score (%.4g): the selector model "
                "answered no query correctly (parse_failure_rate=%.2f), so the selection is a "
                "seeded random order. Use a stronger selector model, method.query_layout="
                "separate, or method=data_whisperer_likelihood.",
                self._single_score,
                self.stats["parse_failure_rate"],
            )

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        if self.settings.score_arithmetic == "float16":  # the released output order
            values = torch.tensor(scores["score"].to_numpy(), dtype=torch.float16)
            order = torch.argsort(values, descending=True)[:k].numpy()
            return scores["id"].iloc[order].tolist()
        return top_k(scores, k, self.context.seed)

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
        return self._ready(load_causal_lm(cfg, cache_dir, self.context.device), tokenizer)

    def _ready(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The attention layer checked against the model, and its attention made readable."""
        layers = int(model.config.get_text_config().num_hidden_layers)
        if self.layer is None:
            self.layer = layers // 2
        _check_layer(self.layer, layers)
        use_capture_attention(model)
        return model, tokenizer

    def _max_new_tokens(self) -> int:
        """Per row: one answer in the separate layout, all n_q in the joint one; 0 if forced."""
        s = self.settings
        if s.query_scoring == "likelihood":
            return 0
        per_row = 1 if s.query_layout == "separate" else s.n_queries
        return s.max_new_tokens_per_answer * per_row

    def _run(
        self,
        pool: list[Example],
        queries: list[Example],
        episodes: list[Episode],
        log: EpisodeLog,
    ) -> float:
        """Run the episodes the log lacks, logging each as it finishes; load seconds.

        Batches are the chunks of `episodes_per_call` an uninterrupted run makes, and a chunk
        that a kill left partly done runs whole again (only its missing episodes are logged):
        the episodes of a batch are padded and packed together, so any other grouping would
        change the scores in their last bits, and a resumed run gives the same bytes.
        """
        done_before = set(log.records)
        pending = [e for e in episodes if e.index not in done_before]
        load_start = time.perf_counter()
        model, tokenizer = self._load()
        load_s = time.perf_counter() - load_start
        s = self.settings
        if s.prompt_style == "released":
            self._run_released(model, tokenizer, pool, queries, episodes, log)
            return load_s
        max_new = self._max_new_tokens()
        context = (
            getattr(model.config.get_text_config(), "max_position_embeddings", None)
            or tokenizer.model_max_length
        )
        per_call = s.episodes_per_call(self.context.device)
        logger.info(
            "Data Whisperer: %d episodes, layer %d, %s layout, %s scoring, %s span, %d episodes "
            "per call, up to %d new tokens per row.",
            len(pending),
            self.layer,
            s.query_layout,
            s.query_scoring,
            s.attention_span,
            per_call,
            max_new,
        )
        runner = EpisodeRunner(
            model, tokenizer, int(self.layer), s.attention_span, _stop_ids(model, tokenizer)
        )
        try:
            with tqdm(total=len(pending), desc="data_whisperer", unit="episode") as progress:
                for batch in _batches(episodes, per_call):
                    if all(e.index in done_before for e in batch):
                        continue
                    fitted = [
                        self._fit(tokenizer, pool, queries, e, int(context) - max_new)
                        for e in batch
                    ]
                    skipped = [
                        (e, kept)
                        for e, (kept, enc) in zip(batch, fitted, strict=True)
                        if enc is None and e.index not in done_before
                    ]
                    if skipped:
                        log.append(
                            [self._record(e, kept, None, pool, queries) for e, kept in skipped]
                        )
                        progress.update(len(skipped))
                    runnable = [
                        (e, kept, enc)
                        for e, (kept, enc) in zip(batch, fitted, strict=True)
                        if enc is not None
                    ]
                    if not runnable:
                        continue

                    def done(b: int, out: EpisodeOutput, runnable: list = runnable) -> None:
                        episode, kept, _ = runnable[b]
                        if episode.index in done_before:
                            return
                        log.append([self._record(episode, kept, out, pool, queries)])
                        progress.update(1)

                    encoded = [enc for _, _, enc in runnable]
                    if s.query_scoring == "likelihood":
                        for b, out in enumerate(runner.likelihood(encoded)):
                            done(b, out)
                    else:
                        runner.generate(encoded, self._stop_factory(), max_new, done)
        finally:
            runner.close()
        return load_s

    def _run_released(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pool: list[Example],
        queries: list[Example],
        episodes: list[Episode],
        log: EpisodeLog,
    ) -> None:
        """The episodes the log lacks, as the released code runs them: the plan's chunks of
        `parallel_batches` are padded together, so a chunk a kill left partly done runs whole
        again (only its missing episodes are logged)."""
        done_before = set(log.records)
        pending = [e for e in episodes if e.index not in done_before]
        s = self.settings
        prompts = ReleasedPrompts.load(str(s.prompt_family), str(s.prompt_dataset))
        task = self.context.task_cfg
        template = str(task.get("prompt_template") or "{prompt}")
        task_fields = [str(f) for f in (task.get("fields") or {}).get("prompt") or ["prompt"]]

        def record(example: Example) -> dict[str, str]:
            return prompts.record(example, template, task_fields)

        runner = ReleasedRunner(model, tokenizer, int(self.layer), prompts, s.max_token)
        logger.info(
            "Data Whisperer (released): %d episodes, layer %d, %s prompts for %s, %d per batch, "
            "up to %d tokens in all.",
            len(pending),
            self.layer,
            s.prompt_family,
            s.prompt_dataset,
            s.parallel_batches,
            s.max_token,
        )
        with tqdm(total=len(pending), desc="data_whisperer", unit="episode") as progress:
            for batch in _batches(episodes, s.parallel_batches):
                if all(e.index in done_before for e in batch):
                    continue
                records = [
                    ([record(pool[i]) for i in e.demos], [record(queries[j]) for j in e.queries])
                    for e in batch
                ]
                outputs = runner.run(records) or [None] * len(batch)
                new = [
                    self._released_record(e, demos_queries[1], out, pool, queries, prompts)
                    for e, demos_queries, out in zip(batch, records, outputs, strict=True)
                    if e.index not in done_before
                ]
                log.append(new)
                progress.update(len(new))

    def _released_record(
        self,
        episode: Episode,
        query_records: list[dict[str, str]],
        out: ReleasedOutput | None,
        pool: list[Example],
        queries: list[Example],
        prompts: ReleasedPrompts,
    ) -> dict[str, Any]:
        """One episode's log line, as the released code scores it: more answers than queries
        are cut to the first ones; fewer fail the episode (every query unanswered)."""
        references = [prompts.reference_of(r) for r in query_records]
        predictions = [] if out is None else out.predictions
        failed = len(predictions) < len(references)
        metrics = [prompts.score(p, r) for p, r in zip(predictions, references, strict=False)]
        scores = [0.0] * len(references) if failed else metrics
        return {
            "episode": episode.index,
            "attention_layer": self.layer,
            "demo_ids": [pool[i].id for i in episode.demos],
            "dropped": 0,
            "query_ids": [queries[i].id for i in episode.queries],
            "completions": [] if out is None else [out.generated_text],
            "predictions": predictions,
            "references": references,
            "query_scores": scores,
            "correct": [m == 1.0 for m in scores] if prompts.numbers else [],
            "score": float(np.mean(scores)),
            "parse_failures": len(references) if failed else 0,
            "failed": failed,
            "attention": [] if out is None else out.attention,
            "new_tokens": 0 if out is None else len(out.generated_ids),
            "complete": out is not None and not out.hit_cap,
            "hit_cap": out is not None and out.hit_cap,
            "max_new_tokens": 0 if out is None else out.max_new_tokens,
            "prompt_token_ids": [] if out is None else out.prompt_ids,
            "generated_token_ids": [] if out is None else out.generated_ids,
            "seconds": 0.0 if out is None else out.seconds,
        }

    def _stop_factory(self) -> Any:
        if self.settings.query_layout == "separate":
            return lambda: SeparateStop(self.numeric)
        return lambda: JointStop(self.settings.n_queries, self.numeric)

    def _prompt(
        self, tokenizer: PreTrainedTokenizerBase, demos: list[Example], queries: list[Example]
    ) -> EncodedEpisode:
        gold = self.settings.query_scoring == "likelihood"
        build = (
            build_separate_prompt
            if self.settings.query_layout == "separate"
            else build_joint_prompt
        )
        encoded = encode_episode(
            tokenizer, build(tokenizer, demos, queries, self.instruction, gold)
        )
        return encoded.with_knockouts() if self.settings.leave_one_out else encoded

    def _fit(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pool: list[Example],
        queries: list[Example],
        episode: Episode,
        budget: int,
    ) -> tuple[list[int], EncodedEpisode | None]:
        """The episode with as many demonstrations as fit the context (None if none fit)."""
        demos = list(episode.demos)
        query_examples = [queries[i] for i in episode.queries]
        while demos:
            encoded = self._prompt(tokenizer, [pool[i] for i in demos], query_examples)
            if encoded.longest_row() <= budget:
                return demos, encoded
            demos.pop()
        return [], None

    def _query_scores(
        self, out: EpisodeOutput, queries: Sequence[Example]
    ) -> tuple[list[float], int, list[bool | None], list[str | None], list[float] | None]:
        """Per-query scores, parse failures, whether each query was answered right, completions
        and, for likelihood, each gold span's log-probability."""
        if self.settings.query_scoring == "likelihood":  # one row per query, in query order
            rows = out.rows
            final = self.settings.likelihood_span == "final"
            probs = [p for row in rows for p in (row.final_probs if final else row.gold_probs)]
            correct = [m for row in rows for m in row.number_match]
            log_probs = [float(np.sum(np.log(np.asarray(p, dtype=np.float64)))) for p in probs]
            return [float(np.mean(p)) for p in probs], 0, correct, [], log_probs
        completions = [row.text for row in out.rows]
        if self.settings.query_layout == "separate":
            answers = [separate_answer(text) for text in completions]
        else:  # the completion continues the pre-filled "Answer 1:"
            answers = split_answers(joint_reply(completions[0]), len(queries), self.numeric)
        scores, failures, correct = [], 0, []
        for answer, query in zip(answers, queries, strict=True):
            if answer_failed(answer, self.numeric):
                scores.append(0.0)
                failures += 1
            else:
                scores.append(float(self.metric(answer.strip(), query.references)))
            correct.append(scores[-1] == 1.0 if self.numeric else None)
        return scores, failures, correct, list(completions), None

    def _blind_scores(
        self, rows: Sequence[RowOutput], queries: Sequence[Example], n_demos: int
    ) -> dict[str, list[list[float]]]:
        """The leave-one-out rows read per hidden demonstration: `blind_query_scores[i]` and
        `blind_query_log_probs[i]` are the queries' values without demonstration i."""
        n = len(queries)
        if len(rows) != n * n_demos:
            raise DwbenchError(
                f"expected {n * n_demos} leave-one-out rows ({n_demos} demonstrations x {n} "
                f"queries), got {len(rows)}"
            )
        scores, log_probs = [], []
        for i in range(n_demos):
            part = EpisodeOutput([], list(rows[i * n : (i + 1) * n]))
            values, _, _, _, logs = self._query_scores(part, queries)
            scores.append(values)
            log_probs.append(logs)
        return {"blind_query_scores": scores, "blind_query_log_probs": log_probs}

    def _record(
        self,
        episode: Episode,
        kept: list[int],
        out: EpisodeOutput | None,
        pool: list[Example],
        queries: list[Example],
    ) -> dict[str, Any]:
        """One episode's log line: everything accumulation and the statistics need."""
        query_examples = [queries[i] for i in episode.queries]
        log_probs: list[float] | None = None
        blind: dict[str, list[list[float]]] = {}
        if out is None:
            scores, failures, correct, completions = [0.0] * len(query_examples), 0, [], []
        else:
            n = len(query_examples)
            if self.settings.leave_one_out:  # rows: the n queries, then n per hidden demo
                blind = self._blind_scores(out.rows[n:], query_examples, len(kept))
                out = EpisodeOutput(out.attention, out.rows[:n], out.seconds)
            scores, failures, correct, completions, log_probs = self._query_scores(
                out, query_examples
            )
        return {
            "episode": episode.index,
            "attention_layer": self.layer,
            "demo_ids": [pool[i].id for i in kept],
            "dropped": len(episode.demos) - len(kept),
            "query_ids": [q.id for q in query_examples],
            "completions": completions,
            "query_scores": scores,
            **({} if log_probs is None else {"query_log_probs": log_probs}),
            **blind,
            "correct": correct,
            "score": float(np.mean(scores)),
            "parse_failures": failures,
            "attention": [] if out is None else out.attention,
            "new_tokens": 0 if out is None else sum(row.new_tokens for row in out.rows),
            "complete": out is not None and all(row.complete for row in out.rows),
            "seconds": 0.0 if out is None else out.seconds,
        }


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """End-of-sequence and end-of-turn tokens of the model and its tokenizer."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


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


def _check_final_answers(queries: Sequence[Example]) -> None:
    """likelihood_span=final scores each query's final number: every query must have one."""
    for ex in queries:
        if not has_final_answer(ex.response):
            raise DataError(
                f"query example {ex.id!r} has no final `#### n` line in its answer, which "
                "method.likelihood_span=final scores; fix or remove it, or use "
                "method.likelihood_span=answer."
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
    correct = [c for r in ran for c in r["correct"] if c is not None]
    accuracy = {"query_accuracy": float(np.mean(correct))} if correct else {}
    return {
        **accuracy,
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
