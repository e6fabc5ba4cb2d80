"""The released preset (`method=data_whisperer_released`) pinned against the authors' code.

The figures in tests/fixtures/released_dialogsum_figures.json come from a run of the released
code (indices, counts, metrics, attention weights, final scores and order; no data rows), so
the plan, the float16 arithmetic and the output order are checked without the reference data.
`python -m dwbench.bench parity` checks the rest (prompts, generations, answers) on the data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from dwbench.config_files import CONF_DIR
from dwbench.data.embedded import generate_embedded_task
from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods.base import ScoringContext
from dwbench.methods.data_whisperer import method as dw
from dwbench.methods.data_whisperer.episodes import accumulate_float16, plan_episodes
from dwbench.methods.data_whisperer.released import (
    RELEASED_DATASETS,
    RELEASED_FAMILIES,
    ReleasedPrompts,
    ReleasedRunner,
    fields_from_prompt,
)
from dwbench.methods.data_whisperer.settings import Settings

FIGURES = json.loads(
    (Path(__file__).parent / "fixtures" / "released_dialogsum_figures.json").read_text()
)


def test_validation_plan_is_the_released_one() -> None:
    plan = plan_episodes(
        FIGURES["pool_size"],
        FIGURES["query_split_size"],
        FIGURES["n_demos"],
        FIGURES["n_queries"],
        "released",
        1,
        seed=123,  # the released plan ignores the seed
    )
    assert [list(e.demos) for e in plan] == [e["demo_indices"] for e in FIGURES["episodes"]]
    assert [list(e.queries) for e in plan] == [e["query_indices"] for e in FIGURES["episodes"]]


def test_validation_plan_wraps_the_query_chunks() -> None:
    plan = plan_episodes(20, 7, 5, 3, "released", 1, seed=0)
    assert [list(e.queries) for e in plan] == [[0, 1, 2], [3, 4, 5], [6], [0, 1, 2]]


def test_kfold_plan_matches_sklearn_and_uses_every_example_once() -> None:
    from sklearn.model_selection import KFold

    plan = plan_episodes(23, None, 5, 3, "released", 1, seed=7)
    folds = list(KFold(n_splits=2, shuffle=True, random_state=42).split(np.arange(23)))
    demos = [i for e in plan for i in e.demos]
    assert sorted(demos) == list(range(23))
    first_fold = [e for e in plan if e.demos[0] in set(folds[0][0])]
    assert [i for e in first_fold for i in e.demos] == list(folds[0][0])  # ascending, chunked
    assert list(first_fold[0].queries) == list(folds[0][1][:3])  # pointer restarts per fold
    for e in plan:
        fold = 0 if e in first_fold else 1
        assert set(e.queries) <= set(folds[fold][1])


def test_float16_replay_gives_the_released_scores_and_order_bit_for_bit() -> None:
    episodes = FIGURES["episodes"]
    final, order = accumulate_float16(
        FIGURES["pool_size"],
        (
            (e["demo_indices"], e["query_metric"], e["attention_weights_raw"])
            for e in episodes
            if not e["failed"]
        ),
    )
    assert final.tolist() == FIGURES["scores"]
    assert order.tolist() == FIGURES["released_order"]


def test_raw_weights_are_float16_values_and_the_last_demonstration_dominates() -> None:
    for e in FIGURES["episodes"]:
        raw = np.asarray(e["attention_weights_raw"])
        assert np.array_equal(raw, raw.astype(np.float16).astype(np.float64))
        assert np.allclose(raw / raw.sum(), e["attention_weights_normalised"], rtol=1e-12)
        assert 0.33 <= e["attention_weights_normalised"][-1] <= 0.55  # position, mostly


def test_pad_counts_follow_the_multiple_of_eight() -> None:
    """Episode 1 has exactly one pad (the released crop is skipped there), episode 5 none."""
    pads = [(-e["prompt_token_count"]) % 8 for e in FIGURES["episodes"]]
    cap = 2944
    assert [cap - e["max_new_tokens"] for e in FIGURES["episodes"]] == [
        e["prompt_token_count"] + p for e, p in zip(FIGURES["episodes"], pads, strict=True)
    ]
    assert pads[1] == 1 and pads[5] == 0


@pytest.mark.parametrize("family", RELEASED_FAMILIES)
@pytest.mark.parametrize("dataset", RELEASED_DATASETS)
def test_every_released_prompt_loads_and_formats(family: str, dataset: str) -> None:
    spec = ReleasedPrompts.load(family, dataset)
    record = {name: f"<{name}>" for name in (*spec.prompt_fields, spec.response_field)}
    inst, demos, block = spec.segments([record, record], [record, record, record])
    assert len(demos) == 2 and all(f"<{spec.response_field}>" in d for d in demos)
    assert block.startswith(spec.query_instruction) and block.endswith(spec.assistant_header)
    assert block.count(f"<{spec.prompt_fields[0]}>") == 3
    assert "{" not in inst + "".join(demos) + block


def test_qwen_dialogsum_prompt_is_the_released_text() -> None:
    spec = ReleasedPrompts.load("qwen", "dialogsum")
    inst, demos, block = spec.segments(
        [{"dialogue": "#Person1#: Hi.", "summary": "They greet."}],
        [{"dialogue": "#Person1#: Bye.", "summary": "x"}],
    )
    assert inst.startswith("<|im_start|>system\nYou are an expert assistant.")
    assert inst.endswith(
        "<|im_start|>user\nBelow are some demonstrations of how to format your answers:\n"
    )
    assert demos == ["Dialogue: #Person1#: Hi.\nSummary: \nThey greet.\n"]
    assert block.endswith('Dialogue 1: "#Person1#: Bye.\n"<|im_end|>\n\n<|im_start|>assistant')


def test_qwen_dialogsum_strings_tokenise_to_the_released_prompt_ids() -> None:
    """Every released prompt starts with the instruction's 170 SmolLM2 tokens and ends with
    the assistant header's 5; the released span arithmetic then counts n_i = 169."""
    from tiny_models import _smollm2_tokenizer

    tokenizer = _smollm2_tokenizer()
    spec = ReleasedPrompts.load("qwen", "dialogsum")
    assert tokenizer.encode(spec.instruction) == FIGURES["instruction_token_ids"]
    assert tokenizer.encode(spec.assistant_header) == FIGURES["prompt_end_token_ids"]
    assert tokenizer.encode("x")[0] != tokenizer.bos_token_id  # no BOS: every `- 1` is short


