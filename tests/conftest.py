"""Shared fixtures: an isolated model cache, the converted SmolLM2 (and Gemma-3-270M, where
installed), and tiny models built once."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each (and in every process they start), or their
    # thread pools oversubscribe the cores and each worker runs several times slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402
from tiny_models import build_tiny_model, model_config
from tiny_models import tiny_model_cfg as _tiny_model_cfg

from dwbench.models import embedded_model_dir  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


# Test files that take longest, in that order. With `--dist loadfile --no-loadscope-reorder`
# (the Makefile's PYTEST_ARGS) the workers take files in collection order: starting with the
# longest files balances the two workers (xdist's own order, most tests first, left the two-test
# SLURM file to the end, with the other worker idle for minutes).
LONGEST_FILES_FIRST = (
    "test_slurm.py",
    "test_shards.py",
    "test_cli.py",
    "test_damaged_artifacts.py",
    "test_experiments.py",
    "test_baselines.py",
    "test_data_whisperer.py",
    "test_faults.py",
    "test_probe_faults.py",
    "test_report.py",
    "test_install.py",
    "test_own_method.py",
    "test_gpu_bench.py",
    "test_models.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _shared_tmp(factory: pytest.TempPathFactory) -> Path:
    """A folder every pytest worker of this run sees (the run's own tmp folder otherwise)."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh model cache, also exported as DWBENCH_CACHE so code under test finds it (for
    every test: none writes into the user's cache, such as the MLflow empty store).

    Its `models` folder is shared by this run's workers: the embedded model is converted once
    (the conversion renames its folder into place atomically, and a lock keeps a second worker
    from converting it again meanwhile).
    """
    path = tmp_path_factory.mktemp("dwbench_cache")
    shared_models = _shared_tmp(tmp_path_factory) / "shared_models"
    shared_models.mkdir(exist_ok=True)
    (path / "models").symlink_to(shared_models, target_is_directory=True)
    previous = os.environ.get("DWBENCH_CACHE")
    os.environ["DWBENCH_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("DWBENCH_CACHE", None)
    else:
        os.environ["DWBENCH_CACHE"] = previous


@pytest.fixture(scope="session")
def smollm2_dir(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF (about 20 s, once per test run)."""
    with FileLock(cache_dir / "models" / "convert.lock"):
        return embedded_model_dir(model_config("smollm2_135m"), cache_dir)


@pytest.fixture(scope="session")
def gemma3_dir(cache_dir: Path) -> Path:
    """Gemma-3-270M joined from its chunk packages and converted (about 40 s and 3.4 GB of RAM,
    once per test run). Not part of `make install`: the tests that use it skip until
    `make install-gemma` has run."""
    if importlib.util.find_spec(model_config("gemma3_270m")["embedded"]["package"]) is None:
        pytest.skip("Gemma-3-270M is not installed: make install-gemma")
    with FileLock(cache_dir / "models" / "convert.lock"):
        return embedded_model_dir(model_config("gemma3_270m"), cache_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer (read from the GGUF file, no conversion)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Qwen2 with GPT-2's tokenizer and a plain-text chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_model_cfg() -> Callable[..., dict[str, Any]]:
    """`tiny_model_cfg(folder, arch="llama")`: a model config dict for a tiny model folder."""
    return _tiny_model_cfg
