"""Sharded scoring: shards partition the units, and merged scores equal an unsharded run's.

On CPU the equality is bitwise: a unit (a batch of episodes, a batch of examples) is computed
the same way whichever process runs it, and the merge adds the units up in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from test_cli import run_cli, run_in_process, tiny_overrides
from test_data_whisperer import _method, _pool

from dwbench.methods.base import Shard


@pytest.mark.parametrize("n_units", [0, 1, 2, 5, 7, 12])
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_partition_the_units_in_order(n_units: int, count: int) -> None:
    blocks = [Shard(i, count).units(n_units) for i in range(count)]
    assert [u for block in blocks for u in block] == list(range(n_units))
    sizes = [len(block) for block in blocks]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("count", [2, 3])
def test_data_whisperer_shards_merge_to_the_unsharded_scores(
    tmp_path: Path,
    tiny_qwen2_dir: Path,
    tiny_model_cfg: Callable[..., dict[str, Any]],
    count: int,
) -> None:
    selector = tiny_model_cfg(tiny_qwen2_dir, "qwen2")
    settings = {
        "n_demos": 2,
        "n_queries": 2,
        "max_new_tokens_per_answer": 2,
        "runtime": {"prompts_per_call": 2},  # a unit is a batch of two episodes
    }
    pool = _pool(13)  # folds of 7 and 6: 4 + 3 = 7 episodes, 4 units (the last holds one)
    whole = _method(tmp_path / "whole", selector, **settings)
    expected = whole.score(pool)
    folders, episodes = [], 0
    for index in range(count):
        folder = tmp_path / f"shard-{index}"
        method = _method(folder, selector, **settings)
        n_units = method.shard_units(pool)
        assert n_units == 4
        episodes += method.score_units(pool, Shard(index, count).units(n_units), folder)["episodes"]
        folders.append(folder)
    assert episodes == whole.stats["episodes"] == 7
    merger = _method(tmp_path / "merge", selector, **settings)
    merged = merger.merge_units(pool, folders)
    pd.testing.assert_frame_equal(merged, expected, check_exact=True)
    assert merger.stats["episodes"] == 7
    assert merger.stats["query_accuracy"] == whole.stats["query_accuracy"]


def test_a_missing_shard_is_named_not_merged(
    tmp_path: Path, tiny_qwen2_dir: Path, tiny_model_cfg: Callable[..., dict[str, Any]]
) -> None:
    from dwbench.errors import DataError

    selector = tiny_model_cfg(tiny_qwen2_dir, "qwen2")
    settings = {
        "n_demos": 2,
        "n_queries": 2,
        "max_new_tokens_per_answer": 2,
        "runtime": {"prompts_per_call": 1},
    }
    pool = _pool(8)  # 4 episodes, 4 units: shard 0 of 2 holds two
    method = _method(tmp_path / "a", selector, **settings)
    method.score_units(pool, Shard(0, 2).units(method.shard_units(pool)), tmp_path / "a")
    with pytest.raises(DataError, match="score the missing shard again"):
        _method(tmp_path / "m", selector, **settings).merge_units(pool, [tmp_path / "a"])


def _scores_csv(results: Path) -> bytes:
    (path,) = (results / "artifacts" / "score").glob("*/scores.csv")
    return path.read_bytes()


def test_a_sharded_cell_equals_the_unsharded_cell(tmp_path: Path, tiny_llama_dir, cache_dir):
    """The pipeline: S=2 through one `python -m dwbench` (shards, then merge) gives the
    unsharded scores.csv. (One part per process, as SLURM runs them, with a cancelled shard:
    tests/test_slurm.py.)"""
    cell = [
        "method=data_whisperer_separate",
        "stages=[score]",
        "method.n_demos=3",
        "method.n_queries=2",
        *tiny_overrides(tiny_llama_dir),
        "task.answer_max_tokens=4",
        "method.runtime.prompts_per_call=2",  # 8 episodes: 4 units of 2
    ]
    run_in_process(cell, tmp_path / "plain")
    two = run_cli([*cell, "score.shards=2"], tmp_path / "two", cache_dir)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _scores_csv(tmp_path / "two") == _scores_csv(tmp_path / "plain")
    assert len(list((tmp_path / "two" / "artifacts" / "score_shard").glob("*/_SUCCESS.json"))) == 2


def test_a_method_that_cannot_shard_scores_in_one_piece_and_has_no_parts(
    tmp_path: Path, cache_dir
) -> None:
    part = run_cli(["method=oracle_clean", "score.shards=2", "score.shard=1"], tmp_path, cache_dir)
    assert part.returncode == 2
    assert "cannot split its scoring into shards" in part.stderr
    assert not (tmp_path / "artifacts").exists()
    whole = run_cli(
        ["method=oracle_clean", "score.shards=2", "stages=[score]"], tmp_path, cache_dir
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "scoring it in one piece" in whole.stdout + whole.stderr
    assert not (tmp_path / "artifacts" / "score_shard").exists()


# Per-example methods and the overrides that cut their scoring into several units.
PER_EXAMPLE_SHARDING = {
    "perplexity_middle": ["method.runtime.batch_size=2"],  # 6 batches of the 12 examples
    "el2n": ["method.runtime.batch_size=4"],
    "ccs": [],
    "grand": [],  # a unit per example
    "less": ["method.runtime.examples_per_shard=4"],  # 3 feature blocks
    "s2l": ["method.runtime.batch_size=4"],
    "nuggets": [],  # a unit per candidate
    "ifd": ["method.runtime.batch_size=4"],
}


@pytest.mark.parametrize(("method", "extra"), PER_EXAMPLE_SHARDING.items())
def test_per_example_methods_merge_to_the_unsharded_scores(
    method: str, extra: list[str], tmp_path: Path, tiny_llama_dir: Path, cache_dir: Path
) -> None:
    """Three shards run one by one as SLURM jobs would (the scorer fine-tune first), then the
    merge: the same scores.csv as one unsharded run, and the same selection. The sharded run
    is a second run with the same seed (its own scorer fine-tune included), so this is also the
    method's same-seed check (tests/test_baselines.py)."""
    from test_baselines import _config, checked_selection

    from dwbench import pipeline

    plain = tmp_path / "plain"
    pipeline.run(_config(method, plain, tiny_llama_dir, *extra))
    checked_selection(method, plain)
    sharded = tmp_path / "sharded"
    parts = ["shared", 0, 1, 2] if method != "perplexity_middle" else [2, 0, 1]
    for part in parts:
        outcome = pipeline.run(
            _config(
                method, sharded, tiny_llama_dir, *extra, "score.shards=3", f"score.shard={part}"
            )
        )
        assert outcome.last_stage in {"score", "score_shard"}
    assert not (sharded / "artifacts" / "score").is_dir()
    pipeline.run(_config(method, sharded, tiny_llama_dir, *extra, "score.shards=3"))
    assert _scores_csv(sharded) == _scores_csv(plain)
    (plain_ids,) = (plain / "artifacts" / "select").glob("*/selected_ids.json")
    (sharded_ids,) = (sharded / "artifacts" / "select").glob("*/selected_ids.json")
    assert plain_ids.read_text() == sharded_ids.read_text()
    checked_selection(method, sharded)
