"""Data Whisperer's attribution switches and `python -m dwbench.bench attribution`.

The switches re-read the episode log; each is checked against a hand computation written with
plain loops on a few hand-made episodes, and the bench on a tiny model, whose split-half
reliability is recomputed from its own episode log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from dwbench.bench import attribution as at
from dwbench.config_files import CONF_DIR
from dwbench.errors import ConfigError
from dwbench.methods.data_whisperer import episodes as ep
from dwbench.methods.data_whisperer.settings import Settings

# Five examples, four episodes of two or three demonstrations, two queries each.
EPISODES = [
    ep.Contribution([0, 1, 2], 0.5, [1.0, 2.0, 5.0], ["q1", "q2"], [1.0, 0.0]),
    ep.Contribution([3, 4, 0], 0.25, [2.0, 2.0, 4.0], ["q1", "q3"], [0.5, 0.0]),
    ep.Contribution([1, 3], 0.75, [3.0, 1.0], ["q2", "q3"], [1.0, 0.5]),
    ep.Contribution([2, 4, 1], 0.0, [1.0, 1.0, 1.0], ["q1", "q2"], [0.0, 0.0]),
]


def _mean_scores(n: int, episodes: list, weights: list[list[float]], scores: list[float]):
    """S[i] = mean over i's appearances of s_e * w_e,i, by loops."""
    total, count = [0.0] * n, [0] * n
    for c, w, s in zip(episodes, weights, scores, strict=True):
        for d, wi in zip(c.demos, w, strict=True):
            total[d] += s * wi
            count[d] += 1
    return np.array([t / max(k, 1) for t, k in zip(total, count, strict=True)])


def _normalised(a: list[float]) -> list[float]:
    return [len(a) * x / sum(a) for x in a]


def test_defaults_are_the_paper_arithmetic() -> None:
    table = ep.accumulate(5, EPISODES, weighting=True)
    weights = [_normalised(list(c.attention)) for c in EPISODES]
    expected = _mean_scores(5, EPISODES, weights, [c.score for c in EPISODES])
    np.testing.assert_allclose(table.score, expected, rtol=0, atol=1e-15)
    assert table.appearances.tolist() == [2, 3, 2, 2, 2]


def test_position_correction_divides_by_each_positions_mean_weight() -> None:
    weights = [_normalised(list(c.attention)) for c in EPISODES]
    means = []
    for p in range(3):
        at_p = [w[p] for w in weights if len(w) > p]
        means.append(sum(at_p) / len(at_p))
    corrected = [_normalised([wi / means[p] for p, wi in enumerate(w)]) for w in weights]
    expected = _mean_scores(5, EPISODES, corrected, [c.score for c in EPISODES])
    table = ep.accumulate(5, EPISODES, weighting=True, attention_correction="position")
    np.testing.assert_allclose(table.score, expected, rtol=0, atol=1e-12)
    assert not np.allclose(table.score, ep.accumulate(5, EPISODES, weighting=True).score)


def test_position_correction_removes_a_pure_position_effect() -> None:
    """Attention that only grows with position gives every demonstration the same weight."""
    episodes = [ep.Contribution([i, i + 1, i + 2], 1.0, [1.0, 2.0, 4.0]) for i in range(4)]
    table = ep.accumulate(6, episodes, weighting=True, attention_correction="position")
    np.testing.assert_allclose(table.mean_weight[table.appearances > 0], 1.0)


def test_query_baseline_subtracts_each_querys_mean_score() -> None:
    by_query: dict[str, list[float]] = {}
    for c in EPISODES:
        for q, v in zip(c.query_ids, c.query_scores, strict=True):
            by_query.setdefault(q, []).append(v)
    mean = {q: sum(v) / len(v) for q, v in by_query.items()}
    scores = [
        sum(v - mean[q] for q, v in zip(c.query_ids, c.query_scores, strict=True))
        / len(c.query_ids)
        for c in EPISODES
    ]
    weights = [_normalised(list(c.attention)) for c in EPISODES]
    table = ep.accumulate(5, EPISODES, weighting=True, query_baseline="mean")
    np.testing.assert_allclose(table.score, _mean_scores(5, EPISODES, weights, scores), atol=1e-12)
    # an easy query no longer lifts its demonstrations: a constant query scores 0 everywhere
    same = [ep.Contribution(c.demos, 1.0, c.attention, ["q"] * 2, [1.0, 1.0]) for c in EPISODES]
    np.testing.assert_allclose(ep.accumulate(5, same, True, query_baseline="mean").score, 0.0)


