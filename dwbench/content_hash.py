"""Content-addressed stage keys.

A key hashes what determines a stage's output: its own config, the keys of the stages it reads,
and the data fingerprint. Locations (`path`, a method class's `_target_`) and knobs that cannot
change results (anything under a `runtime:` node: batch sizes for inference, worker counts,
logging) are left out, so moving a results folder, a class to another module or changing a batch
size never invalidates finished work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

KEY_LENGTH = 16
NON_RESULT_FIELDS = frozenset({"path", "runtime", "_target_"})  # where, not what
# Switches added after results were logged, at the value that changes nothing: left out of keys,
# so cells and stages logged before the switch existed keep their keys; set otherwise, they enter.
NEUTRAL_SWITCHES: Mapping[str, Any] = {"leave_one_out": False}  # method.leave_one_out (DW)


def to_plain(value: Any) -> Any:
    """OmegaConf nodes to plain containers, resolving interpolations."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def result_identity(node: Any) -> Any:
    """The part of a config node that can change results: drops `path` and `runtime` fields,
    and switches at their neutral value (NEUTRAL_SWITCHES)."""
    plain = to_plain(node)
    if isinstance(plain, Mapping):
        return {
            str(k): result_identity(v)
            for k, v in plain.items()
            if k not in NON_RESULT_FIELDS
            and not (k in NEUTRAL_SWITCHES and v is NEUTRAL_SWITCHES[k])
        }
    if isinstance(plain, list | tuple):
        return [result_identity(v) for v in plain]
    return plain


# Methods renamed after their results were logged: new name -> the name inside their keys, so a
# rename neither orphans committed cells nor makes them computed again (CHANGELOG, 0.x: the
# one-shot Data Whisperer presets became one_shot_gain).
LOGGED_AS: Mapping[str, str] = {
    "one_shot_gain": "data_whisperer_one_shot",
    "one_shot_gain_16q": "data_whisperer_one_shot_16q",
}


def method_identity(method_cfg: Any) -> Any:
    """A method config's result identity, under the name its results were first logged as."""
    method = result_identity(method_cfg)
    if isinstance(method, Mapping) and method.get("name") in LOGGED_AS:
        method["name"] = LOGGED_AS[method["name"]]
    return method


def task_identity(task_cfg: Any) -> Any:
    """A task config's result identity. `task.noise` enters only while it plants noise (share >
    0): switched off it changes nothing, so keys and cells made before the option existed still
    name the same data and results; switched on, any of its settings makes another key.
    `task.fit` (what a CPU recipe needs for this task's examples) is left out: it changes no
    data, and the train key sees it through the finetune config it feeds."""
    task = result_identity(task_cfg)
    if isinstance(task, Mapping):
        task.pop("fit", None)
    noise = task.get("noise") if isinstance(task, Mapping) else None
    if isinstance(task, Mapping) and not (isinstance(noise, Mapping) and noise.get("share")):
        task.pop("noise", None)
    return task


def stable_hash(payload: Any) -> str:
    """A short sha256 of canonical JSON: identical across processes and Python hash seeds."""
    text = json.dumps(to_plain(payload), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_LENGTH]


def stage_key(stage: str, **parts: Any) -> str:
    """Key of one stage execution from its named inputs (configs are reduced to their identity)."""
    return stable_hash({"stage": stage, **{k: result_identity(v) for k, v in parts.items()}})
