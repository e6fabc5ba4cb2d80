"""Data Whisperer: attention weights, token spans, accumulation, stopping, determinism, bad input.

Tiny 2-layer models stand in for the selector everywhere except where SmolLM2's own tokenizer
is the point; their query/key projections are scaled up so attention is far from uniform and a
span that is off by one token changes the weights well beyond the tolerance.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from dwbench.config_files import CONF_DIR
from dwbench.data.embedded import generate_embedded_task
from dwbench.data.metrics import exact_match_number
from dwbench.data.records import Example
from dwbench.errors import ConfigError, DataError
from dwbench.methods.base import ScoringContext, top_k
from dwbench.methods.data_whisperer import episodes as ep
from dwbench.methods.data_whisperer import log_scores
from dwbench.methods.data_whisperer import method as dw
from dwbench.methods.data_whisperer import prompts as pr
from dwbench.methods.data_whisperer import runner as rn
from dwbench.methods.data_whisperer.attention import use_capture_attention

TASK = {"name": "embedded_gsm", "metric": "exact_match_number", "query_source": "pool_kfold"}


def _pool(n: int, seed: int = 0, corrupt_share: float = 0.3) -> list[Example]:
    records, _ = generate_embedded_task(
        seed=seed, pool_size=n, eval_size=1, corrupt_share=corrupt_share
    )
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


def _episodes(
    tokenizer: Any, layout: str, scoring: str, instruction: str | None = "Solve them."
) -> list[pr.EncodedEpisode]:
    """Two episodes of different lengths (one call pads them), 3 queries each."""
    pool = _pool(12)
    build = pr.build_separate_prompt if layout == "separate" else pr.build_joint_prompt
    return [
        pr.encode_episode(
            tokenizer, build(tokenizer, demos, queries, instruction, scoring == "likelihood")
        )
        for demos, queries in [(pool[0:4], pool[8:11]), (pool[4:6], pool[9:12])]
    ]


def _reference_weights(
    model: torch.nn.Module, episode: pr.EncodedEpisode, layer: int, span: str, shift: int = 0
) -> np.ndarray:
    """Brute force: each row run whole through an eager forward with every layer's attention."""
    n_prefix = len(episode.prefix_ids)
    mass, n_rows = np.zeros(len(episode.demo_tokens)), 0
    for row in (row for row in episode.rows if row.query_tokens is not None):
        ids = episode.prefix_ids + row.suffix_ids
        with torch.no_grad():
            output = model(torch.tensor([ids]), output_attentions=True)
        attention = output.attentions[layer][0].sum(dim=0).double().numpy()  # heads summed
        start, end = (n_prefix + t for t in row.query_tokens)
        block = attention[slice(start, end) if span == "query_block" else slice(end - 1, end)]
        n_rows += len(block)
        mass += [block[:, s + shift : e + shift].sum() / (e - s) for s, e in episode.demo_tokens]
    a = mass / n_rows
    return a / a.sum()


def _run(
    runner: rn.EpisodeRunner, episodes: list[pr.EncodedEpisode], scoring: str, max_new: int = 2
) -> list[rn.EpisodeOutput]:
    if scoring == "likelihood":
        return runner.likelihood(episodes)
    outputs: dict[int, rn.EpisodeOutput] = {}
    runner.generate(
        episodes, lambda: pr.SeparateStop(True), max_new, lambda b, o: outputs.setdefault(b, o)
    )
    return [outputs[b] for b in range(len(episodes))]


