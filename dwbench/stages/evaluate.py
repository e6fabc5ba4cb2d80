"""evaluate: lm-evaluation-harness on the evaluation split, base model + LoRA adapter.

Before a score is trusted, the adapter must change the model's next-token logits: an adapter
that did not train (lr 0, no steps) or did not load would otherwise report the base model's
score under the fine-tuned label. Without a fine-tune (zero-shot, budget 0) the base model is
evaluated as it is, under a key of its own.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from typing import Any

from dwbench.context import RunContext
from dwbench.data.records import read_jsonl
from dwbench.errors import DwbenchError
from dwbench.memory import PeakMemory
from dwbench.models import LoadingArgs, loading_args
from dwbench.stages.keys import evaluate_key, zero_shot_key
from dwbench.stages.left_open import finish_logging
from dwbench.stages.outputs import Evaluated, Prepared, Trained

logger = logging.getLogger(__name__)
# Prompts per generate call when eval.runtime.batch_size is null. CPU: measured on 2 cores with
# SmolLM2-135M and dwbench's greedy decoding, 200 embedded problems with an adapter: 31 s at 128,
# 39 s at 64, 43 s at 32 (finished rows leave the batch, so a larger one costs little).
# cuda / mps: stated, not measured here (64 prompts of ~1k tokens with an 8B target in bf16 fit
# a 40 GB GPU with room to spare).
EVAL_BATCH_SIZE = {"cpu": 128, "cuda": 64, "mps": 16}


def eval_batch_size(configured: int | None, device: str) -> int:
    """eval.runtime.batch_size, or the device's default when it is null."""
    if configured is not None:
        return int(configured)
    return EVAL_BATCH_SIZE.get(device.split(":")[0], EVAL_BATCH_SIZE["cpu"])


ADAPTER_CHECK_PROMPTS = 4
NO_TRAIN = "none (zero-shot)"  # the train key of an evaluation without a fine-tune


def run(ctx: RunContext, prepared: Prepared, trained: Trained | None) -> Evaluated:
    """Evaluate base + `trained`'s adapter, or the base model alone when `trained` is None."""
    from dwbench.lm_eval_runner import run_lm_eval, write_results_json

    cfg = ctx.cfg
    key = evaluate_key(cfg, trained.key) if trained else zero_shot_key(cfg, prepared.key)
    if ctx.store.reusable("evaluate", key):
        logger.info("evaluate: cached %s", key)
        finish_logging(ctx, "evaluate", key, partial(log_evaluation, ctx, key))
        return Evaluated(key, ctx.store.marker("evaluate", key))
    cfg = ctx.cfg
    target = cfg.target_model
    model = loading_args(target, ctx.cache_dir, ctx.device)
    params = {"eval": cfg.eval, "train_key": trained.key if trained is not None else NO_TRAIN}
    with ctx.tracker.stage_run("evaluate", key, ctx.tags(), params) as mlflow_run:
        with ctx.store.writing("evaluate", key) as (out, marker):
            if trained is not None:
                marker["adapter_logit_change"] = check_adapter(ctx, prepared, trained, model)
            start = time.perf_counter()
            with PeakMemory() as memory:
                result = run_lm_eval(
                    model,
                    str(cfg.task.lm_eval_task),
                    prepared.eval_path,
                    adapter_dir=trained.adapter_dir if trained is not None else None,
                    batch_size=eval_batch_size(cfg.eval.runtime.batch_size, ctx.device),
                    max_new_tokens=int(cfg.eval.max_new_tokens),
                    apply_chat_template=bool(cfg.eval.apply_chat_template),
                    generate=str(cfg.eval.runtime.generate),
                )
            eval_s = time.perf_counter() - start
            logger.info(
                "evaluate: %d problems in %.0f s (%.2f s per problem)",
                result.n_examples,
                eval_s,
                eval_s / result.n_examples,
            )
            write_results_json(result, out / "lm_eval_results.json")
            with (out / "samples.jsonl").open("w") as handle:
                for sample in result.samples:
                    handle.write(json.dumps(sample) + "\n")
            marker.update(
                score=result.score,
                metric=result.metric,
                n_eval=result.n_examples,
                eval_s=eval_s,
                **memory.as_metrics("eval"),
            )
        log_evaluation(ctx, key, mlflow_run)
    return Evaluated(key, ctx.store.marker("evaluate", key))


def log_evaluation(ctx: RunContext, key: str, mlflow_run: Any) -> None:
    """A finished evaluation's numbers, results and samples on its run, from its output folder."""
    marker = ctx.store.marker("evaluate", key)
    mlflow_run.log_metrics({k: v for k, v in marker.items() if isinstance(v, int | float)})
    mlflow_run.log_artifact(ctx.store.stage_dir("evaluate", key) / "lm_eval_results.json")
    mlflow_run.log_artifact(ctx.store.stage_dir("evaluate", key) / "samples.jsonl")


def check_adapter(
    ctx: RunContext, prepared: Prepared, trained: Trained, model: LoadingArgs
) -> float:
    """The adapter's largest next-token logit change; an error when it changes nothing."""
    from dwbench.lm_eval_runner import adapter_output_change

    prompts = [ex.prompt for ex in read_jsonl(prepared.eval_path)[:ADAPTER_CHECK_PROMPTS]]
    change = adapter_output_change(model, trained.adapter_dir, prompts)
    if change < float(ctx.cfg.eval.min_adapter_logit_change):
        raise DwbenchError(
            f"the LoRA adapter of train/{trained.key} leaves the model's logits unchanged "
            f"(max change {change:.2e} < eval.min_adapter_logit_change); it did not train "
            "or did not load, so its score would be the base model's. Check finetune.lr "
            "and finetune.max_steps."
        )
    return change
