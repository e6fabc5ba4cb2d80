"""dwbench's greedy decoding writes the tokens `model.generate` writes, with finished rows gone
from the batch; evaluation through it scores what lm-eval's own generation scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_lm_eval_runner import GSM8K_EXAMPLES, _local

from dwbench.data.records import write_jsonl
from dwbench.decoding import greedy_generate, greedy_settings_problem
from dwbench.errors import ConfigError
from dwbench.lm_eval_runner import evaluation_model, run_lm_eval

PROMPTS = ["Q: what is 2 + 3?", "Tell me a story about a cat that", "1, 2, 3,", "Hi"]


def _left_padded(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def _generate_then_compare(
    model, ids, mask, cap: int, ends_at: list[tuple[int, int]]
) -> tuple[torch.Tensor, set[int]]:
    """End ids picked from an unstopped `generate` (row, step after the prompt), so rows end at
    different steps; then dwbench's tokens must equal `generate`'s with those end ids."""
    free = model.generate(
        ids, attention_mask=mask, max_length=cap, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    ends = {int(free[row, ids.shape[1] + step]) for row, step in ends_at}
    expected = model.generate(
        ids,
        attention_mask=mask,
        max_length=cap,
        do_sample=False,
        eos_token_id=sorted(ends),
        pad_token_id=0,
    )
    got = greedy_generate(model, ids, mask, cap, pad_id=0, eos_ids=ends)
    assert torch.equal(got, expected)
    return expected, ends


def test_same_tokens_as_generate_with_rows_ending_at_different_steps(tiny_llama_dir: Path) -> None:
    """float64, so only the algorithm could differ: a row ends at an end id at its own step, its
    later places are padding, the others go on to the cap."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64).eval()
    ids, mask = _left_padded(tokenizer, PROMPTS)
    cap = ids.shape[1] + 12
    expected, ends = _generate_then_compare(model, ids, mask, cap, [(0, 2), (2, 5)])
    assert (expected[:, ids.shape[1] :] == 0).any()  # some row did end and was padded
    stopped = greedy_generate(
        model, ids, mask, cap, pad_id=0, eos_ids=ends, stop=lambda t: t.shape[1] >= ids.shape[1] + 3
    )
    assert torch.equal(stopped, expected[:, : ids.shape[1] + 3])


def test_settings_that_change_greedy_tokens_are_named(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert greedy_settings_problem(model) is None
    model.generation_config.repetition_penalty = 1.3
    assert greedy_settings_problem(model) == "repetition_penalty=1.3"


def test_a_penalising_generation_config_is_refused_with_the_fix(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    folder = tmp_path / "penalised"
    shutil.copytree(tiny_llama_dir, folder)
    config = folder / "generation_config.json"
    settings = json.loads(config.read_text()) if config.is_file() else {}
    config.write_text(json.dumps({**settings, "repetition_penalty": 1.2}))
    with pytest.raises(ConfigError, match="eval.runtime.generate=lm_eval"):
        evaluation_model(_local(folder), None, 4, "dwbench")


def test_evaluation_scores_as_lm_evals_own_generation(smollm2_dir: Path, tmp_path: Path) -> None:
    """The real SmolLM2 on GSM8K-style prompts: same completions, same score, either way."""
    path = tmp_path / "eval.jsonl"
    write_jsonl(path, GSM8K_EXAMPLES)
    runs = {
        generate: run_lm_eval(
            _local(smollm2_dir),
            "dwbench_gsm8k",
            path,
            adapter_dir=None,
            batch_size=4,
            max_new_tokens=32,
            generate=generate,
        )
        for generate in ("dwbench", "lm_eval")
    }
    ours, theirs = runs["dwbench"], runs["lm_eval"]
    assert [s["prediction"] for s in ours.samples] == [s["prediction"] for s in theirs.samples]
    assert ours.score == theirs.score
    assert ours.results["config"]["model_args"]["generate"] == "dwbench"
    assert len({len(s["prediction"]) for s in ours.samples}) > 1  # answers of different lengths


def test_same_tokens_as_generate_on_sliding_window_layers() -> None:
    """Gemma 3 mixes sliding-window layers into its cache: they keep transformers' own cache
    layers (which trim to the window), and the tokens still equal `generate`'s."""
    from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    model = Gemma3ForCausalLM(config).to(torch.float64).eval()
    layers = DynamicCache(config=model.config).layers
    assert type(layers[0]).__name__ == "DynamicSlidingWindowLayer"  # the path under test
    ids = torch.randint(3, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids[1, :3] = 0
    cap = ids.shape[1] + 10
    _generate_then_compare(model, ids, mask, cap, [(0, 3)])