def test_bioinstruct_queries_drop_an_empty_or_na_input_only() -> None:
    spec = ReleasedPrompts.load("llama3_8b", "bioinstruct")
    queries = [
        {"instruction": "a", "input": "x"},
        {"instruction": "b", "input": " n/a "},
        {"instruction": "c", "input": "Not applicable"},  # never matches once upper-cased
        {"instruction": "d", "input": ""},
    ]
    _, _, block = spec.segments([], queries)
    assert 'Question 1: Instruction: "a" Input: "x"' in block
    assert 'Question 2: Instruction: "b"\n' in block
    assert 'Question 3: Instruction: "c" Input: "Not applicable"' in block
    assert 'Question 4: Instruction: "d"<|eot_id|>' in block


def test_parsers_read_as_the_released_code_reads() -> None:
    dialog = ReleasedPrompts.load("qwen", "dialogsum")
    text = "system You are an expert assistant. user ... assistant\n"
    text += "Dialogue 1:\nDialogue 2: B\nSummary 3: C"
    # the split is at the last "assistant"; `\s+`/`\s*` cross newlines: "Dialogue 1:\nDialogue 2:"
    # yields the prediction "Dialogue 2: B"
    assert dialog.parse(text) == ["Dialogue 2: B", "C"]
    assert dialog.parse("assistant says: assistant\nSummary 1: only") == ["only"]
    gsm = ReleasedPrompts.load("llama3_8b", "gsm8k")
    assert gsm.parse("assistant\nQuestion 1 Answer: 2+2\n#### 1,234\n#### 5.5\n#### x") == [
        1234.0,
        5.5,
    ]
    assert gsm.reference_of({"answer": "3 * 4 = 12 apples\n#### 12"}) == "12"
    assert gsm.score(12.0, "12") == 1.0 and gsm.score(12.5, "12") == 0.0
    bio = ReleasedPrompts.load("mistral", "bioinstruct")
    assert bio.parse("assistant **Question 1 Answer:** yes\nQuestion 2 Answer: no") == ["yes", "no"]
    assert bio.parse("assistant\nAnswer 1: a\nAnswer 2: b") == ["a", "b"]


