"""`python -m dwbench.bench gpu`: a clean exit without CUDA, and its code run on a tiny model."""

from __future__ import annotations

import os
import sys

import forked_cli
import pytest
import torch
from test_cli import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_cleanly() -> None:
    done = forked_cli.run(
        [sys.executable, "-m", "dwbench.bench", "gpu"],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device here" in done.stdout


def test_tiny_runs_every_measurement(cache_dir) -> None:
    done = forked_cli.run(
        [sys.executable, "-m", "dwbench.bench", "gpu", "--tiny", "--cache-dir", str(cache_dir)],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    labels = [row.split("|")[1].strip() for row in rows[1:]]
    variants = ["joint-generate", "separate-generate", "joint-likelihood", "separate-likelihood"]
    assert labels == [
        *(f"Data Whisperer {v}" for v in variants),
        "evaluation (greedy generate)",
        "LoRA step",
    ]
    for row in rows[1:]:
        throughput = row.split("|")[3]
        assert float(throughput.split()[0]) > 0, row


def test_runtime_defaults_follow_the_device() -> None:
    from dwbench.methods.data_whisperer.settings import EPISODES_PER_CALL
    from dwbench.stages.evaluate import eval_batch_size

    assert [eval_batch_size(None, d) for d in ("cpu", "cuda:0", "mps")] == [128, 64, 16]
    assert eval_batch_size(4, "cuda") == 4  # a configured size wins
    assert EPISODES_PER_CALL["cuda"]["generate"] > EPISODES_PER_CALL["cpu"]["generate"]
