"""Evaluate a model (plus an optional LoRA adapter) with lm-evaluation-harness on dwbench's tasks.

The tasks are the YAML files in `dwbench/lm_eval_tasks/`. Their `data_files` is a placeholder:
`run_lm_eval` writes a two-key YAML to a temporary folder that `include:`s the shipped task and
sets `data_files` to the absolute path of the evaluation JSONL, and loads the task from that
file. This keeps the shipped YAML the single definition of the task (prompt, generation settings,
metric) while every run names its own data, and needs only lm-eval's public `include:` and
load-by-path behaviour.

lm-eval and torch are imported inside the functions: importing this module stays cheap for the
CLI and for tests that never evaluate.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dwbench.data.records import read_jsonl
from dwbench.errors import ConfigError, DataError

if TYPE_CHECKING:
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

    from dwbench.models import LoadingArgs

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"


@dataclass
class EvalResult:
    """One evaluation of one model on one task; `results` is what goes into the artifacts."""

    metric: str  # the task's metric name: "exact_match" | "rouge_l"
    score: float  # mean over examples, 0..1
    n_examples: int
    samples: list[dict]  # one per example, in the eval file's order: {"id", "prediction", "score"}
    results: dict  # lm-eval's results dict (samples included), made JSON-serialisable


@cache
def get_task_manager() -> TaskManager:
    """One TaskManager per process, indexing only dwbench's tasks.

    lm-eval's ~15k built-in task YAMLs are left out (include_defaults=False): indexing them costs
    about 9 s per construction and dwbench never evaluates them.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def _load_task(
    task_manager: TaskManager, task_name: str, eval_jsonl: Path, max_new_tokens: int
) -> Task:
    """Build `task_name` from its shipped YAML, reading `eval_jsonl` and generating at most
    `max_new_tokens` tokens."""
    entry = task_manager.task_index.get(task_name)
    if entry is None or entry.yaml_path is None:
        raise ConfigError(
            f"Unknown lm-eval task {task_name!r} in task.lm_eval_task. "
            f"Available: {', '.join(task_manager.all_subtasks)}."
        )
    override = {
        "include": str(Path(entry.yaml_path).resolve()),
        "task": task_name,
        "dataset_kwargs": {"data_files": {"test": str(eval_jsonl.resolve())}},
    }
    with tempfile.TemporaryDirectory(prefix="dwbench_lm_eval_") as tmp:
        # JSON is valid YAML; the dataset is read (and cached by datasets) inside load().
        spec = Path(tmp) / f"{task_name}.yaml"
        spec.write_text(json.dumps(override, indent=2), encoding="utf-8")
        task = task_manager.load(str(spec))["tasks"][task_name]
    # set_config(update=True) merges into the YAML's generation_kwargs instead of replacing them.
    task.set_config("generation_kwargs", {"max_gen_toks": max_new_tokens}, update=True)
    return task


def _task_metric(task: Task) -> str:
    """The task's single metric: dwbench reports one number per task."""
    metric_list = task.config.metric_list or []
    if len(metric_list) != 1:
        raise ConfigError(
            f"lm-eval task {task.config.task!r} must define exactly one metric in metric_list, "
            f"found {[m['metric'] for m in metric_list]}."
        )
    return metric_list[0]["metric"]


