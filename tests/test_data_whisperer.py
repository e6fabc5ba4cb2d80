"""Data Whisperer: attention weights, token spans, accumulation, stopping, determinism, bad input.

Tiny 2-layer models stand in for the selector everywhere except where SmolLM2's own tokenizer
is the point; their query/key projections are scaled up so attention is far from uniform and a
span that is off by one token changes the weights well beyond the tolerance.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from dwbench.cli import CONF_DIR
from dwbench.data.embedded import generate_embedded_task
from dwbench.data.metrics import exact_match_number
from dwbench.data.records import Example
from dwbench.errors import ConfigError, DataError
from dwbench.methods import data_whisperer as dw
from dwbench.methods.base import ScoringContext

TASK = {"name": "embedded_gsm", "metric": "exact_match_number", "query_source": "pool_kfold"}


def _pool(n: int, seed: int = 0) -> list[Example]:
    records, _ = generate_embedded_task(seed=seed, pool_size=n, eval_size=1, corrupt_share=0.3)
    return [
        Example(f"pool-{i:05d}", r["question"], r["answer"], (r["answer"],))
        for i, r in enumerate(records)
    ]


def _method_cfg(**overrides: Any) -> dict[str, Any]:
    """conf/method/data_whisperer.yaml with the task interpolations resolved, plus overrides."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / "data_whisperer.yaml"))
    task = OmegaConf.load(CONF_DIR / "task" / "embedded_gsm.yaml")
    cfg["query_source"] = "pool_kfold"
    cfg["max_new_tokens_per_answer"] = task.answer_max_tokens
    cfg.update(overrides)
    return cfg


def _method(
    work_dir: Path, selector: dict[str, Any], task: dict[str, Any] = TASK, **overrides: Any
) -> dw.DataWhisperer:
    context = ScoringContext(
        method_cfg=_method_cfg(**overrides),
        task_cfg=task,
        selector_cfg=selector,
        queries=None,
        seed=0,
        device="cpu",
        cache_dir=work_dir,
        work_dir=work_dir,
    )
    return dw.DataWhisperer(context)


def _sharp_model(folder: Path) -> torch.nn.Module:
    """The tiny model with eager attention and peaked attention patterns."""
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        for module in model.modules():
            for name in ("q_proj", "k_proj"):
                if hasattr(module, name):
                    getattr(module, name).weight.mul_(8.0)
    return model.eval()


def _reference_weights(
    model: torch.nn.Module, prompt: dw.EncodedPrompt, layer: int, span: str, shift: int = 0
) -> np.ndarray:
    """Brute force: every layer's attention from one eager forward pass, read at `layer`."""
    with torch.no_grad():
        output = model(torch.tensor([prompt.input_ids]), output_attentions=True)
    attention = output.attentions[layer][0].sum(dim=0).double().numpy()  # heads summed
    n = len(prompt.input_ids)
    rows = slice(*prompt.query_tokens) if span == "query_block" else slice(n - 1, n)
    block = attention[rows]
    a = np.array(
        [
            block[:, s + shift : e + shift].sum() / ((e - s) * len(block))
            for s, e in prompt.demo_tokens
        ]
    )
    return a / a.sum()


@pytest.mark.parametrize("span", dw.ATTENTION_SPANS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_weights_equal_a_full_forward_with_output_attentions(
    arch: str, span: str, tiny_llama_dir: Path, tiny_qwen2_dir: Path
) -> None:
    folder = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}[arch]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = _sharp_model(folder)
    pool = _pool(12)
    # Two prompts of different lengths in one call: the shorter one is left-padded.
    prompts = [
        dw.encode_prompt(tokenizer, dw.build_prompt(tokenizer, demos, queries, "Solve them."))
        for demos, queries in [(pool[0:4], pool[8:11]), (pool[4:6], pool[9:12])]
    ]
    assert len(prompts[0].input_ids) != len(prompts[1].input_ids)
    references = [_reference_weights(model, p, 1, span) for p in prompts]
    off_by_one = [_reference_weights(model, p, 1, span, shift=1) for p in prompts]

    dw.use_capture_attention(model)
    runner = dw.EpisodeRunner(model, tokenizer, 1, span, 3, True, max_new_tokens=2)
    try:
        generations = runner.run(prompts)
    finally:
        runner.close()
    for generation, reference in zip(generations, references, strict=True):
        weights = np.asarray(generation.attention) / sum(generation.attention)
        np.testing.assert_allclose(weights, reference, rtol=0, atol=1e-5)
    # The comparison can see a span that is one token off.
    assert max(np.abs(s - r).max() for s, r in zip(off_by_one, references, strict=True)) > 1e-4


