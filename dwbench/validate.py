"""One pass over a composed config before anything is written: no stage, no MLflow run, no plan.

`python -m dwbench` runs it on its config, and `plan`, `status` and `submit` on every cell they
compose (dwbench.sweep.grid), so what one of them refuses, all of them refuse: a typo never
becomes plan lines whose jobs each fail at start. It covers
- every field a run reads, whatever the method or task: its type, its range and, for a size, a
  bound past which the run would never finish (RULES);
- keys that a `+key=value` or `++key=value` override added and no config defines, with a
  did-you-mean: with it (`+buget=0.1`, `++method.n_demo=3`) nothing would read the key and the
  run would go on with the defaults; without `+` (`buget=0.1`) `python -m dwbench` says the same
  before Hydra composes (check_changed_keys), where Hydra would suggest the `+`;
- the task's options (dwbench.data.loading.check_task) and the method's, through the method
  class's own `check_options` (dwbench.methods.base.ChecksOptions), so an option a method gains
  later is checked here with no list to edit.
Each refusal is one ConfigError naming the field and the fix, so a bad value never surfaces as a
torch or numpy traceback after minutes of work.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig

from dwbench.data.metrics import METRICS
from dwbench.errors import ConfigError
from dwbench.lm_eval_runner import GENERATE_CHOICES
from dwbench.models import DEVICES, DTYPES

Check = Callable[[Any], bool]
Rules = list[tuple[str, tuple[Check, str], str]]  # (field, (check, what it must be), an example)


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
SHARE_ABOVE_ZERO = (lambda v: _number(v) and 0 < v <= 1), "a share in (0, 1]"
BOOLEAN = (lambda v: isinstance(v, bool)), "true or false"
FOLDER = (
    (lambda v: isinstance(v, str) and bool(v.strip())),
    "a folder (left empty, the run would write artifacts/, mlartifacts/ and mlflow.db into the "
    "working directory)",
)
TEXT = (lambda v: isinstance(v, str) and bool(v.strip())), "a non-empty text"
# A name that becomes one folder name (a model's under the cache, a sweep's under results_dir):
# no separator, no `..`, nothing hidden.
FOLDER_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def is_folder_name(value: Any) -> bool:
    return isinstance(value, str) and FOLDER_NAME.fullmatch(value) is not None


PATH_COMPONENT = (
    is_folder_name,
    "one folder name (letters, digits, '.', '_', '-', not starting with '.')",
)
DEVICE = (
    (lambda v: isinstance(v, str) and (v in DEVICES or re.fullmatch(r"cuda:\d+", v) is not None)),
    f"one of {', '.join(DEVICES)} or cuda:N",
)


def whole_between(low: int, high: int, why: str) -> tuple[Check, str]:
    return (lambda v: _whole(v) and low <= v <= high), f"a whole number in [{low}, {high}] ({why})"


def one_of(*options: str) -> tuple[Check, str]:
    return (lambda v: v in options), f"one of {', '.join(options)}"


# NumPy's legacy seeding and transformers' set_seed take 32-bit seeds: a larger one passes every
# stage before training and fails there, after the model load.
MAX_SEED = 2**32 - 1
# Token counts: above any model's context window, a generation cap would only let a model that
# never stops run for hours.
MAX_TOKENS = 2**20
# A shard is one SLURM array task, and SLURM's default MaxArraySize is 1001 (0..1000).
MAX_SHARDS = 1000
SEED = whole_between(0, MAX_SEED, "32 bits: NumPy and torch seeds")
TOKENS = whole_between(1, MAX_TOKENS, "more tokens than any model's context window")

# (field, rule, a valid example): what every run reads, whatever the method or task
RULES: Rules = [
    ("seed", SEED, "1"),
    ("budget", SHARE, "0.1"),
    ("device", DEVICE, "auto"),
    ("results_dir", FOLDER, "results"),
    ("cache_dir", FOLDER, "~/.cache/dwbench"),
    ("tracking.uri", TEXT, "sqlite:///results/mlflow.db"),
    ("tracking.experiment", TEXT, "dwbench"),
    ("selector_model.name", PATH_COMPONENT, "smollm2_135m"),
    ("target_model.name", PATH_COMPONENT, "smollm2_135m"),
    ("selector_model.embedded.gguf_file", PATH_COMPONENT, "smollm2-135m-instruct.gguf"),
    ("target_model.embedded.gguf_file", PATH_COMPONENT, "smollm2-135m-instruct.gguf"),
    ("selector_model.dtype", optional(one_of(*DTYPES)), "float32"),
    ("target_model.dtype", optional(one_of(*DTYPES)), "float32"),
    ("finetune.lr", POSITIVE, "1e-4"),
    ("finetune.epochs", whole_at_least(1), "3"),
    ("finetune.batch_size", whole_at_least(1), "8"),
    ("finetune.max_steps", optional(whole_at_least(1)), "100"),
    ("finetune.max_seq_len", TOKENS, "1024"),
    ("finetune.warmup_ratio", SHARE, "0.1"),
    ("finetune.weight_decay", NON_NEGATIVE, "0"),
    ("finetune.lora.r", whole_at_least(1), "8"),
    ("finetune.lora.alpha", POSITIVE, "16"),
    ("finetune.lora.dropout", SHARE_BELOW_ONE, "0.05"),
    ("finetune.runtime.micro_batch_size", whole_at_least(1), "4"),
    ("finetune.runtime.save_every_steps", whole_at_least(1), "50"),
    ("finetune.runtime.bf16", BOOLEAN, "false"),
    ("eval.max_new_tokens", TOKENS, "256"),
    ("eval.runtime.batch_size", optional(whole_at_least(1)), "32"),
    ("eval.runtime.generate", one_of(*GENERATE_CHOICES), "dwbench"),
    ("eval.apply_chat_template", BOOLEAN, "true"),
    ("task.metric", one_of(*METRICS), "exact_match_number"),
    ("task.answer_max_tokens", TOKENS, "128"),
    ("task.pool_limit", optional(whole_at_least(1)), "1000"),
    ("task.eval_limit", optional(whole_at_least(1)), "200"),
    ("task.shuffle_seed", whole_at_least(0), "0"),
    ("task.anchor_examples", optional(whole_at_least(1)), "10"),
    ("task.generator.pool_size", whole_at_least(1), "200"),
    ("task.generator.eval_size", whole_at_least(1), "200"),
    ("task.generator.corrupt_share", SHARE_BELOW_ONE, "0.3"),
    ("task.generator.seed", whole_at_least(0), "0"),
    ("score.shards", whole_between(1, MAX_SHARDS, "one SLURM array task each"), "4"),
    ("slurm.parallel", whole_at_least(1), "8"),
    ("slurm.time_min", whole_at_least(1), "720"),
    ("slurm.cpus_per_task", whole_at_least(1), "8"),
    ("slurm.mem_gb", whole_at_least(1), "64"),
]


def validate_config(
    cfg: DictConfig, overrides: Sequence[str] | None = None, pool_size: int | None = None
) -> None:
    """Refuse the first bad field, unknown key or bad task or method option, naming it and the fix.

    `overrides` are the command line's, for the checks that need them (a method name, keys added
    with `+`); None takes those of the running Hydra app. `pool_size` is the pool's size once the
    data is loaded; before that, what the task config fixes (configured_pool_size).
    """
    check_fields(cfg, RULES)
    given = command_overrides() if overrides is None else list(overrides)
    check_method_named(cfg, given)
    for written, path, siblings in added_keys(cfg, given):
        raise unknown_key(
            written,
            path,
            siblings,
            "nothing would read it and the run would go on with the defaults.",
            "Drop the + and correct the name.",
        )
    if "task" in cfg:
        from dwbench.data.loading import check_task

        check_task(cfg.task)
    if "method" in cfg:
        known = configured_pool_size(cfg.task) if pool_size is None else pool_size
        check_method_options(cfg, known)


def check_fields(cfg: Mapping[str, Any], rules: Rules, prefix: str = "") -> None:
    """Each rule's field, where `cfg` has it: `field=value is not <rule>; pass e.g. ...`; a
    method checks its options with `prefix="method."` (ChecksOptions)."""
    for field, (check, text), example in rules:
        found, value = _lookup(cfg, field)
        if found and not check(value):
            name = prefix + field
            raise ConfigError(f"{name}={value!r} is not {text}; pass e.g. {name}={example}.")


def check_method_options(cfg: DictConfig, pool_size: int | None) -> None:
    """The method class's own `check_options`, where it has one (ChecksOptions)."""
    from dwbench.methods.registry import method_class

    check = getattr(method_class(cfg.method), "check_options", None)
    if callable(check):
        check(cfg.method, cfg.task, pool_size)


