"""What users run first: the embedded default (SmolLM2-135M, generated task), shrunk to seconds."""

from __future__ import annotations

import json

import pytest
from test_cli import finished_keys, run_cli, runs_of


@pytest.mark.slow
def test_embedded_default_end_to_end(tmp_path, smollm2_dir, cache_dir) -> None:
    result = run_cli(
        [
            "task.generator.pool_size=16",
            "task.generator.eval_size=3",
            "budget=0.5",
            "finetune.max_steps=2",
            "eval.max_new_tokens=48",
        ],
        tmp_path,
        cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedded_gsm" in result.stdout and "random" in result.stdout
    for stage in ("prepare", "score", "select", "train", "evaluate"):
        assert len(finished_keys(tmp_path, stage)) == 1, stage
    evaluation = next(r for r in runs_of(tmp_path) if r.data.tags["stage"] == "evaluate")
    assert evaluation.data.tags["target"] == "smollm2_135m"
    assert evaluation.data.metrics["adapter_logit_change"] > 1e-4
    samples = next((tmp_path / "artifacts/evaluate").glob("*/samples.jsonl")).read_text()
    predictions = [json.loads(line)["prediction"] for line in samples.splitlines()]
    assert len(predictions) == 3 and all(p.strip() for p in predictions)