def _json_safe(obj: Any) -> Any:
    """Round-trip through JSON the way lm-eval writes its own results files."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable, ensure_ascii=False))


GENERATE_CHOICES = ("dwbench", "lm_eval")  # eval.runtime.generate


def run_lm_eval(
    model: LoadingArgs,
    task_name: str,
    eval_jsonl: Path,
    *,
    adapter_dir: Path | None,
    batch_size: int,
    max_new_tokens: int,
    apply_chat_template: bool = True,
    task_manager: TaskManager | None = None,
    generate: str = "dwbench",
) -> EvalResult:
    """Greedy generation on every example of `eval_jsonl`, scored by the task's metric.

    `model` says how to load the weights (`dwbench.models.loading_args`: the same folder or hub
    id, revision and dtype as training); `adapter_dir` is a peft adapter, merged into those
    weights before evaluation (one matrix per layer instead of three per step). `generate`:
    "dwbench" decodes with dwbench.decoding (finished rows leave the batch), "lm_eval" with
    lm-eval's own `model.generate`; both give the same tokens up to float rounding. Per-sample
    predictions and scores are matched to the examples by the `id` in the logged document, not
    by position.
    """
    import lm_eval

    examples = read_jsonl(eval_jsonl)
    ids = [ex.id for ex in examples]
    if not ids:
        raise DataError(f"{eval_jsonl}: no examples to evaluate on.")
    if len(set(ids)) != len(ids):
        raise DataError(f"{eval_jsonl}: example ids are not unique; samples could not be matched.")
    if generate not in GENERATE_CHOICES:
        raise ConfigError(
            f"eval.runtime.generate={generate!r} is not one of {', '.join(GENERATE_CHOICES)}."
        )

    task_manager = task_manager or get_task_manager()
    task = _load_task(task_manager, task_name, Path(eval_jsonl), max_new_tokens)
    metric = _task_metric(task)
    log.info(
        "lm-eval %s on %d examples: %s (adapter: %s, generate: %s)",
        task_name,
        len(ids),
        model.source,
        adapter_dir,
        generate,
    )
    evaluated = evaluation_model(model, adapter_dir, batch_size, generate)
    raw = lm_eval.simple_evaluate(
        model=evaluated,
        tasks=[task],
        task_manager=task_manager,
        log_samples=True,
        apply_chat_template=apply_chat_template,
    )
    if raw is None:  # only non-zero ranks of a distributed run get None; dwbench runs one process
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    results = _json_safe(raw)
    results["config"]["model_args"] = {  # lm-eval records nothing for a model object
        **model.lm_eval_model_args(),
        "peft": str(adapter_dir) if adapter_dir is not None else None,
        "adapter_merged": adapter_dir is not None,
        "batch_size": batch_size,
        "generate": generate,
    }

    by_id = {s["doc"]["id"]: s for s in results["samples"][task_name]}
    if sorted(by_id) != sorted(ids):
        raise DataError(
            f"lm-eval evaluated other examples than {eval_jsonl} holds "
            f"({len(by_id)} logged, {len(ids)} in the file): is the task reading that file?"
        )
    samples = [
        {
            "id": ex_id,
            "prediction": by_id[ex_id]["filtered_resps"][0],
            "score": float(by_id[ex_id][metric]),
        }
        for ex_id in ids
    ]
    score = float(results["results"][task_name][f"{metric},none"])
    log.info("lm-eval %s: %s = %.4f", task_name, metric, score)
    return EvalResult(
        metric=metric, score=score, n_examples=len(samples), samples=samples, results=results
    )


def evaluation_model(
    model: LoadingArgs, adapter_dir: Path | None, batch_size: int, generate: str
) -> Any:
    """lm-eval's HF model around weights loaded by dwbench.models, the adapter merged in."""
    from lm_eval.models.huggingface import HFLM

    from dwbench import timing
    from dwbench.decoding import greedy_settings_problem
    from dwbench.models import causal_lm_from, tokenizer_from

    tokenizer = tokenizer_from(model)
    weights = causal_lm_from(model, model.source)
    if adapter_dir is not None:
        from peft import PeftModel

        with timing.phase("load"):
            weights = PeftModel.from_pretrained(weights, str(adapter_dir)).merge_and_unload()
            weights.eval()
    if generate == "lm_eval":
        return HFLM(pretrained=weights, tokenizer=tokenizer, batch_size=batch_size)
    problem = greedy_settings_problem(weights)
    if problem:
        raise ConfigError(
            f"{model.source}'s generation config sets {problem}, which dwbench's greedy decoding "
            "does not apply; set eval.runtime.generate=lm_eval to evaluate with them."
        )
    return _greedy_lm_class()(pretrained=weights, tokenizer=tokenizer, batch_size=batch_size)


@cache
def _greedy_lm_class() -> type:
    """lm-eval's HF model whose greedy generation lets finished rows leave the batch."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils_hf import stop_sequences_criteria

    from dwbench.decoding import greedy_generate

    class GreedyHFLM(HFLM):  # type: ignore[misc]
        def _model_generate(
            self, context: Any, max_length: int, stop: list[str], **generation_kwargs: Any
        ) -> Any:
            attention_mask = generation_kwargs.pop("attention_mask")
            sampling = {
                k: v
                for k, v in generation_kwargs.items()
                if not (k == "do_sample" and not v) and not (k == "temperature" and v == 0.0)
            }
            if sampling:
                raise ConfigError(
                    f"the lm-eval task asks for generation settings {sampling}; dwbench's "
                    "decoding is greedy only: set eval.runtime.generate=lm_eval."
                )
            criteria = stop_sequences_criteria(
                self.tokenizer, stop, context.shape[1], context.shape[0]
            )
            return greedy_generate(
                self.model,
                context,
                attention_mask,
                max_length,
                pad_id=self.tokenizer.pad_token_id,
                stop=lambda tokens: bool(criteria(tokens, None).all()),
            )

    return GreedyHFLM


def write_results_json(result: EvalResult, path: Path) -> None:
    """The whole record (score, per-sample predictions, lm-eval's results) as one JSON file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result), indent=2, ensure_ascii=False), encoding="utf-8")


def adapter_output_change(model: LoadingArgs, adapter_dir: Path, prompts: list[str]) -> float:
    """Largest |logit difference| at the next token between base and base+adapter on `prompts`.

    About 0 means the adapter did not train (LoRA B is still zero) or did not load, and then a
    score "with the adapter" is really the base model's. Prompts go through the chat template as
    in training and evaluation; each runs alone (no padding), once with the adapter and once
    inside `disable_adapter()`.
    """
    import torch
    from peft import PeftModel

    from dwbench.chat import prompt_text, require_chat_template
    from dwbench.models import causal_lm_from, tokenizer_from

    if not prompts:
        raise ValueError("adapter_output_change needs at least one prompt")
    device = model.device
    tokenizer = tokenizer_from(model)
    require_chat_template(tokenizer, model.source)
    base = causal_lm_from(model, model.source)
    adapted_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()

    max_diff = 0.0
    with torch.inference_mode():
        for prompt in prompts:
            # The template writes any BOS itself, as in dwbench.chat.encode_supervised.
            inputs = tokenizer(
                prompt_text(tokenizer, prompt), add_special_tokens=False, return_tensors="pt"
            ).to(device)
            adapted = adapted_model(**inputs).logits[0, -1].float()
            with adapted_model.disable_adapter():
                original = adapted_model(**inputs).logits[0, -1].float()
            diff = (adapted - original).abs().max().item()
            if not math.isfinite(diff):
                raise RuntimeError(f"non-finite logits comparing {adapter_dir} with its base model")
            max_diff = max(max_diff, diff)
    return max_diff
