"""What a selection method is: score every pool example, then keep k of them.

Methods see the pool (ids, prompts, responses), the task's query examples and the selector
model; never the `is_clean` labels (the embedded task's, or planted noise's), which the select
stage reads to report selection precision. A method gets them only when its class declares
`reads_labels = True` (a reference, such as oracle_clean, bounding what a perfect noise filter
could gain); every other method's context has no flags and a task config without what made them
(the generator's and the noise's settings, from which the flags could be drawn again).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from dwbench.data.records import Example
from dwbench.errors import ConfigError, DwbenchError


class CellData(Protocol):
    """What a method may read of a cell's prepared data besides the pool."""

    queries: list[Example] | None
    clean_flags: dict[str, bool] | None


@dataclass(frozen=True)
class GivenData:
    """Queries (and clean flags) that a benchmark hands a method outside a pipeline cell."""

    queries: list[Example] | None
    clean_flags: dict[str, bool] | None = None


@dataclass
class ScoringContext:
    """Everything a method may use besides the pool."""

    method_cfg: Mapping[str, Any]
    task_cfg: Mapping[str, Any]
    selector_cfg: Mapping[str, Any]
    queries: list[Example] | None
    seed: int
    device: str
    cache_dir: Path
    work_dir: Path  # scratch space that survives a kill, for methods that checkpoint
    # LoRA fine-tunes through the train stage's cache: fine_tune(examples, model_cfg=None
    # (the selector), finetune_overrides=None) -> ScorerFineTune; None where no store exists
    fine_tune: Callable[..., Any] | None = None
    # id -> is_clean, for a method whose class declares `reads_labels = True` (a reference such
    # as oracle_clean); None for every other method, and for tasks without labels
    clean_flags: dict[str, bool] | None = None

    @classmethod
    def for_cell(
        cls,
        cfg: Mapping[str, Any],
        data: CellData,
        work_dir: Path,
        *,
        device: str | None = None,
        cache_dir: Path | None = None,
        fine_tune: Callable[..., Any] | None = None,
        reads_labels: bool = False,
    ) -> ScoringContext:
        """The one way to build a method's context: its method, task, selector and seed from the
        composed `cfg`, its queries from `data` (a cell's prepared data, or `GivenData` for a
        benchmark's own), and the clean flags only where `reads_labels` (the method's class
        declares it: `reads_labels(method_class)`). Device and cache folder default to the
        config's (`device`, `cache_dir`)."""
        from dwbench.models import resolve_device

        task_cfg = cfg["task"] if reads_labels else without_label_sources(cfg["task"])
        return cls(
            method_cfg=cfg["method"],
            task_cfg=task_cfg,
            selector_cfg=cfg["selector_model"],
            queries=data.queries,
            seed=int(cfg["seed"]),
            device=device or resolve_device(str(cfg["device"])),
            cache_dir=Path(cache_dir or Path(str(cfg["cache_dir"])).expanduser()),
            work_dir=Path(work_dir),
            fine_tune=fine_tune,
            clean_flags=data.clean_flags if reads_labels else None,
        )

    def require_fine_tune(self, method: str) -> Callable[..., Any]:
        if self.fine_tune is None:
            raise DwbenchError(
                f"method {method} fine-tunes a scorer, which needs the pipeline's artifact "
                "store; run it through `python -m dwbench method=" + method + "`"
            )
        return self.fine_tune


LABEL_SOURCES = ("generator", "noise")  # task settings that draw the is_clean flags


def without_label_sources(task_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The task config a method that reads no labels sees: without the generator's and the
    planted noise's settings, whose seeds would let it draw the flags again."""
    from dwbench.content_hash import to_plain

    return {k: v for k, v in to_plain(task_cfg).items() if k not in LABEL_SOURCES}


def reads_labels(method: type | object) -> bool:
    """Whether a method (class or instance) declares that it reads the is_clean flags."""
    return getattr(method, "reads_labels", False) is True


class SelectionMethod(Protocol):
    needs_selector: bool  # whether scoring loads the selector model (checked before work starts)

    def __init__(self, context: ScoringContext) -> None: ...

    def score(self, pool: list[Example]) -> pd.DataFrame:
        """One row per pool example, in pool order: `id`, `score` (higher = keep), extras."""
        ...

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        """Ids of the k kept examples."""
        ...


class ChecksOptions(Protocol):
    """A method that checks its own options: `check_options` runs in dwbench.validate, before
    anything is written and on every cell `plan`, `status` and `submit` compose, so a bad option
    is refused up front (and an option the method gains later is too, with no list to edit).

    `pool_size` is the pool's size where it is known by then (the run has loaded the data; the
    embedded task's config fixes it), else None. Raise ConfigError naming `method.<key>`.
    """

    @staticmethod
    def check_options(
        method_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], pool_size: int | None
    ) -> None: ...


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: a contiguous block of a method's scoring units."""

    index: int
    count: int

    def units(self, n_units: int) -> range:
        """This shard's units; the first `n_units % count` shards hold one more."""
        size, extra = divmod(n_units, self.count)
        start = self.index * size + min(self.index, extra)
        return range(start, start + size + (self.index < extra))


