from __future__ import annotations

import subprocess
import sys

from omegaconf import OmegaConf

from dwbench.content_hash import result_identity, stable_hash, stage_key

TASK = {"name": "gsm8k", "path": "/data/a", "metric": "exact_match_number", "pool_limit": 100}


def test_key_ignores_paths_and_runtime() -> None:
    moved = {**TASK, "path": "/elsewhere/b"}
    assert stage_key("prepare", task=TASK, data="f1") == stage_key("prepare", task=moved, data="f1")
    eval_a = {"max_new_tokens": 256, "runtime": {"batch_size": 8}}
    eval_b = {"max_new_tokens": 256, "runtime": {"batch_size": 64}}
    assert stage_key("evaluate", eval=eval_a) == stage_key("evaluate", eval=eval_b)


def test_key_changes_with_what_matters() -> None:
    base = stage_key("prepare", task=TASK, data="f1")
    assert stage_key("prepare", task=TASK, data="f2") != base
    assert stage_key("prepare", task={**TASK, "pool_limit": 50}, data="f1") != base
    assert stage_key("score", task=TASK, data="f1") != base


def test_key_same_for_omegaconf_and_plain_and_key_order() -> None:
    reordered = dict(reversed(list(TASK.items())))
    assert stable_hash(result_identity(OmegaConf.create(TASK))) == stable_hash(
        result_identity(reordered)
    )


def test_key_stable_across_processes() -> None:
    code = (
        "from dwbench.content_hash import stage_key;"
        f"print(stage_key('prepare', task={TASK!r}, data='f1'))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outputs == {stage_key("prepare", task=TASK, data="f1")}


def test_a_switch_at_its_neutral_value_leaves_keys_as_they_were() -> None:
    """method.leave_one_out arrived after cells were logged: false keeps their keys."""
    from dwbench.content_hash import result_identity

    before = {"n_demos": 1, "runtime": {"prompts_per_call": 4}}
    assert result_identity({**before, "leave_one_out": False}) == result_identity(before)
    assert result_identity({**before, "leave_one_out": True}) != result_identity(before)
