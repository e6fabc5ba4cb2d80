"""The method: the scoring run (plan, resume, run the selector) and selection.

Its settings are checked in settings.py, an episode's log line is written by
episode_records.py and the log is read back into scores by log_scores.py.

Registered as `data_whisperer` (and `data_whisperer_likelihood`, the same class with
`query_scoring=likelihood`); config in conf/method/.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dwbench.chat import require_chat_template
from dwbench.content_hash import result_identity, stable_hash
from dwbench.data.metrics import get_metric
from dwbench.data.records import Example
from dwbench.errors import ConfigError, DataError
from dwbench.methods.base import ScoringContext, top_k
from dwbench.methods.data_whisperer.attention import use_capture_attention
from dwbench.methods.data_whisperer.episode_records import EpisodeRecords
from dwbench.methods.data_whisperer.episodes import (
    CHECKPOINT_FILE,
    Episode,
    EpisodeLog,
    plan_episodes,
    read_episode_log,
)
from dwbench.methods.data_whisperer.log_scores import ZERO_SHOT_FILE, LogScores
from dwbench.methods.data_whisperer.prompts import (
    NUMERIC_METRIC,
    EncodedEpisode,
    JointStop,
    SeparateStop,
    build_joint_prompt,
    build_separate_prompt,
    default_instruction,
    encode_episode,
    has_final_answer,
)
from dwbench.methods.data_whisperer.released import ReleasedPrompts, ReleasedRunner
from dwbench.methods.data_whisperer.runner import EpisodeOutput, EpisodeRunner
from dwbench.methods.data_whisperer.settings import Settings

logger = logging.getLogger(__name__)

ZERO_SHOT_ROWS_PER_CALL = 8  # zero-shot rows are short; a runtime choice, not in any key


class DataWhisperer(EpisodeRecords, LogScores):
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
                "dwbench.sweep.plan lists it)."
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
