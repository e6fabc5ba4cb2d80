"""What one episode leaves in the log: its line, read from the selector's output.

Accumulation, the statistics and a resumed run read these lines back (log_scores.py), so what a
line holds, and how each query's answer or gold span became a number, lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dwbench.data.records import Example
from dwbench.errors import DwbenchError
from dwbench.methods.data_whisperer.episodes import Episode
from dwbench.methods.data_whisperer.prompts import (
    answer_failed,
    joint_reply,
    separate_answer,
    split_answers,
)
from dwbench.methods.data_whisperer.released import ReleasedOutput, ReleasedPrompts
from dwbench.methods.data_whisperer.runner import EpisodeOutput, RowOutput
from dwbench.methods.data_whisperer.settings import Settings


class EpisodeRecords:
    """DataWhisperer's episode log lines (a mixin: it reads the method's checked settings, its
    task metric and the attention layer it scores at)."""

    settings: Settings
    metric: Callable[[str, Sequence[str]], float]
    numeric: bool
    layer: int | None

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