def test_query_baseline_needs_the_queries_in_the_log() -> None:
    with pytest.raises(Exception, match="query_ids and query_scores"):
        ep.accumulate(3, [ep.Contribution([0, 1], 0.5, [1.0, 1.0])], True, query_baseline="mean")


def test_zero_shot_baseline_subtracts_each_querys_score_without_demonstrations() -> None:
    zero = {"q1": 0.25, "q2": 0.5, "q3": 0.0}
    scores = [
        sum(v - zero[q] for q, v in zip(c.query_ids, c.query_scores, strict=True))
        / len(c.query_ids)
        for c in EPISODES
    ]
    weights = [[1.0] * len(c.demos) for c in EPISODES]
    table = ep.accumulate(5, EPISODES, False, query_baseline="zero_shot", zero_shot=zero)
    np.testing.assert_allclose(table.score, _mean_scores(5, EPISODES, weights, scores), atol=1e-12)
    with pytest.raises(Exception, match=r"'q2' has no zero-shot score \(2 queries lack one\)"):
        ep.accumulate(5, EPISODES, False, query_baseline="zero_shot", zero_shot={"q1": 0.0})


@pytest.mark.parametrize("weighting", [True, False])
def test_ridge_equals_the_closed_form_solution(weighting: bool) -> None:
    """beta = (Xc'Xc + alpha I)^-1 Xc'yc, X holding w_i (or 1) at each episode's demonstrations."""
    rng = np.random.default_rng(0)
    episodes = [
        ep.Contribution(
            list(rng.choice(8, size=3, replace=False)),
            float(rng.random()),
            list(rng.random(3) + 0.1),
        )
        for _ in range(12)
    ]
    x = np.zeros((12, 8))
    for e, c in enumerate(episodes):
        w = _normalised(list(c.attention)) if weighting else [1.0] * 3
        for d, wi in zip(c.demos, w, strict=True):
            x[e, d] = wi
    y = np.array([c.score for c in episodes])
    xc, yc = x - x.mean(axis=0), y - y.mean()
    beta = np.linalg.solve(xc.T @ xc + ep.RIDGE_ALPHA * np.eye(8), xc.T @ yc)
    table = ep.accumulate(8, episodes, weighting=weighting, aggregation="ridge")
    np.testing.assert_allclose(table.score, beta, atol=1e-8)


def test_split_half_reliability_is_spearman_of_even_and_odd_passes() -> None:
    rng = np.random.default_rng(1)
    n, episodes, passes = 12, [], []
    for p in range(4):
        order = rng.permutation(n)
        for start in range(0, n, 3):
            demos = [int(i) for i in order[start : start + 3]]
            queries = [f"q{int(q)}" for q in rng.choice(5, 2, replace=False)]
            values = [float(v) for v in rng.random(2)]
            episodes.append(
                ep.Contribution(demos, float(np.mean(values)), list(rng.random(3)), queries, values)
            )
            passes.append(p)
    for switches in ({}, {"query_baseline": "mean", "attention_correction": "position"}):
        halves = [
            ep.accumulate(
                n,
                [c for c, p in zip(episodes, passes, strict=True) if p % 2 == h],
                True,
                **switches,
            ).score
            for h in (0, 1)
        ]
        expected = spearmanr(halves[0], halves[1]).statistic
        got = ep.split_half_reliability(n, episodes, passes, True, **switches)
        assert got == pytest.approx(expected, abs=1e-12)
        # not the full run's scores against themselves
        assert got < 1.0


def _settings(**overrides: Any) -> Settings:
    cfg = OmegaConf.to_container(
        OmegaConf.load(CONF_DIR / "method" / "data_whisperer.yaml"), resolve=False
    )
    cfg.update(query_source="pool_kfold", max_new_tokens_per_answer=64, prompt_dataset="gsm8k")
    cfg.update(overrides)
    return Settings.from_config(cfg)


