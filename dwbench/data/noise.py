"""Planted label noise on any task's pool (`task.noise`), the standard test of a data filter.

A real task (GSM8K, DialogSum, BioInstruct, your own files) has no `is_clean` flags, so nothing
can say whether a method finds bad data. With `task.noise.share=s`, a seeded `s` of the pool gets
a corrupted response and every example gets `is_clean` and its `corruption` kind, exactly as the
embedded task records them, so oracle_clean, AUROC, selection precision and `bench calibrate`
work on any task. Only the pool is corrupted: the evaluation split and the task's own query
split (DialogSum's validation) never are.

Kinds, cycled evenly over the corrupted examples in `task.noise.kinds` order (where a kind
cannot change an example, the next one that can is used, and recorded):
- swap: the response of another pool example (one whose response differs).
- truncate: the response cut after a uniform 25-75% of its words (at least one word kept, at
  least one dropped); needs two or more words.
- copy_prompt: the prompt copied as the response.
- foreign: a response of the same number of words in another language: consecutive sentences,
  from a seeded start, of everyday German, French, Spanish or Italian text shipped with dwbench
  (`dwbench/data/foreign_text.json`, written for it), cut to the length. Fluent, on no task.
- shuffle_sentences: the response's sentences (split after . ! ? and at line breaks) in a
  seeded order other than their own; needs two distinct sentences.

Which examples are corrupted depends only on `seed`, `share` and the pool (a seeded permutation,
its first `round(share * n)` entries that some kind can change), so a smaller share corrupts a
subset of a larger one's examples. The share is of the pool after `task.pool_limit`; one that
corrupts none of it or all of it (rounded: 0.01 of 24 examples is 0, 0.99 is 24) is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from dwbench.data.records import Example
from dwbench.errors import ConfigError, DataError

KINDS = ("swap", "truncate", "copy_prompt", "foreign", "shuffle_sentences")
DEFAULTS: dict[str, Any] = {"share": 0.0, "kinds": list(KINDS), "seed": 0}
FOREIGN_TEXT = Path(__file__).with_name("foreign_text.json")
_ORDER_STREAM, _TEXT_STREAM = 0, 1  # which examples, and what they become, from separate streams
_WORD = re.compile(r"\S+")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
_SWAP_TRIES = 32


def check_noise(noise: Any) -> dict[str, Any]:
    """`task.noise` with its defaults, checked; None is noise off."""
    if noise is None:
        return dict(DEFAULTS)
    if not isinstance(noise, Mapping):
        raise ConfigError(
            f"task.noise must be a mapping {{share, kinds, seed}}, got {noise!r}; "
            "e.g. task.noise.share=0.3."
        )
    unknown = sorted(set(noise) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"Unknown key task.noise.{unknown[0]}; valid keys under task.noise: "
            f"{', '.join(DEFAULTS)}."
        )
    args = {**DEFAULTS, **noise}
    share = args["share"]
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share < 1:
        raise ConfigError(
            f"task.noise.share={share!r} is not a share in [0, 1) of the pool to corrupt; pass "
            "e.g. task.noise.share=0.3 (0 turns planted noise off)."
        )
    kinds = args["kinds"]
    if isinstance(kinds, str) or not isinstance(kinds, list | tuple) or not kinds:
        raise ConfigError(
            f"task.noise.kinds={kinds!r} is not a non-empty list of kinds; pass e.g. "
            f"task.noise.kinds=[{','.join(KINDS)}]."
        )
    for kind in kinds:
        if kind not in KINDS:
            raise ConfigError(
                f"task.noise.kinds holds {kind!r}, which is not one of {', '.join(KINDS)}; "
                "drop it or correct its name."
            )
    if len(set(kinds)) != len(kinds):
        raise ConfigError(
            f"task.noise.kinds={list(kinds)} names a kind twice; list each kind once (kinds "
            "are cycled evenly, so a repeat would not weight it)."
        )
    seed = args["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"task.noise.seed={seed!r} is not a whole number >= 0; pass e.g. 0.")
    return {"share": float(share), "kinds": list(kinds), "seed": seed}


@dataclass(frozen=True)
class NoisyPool:
    """The pool with noise planted, and per example id its flag and kind (None: clean)."""

    pool: list[Example]
    clean: dict[str, bool]
    corruption: dict[str, str | None]


def plant_noise(pool: list[Example], noise: Mapping[str, Any]) -> NoisyPool:
    """Corrupt `round(share * len(pool))` examples of `pool` (checked args, `check_noise`)."""
    args = check_noise(noise)
    kinds: list[str] = args["kinds"]
    wanted = round(args["share"] * len(pool))
    if args["share"] > 0 and not 0 < wanted < len(pool):
        # none corrupted: flags saying noise was planted where none was; all: no clean example
        raise DataError(
            f"task.noise.share={args['share']} of the {len(pool)}-example pool corrupts "
            f"{'none' if wanted == 0 else 'all'} of it (round({args['share']} x {len(pool)}) = "
            f"{wanted}); pass a share from {1 / len(pool):.3g} to {1 - 1 / len(pool):.3g}, or "
            "task.noise.share=0 to turn planted noise off."
        )
    order = np.random.default_rng([args["seed"], _ORDER_STREAM]).permutation(len(pool))
    rng = np.random.default_rng([args["seed"], _TEXT_STREAM])
    changed: dict[int, tuple[str, str]] = {}
    for position in order:
        if len(changed) == wanted:
            break
        first = len(changed) % len(kinds)
        for kind in kinds[first:] + kinds[:first]:
            text = _CORRUPT[kind](pool, int(position), rng)
            if text is not None and text != pool[position].response:
                changed[int(position)] = (kind, text)
                break
    if len(changed) < wanted:
        raise DataError(
            f"task.noise.share={args['share']} asks for {wanted} corrupted pool examples, but "
            f"the kinds {', '.join(kinds)} can change only {len(changed)} of the "
            f"{len(pool)}; lower task.noise.share or add kinds (e.g. copy_prompt, foreign)."
        )
    noisy = [
        replace(ex, response=changed[i][1], references=(changed[i][1],)) if i in changed else ex
        for i, ex in enumerate(pool)
    ]
    kind_of = {ex.id: changed[i][0] if i in changed else None for i, ex in enumerate(pool)}
    return NoisyPool(noisy, {i: k is None for i, k in kind_of.items()}, kind_of)


def _swap(pool: list[Example], position: int, rng: np.random.Generator) -> str | None:
    own = pool[position].response
    if len(pool) < 2:
        return None
    for _ in range(_SWAP_TRIES):
        other = int(rng.integers(len(pool) - 1))
        other += other >= position  # any example but this one
        if pool[other].response != own:
            return pool[other].response
    return None


def _truncate(pool: list[Example], position: int, rng: np.random.Generator) -> str | None:
    text = pool[position].response
    words = list(_WORD.finditer(text))
    if len(words) < 2:
        return None
    keep = int(np.clip(round(rng.uniform(0.25, 0.75) * len(words)), 1, len(words) - 1))
    return text[: words[keep - 1].end()]


def _copy_prompt(pool: list[Example], position: int, rng: np.random.Generator) -> str | None:
    return pool[position].prompt


def _foreign(pool: list[Example], position: int, rng: np.random.Generator) -> str | None:
    n_words = len(_WORD.findall(pool[position].response))
    if n_words == 0:
        return None
    text = foreign_text()
    sentences = text[sorted(text)[int(rng.integers(len(text)))]]
    index = int(rng.integers(len(sentences)))
    words: list[str] = []
    while len(words) < n_words:
        words += sentences[index % len(sentences)].split()
        index += 1
    return " ".join(words[:n_words])


def _shuffle_sentences(pool: list[Example], position: int, rng: np.random.Generator) -> str | None:
    text = pool[position].response.strip()
    sentences = [s for s in _SENTENCE_BREAK.split(text) if s]
    if len(set(sentences)) < 2:
        return None
    shuffled = [sentences[i] for i in rng.permutation(len(sentences))]
    if shuffled == sentences:
        shuffled = sentences[1:] + sentences[:1]  # differs: not every sentence is the same
    return ("\n" if "\n" in text else " ").join(shuffled)


_CORRUPT: dict[str, Callable[[list[Example], int, np.random.Generator], str | None]] = {
    "swap": _swap,
    "truncate": _truncate,
    "copy_prompt": _copy_prompt,
    "foreign": _foreign,
    "shuffle_sentences": _shuffle_sentences,
}


@cache
def foreign_text() -> dict[str, list[str]]:
    """Language code -> sentences, from dwbench/data/foreign_text.json."""
    data = json.loads(FOREIGN_TEXT.read_text(encoding="utf-8"))
    return {lang: list(sentences) for lang, sentences in data.items() if not lang.startswith("_")}
