"""The baseline selection methods on tiny models built in the test.

Signals are checked against direct computations (EL2N and perplexity from full logits, GraNd
from per-example autograd of the model's own loss); every method runs through the pipeline's
score and select stages twice with one seed and must select the same examples (the
per-example methods' second run is their sharded run in tests/test_shards.py); the scorer
fine-tune is shared and its time counted; a method missing its proxy model fails before work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_shards import PER_EXAMPLE_SHARDING

from dwbench import pipeline
from dwbench.config_files import CONF_DIR
from dwbench.data.records import Example, read_jsonl
from dwbench.errors import ConfigError
from dwbench.methods import lm_signals
from dwbench.methods.base import ScoringContext
from dwbench.methods.nuggets import Nuggets, golden_scores
from dwbench.methods.perplexity import variant_score


def _example(id_: str, prompt: str, response: str) -> Example:
    return Example(id_, prompt, response, (response,))


EXAMPLES = [
    _example("a", "What is 2 + 3?", "2 + 3 = 5\n#### 5"),
    _example("b", "Tom has 4 apples and eats 1. How many are left?", "4 - 1 = 3\n#### 3"),
    _example("c", "Double 21.", "21 * 2 = 42\n#### 42"),
]


def _tiny(folder: Path, tiny_model_cfg: Any, cache_dir: Path) -> tuple[Any, Any]:
    return lm_signals.load_model(tiny_model_cfg(folder), cache_dir, "cpu")


def test_perplexity_and_el2n_match_a_direct_computation_from_logits(
    tiny_llama_dir: Path, tiny_model_cfg: Any, cache_dir: Path
) -> None:
    model, tokenizer = _tiny(tiny_llama_dir, tiny_model_cfg, cache_dir)
    records = lm_signals.encode(tokenizer, EXAMPLES, 256)
    stats = lm_signals.token_stats(model, records, batch_size=2)  # padded batches
    for i, record in enumerate(records):
        ids = torch.tensor([record["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        labels = torch.tensor(record["labels"][1:])
        keep = labels != -100
        probs = torch.softmax(logits[keep], -1)
        onehot = torch.nn.functional.one_hot(labels[keep], probs.shape[-1]).float()
        el2n = (probs - onehot).norm(dim=-1).mean()
        nll = -torch.log(probs.gather(1, labels[keep][:, None])).mean()
        assert stats.n_tokens[i] == int(keep.sum())
        assert stats.el2n[i] == pytest.approx(float(el2n), rel=1e-4)
        assert stats.mean_nll[i] == pytest.approx(float(nll), rel=1e-4)
        assert stats.perplexity[i] == pytest.approx(float(torch.exp(nll)), rel=1e-4)


def test_perplexity_variants_rank_low_middle_and_high() -> None:
    perplexity = np.array([5.0, 1.0, 3.0, 9.0, 2.0])
    order = {
        v: list(np.argsort(-variant_score(perplexity, v), kind="stable"))
        for v in ("low", "middle", "high")
    }
    assert order["low"][:2] == [1, 4]
    assert order["high"][:2] == [3, 0]
    assert order["middle"][0] == 2  # the median


def _lora_with_random_b(model: Any) -> Any:
    cfg = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
    model = lm_signals.with_fresh_lora(model, cfg, seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # a fresh adapter's B = 0 would zero every A gradient
    return model


def test_grand_equals_per_example_autograd_of_the_model_loss(
    tiny_llama_dir: Path, tiny_model_cfg: Any, cache_dir: Path
) -> None:
    model, tokenizer = _tiny(tiny_llama_dir, tiny_model_cfg, cache_dir)
    model = _lora_with_random_b(model)
    records = lm_signals.encode(tokenizer, EXAMPLES, 256)
    params = lm_signals.gradient_parameters(model, "all")
    norms = lm_signals.gradient_norms(model, records, params)
    for i, record in enumerate(records):
        loss = model(
            input_ids=torch.tensor([record["input_ids"]]), labels=torch.tensor([record["labels"]])
        ).loss  # transformers' own shifted, masked mean cross-entropy
        grads = torch.autograd.grad(loss, [p for _, p in params])
        expected = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        assert norms[i] == pytest.approx(float(expected), rel=1e-4)
    assert len(set(np.round(norms, 6))) == len(EXAMPLES)


def test_batched_example_gradients_equal_one_example_at_a_time(
    tiny_llama_dir: Path, tiny_model_cfg: Any, cache_dir: Path
) -> None:
    """Several examples of different lengths per backward pass: each one's gradient is still its
    own, element for element, whatever the batch (LESS and GraNd's runtime.gradient_batch_size)."""
    model, tokenizer = _tiny(tiny_llama_dir, tiny_model_cfg, cache_dir)
    model = _lora_with_random_b(model)
    records = lm_signals.encode(tokenizer, EXAMPLES, 256)
    assert len({len(r["input_ids"]) for r in records}) > 1  # padding inside a batch
    params = lm_signals.gradient_parameters(model, "all")
    one = torch.stack(list(lm_signals.example_gradients(model, records, params, "", 1)))
    for batch_size in (2, len(records)):
        batched = torch.stack(
            list(lm_signals.example_gradients(model, records, params, "", batch_size))
        )
        assert torch.allclose(batched, one, rtol=1e-4, atol=1e-7)
    assert one.abs().sum(dim=1).min() > 0
    with pytest.raises(ConfigError, match="gradient_batch_size=1"):
        layer_norm = [(n, p) for n, p in model.named_parameters() if "norm" in n][:1]
        list(lm_signals.example_gradients(model, records, layer_norm, "", 2))


def test_last_v_proj_b_scope_is_the_last_layers_v_proj_lora_b_only(
    tiny_llama_dir: Path, tiny_model_cfg: Any, cache_dir: Path
) -> None:
    model, _ = _tiny(tiny_llama_dir, tiny_model_cfg, cache_dir)
    model = _lora_with_random_b(model)
    params = lm_signals.gradient_parameters(model, "last_v_proj_b")
    assert [name for name, _ in params] == [
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    ]
    with pytest.raises(ConfigError, match="gradient scope"):
        lm_signals.gradient_parameters(model, "first_layer")


def test_golden_score_is_the_share_of_anchors_helped_without_self() -> None:
    zero = np.array([-3.0, -2.0, -5.0, -1.0])
    one = np.array([-2.0, -2.5, -4.0, -0.5])
    assert golden_scores(zero, one, None) == 0.75
    assert golden_scores(zero, one, self_anchor=0) == pytest.approx(2 / 3)


def test_nuggets_ranks_first_the_candidate_that_raises_every_anchor(
    tmp_path: Path, tiny_llama_dir: Path, tiny_model_cfg: Any, cache_dir: Path, monkeypatch
) -> None:
    """A constructed scorer: an answer's log-prob is 1 when the conversation mentions 'zebra'
    and 0 otherwise, so the zebra candidate provably raises every other anchor and no other
    candidate raises any."""
    real_stats = lm_signals.token_stats
    model, tokenizer = _tiny(tiny_llama_dir, tiny_model_cfg, cache_dir)

    def constructed(model_: Any, records: list, batch_size: int, desc: str = "") -> Any:
        stats = real_stats(model_, records, batch_size, desc)  # shapes and bookkeeping
        mentions = ["zebra" in tokenizer.decode(r["input_ids"]) for r in records]
        stats.sum_logprob = np.array(mentions, dtype=float)
        return stats

    monkeypatch.setattr(lm_signals, "token_stats", constructed)
    pool = [
        _example(f"p{i}", f"Add {i} and {i}.", f"{i} + {i} = {2 * i}\n#### {2 * i}")
        for i in range(8)
    ]
    pool[5] = _example("p5", "Name a striped animal.", "A zebra.\n#### 1")
    context = ScoringContext(
        method_cfg={
            "n_anchors": 3,
            "scorer": "base",
            "max_seq_len": 128,
            "runtime": {"batch_size": 4},
        },
        task_cfg={},
        selector_cfg=tiny_model_cfg(tiny_llama_dir),
        queries=None,
        seed=0,
        device="cpu",
        cache_dir=cache_dir,
        work_dir=tmp_path / "work",
    )
    method = Nuggets(context)
    scores = method.score(pool)
    assert method.select(scores, 1) == ["p5"]
    assert scores.set_index("id")["score"]["p5"] == 1.0
    assert scores.drop(index=5)["score"].max() == 0.0  # the anchors' log-probs only fall or tie
    assert int(scores["is_anchor"].sum()) == 3
    logged = (tmp_path / "work" / "nuggets_scores.jsonl").read_text().splitlines()
    assert len(logged) == 1 + len(pool)  # anchors header, then one line per candidate

    resumed = Nuggets(context).score(pool)  # every candidate is in the log: nothing recomputed
    pd.testing.assert_frame_equal(resumed, scores)


# --- every method through the pipeline's score and select stages --------------------------

# Data Whisperer has its own tests; random and the oracle_clean reference score without a model.
METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
# one_shot_gain runs on Data Whisperer's engine, tested with it (test_data_whisperer, test_labels)
NOT_BASELINES = {"random", "oracle_clean"} | {
    m for m in METHODS if m.startswith(("data_whisperer", "one_shot_gain"))
}
BASELINES = sorted(set(METHODS) - NOT_BASELINES)
# one forward pass per example with the untuned selector, or no model at all
NO_SCORER_FINE_TUNE = {"rds_plus", "ifd", "length_longest", "length_shortest", "format_rules"}
METHOD_OVERRIDES = {
    "ccs": ["method.n_strata=4"],
    "el2n": ["method.checkpoint_epochs=[1,2]"],
    "less": ["method.n_targets=3", "method.proj_dim=64", "method.warmup_epochs=2"],
    "rds_plus": ["method.n_targets=3"],
    "nuggets": ["task.anchor_examples=3"],
    "s2l": ["method.n_clusters=3"],
    "staff": ["method.n_regions=4", "method.verify_per_region=2"],
}


def _model_overrides(role: str, folder: Path) -> list[str]:
    return [
        f"{role}.path={folder}",
        f"{role}.name=tiny_llama",
        f"{role}.id=tiny/llama",
        f"{role}.embedded=null",
        f"{role}.attention_layer=1",
        f"{role}.num_layers=2",
    ]


def _config(method: str, results: Path, folder: Path, *extra: str) -> Any:
    overrides = [
        f"method={method}",
        f"results_dir={results}",
        "stages=[score,select]",
        "task.generator.pool_size=12",
        "task.generator.eval_size=2",
        "budget=0.25",
        "finetune.epochs=2",
        "finetune.batch_size=4",
        "finetune.runtime.micro_batch_size=4",
        *_model_overrides("selector_model", folder),
        *_model_overrides("target_model", folder),
        *METHOD_OVERRIDES.get(method, []),
    ]
    if method in ("staff", "s2l"):  # the tiny model cut to its first layer is the proxy
        proxy = (
            f"{{name:tiny_llama_1l,id:tiny/llama,revision:null,path:'{folder}',embedded:null,"
            "dtype:float32,attention_layer:0,num_layers:1,keep_layers:1,trust_remote_code:false,"
            "requires_gpu:false,gpu_memory_gb:1}"
        )
        overrides.append(f"method.proxy_model={proxy}")
    overrides += extra
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def checked_selection(method: str, results: Path) -> tuple[list[str], pd.DataFrame]:
    """A baseline's score and select stages as every baseline must leave them: 3 distinct ids
    of the 12, a finite score for each example, its scorer fine-tune counted as selection time."""
    (ids_file,) = (results / "artifacts" / "select").glob("*/selected_ids.json")
    ids = json.loads(ids_file.read_text())
    assert len(ids) == 3 and len(set(ids)) == 3
    (score_dir,) = (results / "artifacts" / "score").glob("*/")
    scores = pd.read_csv(score_dir / "scores.csv")
    assert len(scores) == 12 and np.isfinite(scores["score"]).all()
    marker = json.loads((score_dir / "_SUCCESS.json").read_text())
    if method.startswith("perplexity") or method in NO_SCORER_FINE_TUNE:
        assert marker["scorer_train_s"] == 0
    else:  # scorer fine-tunes count as selection time (STR)
        assert 0 < marker["scorer_train_s"] <= marker["selection_s"]
    return ids, scores


# The methods tests/test_shards.py runs sharded and unsharded: two independent runs with one
# seed that must agree byte for byte, which is their same-seed check too.
SAME_SEED_CHECKED_BY_SHARDS = set(PER_EXAMPLE_SHARDING)


@pytest.mark.parametrize("method", sorted(set(BASELINES) - SAME_SEED_CHECKED_BY_SHARDS))
def test_every_baseline_selects_the_same_examples_with_the_same_seed(
    method: str, tmp_path: Path, tiny_llama_dir: Path, cache_dir: Path
) -> None:
    selections = []
    for attempt in ("first", "second"):
        pipeline.run(_config(method, tmp_path / attempt, tiny_llama_dir))
        selections.append(checked_selection(method, tmp_path / attempt))
    assert selections[0][0] == selections[1][0]
    np.testing.assert_allclose(selections[0][1]["score"], selections[1][1]["score"], rtol=1e-5)


def test_whole_pool_cell_and_scorer_share_one_fine_tune_equal_to_a_plain_one(
    tmp_path: Path, tiny_llama_dir: Path, cache_dir: Path
) -> None:
    """A whole-pool cell's fine-tune of the target is EL2N's scorer fine-tune (one training, read
    by both), and its adapter is bit for bit what a fine-tune without epoch snapshots makes."""
    from safetensors.torch import load_file

    from dwbench.lora import Recipe, fine_tune

    results = tmp_path / "shared"
    pipeline.run(_config("el2n", results, tiny_llama_dir))
    whole_pool = _config(
        "random", results, tiny_llama_dir, "budget=1.0", "stages=[score,select,train]"
    )
    pipeline.run(whole_pool)
    markers = [
        json.loads(p.read_text()) for p in (results / "artifacts" / "train").glob("*/_SUCCESS.json")
    ]
    (scorer,) = [m for m in markers if m.get("role") == "scorer"]
    (cell,) = [m for m in markers if m.get("role") != "scorer"]
    assert cell["scorer_key"] == scorer["key"] and cell["budget"] == 1.0
    assert cell["train_s"] == scorer["train_s"] and cell["group"] == scorer["group"]
    shared = load_file(
        str(results / "artifacts" / "train" / cell["key"] / "adapter" / "adapter_model.safetensors")
    )

    pool = read_jsonl(next((results / "artifacts" / "prepare").glob("*/pool.jsonl")))
    recipe = Recipe(whole_pool.target_model, whole_pool.finetune, 0, "cpu", cache_dir)
    fine_tune(recipe, pool, tmp_path / "plain-scratch", tmp_path / "plain")
    plain = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    assert shared.keys() == plain.keys()
    for name, tensor in plain.items():
        assert torch.equal(shared[name], tensor), name


def test_one_scorer_fine_tune_serves_every_method_and_counts_each_time(
    tmp_path: Path, tiny_llama_dir: Path, cache_dir: Path
) -> None:
    results = tmp_path / "shared"
    markers = {}
    for method in ("el2n", "grand", "ccs"):
        pipeline.run(_config(method, results, tiny_llama_dir))
        for path in (results / "artifacts" / "score").glob("*/_SUCCESS.json"):
            marker = json.loads(path.read_text())
            markers.setdefault(path.parent.name, marker)
    trains = list((results / "artifacts" / "train").glob("*/_SUCCESS.json"))
    assert len(trains) == 1  # one whole-pool fine-tune for all three
    train = json.loads(trains[0].read_text())
    assert train["role"] == "scorer" and train["n_examples"] == train["n_pool"] == 12
    assert len(markers) == 3
    for marker in markers.values():
        assert marker["scorer_train_keys"] == [train["key"]]
        assert marker["scorer_train_s"] == pytest.approx(train["train_s"])
        assert marker["selection_s"] >= train["train_s"]  # paid earlier, still counted


def test_a_proxy_method_without_a_proxy_model_fails_before_any_work(
    tmp_path: Path, tiny_llama_dir: Path, cache_dir: Path
) -> None:
    for method in ("staff", "s2l"):
        results = tmp_path / method
        cfg = _config(method, results, tiny_llama_dir, "method.proxy_model=null")
        with pytest.raises(ConfigError, match="model@method.proxy_model"):
            pipeline.run(cfg)
        assert not (results / "artifacts").exists()
