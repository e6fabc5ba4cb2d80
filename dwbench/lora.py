"""LoRA fine-tuning with peft and transformers: the recipe, the run, its epoch snapshots.

Loss on response tokens only, through the model's chat template. Checkpoints go to a scratch
folder that survives a kill, so a restarted job resumes from the last complete one; the time
counted is the training time up to that checkpoint plus the time after the restart, never the
lost work. A checkpoint is complete once sealed: its files flushed to disk, then a marker
listing their sizes and sha256 (dwbench.artifacts.seal); only then is the one before it
removed, so a kill or a power loss at any moment leaves one to resume from.
Scorers that read training states (EL2N, LESS, S2L) get a snapshot after every epoch: the
adapter, its Adam moments and the epoch's mean learning rate.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dwbench.artifacts import aside_path, damage, seal
from dwbench.context import RunContext
from dwbench.data.records import Example

logger = logging.getLogger(__name__)
ELAPSED_FILE = "elapsed_s.json"


@dataclass
class Recipe:
    """What one LoRA fine-tune needs besides its data: the model, the recipe, seed and device."""

    model_cfg: Mapping[str, Any]
    finetune: Mapping[str, Any]
    seed: int
    device: str
    cache_dir: Path

    @classmethod
    def of_target(cls, ctx: RunContext) -> Recipe:
        cfg = ctx.cfg
        return cls(cfg.target_model, cfg.finetune, int(cfg.seed), ctx.device, ctx.cache_dir)


def fine_tune(
    recipe: Recipe,
    subset: list[Example],
    scratch: Path,
    adapter_dir: Path,
    snapshots_dir: Path | None = None,
) -> dict:
    """Train a LoRA adapter; return timings, throughput and the loss history.

    With `snapshots_dir`, the adapter, its Adam moments and the epoch's mean learning rate are
    also kept after every epoch (scorers that read training checkpoints: EL2N, LESS, S2L).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, set_seed

    from dwbench.chat import encode_supervised, require_chat_template
    from dwbench.models import load_causal_lm, load_tokenizer
    from dwbench.warmup import RatioWarmupArguments

    ft, model_cfg, device = recipe.finetune, recipe.model_cfg, recipe.device
    load_start = time.perf_counter()
    tokenizer = load_tokenizer(model_cfg, recipe.cache_dir)
    require_chat_template(tokenizer, str(model_cfg["name"]))
    model = load_causal_lm(model_cfg, recipe.cache_dir, device)
    set_seed(recipe.seed)  # LoRA's A matrices are drawn here, before the Trainer seeds anything
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
    use_bf16 = bool(ft.runtime.bf16) and device == "cuda" and torch.cuda.is_bf16_supported()
    args = RatioWarmupArguments(
        output_dir=str(scratch),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=int(ft.batch_size) // micro,
        num_train_epochs=float(ft.epochs),
        max_steps=int(ft.max_steps) if ft.max_steps is not None else -1,
        learning_rate=float(ft.lr),
        lr_scheduler_type=str(ft.scheduler),
        warmup_steps=float(ft.warmup_ratio),  # a share at every value (RatioWarmupArguments)
        weight_decay=float(ft.weight_decay),
        logging_steps=1,
        save_strategy="steps",
        save_steps=int(ft.runtime.save_every_steps),
        save_total_limit=None,  # SealCheckpoints removes a checkpoint once a later one is sealed
        report_to="none",
        seed=recipe.seed,
        data_seed=recipe.seed,
        bf16=use_bf16,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    elapsed_file = scratch / ELAPSED_FILE
    resume_from = last_complete_checkpoint(scratch)
    elapsed_before = 0.0
    if resume_from:
        elapsed_before = _read_elapsed(elapsed_file).get(Path(resume_from).name, 0.0)
        logger.info("train: resuming from %s (%.1f s already trained)", resume_from, elapsed_before)
    attempt_start = time.perf_counter()

    class RecordElapsed(TrainerCallback):
        """Remember the training time reached at each checkpoint, for resumed timing."""

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            done = elapsed_before + time.perf_counter() - attempt_start
            elapsed = _read_elapsed(elapsed_file)
            elapsed[f"checkpoint-{state.global_step}"] = done
            staging = elapsed_file.with_suffix(".tmp")  # a full disk never leaves it half-written
            staging.write_text(json.dumps(elapsed))
            os.replace(staging, elapsed_file)

    callbacks: list[Any] = [RecordElapsed(), seal_checkpoints()]
    if snapshots_dir is not None:
        callbacks.append(epoch_snapshots(snapshots_dir))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=records,
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_s = elapsed_before + time.perf_counter() - attempt_start
    model.save_pretrained(str(adapter_dir))
    examples_seen = len(records) * float(ft.epochs)
    if ft.max_steps is not None:
        examples_seen = min(examples_seen, int(ft.max_steps) * int(ft.batch_size))
    train_loss = mean_training_loss(trainer.state.log_history, result.training_loss)
    return {
        "train_s": train_s,
        "load_s": load_s,
        "n_examples": len(records),
        "epochs": float(ft.epochs),
        "steps": int(trainer.state.global_step),
        "examples_per_s": examples_seen / train_s,
        "train_loss": train_loss,
        "resumed": resume_from is not None,
        # the trainer's closing entry states the loss of this attempt's steps alone: a resumed
        # run's train_log.json states, as an uninterrupted one's does, that of every step
        "log_history": [
            {**entry, "train_loss": train_loss} if "train_loss" in entry else entry
            for entry in trainer.state.log_history
        ],
    }


CHECKPOINT_STAGE = "checkpoint"  # the stage a checkpoint's marker names (dwbench.artifacts)


def seal_checkpoints() -> Any:
    """A callback sealing each checkpoint the Trainer saves, then removing the earlier ones."""
    from transformers import TrainerCallback

    class SealCheckpoints(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not args.should_save:  # another process of a distributed run writes it
                return
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            seal(checkpoint, {"stage": CHECKPOINT_STAGE, "key": checkpoint.name})
            for earlier in _checkpoints(Path(args.output_dir)):
                if _step(earlier) < state.global_step:
                    shutil.rmtree(earlier)

    return SealCheckpoints()


def last_complete_checkpoint(scratch: Path) -> str | None:
    """The newest sealed `checkpoint-N` whose files match its marker, or None.

    Newer ones that do not (a kill while saving, a file cut short by a power loss, edited or
    missing) are reported, one line each, and moved aside (`.damaged-checkpoint-N-<time>`),
    never resumed from; the stage's scratch folder, and they with it, goes once training ends.
    """
    damaged = 0
    for checkpoint in reversed(_checkpoints(scratch)):
        problem = damage(checkpoint, CHECKPOINT_STAGE, legacy=False)
        if problem is None:
            return str(checkpoint)
        aside = aside_path(checkpoint)
        logger.warning("train: %s is incomplete (%s); moved to %s.", checkpoint, problem, aside)
        os.replace(checkpoint, aside)
        damaged += 1
    if damaged:
        logger.warning("train: no complete checkpoint is left; training from the start.")
    return None


def _checkpoints(scratch: Path) -> list[Path]:
    """The Trainer's `checkpoint-N` folders in `scratch`, oldest first."""
    if not scratch.is_dir():
        return []
    found = (p for p in scratch.glob("checkpoint-*") if p.name.split("-")[-1].isdigit())
    return sorted(found, key=_step)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def _read_elapsed(path: Path) -> dict[str, float]:
    """Training seconds reached at each checkpoint; an unreadable record counts as none."""
    try:
        return dict(json.loads(path.read_text())) if path.exists() else {}
    except (OSError, ValueError):
        logger.warning("train: %s cannot be read; earlier training time is not counted.", path)
        return {}


def mean_training_loss(history: list[dict[str, Any]], this_attempt: float) -> float:
    """The mean logged loss over every step of the run, the steps before a resume included
    (the trainer's own figure covers only the steps after it)."""
    losses = [float(entry["loss"]) for entry in history if "loss" in entry and "step" in entry]
    return sum(losses) / len(losses) if losses else float(this_attempt)


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


SNAPSHOT_LRS = "step_lrs.json"
MOMENTS_FILE = "adam_moments.pt"


def epoch_snapshots(folder: Path) -> Any:
    """A callback keeping `folder/epoch-N/` after each epoch: adapter, Adam moments, mean lr.

    The moments are stored by parameter name (`exp_avg`, `exp_avg_sq`, `step`), so a scorer can
    precondition gradients without rebuilding the trainer's optimizer. Step learning rates are
    written as they happen, so a resumed run still knows the mean lr of its interrupted epoch.
    """
    import torch
    from transformers import TrainerCallback

    class EpochSnapshots(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            lrs = _read_json(folder / SNAPSHOT_LRS)
            lrs[str(state.global_step + 1)] = float(kwargs["lr_scheduler"].get_last_lr()[0])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / SNAPSHOT_LRS).write_text(json.dumps(lrs))

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            epoch = round(state.epoch)
            previous = [_read_json(p / "snapshot.json") for p in folder.glob("epoch-*")]
            first_step = max((m["last_step"] for m in previous if m["epoch"] < epoch), default=0)
            lrs = _read_json(folder / SNAPSHOT_LRS)
            epoch_lrs = [
                lr for step, lr in lrs.items() if first_step < int(step) <= state.global_step
            ]
            target = folder / f"epoch-{epoch}"
            staging = folder / f".epoch-{epoch}.partial"
            kwargs["model"].save_pretrained(str(staging / "adapter"))
            optimizer = getattr(kwargs["optimizer"], "optimizer", kwargs["optimizer"])
            moments = {
                name: {
                    "exp_avg": optimizer.state[param]["exp_avg"].detach().cpu(),
                    "exp_avg_sq": optimizer.state[param]["exp_avg_sq"].detach().cpu(),
                    "step": int(optimizer.state[param]["step"]),
                }
                for name, param in kwargs["model"].named_parameters()
                if param.requires_grad and param in optimizer.state
            }
            group = optimizer.param_groups[0]
            torch.save(moments, staging / MOMENTS_FILE)
            meta = {
                "epoch": epoch,
                "last_step": int(state.global_step),
                "mean_lr": sum(epoch_lrs) / len(epoch_lrs) if epoch_lrs else 0.0,
                "betas": list(group.get("betas", (0.9, 0.999))),
                "eps": float(group.get("eps", 1e-8)),
            }
            (staging / "snapshot.json").write_text(json.dumps(meta))
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)

    return EpochSnapshots()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Snapshot:
    """A scorer fine-tune's state after one epoch."""

    epoch: int
    adapter_dir: Path
    moments_path: Path
    mean_lr: float
    betas: tuple[float, float]
    eps: float


@dataclass
class ScorerFineTune:
    """A fine-tune made for scoring (GraNd, EL2N, LESS, ...): where it is and what it cost."""

    key: str
    adapter_dir: Path
    snapshots: list[Snapshot]
    train_s: float
    cached: bool  # True: made by an earlier run, so its time was not spent in this one
