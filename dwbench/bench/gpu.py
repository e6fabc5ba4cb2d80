"""`python -m dwbench.bench gpu`: what a GPU gives Data Whisperer, LoRA and evaluation, with
nothing to download.

It builds Llama-3-8B's architecture from its published dimensions (`LLAMA3_8B`) with random
weights in bfloat16 on the GPU. The tokenizer is the embedded SmolLM2's (its ids fit Llama-3's
vocabulary), the prompts are the embedded task's multi-step problems (GSM8K-length answers).
Random weights cost what trained ones cost per token, but they never stop early, so generation
runs to its cap every time: the figures are upper bounds on decoding time. Printed:

- Data Whisperer episodes per second for each layout x scoring, at the device's episodes per
  generate call and the paper's n_d = 10, n_q = 5, with each variant's peak GPU memory;
- a LoRA step (r = 8, all linear layers, batch 8 x 512 tokens, AdamW, gradient checkpointing,
  as the train stage runs it): seconds per step and peak memory;
- evaluation throughput: greedy generation of 64 chat prompts to 256 new tokens in one batch,
  as lm-eval's `hf` backend generates, in problems and new tokens per second.

Without CUDA it says so and exits 0. `--tiny` runs the same code on a 2-layer model of the same
family (on CPU too), which is what the tests run.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dwbench.bench.common import compose, markdown_table

LLAMA3_8B = {  # meta-llama/Meta-Llama-3-8B-Instruct's config.json
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY = {  # the same family, small enough for a CPU smoke test (the tokenizer's vocabulary)
    **LLAMA3_8B,
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
VARIANTS = {
    "joint-generate": ("method.query_layout=joint", "method.query_scoring=generate"),
    "separate-generate": ("method.query_layout=separate", "method.query_scoring=generate"),
    "joint-likelihood": ("method.query_layout=joint", "method.query_scoring=likelihood"),
    "separate-likelihood": ("method.query_layout=separate", "method.query_scoring=likelihood"),
}
EVAL_PROMPTS, EVAL_NEW_TOKENS = 64, 256
LORA_BATCH, LORA_TOKENS, LORA_STEPS = 8, 512, 3


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available() and not args.tiny:
        print(
            "python -m dwbench.bench gpu: no CUDA device here (torch "
            f"{torch.__version__}); it measures a GPU, so there is nothing to do. "
            "`--tiny` runs its code on a small model, on CPU."
        )
        return 0
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = TINY if args.tiny else LLAMA3_8B
    start = time.perf_counter()
    model, tokenizer = build_model(shape, device, dtype, args.cache_dir)
    name = "2-layer Llama-3 (tiny)" if args.tiny else "Llama-3-8B architecture"
    print(
        f"{name}, random weights, {dtype}, {device}"
        + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
        + f": built in {time.perf_counter() - start:.1f} s, "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters"
    )
    rows = [
        data_whisperer_row(label, overrides, model, tokenizer, device, args)
        for label, overrides in VARIANTS.items()
    ]
    rows.append(evaluation_row(model, tokenizer, device, args.tiny))
    rows.append(lora_row(model, device, *((2, 64) if args.tiny else (LORA_BATCH, LORA_TOKENS))))

    print(markdown_table(rows, ("what", "setting", "throughput", "seconds", "peak GPU MB")))
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


def build_model(shape: dict[str, Any], device: str, dtype: Any, cache_dir: Path) -> tuple:
    """Llama with these dimensions and random weights, and the embedded SmolLM2 tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dwbench.models import load_tokenizer
    from dwbench.models import resolve_model_source as _resolve  # converts the GGUF once

    smollm2 = _smollm2_cfg()
    _resolve(smollm2, cache_dir)
    tokenizer = load_tokenizer(smollm2, cache_dir)
    config = LlamaConfig(
        **shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model, tokenizer


def _smollm2_cfg() -> Any:
    from omegaconf import OmegaConf

    from dwbench.config_files import CONF_DIR

    return OmegaConf.load(CONF_DIR / "model" / "smollm2_135m.yaml")


@contextmanager
def peak_gpu(device: str) -> Iterator[Callable[[], float | None]]:
    """Yields a function giving the block's peak GPU memory in MB (None on CPU)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    peak: list[float | None] = [None]
    yield lambda: peak[0]
    if device == "cuda":
        torch.cuda.synchronize()
        peak[0] = torch.cuda.max_memory_allocated() / 2**20


def data_whisperer_row(
    label: str,
    overrides: tuple[str, ...],
    model: Any,
    tokenizer: Any,
    device: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Two generate calls' worth of the paper's episodes in one variant."""
    from dwbench.data.loading import load_task
    from dwbench.methods.base import ScoringContext
    from dwbench.methods.data_whisperer.method import DataWhisperer

    class Prebuilt(DataWhisperer):
        def _load(self) -> tuple:
            return self._ready(model, tokenizer)

    per_call = 32 if device == "cuda" else 8  # EPISODES_PER_CALL's generate default
    answer_cap = 128
    if args.tiny:  # a smoke test of the code path: two calls of two short episodes
        per_call, answer_cap = 2, 16
    pool_size = 2 * per_call * 10  # n_d = 10: about two calls of episodes
    cfg = compose(
        "data_whisperer",
        "embedded_gsm",
        pool_size,
        0,
        [
            *overrides,
            "task.generator.difficulty=multi_step",
            f"task.answer_max_tokens={answer_cap}",
            f"method.runtime.prompts_per_call={per_call}",
            f"selector_model.num_layers={model.config.num_hidden_layers}",
            f"selector_model.attention_layer={model.config.num_hidden_layers // 2}",
        ],
    )
    splits = load_task(cfg.task)
    with tempfile.TemporaryDirectory() as work_dir:
        context = ScoringContext.for_cell(
            cfg, splits, Path(work_dir), device=device, cache_dir=args.cache_dir
        )
        method = Prebuilt(context)
        with peak_gpu(device) as peak:
            start = time.perf_counter()
            method.score(splits.pool)
            seconds = time.perf_counter() - start
    episodes = method.stats["episodes"]
    return {
        "what": f"Data Whisperer {label}",
        "setting": f"{int(episodes)} episodes, n_d=10, n_q=5, {per_call} per call",
        "throughput": f"{episodes / seconds:.2f} episodes/s",
        "seconds": seconds,
        "peak GPU MB": peak(),
    }


def evaluation_row(model: Any, tokenizer: Any, device: str, tiny: bool) -> dict[str, Any]:
    """Greedy generation of a batch of chat prompts, left-padded, as lm-eval's hf backend."""
    import torch

    from dwbench.data.embedded import generate_embedded_task

    _, evaluation = generate_embedded_task(
        seed=0, pool_size=1, eval_size=EVAL_PROMPTS, corrupt_share=0.0, difficulty="multi_step"
    )
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["question"]}], tokenize=False, add_generation_prompt=True
        )
        for r in evaluation
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    new_tokens = 16 if tiny else EVAL_NEW_TOKENS
    with peak_gpu(device) as peak, torch.no_grad():
        start = time.perf_counter()
        out = model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
        seconds = time.perf_counter() - start
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    return {
        "what": "evaluation (greedy generate)",
        "setting": f"{len(prompts)} prompts x {new_tokens} new tokens, one batch",
        "throughput": f"{len(prompts) / seconds:.2f} problems/s, {generated / seconds:.0f} tok/s",
        "seconds": seconds,
        "peak GPU MB": peak(),
    }


