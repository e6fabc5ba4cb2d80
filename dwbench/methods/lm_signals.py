"""Per-example signals of a causal LM on (prompt, response) pairs: what the baselines score with.

Every quantity reads the response tokens only, through the model's chat template (the same
encoding the train stage fine-tunes on), with logits shifted so that position t predicts token
t + 1. Log-probabilities are computed from the decoder's hidden states at response positions only,
so no (batch x length x vocabulary) logits tensor is ever built (this skips logit soft-capping,
which none of the configured model families use).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from dwbench.chat import Turn, encode_supervised, require_chat_template
from dwbench.data.records import Example
from dwbench.errors import ConfigError, DwbenchError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Record = dict[str, list[int]]  # input_ids and labels (-100 off the response)
GRADIENT_SCOPES = ("all", "last_v_proj_b")


def encode(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_len: int,
    history: Sequence[Turn] = (),
) -> list[Record]:
    """Supervised encodings; an example whose response is cut off entirely is an error."""
    records = []
    for ex in examples:
        record = encode_supervised(tokenizer, ex.prompt, ex.response, max_len, tuple(history))
        if all(label == -100 for label in record["labels"][1:]):
            raise ConfigError(
                f"example {ex.id}: no response token fits in {max_len} tokens (its prompt is "
                f"{len(record['input_ids'])}+ tokens); raise finetune.max_seq_len."
            )
        records.append(record)
    return records


def load_model(
    model_cfg: Mapping[str, Any],
    cache_dir: Path,
    device: str,
    adapter_dir: Path | None = None,
    trainable: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (with a LoRA adapter when given) in eval mode, and its tokenizer.

    `trainable=True` keeps the adapter's parameters differentiable, for per-example gradients.
    """
    from dwbench.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_cfg, cache_dir)
    require_chat_template(tokenizer, str(model_cfg["name"]))
    model = load_causal_lm(model_cfg, cache_dir, device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
        model.eval()
    return model, tokenizer


def swap_adapter(model: PreTrainedModel, adapter_dir: Path) -> None:
    """Load another checkpoint of the same LoRA adapter in place (no base-model reload)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise DwbenchError(f"{adapter_dir} holds no adapter_model.safetensors")
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise DwbenchError(f"adapter {adapter_dir} does not fit the model: {unexpected[:3]}")


def _batches(records: Sequence[Record], batch_size: int) -> Iterator[list[int]]:
    """Positions of records in batches of similar length (less padding), in a fixed order."""
    order = sorted(range(len(records)), key=lambda i: len(records[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def batch_positions(
    records: Sequence[Record], batch_size: int, units: range | None = None
) -> list[list[int]]:
    """The batches `token_stats` computes, as record positions: all, or a score shard's units."""
    batches = list(_batches(records, batch_size))
    return batches if units is None else batches[units.start : units.stop]


def _padded(records: Sequence[Record], device: Any) -> tuple[torch.Tensor, ...]:
    import torch

    width = max(len(r["input_ids"]) for r in records)
    ids = torch.zeros(len(records), width, dtype=torch.long)
    labels = torch.full((len(records), width), -100, dtype=torch.long)
    mask = torch.zeros(len(records), width, dtype=torch.long)
    for row, record in enumerate(records):
        n = len(record["input_ids"])
        ids[row, :n] = torch.tensor(record["input_ids"])
        labels[row, :n] = torch.tensor(record["labels"])
        mask[row, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def _decoder_and_head(model: PreTrainedModel) -> tuple[Any, Any]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def response_logits(
    model: PreTrainedModel, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits at response positions, their target tokens, the batch row of each), shifted."""
    decoder, head = _decoder_and_head(model)
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    picked = targets != -100
    logits = head(hidden[:, :-1][picked]).float()
    rows = picked.nonzero()[:, 0]
    return logits, targets[picked], rows


@dataclass
class TokenStats:
    """Per-example response statistics, in record order."""

    mean_nll: np.ndarray  # mean negative log-likelihood per response token
    sum_logprob: np.ndarray  # log p(response | prompt)
    el2n: np.ndarray  # mean over response tokens of || softmax(logits) - onehot(token) ||_2
    n_tokens: np.ndarray
    positions: np.ndarray  # the records computed (all, unless a shard's units were asked for)

    @property
    def perplexity(self) -> np.ndarray:
        return np.exp(self.mean_nll)


def token_stats(
    model: PreTrainedModel,
    records: Sequence[Record],
    batch_size: int,
    desc: str = "forward",
    units: range | None = None,
) -> TokenStats:
    """One no-grad forward pass per batch; padding never changes a value (right padding).

    `units` computes only those batches (a score shard's); the other records stay 0. An empty
    `desc` hides the progress bar (for callers that show their own).
    """
    import torch

    device = next(model.parameters()).device
    batches = batch_positions(records, batch_size, units)
    computed = np.array(sorted(i for batch in batches for i in batch), dtype=np.int64)
    nll_sum = np.zeros(len(records))
    el2n_sum = np.zeros(len(records))
    counts = np.zeros(len(records))
    bar = tqdm(total=len(computed), desc=desc, unit="ex", disable=not desc)
    with torch.no_grad(), bar as progress:
        for batch in batches:
            ids, labels, mask = _padded([records[i] for i in batch], device)
            logits, targets, rows = response_logits(model, ids, labels, mask)
            logp = torch.log_softmax(logits, dim=-1)
            token_logp = logp.gather(1, targets[:, None])[:, 0]
            probs = logp.exp()
            # ||p - e_y||^2 = sum p^2 - 2 p_y + 1
            el2n = (probs.pow(2).sum(-1) - 2 * token_logp.exp() + 1).clamp_min(0).sqrt()
            positions = torch.tensor(batch, device=rows.device)[rows]
            for target, values in ((nll_sum, -token_logp), (el2n_sum, el2n)):
                np.add.at(target, positions.cpu().numpy(), values.double().cpu().numpy())
            np.add.at(counts, positions.cpu().numpy(), 1)
            progress.update(len(batch))
    with np.errstate(invalid="ignore"):  # 0 / 0: a record not computed, or without a response
        return TokenStats(nll_sum / counts, -nll_sum, el2n_sum / counts, counts, computed)


def weighted_mean_hidden(
    model: PreTrainedModel, records: Sequence[Record], batch_size: int, desc: str = "embed"
) -> np.ndarray:
    """Each record's final hidden states (after the decoder's last norm), averaged over its
    tokens with weights proportional to position (1, 2, ..., n): the pooling RDS+ found best, as
    later tokens have read more of the sequence in a causal model. (records x hidden) float64."""
    import torch

    device = next(model.parameters()).device
    decoder, _ = _decoder_and_head(model)
    out: np.ndarray | None = None
    bar = tqdm(total=len(records), desc=desc, unit="ex", disable=not desc)
    with torch.no_grad(), bar as progress:
        for batch in _batches(records, batch_size):
            ids, _, mask = _padded([records[i] for i in batch], device)
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            weights = (torch.cumsum(mask, dim=1) * mask).float()  # right padding: 1..n, then 0
            pooled = (hidden * (weights / weights.sum(1, keepdim=True))[..., None]).sum(1)
            if out is None:
                out = np.zeros((len(records), pooled.shape[1]))
            out[batch] = pooled.double().cpu().numpy()
            progress.update(len(batch))
    return np.zeros((0, 0)) if out is None else out


def gradient_parameters(model: PreTrainedModel, scope: str) -> list[tuple[str, torch.Tensor]]:
    """The LoRA parameters a gradient is taken over, by name (recorded with the scores).

    `all`: every LoRA matrix; `last_v_proj_b`: the last layer's v_proj LoRA-B only, as the code
    the paper's GraNd numbers likely came from.
    """
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    if not lora:
        raise DwbenchError("the scorer model has no trainable LoRA parameters")
    if scope == "all":
        return lora
    if scope == "last_v_proj_b":
        v_b = [(n, p) for n, p in lora if "v_proj.lora_B" in n]
        if not v_b:
            raise ConfigError(
                "gradient scope last_v_proj_b: the adapter has no v_proj LoRA-B; use scope=all "
                "or a LoRA recipe whose target_modules include v_proj."
            )
        layer = max(int(part) for n, _ in v_b for part in n.split(".") if part.isdigit())
        return [(n, p) for n, p in v_b if f".{layer}." in n]
    raise ConfigError(f"gradient scope {scope!r} is not one of {', '.join(GRADIENT_SCOPES)}")


def example_loss(model: PreTrainedModel, record: Record) -> torch.Tensor:
    """The training loss of one example: mean NLL over its response tokens."""
    import torch

    device = next(model.parameters()).device
    ids, labels, mask = _padded([record], device)
    logits, targets, _ = response_logits(model, ids, labels, mask)
    return torch.nn.functional.cross_entropy(logits, targets)


def example_gradients(
    model: PreTrainedModel,
    records: Sequence[Record],
    params: Sequence[tuple[str, torch.Tensor]],
    desc: str = "gradients",
    batch_size: int = 1,
) -> Iterator[torch.Tensor]:
    """Each example's flat float32 gradient over `params` (the gradient of its own mean
    response NLL), in record order.

    Batch size 1 is what GraNd and LESS define. `batch_size` > 1 gives the same gradients up to
    float rounding, several examples per forward and backward pass: `params` must then be LoRA
    A/B matrices, and each example's gradient of such a matrix is the sum over its tokens of the
    outer product of the gradient reaching the matrix's output with its input (Opacus's
    per-sample rule for a linear layer), read from the batch's one backward pass. Examples in a
    batch never see each other: right padding, causal attention, no loss on padding.
    """
    import torch

    tensors = [p for _, p in params]
    if batch_size <= 1:
        for record in tqdm(records, desc=desc, unit="ex", disable=not desc):
            grads = torch.autograd.grad(example_loss(model, record), tensors)
            yield torch.cat([g.reshape(-1).float() for g in grads])
        return
    layers = _lora_linears(model, params)
    offsets = np.cumsum([0] + [p.numel() for p in tensors])
    out = torch.zeros(len(records), int(offsets[-1]))
    with tqdm(total=len(records), desc=desc, unit="ex", disable=not desc) as progress:
        for batch in _batches(records, batch_size):
            batch_grads = _batch_gradients(model, [records[i] for i in batch], layers)
            for i, grads in zip(batch, batch_grads, strict=True):
                for j, grad in enumerate(grads):
                    out[i, offsets[j] : offsets[j + 1]] = grad.reshape(-1)
            progress.update(len(batch))
    yield from out


def _lora_linears(
    model: PreTrainedModel, params: Sequence[tuple[str, torch.Tensor]]
) -> list[torch.nn.Module]:
    """The linear module of each LoRA weight in `params`, in order (an error for anything else)."""
    import torch

    modules = []
    for name, _ in params:
        owner = name.removesuffix(".weight")
        module = model.get_submodule(owner) if owner != name else None
        if (
            "lora_" not in name
            or not isinstance(module, torch.nn.Linear)
            or module.bias is not None
        ):
            raise ConfigError(
                f"batched per-example gradients need LoRA A/B matrices; {name} is not one: "
                "set the method's runtime.gradient_batch_size=1"
            )
        modules.append(module)
    return modules


def _batch_gradients(
    model: PreTrainedModel, batch: Sequence[Record], layers: Sequence[torch.nn.Module]
) -> list[list[torch.Tensor]]:
    """Per example of `batch`, the gradient of each layer's weight (its own loss only)."""
    import torch

    inputs: dict[int, torch.Tensor] = {}
    output_grads: dict[int, torch.Tensor] = {}

    def capture(index: int) -> Any:
        def hook(module: Any, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            inputs[index] = args[0].detach()
            output.register_hook(lambda grad: output_grads.__setitem__(index, grad.detach()))

        return hook

    handles = [layer.register_forward_hook(capture(i)) for i, layer in enumerate(layers)]
    try:
        device = next(model.parameters()).device
        ids, labels, mask = _padded(batch, device)
        logits, targets, rows = response_logits(model, ids, labels, mask)
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        per_example = torch.zeros(len(batch), device=nll.device).index_add_(0, rows, nll)
        counts = torch.bincount(rows, minlength=len(batch)).clamp(min=1)
        torch.autograd.grad((per_example / counts).sum(), [layer.weight for layer in layers])
    finally:
        for handle in handles:
            handle.remove()
    per_layer = [
        torch.einsum("nto,nti->noi", output_grads[i].float(), inputs[i].float()).cpu()
        for i in range(len(layers))
    ]
    return [[grads[n] for grads in per_layer] for n in range(len(batch))]


def gradient_norms(
    model: PreTrainedModel,
    records: Sequence[Record],
    params: Sequence[tuple[str, torch.Tensor]],
    desc: str = "gradient norms",
    batch_size: int = 1,
) -> np.ndarray:
    gradients = example_gradients(model, records, params, desc, batch_size)
    return np.array([float(g.norm()) for g in gradients], dtype=float)


def with_fresh_lora(model: PreTrainedModel, lora: Mapping[str, Any], seed: int) -> PreTrainedModel:
    """The model with a newly initialised LoRA adapter (B = 0), as fine-tuning would start it."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    modules = lora["target_modules"]
    config = LoraConfig(
        r=int(lora["r"]),
        lora_alpha=int(lora["alpha"]),
        lora_dropout=0.0,
        target_modules=modules if isinstance(modules, str) else list(modules),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.eval()
    return peft_model
