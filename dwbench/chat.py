"""Prompts in the model's own chat template, with exact response-token masks for training."""

from __future__ import annotations

from typing import Any

from dwbench.errors import ConfigError


def require_chat_template(tokenizer: Any, model_name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"model '{model_name}' has no chat template; dwbench trains and prompts instruction "
            "models through their own template. Use an -Instruct model, or add a chat_template "
            "to the tokenizer_config.json of the local folder given as model.path."
        )


Turn = tuple[str, str]  # (user prompt, assistant response) of an earlier exchange


def _messages(prompt: str, history: tuple[Turn, ...]) -> list[dict[str, str]]:
    messages = []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": prompt}]


def prompt_text(tokenizer: Any, prompt: str, history: tuple[Turn, ...] = ()) -> str:
    """The user turn (after any earlier turns) and the assistant header: what generation follows."""
    return tokenizer.apply_chat_template(
        _messages(prompt, history), tokenize=False, add_generation_prompt=True
    )


def conversation_text(
    tokenizer: Any, prompt: str, response: str, history: tuple[Turn, ...] = ()
) -> str:
    messages = _messages(prompt, history) + [{"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def encode_supervised(
    tokenizer: Any, prompt: str, response: str, max_len: int, history: tuple[Turn, ...] = ()
) -> dict[str, list[int]]:
    """Token ids of the whole conversation, with labels only on the last assistant reply.

    The conversation is tokenised once and split by character offsets, so the mask is exact
    whatever the tokenizer does at the prompt/response boundary (merges, BOS, no BOS). Earlier
    turns (`history`, e.g. a one-shot demonstration) are context, never labels.
    """
    head = prompt_text(tokenizer, prompt, history)
    full = conversation_text(tokenizer, prompt, response, history)
    if not full.startswith(head):
        raise ConfigError(
            "the chat template renders the user turn differently with and without the "
            "assistant's reply, so response tokens cannot be located; use another model"
        )
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"][:max_len]
    offsets = encoded["offset_mapping"][:max_len]
    labels = [
        tok if start >= len(head) else -100 for tok, (start, _) in zip(ids, offsets, strict=True)
    ]
    return {"input_ids": ids, "labels": labels}