TRICKY = [
    Example(
        "a",
        "  Sam pays $1,000 for 3 bikes.\nHow much is one?  ",
        "1,000 / 3 = 333.33\n#### 333.33\n",
        ("x",),
    ),
    Example("b", "Ünïcödé naïve café: 5 € − 2 € ?", "5 − 2 = 3 😀\n\n#### 3", ("x",)),
    Example("c", "Temperature falls to -47 degrees.", "#### -47", ("x",)),
]


@pytest.mark.parametrize("which", ["smollm2", "gpt2_bpe"])
def test_demonstration_spans_decode_to_exactly_the_demonstration(
    which: str, smollm2_dir: Path, tiny_qwen2_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(
        {"smollm2": smollm2_dir, "gpt2_bpe": tiny_qwen2_dir}[which]
    )
    demos = TRICKY + _pool(4)
    prompt = dw.build_prompt(tokenizer, demos, _pool(6)[4:6], dw.NUMERIC_INSTRUCTION)
    encoded = dw.encode_prompt(tokenizer, prompt)
    assert encoded.input_ids == tuple(tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
    for (start, end), demo in zip(encoded.demo_tokens, demos, strict=True):
        assert tokenizer.decode(encoded.input_ids[start:end]) == dw.demonstration_text(demo)
    query_block = tokenizer.decode(encoded.input_ids[slice(*encoded.query_tokens)])
    assert query_block.startswith(dw.NUMERIC_INSTRUCTION)
    assert query_block.endswith(dw.ANSWER_PREFILL)


@pytest.mark.parametrize("order", dw.EPISODE_ORDERS)
def test_every_example_is_a_demonstration_once_per_pass(order: str) -> None:
    settings = dw.Settings.from_config(
        _method_cfg(n_demos=4, n_queries=3, episode_order=order, passes=1 + (order == "random"))
    )
    plan = dw.plan_episodes(23, None, settings, seed=3)
    assert (
        plan
        == dw.plan_episodes(23, None, settings, seed=3)
        != dw.plan_episodes(23, None, settings, 4)
    )
    demos = [i for episode in plan for i in episode.demos]
    assert sorted(demos) == sorted(list(range(23)) * settings.passes)
    for episode in plan:  # queries come from the other fold, so never from the episode's demos
        assert len(set(episode.queries)) == 3 and not set(episode.queries) & set(episode.demos)


def test_hand_made_episodes_give_the_expected_scores() -> None:
    contributions = [
        dw.Contribution(demos=[0, 1], score=0.6, attention=[3.0, 1.0]),  # w = 1.5, 0.5
        dw.Contribution(demos=[1, 2], score=0.2, attention=[0.01, 0.01]),  # w = 1, 1
        dw.Contribution(demos=[2, 0, 4], score=1.0, attention=[1.0, 1.0, 2.0]),  # .75 .75 1.5
    ]
    table = dw.accumulate(5, contributions, weighting=True)
    np.testing.assert_allclose(table.score, [(0.9 + 0.75) / 2, 0.25, (0.2 + 0.75) / 2, 0, 1.5])
    np.testing.assert_array_equal(table.appearances, [2, 2, 2, 0, 1])
    np.testing.assert_allclose(table.mean_weight, [1.125, 0.75, 0.875, 0, 1.5])
    np.testing.assert_allclose(table.mean_episode_score, [0.8, 0.4, 0.6, 0, 1.0])
    unweighted = dw.accumulate(5, contributions, weighting=False)
    np.testing.assert_allclose(unweighted.score, table.mean_episode_score)
    assert table.score.dtype == np.float64


def test_episodes_that_all_score_zero_are_reported_as_no_signal() -> None:
    """A selector that answers nothing gives every example the same score: the stats say so."""
    records = [
        {
            "demo_ids": ["a", "b"],
            "dropped": 0,
            "parse_failures": 2,
            "complete": False,
            "new_tokens": 9,
            "seconds": 1.0,
            "score": 0.0,
        },
        {
            "demo_ids": ["c", "d"],
            "dropped": 0,
            "parse_failures": 1,
            "complete": True,
            "new_tokens": 5,
            "seconds": 1.0,
            "score": 0.0,
        },
    ]
    contributions = [dw.Contribution([0, 1], 0.0, [1.0, 2.0]), dw.Contribution([2, 3], 0.0, [3, 1])]
    stats = dw._summarise(records, dw.accumulate(4, contributions, weighting=True), 4, 2)
    assert stats["distinct_scores"] == 1
    assert stats["parse_failure_rate"] == 0.75 and stats["capped_episodes"] == 1
    contributions[1] = dw.Contribution([2, 3], 0.5, [3, 1])
    stats = dw._summarise(records, dw.accumulate(4, contributions, weighting=True), 4, 2)
    assert stats["distinct_scores"] == 3  # 0 for a and b; 0.75 and 0.25 for c and d


def test_answers_are_split_scored_and_failures_counted() -> None:
    queries = [
        Example(f"q{k}", "?", f"so\n#### {n}", (f"so\n#### {n}",))
        for k, n in enumerate(["1,000", "-47", "18", "5"])
    ]
    text = (
        "Answer 1: 10 * 100 = 1000\n#### 1,000\n"
        "**Answer 2:** it drops\n#### −47\n"
        "Answer 3: I am not sure.\n"
        "Answer 4: $5 each\n#### $5.00\n"
    )
    scores, failures = dw.score_answers(text, queries, exact_match_number, numeric=True)
    assert scores == [1.0, 1.0, 0.0, 1.0] and failures == 1
    assert dw.answers_complete(text, 4, numeric=True)
    assert not dw.answers_complete(text.removesuffix("\n"), 4, numeric=True)  # "5.00" may go on
    missing = dw.score_answers("Answer 1:\n#### 1000\n", queries, exact_match_number, True)
    assert missing == ([1.0, 0.0, 0.0, 0.0], 3)
    # Markers dropped after the first answer: the `####` blocks are read in order.
    unmarked = "Answer 1: 1000\n#### 1000\n\nIt falls.\n#### -47\n\n18\n#### 18"
    assert dw.score_answers(unmarked, queries, exact_match_number, True) == ([1, 1, 1, 0], 1)
    assert dw.answers_complete(unmarked + "\n", 3, numeric=True)
    assert not dw.answers_complete(unmarked, 3, numeric=True)
    assert dw.answers_complete("Answer 1: a\nAnswer 2: summary.\n\n", 2, numeric=False)
    assert not dw.answers_complete("Answer 1: a\nAnswer 2: summary.", 2, numeric=False)


class _Script(LogitsProcessor):
    """Forces a scripted completion, then endless filler: only a stopping criterion ends it."""

    def __init__(self, script: list[int], filler: int, prompt_length: int) -> None:
        self.script, self.filler, self.prompt_length = script, filler, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        token = self.script[step] if step < len(self.script) else self.filler
        forced = torch.full_like(scores, -torch.inf)
        forced[:, token] = 0.0
        return forced


def test_generation_stops_once_every_answer_is_complete(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    completion = " 2 + 2 = 4\n#### 4\nAnswer 2: 3 * 3 = 9\n#### 9\n"
    script = tokenizer(completion, add_special_tokens=False)["input_ids"]
    filler = tokenizer(" more", add_special_tokens=False)["input_ids"][0]
    prompt = torch.tensor([tokenizer("Q", add_special_tokens=False)["input_ids"]])
    stop_ids = {tokenizer.eos_token_id}
    criterion = dw.AnswersComplete(tokenizer, prompt.shape[1], 2, True, stop_ids)
    output = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=200,
        do_sample=False,
        logits_processor=LogitsProcessorList([_Script(script, filler, prompt.shape[1])]),
        stopping_criteria=StoppingCriteriaList([criterion]),
        pad_token_id=tokenizer.pad_token_id,
    )
    assert output.shape[1] - prompt.shape[1] == len(script) == criterion.lengths[0]


def test_prompt_longer_than_the_context_drops_demonstrations(
    tmp_path: Path, tiny_llama_dir: Path, tiny_model_cfg: Callable[..., dict[str, Any]]
) -> None:
    pool = _pool(12)
    long_answer = "Step. " * 700 + "\n#### 1"  # about 1,400 tokens: two do not fit in 2,048
    pool = [Example(ex.id, ex.prompt, long_answer, ex.references) for ex in pool[:6]] + pool[6:]
    method = _method(
        tmp_path,
        tiny_model_cfg(tiny_llama_dir),
        n_demos=3,
        n_queries=2,
        max_new_tokens_per_answer=2,
    )
    scores = method.score(pool)
    assert method.stats["truncated_episodes"] >= 1 and method.stats["dropped_demonstrations"] >= 1
    assert method.stats["episodes"] == 4 and len(scores) == 12
    assert scores["appearances"].sum() == 12 - method.stats["dropped_demonstrations"]


def test_a_killed_run_resumes_from_its_finished_episodes(
    tmp_path: Path, tiny_qwen2_dir: Path, tiny_model_cfg: Callable[..., dict[str, Any]]
) -> None:
    selector = tiny_model_cfg(tiny_qwen2_dir, "qwen2")
    # One episode per call: batches of other sizes pad differently, which moves the last bits
    # of the attention weights, and this test asks for bit-identical scores.
    settings = {
        "n_demos": 3,
        "n_queries": 2,
        "max_new_tokens_per_answer": 2,
        "runtime": {"prompts_per_call": 1},
    }
    first = _method(tmp_path, selector, **settings)
    full = first.score(_pool(12))
    log = tmp_path / dw.CHECKPOINT_FILE
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # two episodes and a torn line
    again = _method(tmp_path, selector, **settings)
    resumed = again.score(_pool(12))
    assert again.stats["resumed_episodes"] == 2 and again.stats["episodes"] == 4
    assert resumed.equals(full)


_TWIN = textwrap.dedent(
    """
    import json, sys, zlib
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_data_whisperer import _method, _pool
    from tiny_models import tiny_model_cfg
    from dwbench.methods import data_whisperer as dw

    # Random tiny models never answer correctly; score a completion by a hash of its text, so
    # scores depend on what was generated as well as on the attention.
    def by_text(text, queries, metric, numeric):
        return [zlib.crc32(text.encode()) % 97 / 96] * len(queries), 0

    dw.score_answers = by_text
    method = _method(Path(sys.argv[1]), tiny_model_cfg(Path({model!r})), n_demos=3, n_queries=2,
                     max_new_tokens_per_answer=3, runtime={{"prompts_per_call": 2}})
    scores = method.score(_pool(14))
    json.dump({{"scores": scores.to_dict("list"), "selected": method.select(scores, 5)}},
              open(Path(sys.argv[1]) / "out.json", "w"))
    """
)


def test_same_config_and_seed_give_the_same_scores_in_two_processes(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    script = tmp_path / "twin.py"
    script.write_text(_TWIN.format(tests=str(Path(__file__).parent), model=str(tiny_llama_dir)))
    runs = [tmp_path / "one", tmp_path / "two"]
    procs = []
    for run in runs:
        run.mkdir()
        procs.append(
            subprocess.Popen([sys.executable, str(script), str(run)], stderr=subprocess.PIPE)
        )
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    one, two = (json.loads((run / "out.json").read_text()) for run in runs)
    assert one == two
    assert len(set(one["scores"]["score"])) > 3  # not a degenerate all-equal result


def _without_chat_template(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / "chat_template.jinja").unlink()
    return target


@pytest.mark.parametrize(
    "case",
    [
        "pool_too_small",
        "empty_answer",
        "no_chat_template",
        "layer_out_of_range_in_config",
        "layer_out_of_range_in_model",
        "task_without_metric",
        "validation_without_queries",
        "bad_option",
    ],
)
def test_bad_input_fails_clearly_before_any_work(
    case: str,
    tmp_path: Path,
    tiny_qwen2_dir: Path,
    tiny_model_cfg: Callable[..., dict[str, Any]],
) -> None:
    selector = tiny_model_cfg(tiny_qwen2_dir, "qwen2")
    pool, task, overrides = _pool(12), dict(TASK), {}
    expected: tuple[type[Exception], str]
    if case == "pool_too_small":
        pool, expected = pool[:10], (DataError, "fewer than method.n_demos")
    elif case == "empty_answer":
        pool[3] = Example(pool[3].id, pool[3].prompt, "  ", ("  ",))
        overrides, expected = {"n_demos": 3, "n_queries": 2}, (DataError, "empty answer")
    elif case == "no_chat_template":
        selector["path"] = str(_without_chat_template(tiny_qwen2_dir, tmp_path / "plain"))
        overrides, expected = {"n_demos": 3, "n_queries": 2}, (ConfigError, "no chat template")
    elif case == "layer_out_of_range_in_config":
        selector["attention_layer"] = 2
        expected = (ConfigError, "selector_model.attention_layer=2")
    elif case == "layer_out_of_range_in_model":
        selector.update(attention_layer=5, num_layers=None)
        overrides, expected = (
            {"n_demos": 3, "n_queries": 2},
            (
                ConfigError,
                "selector_model.attention_layer=5",
            ),
        )
    elif case == "task_without_metric":
        task.pop("metric")
        expected = (ConfigError, "task.metric")
    elif case == "validation_without_queries":
        overrides = {"query_source": "validation", "n_demos": 3, "n_queries": 2}
        expected = (ConfigError, "no query split")
    else:
        overrides, expected = {"attention_span": "last_token"}, (ConfigError, "attention_span")
    with pytest.raises(expected[0], match=expected[1]):
        _method(tmp_path, selector, task, **overrides).score(pool)
    log = tmp_path / dw.CHECKPOINT_FILE
    assert not log.exists() or len(log.read_text().splitlines()) == 1  # no episode ran