@pytest.mark.parametrize("span", rn.ATTENTION_SPANS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    ("layout", "scoring"),
    [
        ("joint", "generate"),
        ("separate", "generate"),
        ("separate", "likelihood"),
        ("joint", "likelihood"),
    ],
)
def test_weights_equal_a_full_forward_with_output_attentions(
    layout: str, scoring: str, arch: str, span: str, tiny_llama_dir: Path, tiny_qwen2_dir: Path
) -> None:
    folder = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}[arch]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = _sharp_model(folder)
    episodes = _episodes(tokenizer, layout, scoring)
    assert episodes[0].longest_row() != episodes[1].longest_row()
    references = [_reference_weights(model, e, 1, span) for e in episodes]
    off_by_one = [_reference_weights(model, e, 1, span, shift=1) for e in episodes]

    use_capture_attention(model)
    runner = rn.EpisodeRunner(model, tokenizer, 1, span, {tokenizer.eos_token_id})
    try:
        outputs = _run(runner, episodes, scoring)
        if scoring == "likelihood":  # the query rows come before the answers: same weights
            unforced = _run(runner, _episodes(tokenizer, layout, "generate"), "generate")
    finally:
        runner.close()
    for output, reference in zip(outputs, references, strict=True):
        weights = np.asarray(output.attention) / sum(output.attention)
        np.testing.assert_allclose(weights, reference, rtol=0, atol=1e-5)
    if scoring == "likelihood":
        for forced, free in zip(outputs, unforced, strict=True):
            np.testing.assert_allclose(forced.attention, free.attention, rtol=1e-4, atol=1e-7)
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


