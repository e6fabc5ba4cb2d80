"""Greedy decoding in which a finished row leaves the batch.

Evaluation (lm-eval's `generate_until`) and Data Whisperer both decode greedily in batches. With
`model.generate`, a row that has ended keeps being computed, fed padding, until the batch's
longest row ends: on the embedded task a batch of 64 ran about 55 steps while most answers ended
in 20-30. Here a finished row's cache rows are dropped, so it stops costing compute, and each
new token is written in place into cache room reserved up front (`RowCacheLayer`) rather than
concatenated onto the whole cache at every step.

`greedy_generate` writes the same tokens `model.generate(do_sample=False)` does: argmax at every
step, a row ends at one of the model's end-of-sequence ids (its later places get `pad_id`), and
the whole batch ends when `stop(tokens)` says so (lm-eval's stop-sequence criterion, given the
same token matrix `generate` would give it) or at `max_length`. Only float rounding can differ,
as a smaller batch runs through other kernel blockings. Generation settings that change greedy
tokens (a repetition penalty, banned words, a minimum length, ...) are not applied here:
`greedy_settings_problem` names them so the caller can refuse.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from dwbench.errors import DwbenchError

# generation_config fields that change which token greedy decoding picks, at their neutral value
GREEDY_NEUTRAL: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "guidance_scale": None,
    "watermarking_config": None,
}


def cache_argument(model: PreTrainedModel) -> str:
    """transformers >= 5.2x calls the cache `cache`; earlier 5.x releases `past_key_values`."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class RowCacheLayer(DynamicLayer):
    """One layer's decoding cache with room to grow: each new token is written in place.

    A plain DynamicLayer concatenates the whole cache at every decoded token (on 2 CPU cores
    that copy was 38% of Data Whisperer's decoding); here attention reads views of the filled
    part of tensors reserved up front.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        super().__init__()
        self.device = keys.device
        self.length = keys.shape[-2]
        shape = (*keys.shape[:2], self.length + room)
        self._keys = keys.new_empty((*shape, keys.shape[-1]))
        self._values = values.new_empty((*shape, values.shape[-1]))
        self._keys[..., : self.length, :] = keys
        self._values[..., : self.length, :] = values
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self._keys[..., : self.length, :]
        self.values = self._values[..., : self.length, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            raise DwbenchError("the decoding cache ran out of the room reserved for it")
        self._keys[..., self.length : end, :] = key_states
        self._values[..., self.length : end, :] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._views()


def growing_cache(model: PreTrainedModel, prefill: DynamicCache, room: int) -> DynamicCache:
    """`prefill`'s layers as RowCacheLayers with `room` tokens reserved; a cache with other
    layers (Gemma 3's sliding windows, which trim themselves) stays transformers' own."""
    if any(type(layer) is not DynamicLayer for layer in prefill.layers):
        return prefill
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(prefill.layers):
        cache.layers[i] = RowCacheLayer(layer.keys, layer.values, room)
    return cache


def greedy_settings_problem(model: PreTrainedModel) -> str | None:
    """The model's generation settings that would change greedy tokens, or None."""
    config = model.generation_config
    changed = [
        f"{name}={getattr(config, name)!r}"
        for name, neutral in GREEDY_NEUTRAL.items()
        if getattr(config, name, neutral) not in (neutral, None, [], {})
    ]
    return ", ".join(changed) or None


def end_ids(model: PreTrainedModel) -> set[int]:
    """The ids that end a row, as `generate` reads them from the generation config."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def greedy_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_length: int,
    pad_id: int,
    stop: Callable[[torch.Tensor], bool] = lambda tokens: False,
    eos_ids: Iterable[int] | None = None,
) -> torch.Tensor:
    """Greedy continuation of left-padded `input_ids`: (batch, up to max_length) token ids, the
    prompt first, as `model.generate` returns them."""
    eos = torch.tensor(
        sorted(end_ids(model) if eos_ids is None else set(eos_ids)), dtype=torch.long
    )
    device = model.device
    batch, width = input_ids.shape
    if width >= max_length:
        return input_ids
    mask = attention_mask.to(device)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    argument = cache_argument(model)
    prefill = DynamicCache(config=model.config)
    with torch.inference_mode():
        output = model(
            input_ids=input_ids.to(device),
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{argument: prefill},
        )
        cache = growing_cache(model, prefill, max_length - width)
        del prefill
        tokens = input_ids.cpu()
        alive = torch.arange(batch)  # rows of the batch still in the model's batch, in order
        unfinished = torch.ones(batch, dtype=torch.bool)
        last_position = positions[:, -1].cpu()
        while True:
            step_tokens = torch.full((batch,), pad_id, dtype=torch.long)
            step_tokens[alive] = output.logits[:, -1, :].float().argmax(-1).cpu()
            tokens = torch.cat([tokens, step_tokens[:, None]], dim=1)
            unfinished &= ~torch.isin(step_tokens, eos)
            if tokens.shape[1] >= max_length or not unfinished.any() or stop(tokens):
                return tokens
            keep = unfinished[alive]
            if not keep.all():
                index = keep.nonzero().squeeze(1)
                cache.batch_select_indices(index.to(device))
                mask, last_position, alive = (
                    mask[index.to(device)],
                    last_position[index],
                    alive[index],
                )
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            last_position = last_position + 1
            output = model(
                input_ids=tokens[alive, -1:].to(device),
                attention_mask=mask,
                position_ids=last_position[:, None].to(device),
                use_cache=True,
                **{argument: cache},
            )