def lora_row(model: Any, device: str, batch: int, tokens: int) -> dict[str, Any]:
    """LoRA steps as the train stage takes them: r = 8, all linear layers, AdamW, checkpointing
    (`--tiny`: a short batch, as a smoke test of the code path)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = min(model.config.vocab_size, 49152)  # ids the embedded tokenizer could give
    ids = torch.randint(0, vocab, (batch, tokens), generator=generator).to(device)

    def step() -> None:
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: kernels, optimizer state
    with peak_gpu(device) as peak:
        start = time.perf_counter()
        for _ in range(LORA_STEPS):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / LORA_STEPS
    return {
        "what": "LoRA step",
        "setting": f"r=8 all-linear, batch {batch} x {tokens} tokens, AdamW",
        "throughput": f"{batch * tokens / seconds:.0f} tok/s",
        "seconds": seconds,
        "peak GPU MB": peak(),
    }


def add_parser(commands: Any) -> None:
    gpu = commands.add_parser(
        "gpu",
        help="Llama-3-8B-sized Data Whisperer, LoRA and evaluation throughput on a CUDA GPU",
        description=__doc__.split("\n\n")[0],
    )
    gpu.add_argument("--tiny", action="store_true", help="a 2-layer model (runs on CPU too)")
    gpu.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the embedded tokenizer is converted (default: the config's cache_dir)",
    )
    gpu.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> None:
    import sys

    if args.cache_dir is None:
        args.cache_dir = Path(str(compose("random", "embedded_gsm", 10, 0, []).cache_dir))
        args.cache_dir = args.cache_dir.expanduser()
    sys.exit(run(args))
