"""train: LoRA fine-tuning of the target model on the selected subset (peft + transformers).

Loss on response tokens only, through the model's chat template. Checkpoints go to a scratch
folder that survives a kill, so a restarted job resumes from the last one; the time counted is
the training time up to that checkpoint plus the time after the restart, never the lost work.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dwbench.context import RunContext
from dwbench.data.records import Example
from dwbench.keys import result_identity, stable_hash, stage_key
from dwbench.memory import PeakMemory
from dwbench.models import model_identity
from dwbench.stages.prepare import Prepared
from dwbench.stages.select import Selected

logger = logging.getLogger(__name__)
ELAPSED_FILE = "elapsed_s.json"


@dataclass
class Trained:
    key: str
    adapter_dir: Path
    marker: dict[str, Any]


def recipe_group(ctx: RunContext, prepared: Prepared) -> str:
    """Fine-tunes that share data, target and recipe: a budget-1.0 member is STR's denominator."""
    cfg = ctx.cfg
    return stable_hash(
        {
            "prepare": prepared.key,
            "target": model_identity(cfg.target_model),
            "finetune": result_identity(cfg.finetune),
        }
    )


def key_for(ctx: RunContext, selected: Selected) -> str:
    cfg = ctx.cfg
    return stage_key(
        "train",
        select=selected.key,
        target=model_identity(cfg.target_model),
        finetune=cfg.finetune,
        seed=cfg.seed,
    )


def load(ctx: RunContext, key: str) -> Trained:
    folder = ctx.store.stage_dir("train", key)
    return Trained(key, folder / "adapter", ctx.store.marker("train", key))


def run(ctx: RunContext, prepared: Prepared, selected: Selected) -> Trained:
    key = key_for(ctx, selected)
    if ctx.store.is_done("train", key):
        logger.info("train: cached %s", key)
        return load(ctx, key)
    chosen = set(selected.ids)
    subset = [ex for ex in prepared.pool if ex.id in chosen]
    params = {"finetune": ctx.cfg.finetune, "target_model": ctx.cfg.target_model}
    scratch = ctx.store.scratch_dir("train", key)
    with ctx.tracker.stage_run("train", key, ctx.tags(), params) as mlflow_run:
        with ctx.store.writing("train", key) as (out, marker):
            with PeakMemory() as memory:
                stats = fine_tune(ctx, subset, scratch, out / "adapter")
            (out / "train_log.json").write_text(json.dumps(stats.pop("log_history"), indent=1))
            marker.update(
                stats,
                group=recipe_group(ctx, prepared),
                n_pool=len(prepared.pool),
                budget=float(ctx.cfg.budget),
                **memory.as_metrics("train"),
            )
        mlflow_run.log_metrics({k: v for k, v in marker.items() if isinstance(v, int | float)})
    return load(ctx, key)


def fine_tune(ctx: RunContext, subset: list[Example], scratch: Path, adapter_dir: Path) -> dict:
    """Train a LoRA adapter; return timings, throughput and the loss history."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from dwbench.chat import encode_supervised, require_chat_template
    from dwbench.models import load_causal_lm, load_tokenizer

    cfg, ft = ctx.cfg, ctx.cfg.finetune
    load_start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.target_model, ctx.cache_dir)
    require_chat_template(tokenizer, str(cfg.target_model.name))
    model = load_causal_lm(cfg.target_model, ctx.cache_dir, ctx.device)
    lora = LoraConfig(
        r=int(ft.lora.r),
        lora_alpha=int(ft.lora.alpha),
        lora_dropout=float(ft.lora.dropout),
        target_modules=ft.lora.target_modules
        if isinstance(ft.lora.target_modules, str)
        else list(ft.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    load_s = time.perf_counter() - load_start
    records = [
        encode_supervised(tokenizer, ex.prompt, ex.response, int(ft.max_seq_len)) for ex in subset
    ]
    micro = int(ft.runtime.micro_batch_size)
    use_bf16 = bool(ft.runtime.bf16) and ctx.device == "cuda" and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(scratch),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=int(ft.batch_size) // micro,
        num_train_epochs=float(ft.epochs),
        max_steps=int(ft.max_steps) if ft.max_steps is not None else -1,
        learning_rate=float(ft.lr),
        lr_scheduler_type=str(ft.scheduler),
        warmup_steps=float(ft.warmup_ratio),
        weight_decay=float(ft.weight_decay),
        logging_steps=1,
        save_strategy="steps",
        save_steps=int(ft.runtime.save_every_steps),
        save_total_limit=1,
        report_to="none",
        seed=int(cfg.seed),
        data_seed=int(cfg.seed),
        bf16=use_bf16,
        use_cpu=ctx.device == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    elapsed_file = scratch / ELAPSED_FILE
    resume_from = get_last_checkpoint(str(scratch)) if scratch.exists() else None
    elapsed_before = 0.0
    if resume_from and elapsed_file.exists():
        elapsed_before = json.loads(elapsed_file.read_text()).get(Path(resume_from).name, 0.0)
        logger.info("train: resuming from %s (%.1f s already trained)", resume_from, elapsed_before)
    attempt_start = time.perf_counter()

    class RecordElapsed(TrainerCallback):
        """Remember the training time reached at each checkpoint, for resumed timing."""

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            done = elapsed_before + time.perf_counter() - attempt_start
            elapsed = json.loads(elapsed_file.read_text()) if elapsed_file.exists() else {}
            elapsed[f"checkpoint-{state.global_step}"] = done
            elapsed_file.write_text(json.dumps(elapsed))

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=records,
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=[RecordElapsed()],
    )
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_s = elapsed_before + time.perf_counter() - attempt_start
    model.save_pretrained(str(adapter_dir))
    examples_seen = len(records) * float(ft.epochs)
    if ft.max_steps is not None:
        examples_seen = min(examples_seen, int(ft.max_steps) * int(ft.batch_size))
    return {
        "train_s": train_s,
        "load_s": load_s,
        "n_examples": len(records),
        "epochs": float(ft.epochs),
        "steps": int(trainer.state.global_step),
        "examples_per_s": examples_seen / train_s,
        "train_loss": float(result.training_loss),
        "resumed": resume_from is not None,
        "log_history": trainer.state.log_history,
    }


class PadCollator:
    """Right-pads a batch to its longest member; padded labels are ignored by the loss."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(row["input_ids"]) for row in batch)
        ids, labels, mask = [], [], []
        for row in batch:
            pad = width - len(row["input_ids"])
            ids.append(row["input_ids"] + [self.pad_token_id] * pad)
            labels.append(row["labels"] + [-100] * pad)
            mask.append([1] * len(row["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }
