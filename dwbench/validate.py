"""One pass over the whole resolved config before any stage runs or any MLflow run opens.

Every numeric field a run reads is checked for its type and range here, with one message that
names the field and the fix, so a bad value never surfaces as a torch or numpy traceback after
minutes of work. A key that no config defines is refused with a did-you-mean: Hydra already
refuses it without `+`, and with `+` (`+buget=0.1`, `+method.n_demo=3`) it would otherwise be
added, read by nothing, and the run would go on with the defaults.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from dwbench.errors import ConfigError

Check = Callable[[Any], bool]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def whole_at_least(low: int) -> tuple[Check, str]:
    return (lambda v: _whole(v) and v >= low), f"a whole number >= {low}"


def optional(rule: tuple[Check, str]) -> tuple[Check, str]:
    check, text = rule
    return (lambda v: v is None or check(v)), f"{text}, or null"


POSITIVE = (lambda v: _number(v) and v > 0), "a number > 0"
NON_NEGATIVE = (lambda v: _number(v) and v >= 0), "a number >= 0"
SHARE = (lambda v: _number(v) and 0 <= v <= 1), "a share in [0, 1]"
SHARE_BELOW_ONE = (lambda v: _number(v) and 0 <= v < 1), "a share in [0, 1)"
BOOLEAN = (lambda v: isinstance(v, bool)), "true or false"

# (field, rule, a valid example): what every run reads, whatever the method or task
RULES: list[tuple[str, tuple[Check, str], str]] = [
    ("seed", whole_at_least(0), "1"),
    ("budget", SHARE, "0.1"),
    ("finetune.lr", POSITIVE, "1e-4"),
    ("finetune.epochs", whole_at_least(1), "3"),
    ("finetune.batch_size", whole_at_least(1), "8"),
    ("finetune.max_steps", optional(whole_at_least(1)), "100"),
    ("finetune.max_seq_len", whole_at_least(1), "1024"),
    ("finetune.warmup_ratio", SHARE, "0.1"),
    ("finetune.weight_decay", NON_NEGATIVE, "0"),
    ("finetune.lora.r", whole_at_least(1), "8"),
    ("finetune.lora.alpha", POSITIVE, "16"),
    ("finetune.lora.dropout", SHARE_BELOW_ONE, "0.05"),
    ("finetune.runtime.micro_batch_size", whole_at_least(1), "4"),
    ("finetune.runtime.save_every_steps", whole_at_least(1), "50"),
    ("finetune.runtime.bf16", BOOLEAN, "false"),
    ("eval.max_new_tokens", whole_at_least(1), "256"),
    ("eval.runtime.batch_size", optional(whole_at_least(1)), "32"),
    ("eval.apply_chat_template", BOOLEAN, "true"),
    ("task.answer_max_tokens", whole_at_least(1), "128"),
    ("task.pool_limit", optional(whole_at_least(1)), "1000"),
    ("task.eval_limit", optional(whole_at_least(1)), "200"),
    ("task.shuffle_seed", whole_at_least(0), "0"),
    ("task.anchor_examples", optional(whole_at_least(1)), "10"),
    ("task.generator.pool_size", whole_at_least(1), "200"),
    ("task.generator.eval_size", whole_at_least(1), "200"),
    ("task.generator.corrupt_share", SHARE_BELOW_ONE, "0.3"),
    ("task.generator.seed", whole_at_least(0), "0"),
    ("score.shards", whole_at_least(1), "4"),
    ("slurm.parallel", whole_at_least(1), "8"),
    ("slurm.time_min", whole_at_least(1), "720"),
    ("slurm.cpus_per_task", whole_at_least(1), "8"),
    ("slurm.mem_gb", whole_at_least(1), "64"),
]


def validate_config(cfg: DictConfig) -> None:
    """Refuse the first bad field or unknown key, naming it and the fix."""
    for field, (check, text), example in RULES:
        found, value = _lookup(cfg, field)
        if found and not check(value):
            raise ConfigError(f"{field}={value!r} is not {text}; pass e.g. {field}={example}.")
    check_method_named(cfg)
    for path, siblings in added_keys(cfg):
        name = path.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(name, siblings, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"+{path}: no config defines the key {path!r}, so nothing would read it and the "
            f"run would go on with the defaults.{hint} Drop the + and correct the name."
        )


def check_method_named(cfg: DictConfig) -> None:
    """`method.name` labels every tag, table and figure, so it must be a method config's name
    (`method.name=randon` would run Random's class under another name)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from dwbench.methods.registry import check_method_name

    if not HydraConfig.initialized() or "method" not in cfg:
        return
    given = HydraConfig.get().overrides
    searchpath = [o for o in given.hydra if o.startswith("hydra.searchpath=")]  # your conf
    overrides = [*given.task, *searchpath]
    loader = GlobalHydra.instance().config_loader()
    available = loader.get_group_options("method", config_name="config", overrides=overrides)
    check_method_name(str(cfg.method.name), available)


def _lookup(cfg: DictConfig, field: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in field.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, node


def added_keys(cfg: DictConfig) -> list[tuple[str, list[str]]]:
    """The keys this run's `+key=value` overrides added (a `+group=option` selects a config,
    which is fine), each with its siblings in the composed config, for a did-you-mean."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return []
    loader = GlobalHydra.instance().config_loader()
    parser = OverridesParser.create(config_loader=loader)
    added = []
    for override in parser.parse_overrides(list(HydraConfig.get().overrides.task)):
        if not override.is_add():
            continue
        group = override.key_or_group.split("@")[0]
        if loader.repository.group_exists(group):  # +experiment=..., +model@x=...
            continue
        path = override.key_or_group
        parent, _, name = path.rpartition(".")
        found, node = _lookup(cfg, parent) if parent else (True, cfg)
        siblings = [str(k) for k in node if str(k) != name] if found and node is not None else []
        added.append((path, siblings))
    return added
