"""lm-eval runner on tiny random models: the shipped tasks read the given file, the prompt is the
chat-templated user turn that training uses, per-sample scores line up with example ids, and the
adapter check tells a trained adapter from a blank one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dwbench.chat import prompt_text
from dwbench.data.records import Example, write_jsonl
from dwbench.errors import ConfigError
from dwbench.lm_eval_runner import (
    _load_task,
    adapter_output_change,
    get_task_manager,
    run_lm_eval,
    write_results_json,
)
from dwbench.models import LoadingArgs

GSM8K_EXAMPLES = [
    Example(
        f"gsm-{i}",
        f"Q{i}: what is {a} + {b}?",
        f"{a} + {b} = {a + b}\n#### {a + b:,}",
        (f"#### {a + b:,}",),
    )
    for i, (a, b) in enumerate([(2, 3), (40, 2), (999, 1), (-50, 3)])
]
ROUGE_EXAMPLES = [
    Example(
        "dlg-0",
        "Summarise: A: hi. B: the cat sat on the mat.",
        "The cat sat on the mat.",
        ("The cat sat on the mat.", "A cat was sitting on a mat."),
    ),
    Example(
        "dlg-1",
        "Summarise: A: shall we meet at noon? B: yes.",
        "They meet at noon.",
        ("They meet at noon.",),
    ),
    Example(
        "dlg-2",
        "Summarise: A: it rains. B: take an umbrella.",
        "B says take an umbrella.",
        ("B says take an umbrella.",),
    ),
]


def _save_adapter(model_dir: Path, folder: Path, *, trained: bool) -> Path:
    """A LoRA adapter on q/v; `trained=False` keeps peft's init (B = 0: no change to outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=not trained
    )
    get_peft_model(base, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained_adapter(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_adapter(tiny_llama_dir, tmp_path_factory.mktemp("lora_trained"), trained=True)


@pytest.fixture(scope="module")
def blank_adapter(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_adapter(tiny_llama_dir, tmp_path_factory.mktemp("lora_blank"), trained=False)


@pytest.fixture(scope="module")
def qwen2_adapter(tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_adapter(tiny_qwen2_dir, tmp_path_factory.mktemp("lora_qwen2"), trained=True)


@pytest.fixture(scope="module")
def gsm8k_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "gsm8k_eval.jsonl"
    write_jsonl(path, GSM8K_EXAMPLES)
    return path


@pytest.fixture(scope="module")
def rouge_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "rouge_eval.jsonl"
    write_jsonl(path, ROUGE_EXAMPLES)
    return path


def test_task_manager_is_cached_and_lists_shipped_tasks() -> None:
    task_manager = get_task_manager()
    assert get_task_manager() is task_manager
    assert {"dwbench_gsm8k", "dwbench_rouge"} <= set(task_manager.all_subtasks)


def test_task_reads_the_given_file_and_takes_max_new_tokens(gsm8k_jsonl: Path) -> None:
    task = _load_task(get_task_manager(), "dwbench_gsm8k", gsm8k_jsonl, max_new_tokens=7)
    assert [doc["id"] for doc in task.eval_docs] == [ex.id for ex in GSM8K_EXAMPLES]
    gen = task.config.generation_kwargs
    assert gen["max_gen_toks"] == 7
    assert gen["do_sample"] is False and gen["until"]  # the YAML's other settings survive


def test_unknown_task_names_the_shipped_ones(gsm8k_jsonl: Path) -> None:
    with pytest.raises(ConfigError, match="dwbench_gsm8k, dwbench_rouge"):
        _load_task(get_task_manager(), "gsm8k", gsm8k_jsonl, max_new_tokens=8)


@pytest.mark.parametrize(
    ("task_name", "examples", "metric"),
    [
        ("dwbench_gsm8k", GSM8K_EXAMPLES, "exact_match"),
        ("dwbench_rouge", ROUGE_EXAMPLES, "rouge_l"),
    ],
)
def test_reference_as_prediction_scores_one(
    task_name: str, examples: list[Example], metric: str, tmp_path: Path
) -> None:
    """The hook lm-eval calls, given the reference answer as the generation, gives full marks."""
    path = tmp_path / "eval.jsonl"
    write_jsonl(path, examples)
    task = _load_task(get_task_manager(), task_name, path, max_new_tokens=8)
    for doc in task.eval_docs:
        assert task.config.process_results(doc, [doc["response"]]) == {metric: 1.0}


def test_run_lm_eval_gsm8k(tiny_llama_dir: Path, gsm8k_jsonl: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    result = run_lm_eval(
        _local(tiny_llama_dir),
        "dwbench_gsm8k",
        gsm8k_jsonl,
        adapter_dir=None,
        batch_size=4,
        max_new_tokens=8,
    )
    assert result.metric == "exact_match"
    assert result.n_examples == 4
    assert [s["id"] for s in result.samples] == [ex.id for ex in GSM8K_EXAMPLES]
    assert all(s["score"] in (0.0, 1.0) for s in result.samples)
    assert all(isinstance(s["prediction"], str) for s in result.samples)
    assert result.score == pytest.approx(sum(s["score"] for s in result.samples) / 4)
    # lm-eval's context is exactly the chat-templated user turn that training continues from.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for logged in result.results["samples"]["dwbench_gsm8k"]:
        assert logged["arguments"][0][0] == prompt_text(tokenizer, logged["doc"]["prompt"])
        assert logged["arguments"][0][1]["max_gen_toks"] == 8
    json.dumps(result.results, allow_nan=False)

    out = tmp_path / "eval" / "results.json"
    write_results_json(result, out)
    assert json.loads(out.read_text())["samples"] == result.samples


def test_run_lm_eval_rouge_with_adapter(
    tiny_qwen2_dir: Path, rouge_jsonl: Path, qwen2_adapter: Path
) -> None:
    result = run_lm_eval(
        _local(tiny_qwen2_dir),
        "dwbench_rouge",
        rouge_jsonl,
        adapter_dir=qwen2_adapter,
        batch_size=2,
        max_new_tokens=8,
        task_manager=get_task_manager(),
    )
    assert result.metric == "rouge_l"
    assert [s["id"] for s in result.samples] == [ex.id for ex in ROUGE_EXAMPLES]
    assert all(0.0 <= s["score"] <= 1.0 for s in result.samples)
    assert result.score == pytest.approx(sum(s["score"] for s in result.samples) / 3)
    assert result.results["config"]["model_args"]["peft"] == str(qwen2_adapter)


def test_adapter_output_change(
    tiny_llama_dir: Path, trained_adapter: Path, blank_adapter: Path
) -> None:
    prompts = [ex.prompt for ex in GSM8K_EXAMPLES[:2]]
    model = _local(tiny_llama_dir)
    assert adapter_output_change(model, trained_adapter, prompts) > 1e-4
    assert adapter_output_change(model, blank_adapter, prompts) == pytest.approx(0.0, abs=1e-7)


def _local(folder: Path) -> LoadingArgs:
    """A model folder on CPU, as `dwbench.models.loading_args` gives it."""
    return LoadingArgs(
        source=str(folder),
        revision=None,
        dtype="float32",
        device="cpu",
        trust_remote_code=False,
        attn_implementation=None,
    )