def configured_pool_size(task: Mapping[str, Any]) -> int | None:
    """The pool's size as the task config fixes it, with no data read: task.pool_limit (a limit
    above what the data holds is refused when it loads), or the embedded generator's pool_size."""
    limit = task.get("pool_limit")
    generator = task.get("generator")
    if task.get("path") is None and task.get("source") == "embedded" and generator:
        size = generator.get("pool_size")
        return size if limit is None else min(size, limit)
    return limit


def command_overrides() -> list[str]:
    """The running Hydra app's overrides and its hydra.searchpath (your config folder); none
    outside one (a config composed in a test)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    given = HydraConfig.get().overrides
    return [*given.task, *(o for o in given.hydra if o.startswith("hydra.searchpath="))]


def check_method_named(cfg: DictConfig, overrides: list[str]) -> None:
    """`method.name` labels every tag, table and figure, so it must be a method config's name
    (`method.name=randon` would run Random's class under another name)."""
    from hydra.core.global_hydra import GlobalHydra

    from dwbench.methods.registry import check_method_name

    if not GlobalHydra.instance().is_initialized() or "method" not in cfg:
        return
    loader = GlobalHydra.instance().config_loader()
    available = loader.get_group_options("method", config_name="config", overrides=overrides)
    check_method_name(str(cfg.method.name), available)


def _lookup(cfg: Mapping[str, Any], field: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in field.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def unknown_key(written: str, path: str, siblings: list[str], why: str, fix: str) -> ConfigError:
    """`written: no config defines the key path, so <why> Did you mean: ...? <fix>`."""
    close = difflib.get_close_matches(path.rsplit(".", 1)[-1], siblings, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(f"{written}: no config defines the key {path!r}, so {why}{hint} {fix}")


def _siblings(cfg: Mapping[str, Any] | None, path: str) -> list[str]:
    """The keys beside `path`'s last part in `cfg`, for a did-you-mean."""
    parent, _, name = path.rpartition(".")
    found, node = _lookup(cfg, parent) if parent else (cfg is not None, cfg)
    return [str(k) for k in node if str(k) != name] if found and node is not None else []


def _selects_config(loader: Any, override: Any) -> bool:
    """`group=option`, `+experiment=...`, `model@selector_model=...`: a config chosen, no key."""
    return bool(loader.repository.group_exists(override.key_or_group.split("@")[0]))


def _composed_without(loader: Any, overrides: Sequence[Any], left_out: Sequence[Any]) -> Any:
    """The config these overrides compose with `left_out` dropped; a sweep over a group takes its
    first option, so the keys checked are those of a cell the sweep runs."""
    from hydra.types import RunMode

    lines = []
    for override in overrides:
        if override.key_or_group == "hydra.searchpath":
            lines.append(override.input_line)  # your config folders decide what exists
        elif override.is_hydra_override() or any(override is gone for gone in left_out):
            continue
        elif not override.is_sweep_override():
            lines.append(override.input_line)
        elif _selects_config(loader, override):
            first = next(iter(override.sweep_string_iterator()))
            lines.append(f"{override.get_key_element()}={first}")
    return loader.load_configuration("config", overrides=lines, run_mode=RunMode.RUN)


def added_keys(cfg: DictConfig, overrides: list[str]) -> list[tuple[str, str, list[str]]]:
    """The keys these `+key=value` and `++key=value` overrides added that no config defines (a
    `+group=option` selects a config, which is fine; `++` may also set a key that exists), each
    as (override as written, key, its siblings in the composed config) for a did-you-mean."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not GlobalHydra.instance().is_initialized():
        return []
    loader = GlobalHydra.instance().config_loader()
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(overrides)
    added = [
        o
        for o in parsed
        if (o.is_add() or o.is_force_add())
        and not o.is_hydra_override()
        and not _selects_config(loader, o)
    ]
    forced = [o for o in added if o.is_force_add()]
    before = _composed_without(loader, parsed, forced) if forced else None
    unknown = []
    for override in added:
        path = override.key_or_group
        if override.is_force_add() and _lookup(before, path)[0]:
            continue  # `++` set a key a config defines
        unknown.append((override.get_key_element(), path, _siblings(cfg, path)))
    return unknown


def check_changed_keys(overrides: Sequence[str]) -> None:
    """Keys set without `+` that no config defines (`buget=0.1`), refused with a did-you-mean
    before Hydra composes: Hydra's own refusal suggests `+buget=0.1`, which added_keys refuses.

    Runs inside an initialized Hydra (a command's, or hydra.initialize_config_dir).
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    loader = GlobalHydra.instance().config_loader()
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(list(overrides))
    changed = [
        o
        for o in parsed
        if o.type == OverrideType.CHANGE
        and not o.is_hydra_override()
        and not _selects_config(loader, o)
    ]
    if not changed:
        return
    cfg = _composed_without(loader, parsed, changed)
    for override in changed:
        path = override.key_or_group
        if not _lookup(cfg, path)[0]:
            raise unknown_key(
                override.input_line.split("=", 1)[0],
                path,
                _siblings(cfg, path),
                "there is nothing to set.",
                "Correct the name.",
            )