def test_fields_are_recovered_from_the_task_prompt() -> None:
    template = "{instruction}\n\nInput:\n{input}"
    names = ["instruction", "input"]
    assert fields_from_prompt("Do X.\n\nInput:\nabc", template, names) == ["Do X.", "abc"]
    assert fields_from_prompt("Do X.", template, names) == ["Do X.", ""]  # empty input dropped
    dialog = "Summarize the following dialogue.\n\n{dialogue}"
    assert fields_from_prompt(dialog.format(dialogue="A: hi"), dialog, ["dialogue"]) == ["A: hi"]


def _settings(**overrides: Any) -> Settings:
    cfg = OmegaConf.to_container(
        OmegaConf.load(CONF_DIR / "method" / "data_whisperer.yaml"), resolve=False
    )
    cfg.update(query_source="pool_kfold", max_new_tokens_per_answer=64, prompt_dataset="gsm8k")
    cfg.update(overrides)
    return Settings.from_config(cfg)


def test_released_prompts_refuse_settings_they_cannot_honour() -> None:
    assert _settings().result_fields().keys().isdisjoint({"prompt_style", "max_token"})
    released = _settings(prompt_style="released", episode_order="released")
    assert released.episodes_per_call("cpu") == 1
    with pytest.raises(ConfigError, match="method.query_layout=joint"):
        _settings(prompt_style="released", query_layout="separate")
    with pytest.raises(ConfigError, match="prompt_family='llama3'"):
        _settings(prompt_style="released", prompt_family="llama3")
    with pytest.raises(ConfigError, match="prompt_dataset='embedded_gsm'"):
        _settings(prompt_style="released", prompt_dataset="embedded_gsm")
    with pytest.raises(ConfigError, match="score_arithmetic"):
        _settings(score_arithmetic="float32")


def _layer_attention_brute_force(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, layer: int
) -> torch.Tensor:
    """A full forward with every layer's attention returned, positions 0..L-1."""
    with torch.inference_mode():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=torch.arange(ids.shape[1])[None, :],
            output_attentions=True,
        )
    return torch.sum(out.attentions[layer], dim=1).to(torch.float16)


def test_runner_reads_the_layer_a_full_forward_returns(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager")
    spec = ReleasedPrompts.load("qwen", "gsm8k")
    runner = ReleasedRunner(model, tokenizer, 1, spec, max_token=400)
    texts = ["short prompt", "a somewhat longer prompt than the first one is"]
    ids, mask = runner._encode(texts)
    assert ids.shape[1] % 8 == 0 and (ids[:, 0] == tokenizer.eos_token_id).all()  # left pads
    captured = runner._layer_attention(ids, mask)
    assert torch.equal(captured, _layer_attention_brute_force(model, ids, mask, 1))


MAX_TOKEN = 1000  # prompts of the tiny pool are about 850 tokens: a short generation


@pytest.fixture(scope="module")
def released_run(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[dict], dw.DataWhisperer, Any, Path]:
    """The released preset on a 12-example pool (2 folds x 2 episodes) with the tiny Llama."""
    tmp_path = tmp_path_factory.mktemp("released")
    records, _ = generate_embedded_task(seed=0, pool_size=12, eval_size=1, corrupt_share=0.3)
    pool = [
        Example(f"pool-{i}", r["question"], r["answer"], (r["answer"],))
        for i, r in enumerate(records)
    ]
    cfg = OmegaConf.to_container(
        OmegaConf.load(CONF_DIR / "method" / "data_whisperer_released.yaml"), resolve=False
    )
    base = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / "data_whisperer.yaml"))
    cfg = {**base, **{k: v for k, v in cfg.items() if k != "defaults"}}
    cfg.update(query_source="pool_kfold", max_new_tokens_per_answer=64, prompt_dataset="gsm8k")
    cfg.update(n_demos=3, n_queries=2, max_token=MAX_TOKEN)
    selector = {
        "name": "tiny_llama",
        "path": str(tiny_llama_dir),
        "dtype": "float32",
        "attention_layer": 1,
        "num_layers": 2,
    }
    task = {
        "name": "embedded_gsm",
        "metric": "exact_match_number",
        "prompt_template": "{question}",
        "fields": {"prompt": ["question"]},
    }
    context = ScoringContext(cfg, task, selector, None, 0, "cpu", tmp_path, tmp_path / "work")
    method = dw.DataWhisperer(context)
    return records, method, method.score(pool), tmp_path


