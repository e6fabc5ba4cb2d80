"""RDS+ and IFD against brute-force computations on a tiny model (one example at a time, full
logits or hidden states, no padding, no batching), plus their hand-worked selection rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dwbench.chat import encode_supervised
from dwbench.data.records import Example
from dwbench.errors import ConfigError
from dwbench.methods import lm_signals
from dwbench.methods.base import ScoringContext
from dwbench.methods.ifd import IFD, ifd_score
from dwbench.methods.rds_plus import RDSPlus, round_robin


def _example(id_: str, prompt: str, response: str) -> Example:
    return Example(id_, prompt, response, (response,))


POOL = [
    _example("a", "What is 2 + 3?", "2 + 3 = 5\n#### 5"),
    _example("b", "Tom has 4 apples and eats 1. How many are left?", "4 - 1 = 3\n#### 3"),
    _example("c", "Double 21.", "21 * 2 = 42\n#### 42"),
    _example("d", "Summarize: #P1#: hello #P2#: hi there", "Two people greet each other."),
    _example("e", "Translate 'cat' to French.", "chat"),
    _example("f", "Name a colour.", "Blue is a colour, and so is red."),
]
QUERIES = [
    _example("q1", "What is 6 + 1?", "6 + 1 = 7\n#### 7"),
    _example("q2", "Summarize: #P1#: bye #P2#: see you", "They say goodbye."),
]


def _context(method_cfg: dict, folder: Path, cfg: Any, cache_dir: Path, queries=None) -> Any:
    return ScoringContext(
        method_cfg, {}, cfg(folder), queries, 0, "cpu", cache_dir, cache_dir / "work"
    )


def _brute_nll(model: Any, record: dict, first_n: int | None = None) -> tuple[float, int]:
    """Mean NLL over the response tokens (the first `first_n` of them) from full logits."""
    ids = torch.tensor([record["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    labels = torch.tensor(record["labels"][1:])
    positions = (labels != -100).nonzero()[:, 0][:first_n]
    nll = -logp[positions, labels[positions]]
    return float(nll.mean()), len(positions)


@pytest.mark.parametrize("cut", [False, True])
def test_ifd_matches_a_brute_force_ratio_of_perplexities(
    cut: bool, tiny_llama_dir: Path, tiny_model_cfg: Any, cache_dir: Path
) -> None:
    model, tokenizer = lm_signals.load_model(tiny_model_cfg(tiny_llama_dir), cache_dir, "cpu")
    full = [encode_supervised(tokenizer, ex.prompt, ex.response, 10_000) for ex in POOL]
    # cut: room for 2 response tokens after the longest prompt, so long responses are cut
    max_len = max(r["labels"].count(-100) for r in full) + 2 if cut else 10_000
    assert cut == any(len(r["input_ids"]) > max_len for r in full)
    cfg = {"max_ifd": None, "max_seq_len": max_len, "runtime": {"batch_size": 4}}
    scores = IFD(_context(cfg, tiny_llama_dir, tiny_model_cfg, cache_dir)).score(POOL)
    for ex, row in zip(POOL, scores.itertuples(), strict=True):
        given = encode_supervised(tokenizer, ex.prompt, ex.response, max_len)
        nll_given, n = _brute_nll(model, given)
        nll_alone, n_alone = _brute_nll(
            model, encode_supervised(tokenizer, "", ex.response, 256), n
        )
        assert n_alone == n == row.n_response_tokens
        assert row.ppl_given_prompt == pytest.approx(np.exp(nll_given), rel=1e-4)
        assert row.ppl_alone == pytest.approx(np.exp(nll_alone), rel=1e-4)
        assert row.ifd == pytest.approx(np.exp(nll_given - nll_alone), rel=1e-4)
        assert row.score == pytest.approx(row.ifd)  # no filter


def test_ifd_keeps_the_highest_below_the_filter_then_the_least_misaligned() -> None:
    ifd = np.array([0.2, 0.9, 1.0, 3.0, 0.5, 1.5])
    order = list(np.argsort(-ifd_score(ifd, 1.0), kind="stable"))
    assert order == [1, 4, 0, 2, 5, 3]
    assert list(np.argsort(-ifd_score(ifd, None), kind="stable"))[:2] == [3, 5]


def test_ifd_options_are_checked_up_front() -> None:
    with pytest.raises(ConfigError, match=r"method.max_ifd=-1 is not a number > 0, or null"):
        IFD.check_options({"max_ifd": -1, "max_seq_len": 8, "runtime": {"batch_size": 1}}, {}, 4)
    with pytest.raises(ConfigError, match="method.runtime.batch_size=0"):
        IFD.check_options({"max_ifd": 1.0, "max_seq_len": 8, "runtime": {"batch_size": 0}}, {}, 4)


def _brute_embedding(model: Any, record: dict) -> np.ndarray:
    ids = torch.tensor([record["input_ids"]])
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0].double().numpy()
    weights = np.arange(1, len(hidden) + 1, dtype=float)
    return (hidden * weights[:, None]).sum(0) / weights.sum()


def _brute_round_robin(similarity: np.ndarray) -> list[int]:
    picked: list[int] = []
    while len(picked) < len(similarity):
        for t in range(similarity.shape[1]):
            left = [i for i in range(len(similarity)) if i not in picked]
            if not left or len(picked) == len(similarity):
                break
            picked.append(max(left, key=lambda i: (similarity[i, t], -i)))
    return picked


@pytest.mark.parametrize("targets", ["queries", "pool"])
def test_rds_plus_matches_brute_force_embeddings_and_round_robin(
    targets: str, tiny_llama_dir: Path, tiny_model_cfg: Any, cache_dir: Path
) -> None:
    cfg = {"n_targets": 2, "max_seq_len": 256, "runtime": {"batch_size": 4}}
    queries = QUERIES if targets == "queries" else None
    method = RDSPlus(_context(cfg, tiny_llama_dir, tiny_model_cfg, cache_dir, queries))
    scores = method.score(POOL)
    model, tokenizer = lm_signals.load_model(tiny_model_cfg(tiny_llama_dir), cache_dir, "cpu")
    embed = [
        _brute_embedding(model, encode_supervised(tokenizer, ex.prompt, ex.response, 256))
        for ex in POOL
    ]
    if queries:
        target_rows = [
            _brute_embedding(model, encode_supervised(tokenizer, q.prompt, q.response, 256))
            for q in queries
        ]
        own: list[int] = []
    else:
        own = [i for i, flag in enumerate(scores["is_target"]) if flag]
        assert len(own) == 2
        target_rows = [embed[i] for i in own]
    unit = [e / np.linalg.norm(e) for e in embed]
    similarity = np.array([[u @ (t / np.linalg.norm(t)) for t in target_rows] for u in unit])
    for j, i in enumerate(own):
        similarity[i, j] = -np.inf
    expected = _brute_round_robin(similarity)
    got = list(np.argsort(-scores["score"].to_numpy(), kind="stable"))
    assert got == expected
    assert list(scores["round_robin_rank"].iloc[expected]) == list(range(len(POOL)))
    for k in range(1, len(POOL) + 1):  # top-k is the round-robin pick at every budget
        assert set(method.select(scores, k)) == {POOL[i].id for i in expected[:k]}


def test_round_robin_hand_worked() -> None:
    similarity = np.array([[0.9, 0.8], [0.8, 0.1], [0.1, 0.7], [0.0, 0.6]])
    order, picker = round_robin(similarity)
    # target 0 takes 0; target 1's best (0) is taken, so 2; target 0 then 1; target 1 then 3
    assert list(order) == [0, 2, 1, 3] and list(picker) == [0, 1, 0, 1]


def test_rds_plus_refuses_as_many_pool_targets_as_examples() -> None:
    cfg = {"n_targets": 5, "max_seq_len": 8, "runtime": {"batch_size": 1}}
    with pytest.raises(ConfigError, match="method.n_targets=5 must be below the pool's 5"):
        RDSPlus.check_options(cfg, {"query_source": "pool_kfold"}, 5)
    RDSPlus.check_options(cfg, {"query_source": "validation"}, 5)