@pytest.mark.parametrize("layout", pr.QUERY_LAYOUTS)
@pytest.mark.parametrize(
    "which",
    [
        pytest.param("smollm2_dir", id="smollm2"),
        pytest.param("tiny_qwen2_dir", id="gpt2_bpe"),
        # SentencePiece, and a chat template dwbench wrote (the GGUF has none); skips unless
        # `make install-gemma` has run
        pytest.param("gemma3_dir", id="gemma3", marks=pytest.mark.slow),
    ],
)
def test_token_spans_decode_to_exactly_their_text(
    which: str, layout: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(which))
    demos, queries = TRICKY + _pool(4), [*_pool(6)[4:6], TRICKY[2]]
    build = pr.build_separate_prompt if layout == "separate" else pr.build_joint_prompt
    prompt = build(tokenizer, demos, queries, pr.NUMERIC_INSTRUCTION, gold=True)
    encoded = pr.encode_episode(tokenizer, prompt)

    def decode(ids: tuple[int, ...]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    assert len(encoded.rows) == len(queries)  # one row per query, in both layouts
    n_prefix = len(encoded.prefix_ids)
    for k, (row, enc) in enumerate(zip(prompt.rows, encoded.rows, strict=True), 1):
        text = row.text + row.continuation
        ids = encoded.prefix_ids + enc.suffix_ids
        assert ids == tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        for (start, end), chars in zip(encoded.demo_tokens, prompt.demo_chars, strict=True):
            assert decode(ids[start:end]) == text[slice(*chars)]
        for (start, end), chars in zip(enc.answer_tokens, row.answer_chars, strict=True):
            assert decode(enc.suffix_ids[start:end]) == text[slice(*chars)]
        if layout == "joint" and k > 1:  # only row 1, the generating prompt, weighs the demos
            assert enc.query_tokens is None and row.text.endswith(f"Answer {k}:")
            continue
        start, end = enc.query_tokens
        block = decode(ids[n_prefix + start : n_prefix + end])
        if layout == "joint":
            assert block.startswith(pr.NUMERIC_INSTRUCTION) and block.endswith(pr.ANSWER_PREFILL)
        else:
            assert block.startswith(row.text[slice(*row.query_chars)][:20])
    if layout == "joint":
        for (start, end), demo in zip(encoded.demo_tokens, demos, strict=True):
            assert decode(encoded.prefix_ids[start:end]) == pr.demonstration_text(demo)
    # each row's answer is its query's gold answer; its final number is located exactly
    for enc, query in zip(encoded.rows, queries, strict=True):
        assert decode(enc.suffix_ids[slice(*enc.answer_tokens[0])]) == query.response.strip()
        if "####" in query.response:
            number = decode(enc.suffix_ids[slice(*enc.number_tokens[0])])
            assert number.strip() == query.response.rsplit("####", 1)[1].strip()
        else:
            assert enc.number_tokens == (None,)


@pytest.mark.parametrize("order", ep.EPISODE_ORDERS)
def test_every_example_is_a_demonstration_once_per_pass(order: str) -> None:
    passes = 1 + (order == "random")

    def plan(seed: int) -> list[ep.Episode]:
        return ep.plan_episodes(23, None, 4, 3, order, passes, seed)

    if order == "released":  # the released plan is fixed (KFold's random_state=42)
        assert plan(3) == plan(4)
    else:
        assert plan(3) == plan(3) != plan(4)
    demos = [i for episode in plan(3) for i in episode.demos]
    assert sorted(demos) == sorted(list(range(23)) * passes)
    for episode in plan(3):  # queries come from the other fold, so never from the episode's demos
        assert len(set(episode.queries)) == 3 and not set(episode.queries) & set(episode.demos)


def test_hand_made_episodes_give_the_expected_scores() -> None:
    contributions = [
        ep.Contribution(demos=[0, 1], score=0.6, attention=[3.0, 1.0]),  # w = 1.5, 0.5
        ep.Contribution(demos=[1, 2], score=0.2, attention=[0.01, 0.01]),  # w = 1, 1
        ep.Contribution(demos=[2, 0, 4], score=1.0, attention=[1.0, 1.0, 2.0]),  # .75 .75 1.5
    ]
    table = ep.accumulate(5, contributions, weighting=True)
    np.testing.assert_allclose(table.score, [(0.9 + 0.75) / 2, 0.25, (0.2 + 0.75) / 2, 0, 1.5])
    np.testing.assert_array_equal(table.appearances, [2, 2, 2, 0, 1])
    np.testing.assert_allclose(table.mean_weight, [1.125, 0.75, 0.875, 0, 1.5])
    np.testing.assert_allclose(table.mean_episode_score, [0.8, 0.4, 0.6, 0, 1.0])
    unweighted = ep.accumulate(5, contributions, weighting=False)
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
            "correct": [False, False],
        },
        {
            "demo_ids": ["c", "d"],
            "dropped": 0,
            "parse_failures": 1,
            "complete": True,
            "new_tokens": 5,
            "seconds": 1.0,
            "score": 0.0,
            "correct": [False, False],
        },
    ]
    contributions = [ep.Contribution([0, 1], 0.0, [1.0, 2.0]), ep.Contribution([2, 3], 0.0, [3, 1])]
    stats = log_scores._summarise(records, ep.accumulate(4, contributions, weighting=True), 4, 2)
    assert stats["distinct_scores"] == 1
    assert stats["parse_failure_rate"] == 0.75 and stats["capped_episodes"] == 1
    contributions[1] = ep.Contribution([2, 3], 0.5, [3, 1])
    stats = log_scores._summarise(records, ep.accumulate(4, contributions, weighting=True), 4, 2)
    assert stats["distinct_scores"] == 3  # 0 for a and b; 0.75 and 0.25 for c and d


def _read(text: str, queries: list[Example]) -> tuple[list[float], int]:
    """A joint completion's per-query exact match and its parse failures, as scoring reads it."""
    scores, failures = [], 0
    for answer, query in zip(pr.split_answers(text, len(queries), True), queries, strict=True):
        failed = pr.answer_failed(answer, numeric=True)
        failures += failed
        scores.append(0.0 if failed else exact_match_number(answer, query.references))
    return scores, failures


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
    assert _read(text, queries) == ([1.0, 1.0, 0.0, 1.0], 1)
    assert pr.answers_complete(text, 4, numeric=True)
    assert not pr.answers_complete(text.removesuffix("\n"), 4, numeric=True)  # "5.00" may go on
    assert _read("Answer 1:\n#### 1000\n", queries) == ([1.0, 0.0, 0.0, 0.0], 3)
    # Markers dropped after the first answer: the `####` blocks are read in order, and only the
    # cap ends such a completion (an unmarked block may restate the previous answer).
    unmarked = "Answer 1: 1000\n#### 1000\n\nIt falls.\n#### -47\n\n18\n#### 18"
    assert _read(unmarked, queries) == ([1, 1, 1, 0], 1)
    assert not pr.answers_complete(unmarked + "\n", 3, numeric=True)
    assert pr.answers_complete("Answer 1: a\nAnswer 2: summary.\n\n", 2, numeric=False)
    assert not pr.answers_complete("Answer 1: a\nAnswer 2: summary.", 2, numeric=False)