class ShardableMethod(SelectionMethod, Protocol):
    """A method whose scoring is a sum over independent units (episodes, batches of examples).

    `score_units` scores a block of units into `work_dir` (which survives a kill, so a shard can
    resume) and `merge_units` turns the blocks of every shard into the scores `score` returns:
    the same numbers, since a unit is computed the same way whichever process runs it. Work that
    cannot be split (a scorer fine-tune) goes in `shared_work`, run once before the shards.
    """

    def shard_units(self, pool: list[Example]) -> int:
        """How many independent units scoring this pool takes."""
        ...

    def score_units(self, pool: list[Example], units: range, work_dir: Path) -> dict[str, float]:
        """Score the units into files in `work_dir`; returns this block's statistics."""
        ...

    def merge_units(self, pool: list[Example], shard_dirs: list[Path]) -> pd.DataFrame:
        """The scores of the whole pool from every shard's files, as `score` returns them."""
        ...


SHARD_METHODS = ("shard_units", "score_units", "merge_units")


def is_shardable(method: type | object) -> bool:
    """Whether a method (class or instance) implements ShardableMethod."""
    return all(callable(getattr(method, name, None)) for name in SHARD_METHODS)


def shared_work(method: object, pool: list[Example]) -> None:
    """The part of scoring that cannot be split (a scorer fine-tune), where a method has one."""
    run = getattr(method, "shared_work", None)
    if callable(run):
        run(pool)


def method_stats(method: SelectionMethod) -> dict[str, float]:
    """Diagnostics a method exposes after scoring (parse failures, layer used, ...)."""
    return dict(getattr(method, "stats", {}))


TIE_BREAK_STREAM = 7_919  # a seed stream of its own, apart from the one a method scores with


def method_params(method: SelectionMethod) -> dict[str, Any]:
    """Settings a method resolved while scoring (e.g. Data Whisperer's decoding), for the log."""
    return dict(getattr(method, "params", {}))


def check_target_count(
    method_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], pool_size: int | None
) -> None:
    """`method.n_targets` below the pool size where the targets are held out of the pool (no
    query split), checked before anything is written (`target_examples` draws them)."""
    n_targets = method_cfg.get("n_targets")
    from_pool = task_cfg.get("query_source") != "validation"  # no query split to draw from
    if from_pool and pool_size is not None and n_targets is not None and n_targets >= pool_size:
        raise ConfigError(
            f"method.n_targets={n_targets} must be below the pool's {pool_size} examples "
            "(the targets are held out of it); lower it."
        )


def target_examples(
    pool: list[Example], queries: list[Example] | None, n_targets: int, seed: int
) -> tuple[list[Example], list[int]]:
    """The target examples of the methods that select toward the task (LESS, RDS+), and the pool
    positions that are targets themselves: `n_targets` seeded examples of the task's query split
    (held-out task examples) where it has one, else of the pool. One rule, so such methods
    compare on the same targets."""
    if queries:
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(queries), min(n_targets, len(queries)), replace=False)
        return [queries[i] for i in sorted(picked)], []
    if n_targets >= len(pool):
        raise ConfigError(f"method.n_targets={n_targets} must be below the pool size.")
    rng = np.random.default_rng(seed + 1)
    positions = sorted(rng.choice(len(pool), n_targets, replace=False).tolist())
    return [pool[i] for i in positions], positions


def top_k(scores: pd.DataFrame, k: int, seed: int) -> list[str]:
    """The k highest scores; ties are broken by a permutation drawn from the run's seed.

    Pool order would make every seed of a tied run select the same subset (it is fixed by the
    task's shuffle, not the run seed), and the spread over seeds would not be a spread.
    """
    values = scores["score"].to_numpy(dtype=np.float64)
    tie_break = np.random.default_rng([seed, TIE_BREAK_STREAM]).permutation(len(values))
    order = np.lexsort((tie_break, -values))
    return scores["id"].iloc[order[:k]].tolist()