def test_switches_are_checked_and_stay_out_of_the_plan_id() -> None:
    default = _settings()
    assert default.accumulation() == {
        "attention_correction": "none",
        "query_baseline": "none",
        "aggregation": "mean",
    }
    changed = _settings(attention_correction="position", query_baseline="mean", aggregation="ridge")
    assert changed.result_fields() == default.result_fields()  # one episode log serves both
    for key, bad in [
        ("attention_correction", "rank"),
        ("query_baseline", "median"),
        ("aggregation", "sum"),
    ]:
        with pytest.raises(ConfigError, match=f"method.{key}='{bad}' is not one of"):
            _settings(**{key: bad})
    with pytest.raises(ConfigError, match="attention_weighting=false uses none"):
        _settings(attention_correction="position", attention_weighting=False)
    with pytest.raises(ConfigError, match="score_arithmetic=float16"):
        _settings(aggregation="ridge", score_arithmetic="float16")
    likelihood = {"query_scoring": "likelihood", "query_layout": "separate"}
    read = _settings(**likelihood, query_baseline="zero_shot", likelihood_score="log_probability")
    assert read.result_fields() == _settings(**likelihood).result_fields()
    with pytest.raises(ConfigError, match="needs method.query_scoring=likelihood"):
        _settings(likelihood_score="log_probability")
    with pytest.raises(ConfigError, match="set method.query_layout=separate"):
        _settings(query_scoring="likelihood", query_baseline="zero_shot")
    with pytest.raises(ConfigError, match="method.likelihood_score='nats' is not one of"):
        _settings(**likelihood, likelihood_score="nats")


def test_variants_parse_and_share_logs_across_accumulation_switches() -> None:
    variants = at.parse_variants(["likelihood-p4", "mine=method=perplexity_low,seed=3"])
    assert variants["mine"] == ("method=perplexity_low", "seed=3")
    assert at.method_of(variants["likelihood-p4"])[0] == "data_whisperer_likelihood"
    assert at.method_of(["method.passes=2"])[0] == "data_whisperer"
    key = at.log_key("embedded_gsm", 200, 0, 0, at.VARIANTS["likelihood-p4"])
    for label in ("likelihood-p4-ridge", "likelihood-p4-position-baseline-ridge"):
        assert at.log_key("embedded_gsm", 200, 0, 0, at.VARIANTS[label]) == key
    assert at.log_key("embedded_gsm", 200, 1, 0, at.VARIANTS["likelihood-p4"]) != key
    one_shot = at.log_key("embedded_gsm", 200, 0, 0, at.VARIANTS["oneshot-p2"])
    for label in ("oneshot-p2-zeroshot", "oneshot-p2-logprob", "oneshot-p2-logprob-zeroshot"):
        assert at.log_key("embedded_gsm", 200, 0, 0, at.VARIANTS[label]) == one_shot
    assert at.log_key("embedded_gsm", 200, 0, 0, at.VARIANTS["likelihood-p4-noattn"]) != key
    with pytest.raises(ConfigError, match="unknown variant"):
        at.parse_variants(["nope"])


def test_auroc_interval_brackets_the_separation() -> None:
    flags = [True] * 10 + [False] * 10
    assert at.auroc_interval(list(range(20, 0, -1)), flags, 200) == (1.0, 1.0)
    low, high = at.auroc_interval(list(np.random.default_rng(0).random(20)), flags, 500)
    assert 0.0 <= low < 0.5 < high <= 1.0