def test_a_second_final_line_stays_in_its_answer() -> None:
    """ "#### 5\nSo the final answer is\n#### 5" must not shift later answers by one."""
    queries = [Example(f"q{k}", "?", f"#### {n}", (f"#### {n}",)) for k, n in enumerate([5, 9])]
    text = (
        "Answer 1: 2 + 3 = 5\n#### 5\nSo the final answer is\n#### 5\nAnswer 2: 4 + 5 = 9\n#### 9"
    )
    assert _read(text, queries) == ([1.0, 1.0], 0)
    head = text[: text.index("Answer 2")]
    assert not pr.answers_complete(head, 2, numeric=True)  # the second answer is still to come
    assert not pr.answers_complete(text, 2, numeric=True)  # "#### 9" may still grow
    assert pr.answers_complete(text + "\n", 2, numeric=True)


# Joint completions as the runner returns them (`RowOutput.text`: the new tokens only, so
# without the pre-filled "Answer 1:"), with each query's expected score and whether it fails.
NUMERIC_REPLIES = [
    (" 3 + 4 = 7\n#### 7\n\nAnswer 2: 10 - 2 = 8\n#### 8\n", [1.0, 1.0], 0),
    ("\n3 + 4 = 7\n#### 7\n\n**Answer 2:** 10 - 2 = 8\n#### 8", [1.0, 1.0], 0),
    (" 3 + 4 = 7\n#### 7\n\nAnswer 2: I cannot tell.\n", [1.0, 0.0], 1),
    (" 3 + 4 = 7\n#### 7\n\n10 - 2 = 8\n#### 8\n", [1.0, 1.0], 0),  # markers dropped
    ("Answer 1: 3 + 4 = 7\n#### 7\nAnswer 2: 10 - 2 = 8\n#### 8\n", [1.0, 1.0], 0),  # restated
]
TEXT_REPLIES = [
    (" Tom asks Ann for the report.\n\nAnswer 2: They plan a trip.\n\n", [1.0, 1.0], 0),
    ("\nTom asks Ann for the report.\n\n", [1.0, 0.0], 1),  # a bare answer, then it stopped
    (" Tom asks Ann for the report.", [1.0, 0.0], 1),  # capped mid-way
    ("Answer 1: Tom asks Ann for the report.\nAnswer 2: They plan a trip.", [1.0, 1.0], 0),
]


@pytest.mark.parametrize(
    ("metric", "completion", "expected", "failures"),
    [("exact_match_number", *case) for case in NUMERIC_REPLIES]
    + [("rouge_l", *case) for case in TEXT_REPLIES],
)
def test_joint_completions_are_scored_as_the_model_returns_them(
    metric: str,
    completion: str,
    expected: list[float],
    failures: int,
    tmp_path: Path,
    tiny_model_cfg: Callable[..., dict[str, Any]],
) -> None:
    """The completion holds only the new tokens; the reply it continues starts with the
    pre-filled "Answer 1:", so answer 1 is scored whether or not the model writes a marker."""
    answers = (
        ["3 + 4 = 7\n#### 7", "10 - 2 = 8\n#### 8"]
        if metric == "exact_match_number"
        else ["Tom asks Ann for the report.", "They plan a trip."]
    )
    pool = _pool(2) + [Example(f"q{k}", "?", a, (a,)) for k, a in enumerate(answers)]
    task = {**TASK, "metric": metric}
    method = _method(tmp_path, tiny_model_cfg(tmp_path), task, n_demos=2, n_queries=2)
    out = rn.EpisodeOutput([1.0, 3.0], [rn.RowOutput(text=completion, new_tokens=30)])
    record = method._record(ep.Episode(0, (0, 1), (2, 3)), [0, 1], out, pool, pool)
    assert record["query_scores"] == pytest.approx(expected)
    assert record["parse_failures"] == failures
    assert record["completions"] == [completion]  # logged as generated
    # The stop check reads the same reply: a numeric reply with both answers marked is done
    # at its last `####` line's end, and not before.
    stop = pr.JointStop(2, metric == "exact_match_number")
    fired = [stop.feed(piece) for piece in re.split(r"(?<=\n)", completion) if piece]
    if metric == "exact_match_number" and "Answer 2: 10" in completion and completion[-1] == "\n":
        assert fired[-1] and not any(fired[:-1])