def test_released_preset_scores_a_pool_end_to_end(released_run: Any) -> None:
    records, method, scores, tmp_path = released_run
    pool_ids = [f"pool-{i}" for i in range(len(records))]
    log = [
        json.loads(line)
        for line in (tmp_path / "work" / "episodes.jsonl").read_text().splitlines()[1:]
    ]
    assert len(log) == 4  # two folds of 6, chunks of 3
    assert sorted(i for r in log for i in r["demo_ids"]) == sorted(pool_ids)
    for r in log:
        assert r["max_new_tokens"] > 0
        assert r["max_new_tokens"] == MAX_TOKEN - (len(r["prompt_token_ids"]) + 7) // 8 * 8
        assert r["failed"] == (len(r["predictions"]) < 2)
        assert len(r["attention"]) == 3
    values = scores["score"].to_numpy()
    assert np.array_equal(values, values.astype(np.float16).astype(np.float64))
    chosen = method.select(scores, 4)
    order = torch.argsort(torch.tensor(values, dtype=torch.float16), descending=True)
    assert chosen == [pool_ids[i] for i in order[:4].tolist()]


def _write_reference(folder: Path, records: list[dict], log: list[dict], scores: Any) -> None:
    """A reference folder in the traced format, made from a released-preset run."""
    folder.mkdir()
    settings = {
        "dataset": "gsm8k",
        "model_type": "qwen",
        "batch_train": 3,
        "batch_test": 2,
        "attn_layer": 1,
        "max_token": MAX_TOKEN,
        "parallel_batches": 1,
        "dtype": "float32",
        "query_source": "pool_kfold",
        "k_folds": 2,
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    (folder / "pool.json").write_text(json.dumps(records))
    index = {f"pool-{i}": i for i in range(len(records))}
    lines = []
    for r in log:
        total = sum(r["attention"])
        lines.append(
            {
                "episode": r["episode"],
                "demo_indices": [index[i] for i in r["demo_ids"]],
                "query_indices": [index[i] for i in r["query_ids"]],
                "prompt_token_ids": r["prompt_token_ids"],
                "generated_token_ids": r["generated_token_ids"],
                "parsed_predictions": r["predictions"],
                "query_metric": None if r["failed"] else r["query_scores"],
                "failed": r["failed"],
                "attention_weights_raw": r["attention"],
                "attention_weights_normalised": [a / total for a in r["attention"]],
            }
        )
    (folder / "episodes.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    order = torch.argsort(
        torch.tensor(scores["score"].to_numpy(), dtype=torch.float16), descending=True
    )
    rank = {int(i): r for r, i in enumerate(order)}
    rows = [f"{i},{scores['score'][i]},{rank[i]}" for i in range(len(records))]
    (folder / "scores.csv").write_text("pool_index,score,released_rank\n" + "\n".join(rows) + "\n")


def test_parity_command_passes_on_a_matching_reference_and_fails_on_a_changed_one(
    released_run: Any, tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from dwbench.bench.__main__ import main

    records, _, scores, run_dir = released_run
    log = [
        json.loads(line)
        for line in (run_dir / "work" / "episodes.jsonl").read_text().splitlines()[1:]
    ]
    reference = tmp_path / "reference"
    _write_reference(reference, records, log, scores)
    argv = [
        "parity",
        "--reference",
        str(reference),
        "--out",
        str(tmp_path / "out"),
        "-o",
        f"selector_model.path={tiny_llama_dir}",
        "-o",
        "selector_model.num_layers=2",
    ]
    main(argv)
    table = (tmp_path / "out" / "gsm8k.csv").read_text()
    assert table.count("True") >= 4 * 5  # every episode equal in every column
    assert "parity: OK on 4 episode(s)" in capsys.readouterr().out

    changed = json.loads((reference / "episodes.jsonl").read_text().splitlines()[2])
    assert changed["episode"] == 2
    changed["generated_token_ids"][0] += 1
    lines = (reference / "episodes.jsonl").read_text().splitlines()
    lines[2] = json.dumps(changed)
    (reference / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as failed:
        main(argv)
    assert failed.value.code == 1
    assert "parity: FAILED" in capsys.readouterr().err
