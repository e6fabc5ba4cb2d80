"""Shared fixtures: an isolated model cache, the converted SmolLM2, and tiny models built once."""

from __future__ import annotations

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
from tiny_models import build_tiny_model, model_config
from tiny_models import tiny_model_cfg as _tiny_model_cfg

from dwbench.models import embedded_model_dir  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh model cache, also exported as DWBENCH_CACHE so code under test finds it."""
    path = tmp_path_factory.mktemp("dwbench_cache")
    previous = os.environ.get("DWBENCH_CACHE")
    os.environ["DWBENCH_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("DWBENCH_CACHE", None)
    else:
        os.environ["DWBENCH_CACHE"] = previous


@pytest.fixture(scope="session")
def smollm2_dir(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF (about 20 s, once per session)."""
    return embedded_model_dir(model_config("smollm2_135m"), cache_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", cache_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Qwen2 with GPT-2's tokenizer and a plain-text chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_model_cfg() -> Callable[..., dict[str, Any]]:
    """`tiny_model_cfg(folder, arch="llama")`: a model config dict for a tiny model folder."""
    return _tiny_model_cfg
