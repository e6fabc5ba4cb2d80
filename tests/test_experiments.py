"""Every experiment preset composes and sweeps the grid of its table or figure.

Grid sizes are counted from the sweep axes with Hydra's own BasicSweeper, without composing the
cells, so presets may already name baselines whose configs do not exist yet.
"""

from __future__ import annotations

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dwbench.config_files import CONF_DIR
from dwbench.errors import ConfigError
from dwbench.sweep.grid import load_sweep

# preset -> cells (the paper: tasks x models x methods x budgets x seeds, or ablation variants)
GRIDS = {
    "table1": 3 * 1 * 7 * 3 * 3,
    "table2": 3 * 3 * 7 * 3 * 3,
    "table2_reference": 3 * 3 * 1 * 1 * 3,
    "table2_zero_shot": 3 * 3 * 1 * 1 * 1,
    "table3": 1 * 3 * 7 * 3 * 3,
    "table3_reference": 1 * 3 * 1 * 1 * 3,
    "table4": 3 * 2 * 3 * 2 * 3 * 3,  # x 2: both Data Whisperer scorings
    "table5": 4 * 1 * 3 * 2 * 3 * 3,
    "table6": 3 * 2 * 7 * 3 * 3,
    "fig3": 3 * 2 * 1 * 3 * 3,
    "embedded_table1": 19 * 3 * 3,  # 18 methods and oracle_clean
    "embedded_table2": 19 * 3 * 3,  # 18 methods and oracle_clean
    "embedded_table2_reference": 3,
    "embedded_table2_zero_shot": 1,
    "embedded_table3": 19 * 3 * 3,  # 18 methods and oracle_clean
    "embedded_table3_reference": 3,
    "embedded_table4": 3 * 2 * 3 * 3,
    "embedded_table5": 4 * 2 * 3 * 3,
    "embedded_table6": 19 * 3 * 3,  # 18 methods and oracle_clean
    "embedded_fig3": 3 * 3,
    "embedded_multi_step": 3 * 1 * 3,
    "dialogsum_noise_table2": 8 * 1 * 3,  # 7 methods and oracle_clean, 10%, 3 seeds
    "dialogsum_noise_table2_reference": 1,
    "dialogsum_noise_table2_zero_shot": 1,
}
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
EMBEDDED = [p for p in PRESETS if p.startswith("embedded_")]
METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
ABLATIONS = sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml"))


