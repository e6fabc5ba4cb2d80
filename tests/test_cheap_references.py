"""The nearly free rows every table needs: format rules (what a regular expression finds on
GSM8K-format answers) and response length (the field's "Longest" baseline)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from sklearn.metrics import roc_auc_score
from test_baselines import _config

from dwbench import pipeline
from dwbench.config_files import CONF_DIR
from dwbench.data.embedded import generate_embedded_task
from dwbench.data.records import read_jsonl
from dwbench.errors import ConfigError
from dwbench.methods.format_rules import check_answer

# A real GSM8K training answer (its first example), with a comma-free final and annotations.
GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


def test_a_clean_gsm8k_answer_passes_every_rule_and_each_slip_fails_one() -> None:
    assert check_answer(GSM8K_ANSWER) == dict.fromkeys(check_answer(GSM8K_ANSWER), True)
    assert not check_answer(GSM8K_ANSWER.replace("#### 72", "#### 71"))["final_is_last_step"]
    assert not check_answer(GSM8K_ANSWER.replace("=24>>24", "=25>>25"))["steps_right"]
    assert not check_answer(GSM8K_ANSWER.replace("\n#### 72", ""))["has_final"]
    assert check_answer("It costs 1,200 + 300 = <<1,200+300=1,500>>1,500.\n#### 1,500") == {
        "has_final": True,
        "steps_right": True,
        "final_is_last_step": True,
    }


@pytest.mark.parametrize("difficulty", ["one_step", "two_step", "multi_step"])
def test_the_embedded_tasks_corruptions_are_all_visible_to_the_rules(difficulty: str) -> None:
    """What docs/embedded-task.md says: the embedded noise is syntactic (AUROC 1.0 by rules)."""
    pool, _ = generate_embedded_task(0, 300, 1, 0.3, difficulty=difficulty)
    passed = [sum(check_answer(row["answer"]).values()) for row in pool]
    clean = [row["is_clean"] for row in pool]
    assert all(p == 3 for p, c in zip(passed, clean, strict=True) if c)
    assert roc_auc_score(clean, passed) == 1.0


def _run(method: str, results: Path, tiny_llama_dir: Path) -> pd.DataFrame:
    pipeline.run(_config(method, results, tiny_llama_dir))
    (scores,) = (results / "artifacts" / "score").glob("*/scores.csv")
    return pd.read_csv(scores, dtype={"id": str})


def _selected(results: Path) -> list[str]:
    (ids,) = (results / "artifacts" / "select").glob("*/selected_ids.json")
    return json.loads(ids.read_text())


def test_length_counts_response_tokens_and_keeps_the_longest_or_shortest(
    tmp_path: Path, tiny_llama_dir: Path, cache_dir: Path
) -> None:
    from transformers import AutoTokenizer

    longest = _run("length_longest", tmp_path / "longest", tiny_llama_dir)
    shortest = _run("length_shortest", tmp_path / "shortest", tiny_llama_dir)
    pool = read_jsonl(next((tmp_path / "longest" / "artifacts" / "prepare").glob("*/pool.jsonl")))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    counts = [len(tokenizer(ex.response, add_special_tokens=False)["input_ids"]) for ex in pool]
    assert longest["response_tokens"].tolist() == counts
    assert longest["score"].tolist() == counts and shortest["score"].tolist() == [
        -n for n in counts
    ]
    by_id = dict(zip(longest["id"], counts, strict=True))
    kept_long = sorted(by_id[i] for i in _selected(tmp_path / "longest"))
    kept_short = sorted(by_id[i] for i in _selected(tmp_path / "shortest"))
    assert kept_long == sorted(counts)[-3:] and kept_short == sorted(counts)[:3]


def test_format_rules_select_clean_answers_and_refuse_a_task_without_rules(
    tmp_path: Path, tiny_llama_dir: Path, cache_dir: Path
) -> None:
    scores = _run("format_rules", tmp_path / "rules", tiny_llama_dir)
    labels = json.loads(
        next((tmp_path / "rules" / "artifacts" / "prepare").glob("*/labels.json")).read_text()
    )
    assert all(labels[i] for i in _selected(tmp_path / "rules"))
    assert roc_auc_score([labels[i] for i in scores["id"]], scores["score"]) == 1.0
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", ["method=format_rules", "task=dialogsum"])
    with pytest.raises(ConfigError, match="method=format_rules has rules for GSM8K-format"):
        from dwbench.methods.format_rules import FormatRules

        FormatRules.check_options(cfg.method, cfg.task, None)