def test_diagnostics_match_hand_counts() -> None:
    flags = {"a": True, "b": False, "c": True}
    records = [
        {"demo_ids": ["a", "b"], "attention": [1.0, 3.0], "score": 0.2},
        {"demo_ids": ["c", "a"], "attention": [1.0, 1.0], "score": 0.6},
    ]
    rows = {(r["quantity"], r.get("position")): r for r in at.diagnostics(records, flags)}
    assert rows[("weight_by_position", 0)]["value"] == pytest.approx((0.5 + 1.0) / 2)
    assert rows[("weight_by_position", 1)]["value"] == pytest.approx((1.5 + 1.0) / 2)
    assert rows[("weight_corrupted", None)]["value"] == pytest.approx(1.5)
    assert rows[("weight_clean", None)]["value"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert rows[("episode_score_clean", None)]["value"] == pytest.approx((0.2 + 0.6 + 0.6) / 3)
    assert rows[("score_per_corrupted_demo", None)]["value"] == pytest.approx(0.2 - 0.6)


def test_auroc_by_kind_compares_clean_examples_with_each_kind_alone() -> None:
    scores = pd.DataFrame({"id": list("abcde"), "score": [0.9, 0.8, 0.1, 0.85, 0.5]})
    flags = {"a": True, "b": True, "c": False, "d": False, "e": False}
    kinds = {"a": None, "b": None, "c": "missing_final", "d": "broken_step", "e": "broken_step"}
    rows = {r["quantity"]: r for r in at.auroc_by_kind(scores, flags, kinds)}
    assert rows["auroc_vs_missing_final"]["value"] == 1.0  # 0.1 below both clean
    assert rows["auroc_vs_broken_step"]["value"] == pytest.approx(3 / 4)  # 0.85 beats 0.8 only
    assert rows["auroc_vs_broken_step"]["n"] == 2


def _tiny_selector(folder: Path) -> list[str]:
    """Overrides that make the tiny llama the selector (attention read at its last layer)."""
    return [
        f"selector_model.path={folder}",
        "selector_model.name=tiny_llama",
        "selector_model.id=tiny/llama",
        "selector_model.embedded=null",
        "selector_model.attention_layer=1",
        "selector_model.num_layers=2",
    ]


def test_the_bench_on_a_tiny_model(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Two variants share one episode log; reliability is the split halves' Spearman."""
    from dwbench.bench.__main__ import main

    small = "method=data_whisperer_likelihood,method.episode_order=random,method.passes=2"
    small += ",method.n_demos=3,method.n_queries=2"
    model = _tiny_selector(tiny_llama_dir)
    out = tmp_path / "study.csv"
    argv = ["attribution", "--pool-size", "24", "--resamples", "50", "--csv", str(out)]
    argv += ["--diagnostics", str(tmp_path / "diag.csv"), "--figure", str(tmp_path / "f.png")]
    argv += ["--work-dir", str(tmp_path / "work"), "--variants", f"p2={small}"]
    argv += [f"p2-ridge={small},method.aggregation=ridge", "perplexity_low"]
    for o in model:
        argv += ["-o", o]
    main(argv)
    table = pd.read_csv(out)
    assert tuple(table.columns) == at.COLUMNS
    assert table["variant"].tolist() == ["p2", "p2-ridge", "perplexity_low"]
    assert table["log_reused"].tolist() == [False, True, False]
    assert table["passes"].iloc[0] == 2
    assert np.isnan(table["split_half_reliability"].iloc[2])
    assert (tmp_path / "f.png").stat().st_size > 0
    diagnostic = pd.read_csv(tmp_path / "diag.csv")
    assert set(diagnostic["quantity"]) >= {"weight_by_position", "weight_clean", "weight_corrupted"}
    # recompute the first variant's reliability from its log: even passes against odd ones
    log = next((tmp_path / "work").glob("*/episodes.jsonl"))
    records = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    pool = sorted({d for r in records for d in r["demo_ids"]})
    per_pass = len(records) // 2
    halves = []
    for parity in (0, 1):
        total, count = dict.fromkeys(pool, 0.0), dict.fromkeys(pool, 0)
        for r in records:
            if (r["episode"] // per_pass) % 2 != parity:
                continue
            for d, w in zip(r["demo_ids"], _normalised(r["attention"]), strict=True):
                total[d] += r["score"] * w
                count[d] += 1
        halves.append([total[d] / count[d] for d in pool])
    expected = spearmanr(halves[0], halves[1]).statistic
    assert table["split_half_reliability"].iloc[0] == pytest.approx(expected, abs=1e-9)


def _gold_log_probability(
    model: Any,
    tokenizer: Any,
    turns: list[dict],
    answer: str,
    hidden: tuple[str, str] | None = None,
) -> float:
    """log p(answer | chat prompt) by one plain forward pass over the whole text; with `hidden`
    (a demonstration's question and answer), the last turn's and the answer's tokens cannot see
    the tokens from its first text to the end of its second (a causal 4D mask, columns cut)."""
    import torch

    prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(prompt + answer, return_offsets_mapping=True, add_special_tokens=False)
    offsets, n = encoded["offset_mapping"], len(encoded["input_ids"])
    ids = torch.tensor([encoded["input_ids"]])
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    if hidden is not None:
        start = prompt.index(hidden[0])
        end = prompt.index(hidden[1], start) + len(hidden[1])
        columns = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
        # the row: the tokens that end after the earlier turns' text (the shared prefix)
        shared = len(tokenizer.apply_chat_template(turns[:-1], tokenize=False))
        row = next(i for i, (_, e) in enumerate(offsets) if e > shared)
        mask[row:, columns[0] : columns[-1] + 1] = False
    first = next(i for i, (s, _) in enumerate(offsets) if s >= len(prompt))
    with torch.no_grad():
        logits = model(ids, attention_mask=mask[None, None]).logits[0].double().log_softmax(-1)
    return float(sum(logits[t - 1, ids[0, t]] for t in range(first, n)))


def test_one_shot_episodes_against_zero_shot_are_paired_log_probability_effects(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """One demonstration per episode, each query's gold log-probability minus its zero-shot one:
    the logged values equal a plain forward pass, and the scores are their means."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dwbench.bench.__main__ import main
    from dwbench.bench.common import auroc, compose
    from dwbench.data.loading import load_task

    one = "method=data_whisperer_likelihood,method.n_demos=1,method.n_queries=2"
    one += ",method.episode_order=random,method.passes=2"
    one += ",method.query_baseline=zero_shot,method.likelihood_score=log_probability"
    model_overrides = _tiny_selector(tiny_llama_dir)
    out = tmp_path / "study.csv"
    argv = ["attribution", "--pool-size", "12", "--resamples", "20", "--csv", str(out)]
    argv += ["--diagnostics", str(tmp_path / "diag.csv"), "--figure", str(tmp_path / "f.png")]
    argv += ["--work-dir", str(tmp_path / "work"), "--variants", f"one={one}"]
    for o in model_overrides:
        argv += ["-o", o]
    main(argv)
    work = next((tmp_path / "work").glob("*/episodes.jsonl")).parent
    records = [json.loads(line) for line in (work / "episodes.jsonl").read_text().splitlines()[1:]]
    zero_lines = (work / "zero_shot.jsonl").read_text().splitlines()[1:]
    zero = {r["query_id"]: r["query_log_probs"][0] for r in map(json.loads, zero_lines)}
    assert set(zero) == {q for r in records for q in r["query_ids"]}
    assert all(json.loads(line)["seconds"] > 0 for line in zero_lines)  # selection time too

    cfg = compose("data_whisperer_likelihood", "embedded_gsm", 12, 0, ["task.generator.seed=0"])
    splits = load_task(cfg.task)
    pool = {ex.id: ex for ex in splits.pool}
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype="float32")
    record = records[0]
    demo, query = pool[record["demo_ids"][0]], pool[record["query_ids"][0]]
    shown = [
        {"role": "user", "content": demo.prompt.strip()},
        {"role": "assistant", "content": demo.response.strip()},
    ]
    asked = [{"role": "user", "content": query.prompt.strip()}]
    answer = query.response.strip()
    with_demo = _gold_log_probability(model, tokenizer, [*shown, *asked], answer)
    without = _gold_log_probability(model, tokenizer, asked, answer)
    assert record["query_log_probs"][0] == pytest.approx(with_demo, abs=1e-3)
    assert zero[query.id] == pytest.approx(without, abs=1e-3)
    assert with_demo != pytest.approx(without, abs=1e-3)  # the demonstration changes it

    effects: dict[str, list[float]] = {}
    for r in records:
        paired = [v - zero[q] for q, v in zip(r["query_ids"], r["query_log_probs"], strict=True)]
        effects.setdefault(r["demo_ids"][0], []).append(float(np.mean(paired)))
    ids = sorted(effects)
    assert all(len(effects[i]) == 2 for i in ids)  # one episode per pass
    scores = [float(np.mean(effects[i])) for i in ids]
    table = pd.read_csv(out)
    clean = [splits.clean_flags[i] for i in ids]
    assert table["auroc"].iloc[0] == pytest.approx(auroc(np.array(scores), np.array(clean)))
    halves = [[effects[i][p] for i in ids] for p in (0, 1)]
    expected = spearmanr(halves[0], halves[1]).statistic
    assert table["split_half_reliability"].iloc[0] == pytest.approx(expected, abs=1e-9)


def test_leave_one_out_effects_are_with_minus_without_each_demonstration(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """Each hidden-demonstration row equals a plain forward whose query and answer cannot see
    that demonstration; an example's score is the mean of with-minus-without over its
    episodes' queries; its split-half reliability is recomputed from the log."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dwbench.bench.__main__ import main
    from dwbench.bench.common import auroc, compose
    from dwbench.data.loading import load_task

    loo = "method=data_whisperer_likelihood,method.n_demos=2,method.n_queries=2"
    loo += ",method.episode_order=random,method.passes=2,method.attention_weighting=false"
    loo += ",method.leave_one_out=true,method.likelihood_score=log_probability"
    out = tmp_path / "study.csv"
    argv = ["attribution", "--pool-size", "12", "--resamples", "20", "--csv", str(out)]
    argv += ["--diagnostics", str(tmp_path / "diag.csv"), "--figure", str(tmp_path / "f.png")]
    argv += ["--work-dir", str(tmp_path / "work"), "--variants", f"loo={loo}"]
    for o in _tiny_selector(tiny_llama_dir):
        argv += ["-o", o]
    main(argv)
    log = next((tmp_path / "work").glob("*/episodes.jsonl"))
    records = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    assert all(len(r["blind_query_log_probs"]) == len(r["demo_ids"]) == 2 for r in records)

    cfg = compose("data_whisperer_likelihood", "embedded_gsm", 12, 0, ["task.generator.seed=0"])
    splits = load_task(cfg.task)
    pool = {ex.id: ex for ex in splits.pool}
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype="float32").eval()
    record = records[0]
    demos = [pool[i] for i in record["demo_ids"]]
    shown = [
        {"role": role, "content": text}
        for demo in demos
        for role, text in (("user", demo.prompt.strip()), ("assistant", demo.response.strip()))
    ]
    for q, query_id in enumerate(record["query_ids"]):
        query = pool[query_id]
        turns = [*shown, {"role": "user", "content": query.prompt.strip()}]
        answer = query.response.strip()
        with_all = _gold_log_probability(model, tokenizer, turns, answer)
        assert record["query_log_probs"][q] == pytest.approx(with_all, abs=1e-3)
        for i, demo in enumerate(demos):
            hidden = (demo.prompt.strip(), demo.response.strip())
            blind = _gold_log_probability(model, tokenizer, turns, answer, hidden)
            assert record["blind_query_log_probs"][i][q] == pytest.approx(blind, abs=1e-3)
            assert blind != pytest.approx(with_all, abs=1e-3)  # hiding it changes the row

    effects: dict[str, list[float]] = {}
    for r in records:
        for i, demo_id in enumerate(r["demo_ids"]):
            paired = np.subtract(r["query_log_probs"], r["blind_query_log_probs"][i])
            effects.setdefault(demo_id, []).append(float(np.mean(paired)))
    ids = sorted(effects)
    assert all(len(effects[i]) == 2 for i in ids)  # once per pass
    table = pd.read_csv(out)
    scores = [float(np.mean(effects[i])) for i in ids]
    clean = [splits.clean_flags[i] for i in ids]
    assert table["auroc"].iloc[0] == pytest.approx(auroc(np.array(scores), np.array(clean)))
    halves = [[effects[i][p] for i in ids] for p in (0, 1)]
    expected = spearmanr(halves[0], halves[1]).statistic
    assert table["split_half_reliability"].iloc[0] == pytest.approx(expected, abs=1e-9)


def test_leave_one_out_is_checked_and_changes_the_plan_id() -> None:
    likelihood = {"query_scoring": "likelihood", "query_layout": "separate"}
    loo = _settings(**likelihood, attention_weighting=False, leave_one_out=True)
    assert loo.leave_one_out
    assert loo.result_fields() != _settings(**likelihood, attention_weighting=False).result_fields()
    assert "leave_one_out" not in _settings().result_fields()  # old plan ids stay as they were
    for bad, message in [
        ({"attention_weighting": False}, "needs method.query_scoring=likelihood"),
        ({"query_scoring": "likelihood", "attention_weighting": False}, "query_layout=separate"),
        (likelihood, "needs method.attention_weighting=false"),
        ({**likelihood, "attention_weighting": False, "query_baseline": "mean"}, "cancels"),
        ({**likelihood, "attention_weighting": False, "aggregation": "ridge"}, "aggregation=mean"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _settings(**bad, leave_one_out=True)
    with pytest.raises(ConfigError, match="method.leave_one_out='yes' must be true or false"):
        _settings(leave_one_out="yes")