def test_a_separate_row_stops_at_its_final_line_or_a_new_question() -> None:
    def fed(pieces: list[str], numeric: bool = True) -> int | None:
        stop = pr.SeparateStop(numeric)
        return next((i for i, piece in enumerate(pieces) if stop.feed(piece)), None)

    assert fed(["2 + 3", " = 5\n", "####", " 5", "\n", "more"]) == 4
    assert fed(["#### 1", "2", " apples", "\n"]) == 3  # the line is read once it ends
    assert fed(["It is 5.\n", "\n", "Question", ": how"]) == 2
    assert fed(["A summary.", "\n**Quest", "ion 2**"], numeric=False) == 2
    assert fed(["The question is hard.\n", "#### 4"]) is None
    assert pr.separate_answer("5 apples\n#### 5\n\nQuestion: next?") == "5 apples\n#### 5\n"


def test_ties_are_broken_by_the_run_seed() -> None:
    """All-equal scores: each seed selects its own subset, the same one every time."""
    tied = pd.DataFrame({"id": [f"x{i}" for i in range(40)], "score": 0.0})
    picks = [top_k(tied, 8, seed) for seed in (0, 1, 2)]
    assert len({tuple(sorted(p)) for p in picks}) == 3
    assert top_k(tied, 8, 1) == picks[1]
    ranked = pd.DataFrame({"id": ["a", "b", "c", "d"], "score": [0.1, 0.9, 0.5, 0.9]})
    assert {tuple(top_k(ranked, 3, seed)[2:]) for seed in range(5)} == {("c",)}
    assert {tuple(sorted(top_k(ranked, 2, seed))) for seed in range(5)} == {("b", "d")}


def _sampling_folder(source: Path, target: Path) -> Path:
    """The model folder re-saved with a generation_config.json that asks for sampling."""
    shutil.copytree(source, target)
    (target / "generation_config.json").write_text(
        json.dumps(
            {
                "do_sample": True,
                "temperature": 0.6,
                "top_p": 0.9,
                "top_k": 5,
                "transformers_version": "5.0.0",
            }
        )
    )
    return target


class _StopAfter:
    """A stop that fires after a set number of pieces (different for each row)."""

    def __init__(self, lengths: list[int]) -> None:
        self.n, self.seen = lengths.pop(0), 0

    def feed(self, piece: str) -> bool:
        self.seen += 1
        return self.seen >= self.n


