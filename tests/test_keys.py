from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dwbench.content_hash import result_identity, stable_hash, stage_key

REPO = Path(__file__).resolve().parent.parent

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


@pytest.mark.parametrize(
    ("experiment", "old", "new"),
    [
        ("embedded_table2", "data_whisperer_one_shot", "one_shot_gain"),
        ("embedded_table2", "data_whisperer_one_shot_16q", "one_shot_gain_16q"),
        ("dialogsum_noise_table2", "data_whisperer_one_shot_16q", "one_shot_gain_16q"),
    ],
)
def test_a_renamed_method_keeps_the_keys_of_its_committed_cells(experiment, old, new) -> None:
    """The one-shot presets became one_shot_gain: the new name and the old alias compose the cells
    committed under the old name (results/<experiment>.csv), so none is lost or computed again."""
    import pandas as pd

    from dwbench.report.cells import load_report_grid

    committed = pd.read_csv(REPO / "results" / f"{experiment}.csv", dtype=str)
    cells = set(committed.loc[committed["method"] == old, "cell"])
    assert cells
    for name in (new, old):
        # the cell key leaves data paths out: any folder stands for DialogSum's
        data = [f"task.path={REPO}"] if experiment.startswith("dialogsum") else []
        grid = load_report_grid(experiment, [f"method={name}", *data], progress=False)
        keys = {cell.key for cell in grid.grid.cells}
        assert cells <= keys, name
        assert {str(cell.cfg.method.name) for cell in grid.grid.cells} == {new}
