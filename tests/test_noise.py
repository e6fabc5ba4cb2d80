"""task.noise: planted, seeded, recorded noise on any task's pool; never on its evaluation set."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

from dwbench.config_files import CONF_DIR
from dwbench.data.loading import has_clean_flags, load_task
from dwbench.data.noise import KINDS, check_noise, foreign_text, plant_noise
from dwbench.data.records import Example, fingerprint
from dwbench.errors import ConfigError, DataError
from dwbench.methods.oracle_clean import OracleClean
from dwbench.stages.keys import prepare_key
from dwbench.validate import validate_config

SUMMARY = "Person1 asks for the time. Person2 says it is late! They leave together.\nThe end."


def _pool(n: int) -> list[Example]:
    responses = [f"Summary {i}. {SUMMARY}" for i in range(n)]
    return [
        Example(f"p{i:03d}", f"Summarize dialogue {i}.", r, (r,)) for i, r in enumerate(responses)
    ]


@pytest.fixture
def dialog_dir(tmp_path: Path) -> Path:
    """A DialogSum-shaped local task: train, validation and test files."""
    for name, n in (("train", 60), ("validation", 5), ("test", 8)):
        rows = [
            {
                "id": f"{name}_{i}",
                "dialogue": f"#P1#: hi {i}\n#P2#: bye",
                "summary": SUMMARY + f" {i}",
            }
            for i in range(n)
        ]
        (tmp_path / f"{name}.json").write_text(json.dumps(rows), encoding="utf-8")
    return tmp_path


def _task(path: Path, **noise: Any) -> dict[str, Any]:
    return {
        "name": "dialog",
        "path": str(path),
        "fields": {"prompt": ["dialogue"], "response": "summary", "id": "id"},
        "prompt_template": "Summarize.\n{dialogue}",
        "query_source": "validation",
        "noise": noise,
    }


def test_exact_share_every_kind_recorded_and_really_changed() -> None:
    pool = _pool(100)
    noisy = plant_noise(pool, {"share": 0.3, "seed": 0})
    assert sum(not ok for ok in noisy.clean.values()) == 30
    kinds = Counter(k for k in noisy.corruption.values() if k is not None)
    assert kinds == {kind: 6 for kind in KINDS}  # cycled evenly over the five
    for before, after in zip(pool, noisy.pool, strict=True):
        kind = noisy.corruption[before.id]
        assert after.id == before.id and after.prompt == before.prompt
        assert after.references == (after.response,)
        assert (after.response == before.response) == (kind is None)
        assert noisy.clean[before.id] == (kind is None)
        if kind == "swap":
            assert after.response in {ex.response for ex in pool} - {before.response}
        if kind == "truncate":
            assert before.response.startswith(after.response)
            assert 1 <= len(after.response.split()) < len(before.response.split())
        if kind == "copy_prompt":
            assert after.response == before.prompt
        if kind == "foreign":
            assert len(after.response.split()) == len(before.response.split())
            words = {w for s in sum(foreign_text().values(), []) for w in s.split()}
            assert set(after.response.split()) <= words
        if kind == "shuffle_sentences":
            assert sorted(re.split(r"(?<=[.!?])\s+|\n", after.response)) == sorted(
                re.split(r"(?<=[.!?])\s+|\n", before.response)
            )


def test_seeded_and_nested_across_shares() -> None:
    pool = _pool(50)
    first = plant_noise(pool, {"share": 0.2, "seed": 3})
    assert plant_noise(pool, {"share": 0.2, "seed": 3}) == first
    other = plant_noise(pool, {"share": 0.2, "seed": 4})
    assert other.clean != first.clean
    larger = plant_noise(pool, {"share": 0.4, "seed": 3})
    dirty = {i for i, ok in first.clean.items() if not ok}
    assert dirty < {i for i, ok in larger.clean.items() if not ok}
    assert plant_noise(pool, {"share": 0.0}).pool == pool


def test_a_kind_that_cannot_change_an_example_falls_to_the_next() -> None:
    pool = [Example(f"x{i}", f"q{i}", "yes", ("yes",)) for i in range(10)]  # one word, all alike
    noisy = plant_noise(pool, {"share": 0.5, "kinds": ["swap", "truncate", "copy_prompt"]})
    assert set(noisy.corruption.values()) == {None, "copy_prompt"}
    with pytest.raises(DataError, match="task.noise.share=0.5 asks for 5 corrupted"):
        plant_noise(pool, {"share": 0.5, "kinds": ["swap", "shuffle_sentences"]})


@pytest.mark.parametrize(
    ("noise", "message"),
    [
        ({"share": 1.0}, "task.noise.share=1.0 is not a share in [0, 1)"),
        ({"share": -0.1}, "task.noise.share=-0.1 is not a share in [0, 1)"),
        ({"share": "0.3"}, "task.noise.share='0.3' is not a share"),
        ({"kinds": ["swap", "typo"]}, "task.noise.kinds holds 'typo', which is not one of swap"),
        ({"kinds": []}, "task.noise.kinds=[] is not a non-empty list"),
        ({"kinds": ["swap", "swap"]}, "names a kind twice"),
        ({"seed": -1}, "task.noise.seed=-1 is not a whole number >= 0"),
        ({"rate": 0.3}, "Unknown key task.noise.rate; valid keys under task.noise: share"),
    ],
)
def test_bad_options_name_the_field_and_the_fix(noise: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_noise(noise)


def test_local_task_pool_only_with_flags_and_kinds(dialog_dir: Path) -> None:
    clean = load_task(_task(dialog_dir))
    assert clean.clean_flags is None and clean.corruptions is None
    noisy = load_task(_task(dialog_dir, share=0.3, seed=1))
    assert noisy.eval == clean.eval and noisy.queries == clean.queries  # never corrupted
    assert [ex.id for ex in noisy.pool] == [ex.id for ex in clean.pool]
    assert sum(not ok for ok in noisy.clean_flags.values()) == 18
    assert {i for i, k in noisy.corruptions.items() if k} == {
        i for i, ok in noisy.clean_flags.items() if not ok
    }
    assert fingerprint(noisy) != fingerprint(clean)
    limited = load_task({**_task(dialog_dir, share=0.5), "pool_limit": 10})
    assert len(limited.pool) == 10 and sum(not ok for ok in limited.clean_flags.values()) == 5


def test_embedded_task_refuses_two_noise_models_and_takes_one() -> None:
    task = {"name": "e", "source": "embedded", "noise": {"share": 0.3}}
    generator = {"pool_size": 20, "eval_size": 5, "corrupt_share": 0.3, "seed": 0}
    with pytest.raises(ConfigError, match=r"Set task.generator.corrupt_share=0 to plant"):
        load_task({**task, "generator": generator})
    splits = load_task({**task, "generator": {**generator, "corrupt_share": 0.0}})
    assert sum(not ok for ok in splits.clean_flags.values()) == 6
    assert set(splits.corruptions.values()) <= {None, *KINDS}
    generated = load_task({"name": "e", "source": "embedded", "generator": generator})
    assert set(generated.corruptions.values()) == {
        None,
        "wrong_final",
        "broken_step",
        "missing_final",
    }


def test_prepare_key_keeps_old_keys_with_noise_off_and_changes_with_each_setting() -> None:
    task = {"name": "t", "path": "/x", "pool_limit": 5}
    off = prepare_key({**task, "noise": {"share": 0.0, "kinds": list(KINDS), "seed": 0}}, "f")
    assert off == prepare_key(task, "f")  # keys from before task.noise existed still hold
    on = {"share": 0.3, "kinds": list(KINDS), "seed": 0}
    keys = {
        prepare_key({**task, "noise": noise}, "f")
        for noise in (on, {**on, "share": 0.2}, {**on, "seed": 1}, {**on, "kinds": ["swap"]})
    }
    assert len(keys) == 4 and off not in keys


def test_a_cell_with_noise_off_keeps_the_identity_it_had_before_task_noise_existed() -> None:
    """Frozen snapshots name their cells by cell_key: noise off must not rename them."""
    from omegaconf import OmegaConf, open_dict

    from dwbench.cell import cell_key

    cfg = _cfg()
    before = OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(before):
        del before.task.noise
    assert cell_key(cfg, "evaluate") == cell_key(before, "evaluate")
    noisy = _cfg("task.noise.share=0.3", "task.generator.corrupt_share=0")
    assert cell_key(noisy, "evaluate") != cell_key(
        _cfg("task.generator.corrupt_share=0"), "evaluate"
    )


def _cfg(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=list(overrides))


def test_every_task_config_has_noise_off_and_validation_refuses_bad_values() -> None:
    for task in ("gsm8k", "dialogsum", "bioinstruct", "embedded_gsm"):
        cfg = _cfg(f"task={task}")
        assert cfg.task.noise.share == 0.0 and list(cfg.task.noise.kinds) == list(KINDS)
    with pytest.raises(ConfigError, match=re.escape("task.noise.share=1.5 is not a share")):
        validate_config(_cfg("task=dialogsum", "task.noise.share=1.5"), overrides=[])
    with pytest.raises(ConfigError, match="task.noise.kinds holds 'typo'"):
        validate_config(_cfg("task=gsm8k", "task.noise.kinds=[typo]"), overrides=[])


def test_oracle_clean_runs_on_any_task_with_planted_noise() -> None:
    cfg = _cfg("task=dialogsum", "method=oracle_clean", "task.path=/data/dialogsum")
    with pytest.raises(ConfigError, match="plant noise with task.noise.share"):
        validate_config(cfg, overrides=[])
    noisy = _cfg("task=dialogsum", "method=oracle_clean", "task.noise.share=0.3")
    validate_config(noisy, overrides=[])
    assert has_clean_flags(noisy.task) and not has_clean_flags(cfg.task)
    OracleClean.check_options(noisy.method, noisy.task, None)


def test_prepare_records_flags_and_kinds(dialog_dir: Path, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from dwbench.artifacts import ArtifactStore
    from dwbench.stages import prepare

    task = OmegaConf.create(_task(dialog_dir, share=0.3))
    prepared = prepare.run(task, ArtifactStore(tmp_path / "artifacts"))
    labels = json.loads((prepared.dir / "labels.json").read_text())
    kinds = json.loads((prepared.dir / "corruptions.json").read_text())
    assert labels == prepared.clean_flags and sum(not ok for ok in labels.values()) == 18
    assert {i for i, k in kinds.items() if k} == {i for i, ok in labels.items() if not ok}
    assert prepare.run(task, ArtifactStore(tmp_path / "artifacts")).key == prepared.key
