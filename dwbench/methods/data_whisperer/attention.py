"""Layer l's attention from chosen query rows, read in the forward pass scoring runs anyway.

Kept on its own because it is the part a transformers upgrade breaks. Only public APIs are used:
the model runs a registered attention function (`AttentionInterface`) that is plain SDPA for
every layer and, inside layer l's module while a capture is armed (forward hooks set a context
variable), also computes softmax(QK^T) for the armed rows only. No second forward pass, no
other layer materialises attention weights, and the function sees post-RoPE queries and keys,
so it works for any model that dispatches through the AttentionInterface (Llama, Qwen2,
Mistral, Gemma 3, SmolLM2, ...). Logit soft-capping (Gemma 2) and attention sinks are not
applied to the captured weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextvars import ContextVar, Token
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dwbench.errors import ConfigError

CAPTURE_ATTENTION = "dwbench_dw_capture"  # name of the attention function registered below

_ACTIVE_CAPTURE: ContextVar[LayerAttention | None] = ContextVar("dwbench_dw_capture", default=None)


def _attention_with_capture(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA, plus the armed rows' softmax(QK^T) while a capture is active (layer l only)."""
    output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    capture = _ACTIVE_CAPTURE.get()
    if capture is not None:
        capture.record(query, key, attention_mask, kwargs.get("scaling"))
    return output


def use_capture_attention(model: PreTrainedModel) -> None:
    """Switch the model to SDPA-with-capture through transformers' public attention registry."""
    AttentionInterface.register(CAPTURE_ATTENTION, _attention_with_capture)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(CAPTURE_ATTENTION)
    if model.config._attn_implementation != CAPTURE_ATTENTION:
        raise ConfigError(
            f"{type(model).__name__} does not dispatch attention through transformers' "
            "AttentionInterface, so Data Whisperer cannot read its attention; use another "
            "selector model."
        )


def attention_module(model: PreTrainedModel, layer: int) -> torch.nn.Module:
    """Layer `layer`'s self-attention module (the one module with that `layer_idx`)."""
    found = [
        module
        for module in model.modules()
        if getattr(module, "layer_idx", None) == layer and "Attention" in type(module).__name__
    ]
    if len(found) != 1:
        raise ConfigError(
            f"found {len(found)} attention modules for selector_model.attention_layer={layer} "
            f"in {type(model).__name__}; pick a layer with ordinary self-attention."
        )
    return found[0]


class LayerAttention:
    """Layer l's attention from chosen rows, captured once: in the next forward of that layer.

    `arm(spans)` targets the next forward: each span (b, start, end) is a range of query rows of
    batch row b, in the coordinates of that forward's tokens; the capture disarms after it.
    `column_mass[i][t]` is the attention that span i pays to key t (cached keys first), summed
    over heads and rows; softmax runs in float32 over exactly what SDPA attends to (causal,
    padding, a custom 4D mask, window).
    """

    def __init__(self, model: PreTrainedModel, layer: int) -> None:
        module = attention_module(model, layer)
        self._rows: list[tuple[int, int, int]] | None = None
        self._token: Token[LayerAttention | None] | None = None
        self.column_mass: list[np.ndarray] | None = None
        self._handles = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._exit),
        ]

    def arm(self, spans: list[tuple[int, int, int]]) -> None:
        self._rows = spans
        self.column_mass = None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        if self._rows is not None:
            self._token = _ACTIVE_CAPTURE.set(self)

    def _exit(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._token is not None:
            _ACTIVE_CAPTURE.reset(self._token)
            self._token = None
            self._rows = None

    def record(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        assert self._rows is not None  # only an armed capture is ever active
        n_keys, n_new = key.shape[2], query.shape[2]
        groups = query.shape[1] // key.shape[1]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        columns = torch.arange(n_keys, device=query.device)
        masses = []
        for b, start, end in self._rows:
            keys = key[b].float().repeat_interleave(groups, dim=0)  # (heads, keys, dim)
            logits = query[b, :, start:end].float() @ keys.transpose(-1, -2) * scale
            if mask is None:  # SDPA's causal shortcut: no padding, plain causal mask
                rows = torch.arange(start, end, device=query.device) + (n_keys - n_new)
                logits = logits.masked_fill(columns[None, :] > rows[:, None], -math.inf)
            elif mask.dtype == torch.bool:
                logits = logits.masked_fill(~mask[b, :, start:end], -math.inf)
            else:
                logits = logits + mask[b, :, start:end].float()
            probs = torch.softmax(logits, dim=-1)
            masses.append(probs.sum(dim=(0, 1)).double().cpu().numpy())
        self.column_mass = masses


def demonstration_attention(
    column_masses: Sequence[np.ndarray], demo_tokens: Sequence[tuple[int, int]], n_rows: int
) -> list[float]:
    """a_i = attention from all query rows to demonstration i's tokens / (len(demo i) * rows).

    `column_masses` holds one array per batch row of the episode (one for the joint layout, one
    per query for the separate one), `demo_tokens` the key columns of each demonstration and
    `n_rows` the number of query rows summed over those batch rows.
    """
    total = np.sum(column_masses, axis=0)
    return [float(total[s:e].sum()) / ((e - s) * n_rows) for s, e in demo_tokens]
