"""Labels by declaration: a method sees the is_clean flags only when its class says it reads them.

Every registered method (dwbench's own YAMLs and installed entry points; an alias that composes
another's config once) scores a small noisy pool twice: with the flags permuted, and with them
removed (in its context and on disk, prepare's labels.json). A method that reads no labels must
give identical scores; the test method below, which peeks at the flags without declaring it,
shows the check failing.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from test_baselines import _config

from dwbench import pipeline
from dwbench.config_files import CONF_DIR
from dwbench.data import loading
from dwbench.data.records import Example
from dwbench.methods.base import (
    LABEL_SOURCES,
    GivenData,
    ScoringContext,
    reads_labels,
    top_k,
)
from dwbench.methods.registry import installed_methods, method_class
from dwbench.stages import prepare

REGISTERED = sorted(
    {p.stem for p in (CONF_DIR / "method").glob("*.yaml")} | set(installed_methods())
)


def _aliases() -> set[str]:
    """Method configs that compose another one under its name (an old name kept working)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return {m for m in REGISTERED if compose("config", [f"method={m}"]).method.name != m}


ALIASES = _aliases()
DECLARED = {"oracle_clean"}  # the references whose class declares reads_labels
DW_EPISODES = ["method.n_demos=3", "method.n_queries=2"]


def _episodes(method: str) -> list[str]:
    """Data Whisperer's engine sized to the 12-example pool (test_baselines sizes the others)."""
    if method == "data_whisperer_released":  # the released prompts closest to the embedded task,
        # decoding to a cap that a random tiny model reaches in seconds, not 8192 tokens
        return [*DW_EPISODES, "method.prompt_dataset=gsm8k", "method.max_token=640"]
    if "one_shot" in method:
        return ["method.n_queries=4"]
    return DW_EPISODES if method.startswith("data_whisperer") else []


class PeeksAtLabels:
    """A method that reads the flags without declaring it: clean examples first."""

    needs_selector = False

    def __init__(self, context: ScoringContext) -> None:
        self.flags = context.clean_flags or {}
        self.seed = context.seed

    def score(self, pool: list[Example]) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "id": [ex.id for ex in pool],
                "score": [float(self.flags.get(ex.id, 0)) for ex in pool],
            }
        )

    def select(self, scores: pd.DataFrame, k: int) -> list[str]:
        return top_k(scores, k, self.seed)


def _flags_changed(how: str) -> Callable[[Any], Any]:
    """load_task, with the flags it returns permuted or removed (the data itself unchanged)."""
    real = loading.load_task

    def load(task_cfg: Any) -> Any:
        splits = real(task_cfg)
        if how == "removed":
            return dataclasses.replace(splits, clean_flags=None, corruptions=None)
        ids = list(splits.clean_flags)
        values = list(splits.clean_flags.values())
        random.Random(0).shuffle(values)
        assert values != list(splits.clean_flags.values())
        return dataclasses.replace(splits, clean_flags=dict(zip(ids, values, strict=True)))

    return load


def _scores(method: str, results: Path, tiny_llama_dir: Path, *extra: str) -> pd.DataFrame:
    """The method's scores in `results`, computed afresh (scorer fine-tunes are reused)."""
    cfg = _config(method, results, tiny_llama_dir, "stages=[score]", *_episodes(method), *extra)
    shutil.rmtree(results / "artifacts" / "score", ignore_errors=True)
    pipeline.run(cfg)
    (scores,) = (results / "artifacts" / "score").glob("*/scores.csv")
    return pd.read_csv(scores, dtype={"id": str})


def _scored_both_ways(
    method: str, results: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, *extra: str
) -> dict[str, pd.DataFrame]:
    """Scored with the flags removed, then permuted, in one results folder: prepare's folder is
    written without labels.json, then set aside and written with the permuted flags, and the
    scores are computed each time."""
    scored = {}
    for how in ("removed", "permuted"):
        with monkeypatch.context() as patch:
            load = _flags_changed(how)
            patch.setattr(pipeline, "load_task", load)
            patch.setattr(prepare, "load_task", load)
            scored[how] = _scores(method, results, tiny_llama_dir, *extra)
    return scored


@pytest.mark.parametrize("method", sorted(set(REGISTERED) - DECLARED - ALIASES))
def test_a_method_that_reads_no_labels_scores_the_same_whatever_the_flags(
    method: str, tmp_path: Path, tiny_llama_dir: Path, cache_dir: Path, monkeypatch
) -> None:
    scored = _scored_both_ways(method, tmp_path, tiny_llama_dir, monkeypatch)
    pd.testing.assert_frame_equal(scored["removed"], scored["permuted"])


def test_a_method_peeking_at_the_flags_fails_the_check(
    tmp_path: Path, tiny_llama_dir: Path, cache_dir: Path, monkeypatch
) -> None:
    """Given the flags (as a method that declared reads_labels would be), its scores follow them:
    the comparison above would fail on it."""
    monkeypatch.setattr(PeeksAtLabels, "reads_labels", True, raising=False)
    target = f"method._target_={__name__}.PeeksAtLabels"
    scored = _scored_both_ways("random", tmp_path, tiny_llama_dir, monkeypatch, target)
    with pytest.raises(AssertionError):
        pd.testing.assert_frame_equal(scored["removed"], scored["permuted"])


def test_undeclared_the_peeking_method_sees_no_flags_and_no_label_sources() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["task.noise.share=0.3"])
    data = GivenData(queries=None, clean_flags={"pool-0": True})
    context = ScoringContext.for_cell(
        cfg, data, Path("unused"), reads_labels=reads_labels(PeeksAtLabels)
    )
    assert context.clean_flags is None
    assert not set(LABEL_SOURCES) & set(context.task_cfg)
    declared = ScoringContext.for_cell(cfg, data, Path("unused"), reads_labels=True)
    assert declared.clean_flags == {"pool-0": True} and "generator" in declared.task_cfg


def test_only_the_references_declare_that_they_read_labels() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        declaring = {
            name
            for name in REGISTERED
            if reads_labels(method_class(compose("config", [f"method={name}"]).method))
        }
    assert declaring == DECLARED
