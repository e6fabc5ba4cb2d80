"""Gemma-3-270M, the second embedded selector: conversion, chat template, stopping, and a Data
Whisperer run in both layouts. Every test skips unless `make install-gemma` has run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_data_whisperer import TASK, _method_cfg, _pool
from tiny_models import model_config

from dwbench import models
from dwbench.errors import DwbenchError
from dwbench.methods.base import ScoringContext
from dwbench.methods.data_whisperer import DataWhisperer

pytestmark = pytest.mark.slow
CFG = model_config("gemma3_270m")


def test_converted_model_matches_gguf(cache_dir: Path, gemma3_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = models.gguf_path(CFG, cache_dir=cache_dir)
    original = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    converted = models.load_causal_lm(CFG, cache_dir, "cpu")
    tokenizer = models.load_tokenizer(CFG, cache_dir)
    assert converted.config.model_type == "gemma3_text"
    assert converted.config.num_hidden_layers == CFG["num_layers"]
    # The configured layer must see the whole prompt, not a 512-token sliding window.
    assert converted.config.layer_types[CFG["attention_layer"]] == "full_attention"
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        expected = original(**inputs).logits
        actual = converted(**inputs).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_chat_template_stops_and_few_shot_answers(cache_dir: Path, gemma3_dir: Path) -> None:
    """The template dwbench supplies renders Gemma's turns and generation may stop at
    <end_of_turn>. Given solved examples as earlier turns, the base model answers in their
    format, but it does not end its turn (it was not tuned on the template): Data Whisperer's
    own stops (answer complete) end its replies."""
    tokenizer = models.load_tokenizer(CFG, cache_dir)
    model = models.load_causal_lm(CFG, cache_dir, "cpu")
    turn_end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert turn_end in model.generation_config.eos_token_id
    assert tokenizer.model_max_length == 32768
    messages = []
    for a, b in [(3, 4), (10, 5), (6, 6)]:
        messages += [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}\n#### {a + b}"},
        ]
    messages.append({"role": "user", "content": "What is 8 + 1?"})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<bos><start_of_turn>user\nWhat is 3 + 4?<end_of_turn>\n")
    assert text.endswith("<start_of_turn>user\nWhat is 8 + 1?<end_of_turn>\n<start_of_turn>model\n")
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=12, do_sample=False, temperature=None, top_p=None, top_k=None
        )
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply.startswith("8 + 1 = 9\n#### 9")


def _method(layout: str, scoring: str, n_demos: int, tmp_path: Path, cache_dir: Path) -> Any:
    settings = {"n_demos": n_demos, "n_queries": 1, "max_new_tokens_per_answer": 48}
    context = ScoringContext(
        method_cfg=_method_cfg(query_layout=layout, query_scoring=scoring, **settings),
        task_cfg=TASK,
        selector_cfg=CFG,
        queries=None,
        seed=0,
        device="cpu",
        cache_dir=cache_dir,
        work_dir=tmp_path,
    )
    return DataWhisperer(context)


@pytest.mark.parametrize("layout", ["separate", "joint"])
def test_data_whisperer_likelihood_scores_a_pool(
    layout: str, tmp_path: Path, cache_dir: Path, gemma3_dir: Path
) -> None:
    """Short episodes (every row within the 512-token sliding window): finite scores, not all
    equal; the separate layout's template check and the token spans hold for Gemma's template."""
    n_demos = 2 if layout == "separate" else 1  # the joint prompt adds the instruction
    scores = _method(layout, "likelihood", n_demos, tmp_path, cache_dir).score(_pool(9))
    values = scores["score"].to_numpy(dtype=float)
    assert len(values) == 9 and np.isfinite(values).all()
    assert len(set(np.round(values, 9))) > 1


@pytest.mark.parametrize("scoring", ["likelihood", "generate"])
def test_data_whisperer_refuses_what_the_sliding_window_breaks(
    scoring: str, tmp_path: Path, cache_dir: Path, gemma3_dir: Path
) -> None:
    """Rows past 512 tokens (likelihood: the packed 4D mask would lift the window), and any
    generation (the runner re-gathers full-attention caches only), are refused, not run wrong."""
    n_demos = 10 if scoring == "likelihood" else 3
    method = _method("separate", scoring, n_demos, tmp_path, cache_dir)
    with pytest.raises(DwbenchError, match="sliding"):
        method.score(_pool(24))