def _base(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def _axes(experiment: str) -> list[list[str]]:
    params = _base(f"+experiment={experiment}").hydra.sweeper.params or {}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def test_every_sweep_preset_has_a_grid_size_and_an_embedded_twin() -> None:
    assert sorted(GRIDS) == [p for p in PRESETS if p != "gsm8k_10pct"]
    for preset in GRIDS:
        if not preset.startswith(("embedded_", "dialogsum_noise_")):
            assert f"embedded_{preset}" in GRIDS, preset


@pytest.mark.parametrize("experiment", sorted(GRIDS))
def test_grid_size(experiment: str) -> None:
    cells = _axes(experiment)
    assert len(cells) == GRIDS[experiment]
    assert len({tuple(c) for c in cells}) == len(cells)


@pytest.mark.parametrize("experiment", EMBEDDED)
def test_embedded_presets_run_on_cpu_with_the_embedded_model(experiment: str) -> None:
    cfg = _base(f"+experiment={experiment}")
    assert cfg.task.name == "embedded_gsm" and cfg.task.generator.pool_size <= 200
    for role in ("selector_model", "target_model"):
        assert cfg[role].name == "smollm2_135m" and not cfg[role].requires_gpu
    assert {"smollm2_135m"} == {
        o.split("=")[1] for c in _axes(experiment) for o in c if "model_pair=" in o
    }


@pytest.mark.parametrize("experiment", EMBEDDED)
def test_embedded_cells_compose_and_validate(experiment: str) -> None:
    methods = {o.split("=")[1] for c in _axes(experiment) for o in c if o.startswith("method=")}
    if not methods <= set(METHODS):
        pytest.skip(f"method(s) {sorted(methods - set(METHODS))} not registered yet")
    # one seed and one budget: every method and setting composes and validates (seeds and
    # budgets only set a value, checked here without composing, and test_grid_size counts the
    # full grid); distinct keys within it
    axes = _axes(experiment)
    seeds = {o for c in axes for o in c if o.startswith("seed=")}
    budgets = sorted({o for c in axes for o in c if o.startswith("budget=")})
    assert all(0 <= float(b.removeprefix("budget=")) <= 1 for b in budgets), budgets
    one = [f"+experiment={experiment}", "seed=0", *budgets[:1]]
    sweep = load_sweep(one, progress=False)
    assert len(sweep.cells) == GRIDS[experiment] // max(len(seeds), 1) // max(len(budgets), 1)
    assert len({c.key for c in sweep.cells}) == len(sweep.cells)


def test_models_axis_moves_both_models_and_the_papers_learning_rate() -> None:
    cfg = _base("+experiment=table2", "model_pair=qwen2_5_7b")
    assert cfg.selector_model.name == cfg.target_model.name == "qwen2_5_7b_instruct"
    assert cfg.finetune.lr == 1e-5 and cfg.finetune.epochs == 5
    assert _base("+experiment=table2").finetune.lr == 1e-4
    weak = _base("+experiment=fig3", "model_pair=mistral_7b_to_nemo")
    assert weak.selector_model.name == "mistral_7b_instruct_v0_2"
    assert weak.target_model.name == "mistral_nemo_instruct"


def test_dialogsum_noise_slice_needs_a_local_path_and_runs_on_cpu(tmp_path) -> None:
    with pytest.raises(ConfigError, match="task.source=local needs task.path"):
        load_sweep(["+experiment=dialogsum_noise_table2", "seed=0"], progress=False)
    sweep = load_sweep(
        ["+experiment=dialogsum_noise_table2", f"task.path={tmp_path}", "seed=0"], progress=False
    )
    assert len(sweep.cells) == GRIDS["dialogsum_noise_table2"] // 3
    assert len({c.key for c in sweep.cells}) == len(sweep.cells)
    cfg = sweep.cells[0].cfg
    assert cfg.task.name == "dialogsum" and cfg.task.noise.share == 0.3
    assert cfg.target_model.name == "smollm2_135m" and not cfg.target_model.requires_gpu
    assert cfg.finetune.max_seq_len >= 1515  # the pool's longest dialogue with its summary


def test_synthetic_dialogsum_needs_a_local_path() -> None:
    cfg = _base("+experiment=table3")
    assert cfg.task.name == "dialogsum_synthetic"
    assert cfg.task.source == "local" and cfg.task.path is None


def _leaves(node) -> set[str]:
    """Dotted names of a config node's leaves."""
    return set(pd.json_normalize(OmegaConf.to_container(node, resolve=False)).columns)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablations_only_change_keys_that_exist(ablation: str) -> None:
    """A misspelt key would add a new, ignored setting instead of changing the method."""
    plain = _base("+experiment=embedded_table4", "method=data_whisperer")
    varied = _base("+experiment=embedded_table4", "method=data_whisperer", f"+ablation={ablation}")
    for node in ("method", "selector_model"):
        assert _leaves(varied[node]) == _leaves(plain[node])


def test_ablation_values() -> None:
    cfg = _base("+experiment=table4", "method=data_whisperer", "+ablation=nd15_nq10")
    assert (cfg.method.n_demos, cfg.method.n_queries) == (15, 10)
    cfg = _base("+experiment=table5", "method=data_whisperer", "+ablation=no_attention")
    assert cfg.method.attention_weighting is False
    cfg = _base("+experiment=embedded_table5", "+ablation=layer28")
    assert cfg.selector_model.attention_layer == 28 < cfg.selector_model.num_layers


def test_a_sweep_naming_an_unregistered_method_fails_with_the_registry_message() -> None:
    with pytest.raises(ConfigError, match="Unknown method 'nosuch'.*Available: .*random"):
        load_sweep(["+experiment=embedded_table2", "method=random,nosuch"], progress=False)


@pytest.mark.parametrize(
    ("preset", "gpus", "constraint"),
    [("slurm_cpu", None, None), ("slurm_gpu40", 1, "a100"), ("slurm_gpu80", 1, "a100_80gb")],
)
def test_submitit_presets_take_the_clusters_settings(preset, gpus, constraint) -> None:
    cfg = _base(
        "+experiment=embedded_table2",
        f"hydra/launcher={preset}",
        "slurm.partition=gpu",
        "slurm.parallel=3",
        "slurm.gpu_constraint.gb40=a100",
        "slurm.gpu_constraint.gb80=a100_80gb",
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["partition"], launcher["array_parallelism"]) == ("gpu", 3)
    assert (launcher["gpus_per_node"], launcher["constraint"]) == (gpus, constraint)