def test_shared_prefix_rows_decode_greedily_as_rows_run_from_scratch(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """Prefix cache shared, rows padded in the middle, finished rows leaving the batch: the
    completions are each row's own greedy argmax, even when the model folder asks to sample."""
    folder = _sampling_folder(tiny_llama_dir, tmp_path / "sampling")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.generation_config.do_sample  # the trap: model.generate would sample
    episodes = _episodes(tokenizer, "separate", "generate")
    max_new, lengths = 6, [2, 6, 4, 3, 6, 1]  # per row, in batch order
    use_capture_attention(model)
    runner = rn.EpisodeRunner(model, tokenizer, 1, "query_block", {tokenizer.eos_token_id})
    batch_sizes: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    done: dict[tuple[int, int], rn.EpisodeOutput] = {}
    try:
        for seed in (0, 1):  # sampling would differ between seeds
            torch.manual_seed(seed)
            stop_lengths = list(lengths)
            runner.generate(
                episodes,
                lambda stop_lengths=stop_lengths: _StopAfter(stop_lengths),
                max_new,
                lambda b, o, seed=seed: done.__setitem__((seed, b), o),
            )
    finally:
        runner.close()
        hook.remove()
    rows = [(e, row) for e in episodes for row in e.rows]
    outputs = [out for b in range(2) for out in done[(0, b)].rows]
    assert [o.text for o in outputs] == [o.text for b in range(2) for o in done[(1, b)].rows]
    for (episode, row), out, length in zip(rows, outputs, lengths, strict=True):
        ids = list(episode.prefix_ids + row.suffix_ids)
        for _ in range(length):
            with torch.no_grad():
                token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token == tokenizer.eos_token_id:
                break
        scratch = ids[len(episode.prefix_ids + row.suffix_ids) :]
        assert out.new_tokens == len(scratch)
        assert out.text == tokenizer.decode(scratch, skip_special_tokens=True)
    # One call: one packed forward (2 episodes, 6 rows), then steps with the unfinished rows.
    first_call = batch_sizes[: len(batch_sizes) // 2]
    assert first_call == [2, 5, 4, 3, 2, 2]  # rows stop after 1, 2, 3, 4 and 6 pieces


def _final_number_chars(text: str) -> tuple[int, int]:
    """Characters of a gold answer's final `#### n` number, found independently of prompts.py."""
    line_start = text.rindex("####")
    value = text[line_start + 4 :].split("\n")[0].strip()
    begin = text.index(value, line_start)
    return begin, begin + len(value)


@pytest.mark.parametrize("span", ["answer", "final"])
@pytest.mark.parametrize("layout", pr.QUERY_LAYOUTS)
def test_likelihood_scores_equal_a_hand_computation(
    layout: str,
    span: str,
    tmp_path: Path,
    tiny_qwen2_dir: Path,
    tiny_model_cfg: Callable[..., dict[str, Any]],
) -> None:
    """Each query's score is the mean probability of its gold answer's tokens (`answer`) or of
    its final number's (`final`), teacher-forced right after the generating prompt (joint: with
    "Answer k:" in place of "Answer 1:", no other query's gold answer before it), checked
    against a plain forward over the whole row."""
    method = _method(
        tmp_path,
        tiny_model_cfg(tiny_qwen2_dir, "qwen2"),
        n_demos=3,
        n_queries=2,
        query_layout=layout,
        query_scoring="likelihood",
        likelihood_span=span,
    )
    pool = _pool(12, corrupt_share=0.0 if span == "final" else 0.3)
    method.score(pool)
    assert method.stats["generated_tokens_per_episode"] == 0
    records = [json.loads(x) for x in (tmp_path / ep.CHECKPOINT_FILE).read_text().splitlines()[1:]]
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    by_id = {ex.id: ex for ex in pool}
    for record in records:
        demos = [by_id[i] for i in record["demo_ids"]]
        queries = [by_id[i] for i in record["query_ids"]]
        history = []
        for demo in demos:
            history += [
                {"role": "user", "content": demo.prompt.strip()},
                {"role": "assistant", "content": demo.response.strip()},
            ]
        if layout == "joint":
            generating = pr.build_joint_prompt(tokenizer, demos, queries, method.instruction)
            joint = generating.rows[0].text
        for k, (query, score, correct) in enumerate(
            zip(queries, record["query_scores"], record["correct"], strict=True), 1
        ):
            if layout == "joint":
                prompt, lead = joint.removesuffix(pr.ANSWER_PREFILL) + f"Answer {k}:", "\n"
            else:
                prompt, lead = (
                    tokenizer.apply_chat_template(
                        [*history, {"role": "user", "content": query.prompt.strip()}],
                        tokenize=False,
                        add_generation_prompt=True,
                    ),
                    "",
                )
            gold = query.response.strip()
            head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            whole = tokenizer(
                prompt + lead + gold, add_special_tokens=False, return_offsets_mapping=True
            )
            full = whole["input_ids"]
            assert full[: len(head)] == head
            first, last = (len(prompt) + len(lead), len(prompt) + len(lead) + len(gold))
            if span == "final":
                first, last = (len(prompt) + len(lead) + c for c in _final_number_chars(gold))
            scored = [
                t for t, (a, b) in enumerate(whole["offset_mapping"]) if a < last and b > first
            ]
            with torch.no_grad():
                probs = torch.softmax(model(torch.tensor([full])).logits[0].double(), dim=-1)
            expected = np.mean([float(probs[t - 1, full[t]]) for t in scored])
            assert score == pytest.approx(expected, rel=1e-4)
            assert (correct is None) == ("####" not in query.response)


def _merging_tokenizer(folder: Path) -> Any:
    """The tiny Qwen2's tokenizer (Qwen2's pre-tokenizer) with one more merge, ":" + "\\n": as
    in tiktoken-style vocabularies such as Llama 3's, ":\\n" becomes one token."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["model"]["vocab"][":\u010a"] = len(spec["model"]["vocab"])  # byte-level "\\n" is "\u010a"
    spec["model"]["merges"].append([":", "\u010a"])
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    assert len(tokenizer(":\nx", add_special_tokens=False)["input_ids"]) == 2
    return tokenizer


@pytest.mark.parametrize("span", rn.ATTENTION_SPANS)
@pytest.mark.parametrize("which", ["smollm2", "merging"])
def test_likelihood_rows_keep_the_generating_prompt_and_its_weights(
    which: str, span: str, tiny_llama_dir: Path, tiny_qwen2_dir: Path
) -> None:
    """Joint teacher forcing: row k's prompt tokens are the generating prompt's with "Answer k:"
    (row 1's are exactly the generating row's), its gold answer follows, and the demonstration
    weights equal the generating run's, also where the tokenizer would merge the prompt's last
    ":" with the answer's "\\n"."""
    if which == "smollm2":
        tokenizer, model = (
            AutoTokenizer.from_pretrained(tiny_llama_dir),
            _sharp_model(tiny_llama_dir),
        )
    else:
        tokenizer, model = _merging_tokenizer(tiny_qwen2_dir), _sharp_model(tiny_qwen2_dir)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    pool = _pool(12)
    generating, forced = [], []
    for demos, queries in [(pool[0:4], pool[8:11]), (pool[4:6], pool[9:12])]:
        prompt = pr.build_joint_prompt(tokenizer, demos, queries, "Solve them.")
        generating.append(pr.encode_episode(tokenizer, prompt))
        forced.append(
            pr.encode_episode(
                tokenizer, pr.build_joint_prompt(tokenizer, demos, queries, "Solve them.", True)
            )
        )
        text = prompt.rows[0].text
        assert len(forced[-1].rows) == len(queries)
        for k, (row, query) in enumerate(zip(forced[-1].rows, queries, strict=True), 1):
            head = tokenizer(
                text.removesuffix(pr.ANSWER_PREFILL) + f"Answer {k}:", add_special_tokens=False
            )["input_ids"]
            ids = list(forced[-1].prefix_ids + row.suffix_ids)
            assert ids[: len(head)] == head
            assert tokenizer.decode(ids[len(head) :]) == "\n" + query.response.strip()
        row_one = forced[-1].prefix_ids + forced[-1].rows[0].suffix_ids
        generating_ids = generating[-1].prefix_ids + generating[-1].rows[0].suffix_ids
        assert row_one[: len(generating_ids)] == generating_ids
    references = [_reference_weights(model, e, 1, span) for e in generating]
    use_capture_attention(model)
    runner = rn.EpisodeRunner(model, tokenizer, 1, span, {tokenizer.eos_token_id})
    try:
        free = _run(runner, generating, "generate")
        teacher_forced = _run(runner, forced, "likelihood")
    finally:
        runner.close()
    for reference, a, b in zip(references, free, teacher_forced, strict=True):
        np.testing.assert_allclose(b.attention, a.attention, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(np.asarray(b.attention) / sum(b.attention), reference, atol=1e-5)


@pytest.mark.parametrize("layout", pr.QUERY_LAYOUTS)
def test_a_query_score_does_not_depend_on_another_querys_gold_answer(
    layout: str, tiny_llama_dir: Path
) -> None:
    """Teacher forcing scores each gold answer after the prompt alone: another query's gold
    answer (joint: the answers before it in one reply) must not condition it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = _sharp_model(tiny_llama_dir)
    pool = _pool(12)
    demos, queries = pool[0:4], pool[8:11]
    changed = [Example("other", queries[0].prompt, "I am not sure.\n#### 0", ("x",)), *queries[1:]]
    build = pr.build_separate_prompt if layout == "separate" else pr.build_joint_prompt
    use_capture_attention(model)
    runner = rn.EpisodeRunner(model, tokenizer, 1, "query_block", {tokenizer.eos_token_id})
    try:
        outputs = [
            runner.likelihood(
                [pr.encode_episode(tokenizer, build(tokenizer, demos, q, "Go.", True))]
            )[0]
            for q in (queries, changed)
        ]
    finally:
        runner.close()
    before, after = ([p for row in out.rows for p in row.gold_probs] for out in outputs)
    assert len(before) == len(after) == 3 and len(before[0]) != len(after[0])
    for k in (1, 2):
        np.testing.assert_allclose(after[k], before[k], rtol=1e-5)
    np.testing.assert_allclose(outputs[1].attention, outputs[0].attention, rtol=1e-5)


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
    log = tmp_path / ep.CHECKPOINT_FILE
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
    from dwbench.methods.data_whisperer import method as dw

    # Random tiny models never answer correctly; score a completion by a hash of its text, so
    # scores depend on what was generated as well as on the attention.
    def by_text(self, out, queries):
        text = out.rows[0].text
        return [zlib.crc32(text.encode()) % 97 / 96] * len(queries), 0, [], [text], None

    dw.DataWhisperer._query_scores = by_text
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
        "bad_layout",
        "final_span_without_final_answers",
        "final_span_when_generating",
        "final_span_on_a_text_task",
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
    elif case == "bad_layout":
        overrides, expected = {"query_layout": "rows"}, (ConfigError, "method.query_layout")
    elif case.startswith("final_span"):
        overrides = {"n_demos": 3, "n_queries": 2, "query_scoring": "likelihood"}
        overrides["likelihood_span"] = "final"
        if case == "final_span_without_final_answers":  # a gold answer lost its `#### n` line
            pool = [
                Example(ex.id, ex.prompt, ex.response.split("####")[0], ex.references)
                for ex in pool
            ]
            expected = (DataError, r"query example 'pool-\d{5}' has no final `#### n` line")
        elif case == "final_span_when_generating":
            overrides["query_scoring"] = "generate"
            expected = (ConfigError, "needs method.query_scoring=likelihood")
        else:
            task["metric"] = "rouge_l"
            expected = (ConfigError, "likelihood_span=final .*metric rouge_l")
    else:
        overrides, expected = {"attention_span": "last_token"}, (ConfigError, "attention_span")
    with pytest.raises(expected[0], match=expected[1]):
        _method(tmp_path, selector, task, **overrides).score(pool)
    log = tmp_path / ep.CHECKPOINT_FILE
    assert not log.exists() or len(log.read_text().splitlines()) == 1  # no episode ran
