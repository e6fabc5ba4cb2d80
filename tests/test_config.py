"""Every config composes; unknown keys are errors; the headline experiment is the paper's."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from dwbench.config_files import CONF_DIR

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    cfg = _compose(f"+experiment={experiment}")
    assert cfg.task.name and cfg.method.name and cfg.target_model.id


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_composes_in_both_roles(model: str) -> None:
    cfg = _compose(f"model@selector_model={model}", f"model@target_model={model}")
    assert cfg.selector_model.name == cfg.target_model.name == model
    assert cfg.target_model.trust_remote_code is False


@pytest.mark.parametrize("task", TASKS)
def test_every_task_composes(task: str) -> None:
    assert _compose(f"task={task}").task.metric in {"exact_match_number", "rouge_l"}


def test_headline_experiment_is_the_papers_setting() -> None:
    cfg = _compose("+experiment=gsm8k_10pct")
    assert cfg.target_model.id == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert cfg.selector_model.attention_layer == 13
    assert cfg.task.name == "gsm8k" and cfg.method.name == "data_whisperer"
    assert cfg.budget == 0.10
    ft = cfg.finetune
    assert (ft.batch_size, ft.lr, ft.epochs, ft.scheduler) == (8, 1e-4, 5, "cosine")
    assert (ft.lora.r, ft.lora.alpha, ft.lora.target_modules) == (8, 16, "all-linear")


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(ConfigCompositionException):
        _compose("finetune.learning_rate=0.1")
    with pytest.raises(ConfigCompositionException):
        _compose("bugdet=0.1")


def test_a_task_with_long_examples_sizes_the_cpu_recipe_without_moving_keys() -> None:
    """`task.fit` feeds finetune=lora_embedded, so `task=dialogsum` trains on whole dialogues
    (384 tokens would cut every summary off); an explicit finetune setting still wins, the
    prepare key never sees it, and the train key sees it only through the finetune config."""
    from dwbench.content_hash import stage_key, task_identity

    dialogsum = _compose("task=dialogsum")
    assert (dialogsum.finetune.max_seq_len, dialogsum.finetune.runtime.micro_batch_size) == (
        1536,
        1,
    )
    embedded = _compose()
    assert (embedded.finetune.max_seq_len, embedded.finetune.runtime.micro_batch_size) == (384, 8)
    assert _compose("task=dialogsum", "finetune.max_seq_len=2048").finetune.max_seq_len == 2048
    assert _compose("task=dialogsum", "finetune=lora_paper").finetune.max_seq_len == 2048
    refit = _compose("task=dialogsum", "task.fit.max_seq_len=1024")
    assert task_identity(refit.task) == task_identity(dialogsum.task)
    assert stage_key("train", finetune=refit.finetune) != stage_key(
        "train", finetune=dialogsum.finetune
    )


def test_task_fit_passes_the_tasks_own_checks() -> None:
    """The task loader knows `task.fit` (it rejects unknown task keys), and still rejects
    a misspelt one inside it."""
    from dwbench.data.loading import check_task
    from dwbench.errors import ConfigError

    check_task(_compose("task=dialogsum", "task.path=/data/x").task)
    with pytest.raises(ConfigError, match="task.fit.max_len"):
        check_task({"name": "t", "source": "local", "path": "/x", "fit": {"max_len": 1}})
