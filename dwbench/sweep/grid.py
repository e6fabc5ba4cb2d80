"""A sweep's cells, expanded exactly as `python -m dwbench -m [overrides]` expands them.

The sweep axes come from the experiment's `hydra.sweeper.params` plus sweep overrides on the
command line (`budget=0.1,0.2`), combined by Hydra's own BasicSweeper, so the cells a plan lists
are the jobs a Hydra multirun would launch, with the same override lists: `python -m dwbench
<a cell's overrides>` runs that cell alone.

A cell's key hashes what decides its result (task, method, both models, recipe, evaluation,
budget, seed, last stage) but not the data fingerprint, so it is known without loading any data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig
from tqdm import tqdm

from dwbench.cell import cell_key as cell_identity
from dwbench.config_files import CONF_DIR
from dwbench.errors import ConfigError, DwbenchError
from dwbench.methods.registry import check_method_name
from dwbench.pipeline import validate
from dwbench.validate import check_changed_keys, is_folder_name


@dataclass
class Cell:
    """One sweep point: `python -m dwbench <overrides>` runs it."""

    overrides: list[str]
    cfg: DictConfig
    key: str


@dataclass
class Sweep:
    name: str
    base: DictConfig  # the sweep-level config, with its `hydra` node (launcher, sweeper)
    cells: list[Cell]

    @property
    def dir(self) -> Path:
        """Plans, rendered array scripts, job records and logs of this sweep."""
        return Path(str(self.base.results_dir)) / "sweeps" / self.name


def cell_key(cfg: DictConfig, overrides: list[str] | None = None) -> str:
    """Identity of a cell's result (dwbench.cell.cell_key at the cell's last stage), once the
    cell passes the checks a run makes before any work (`overrides`: the cell's)."""
    return cell_identity(cfg, validate(cfg, overrides)[-1])


def checked_cell(overrides: list[str], place: str) -> Cell:
    """The cell these overrides compose, refused as its run would refuse it, with `place` (which
    cell of how many, or which plan line) named: one line, not a job that fails at its start."""
    try:
        cfg = compose("config", overrides=overrides)
        return Cell(overrides, cfg, cell_key(cfg, overrides))
    except (DwbenchError, HydraException) as error:
        raise ConfigError(f"{place} ({' '.join(overrides)}): {error}") from None


def _methods_named(overrides: list[Override]) -> list[str]:
    """The values the sweep gives the `method` group (a later override replaces an earlier one)."""
    names: list[str] = []
    for override in overrides:
        if override.get_key_element().lstrip("+") != "method":
            continue
        if override.is_sweep_override():
            names = list(override.sweep_string_iterator())
        else:
            names = [override.get_value_element_as_str()]
    return names


def check_sweep_name(name: str, origin: str) -> str:
    """`name`, if it is one safe folder name: it names the sweep's folder under results_dir and
    its SLURM jobs, where a `/` or `..` would write elsewhere and a line break would end the
    script's `#SBATCH` block and run the rest as shell."""
    if is_folder_name(name):
        return name
    raise ConfigError(
        f"{origin} {name!r} is not a sweep name: use one folder name of letters, digits, "
        "'.', '_' and '-' (not starting with '.')"
    )


def load_sweep(overrides: list[str], name: str | None = None, progress: bool = True) -> Sweep:
    """Compose every cell of the sweep that `python -m dwbench -m <overrides>` would run.

    A method that no config defines stops here with a did-you-mean, before Hydra would fail on
    its missing YAML: presets may already name baselines that do not exist yet. A `name` that
    is not one safe folder name stops here too, before any cell is composed.
    """
    if name is not None:
        check_sweep_name(name, "--name")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="dwbench"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        given = parser.parse_overrides(overrides)
        fixed = [o.input_line for o in given if not o.is_sweep_override()]
        check_changed_keys(overrides)  # a misspelled key: Hydra's refusal would suggest `+key`
        base = compose("config", overrides=fixed, return_hydra_config=True)
        params = [f"{k}={v}" for k, v in (base.hydra.sweeper.params or {}).items()]
        task_overrides = [o.input_line for o in given if not o.is_hydra_override()]
        combined = parser.parse_overrides(params + task_overrides)
        loader = GlobalHydra.instance().config_loader()  # dwbench's conf, searchpath, ConfigStore
        available = loader.get_group_options("method", config_name="config", overrides=fixed)
        for method in dict.fromkeys(_methods_named(combined)):
            check_method_name(method, available)
        jobs = BasicSweeper.split_arguments(combined, max_batch_size=None)[0]
        # a user's config folder (hydra.searchpath) must reach every cell and its SLURM line
        searchpath = [o.input_line for o in given if o.key_or_group == "hydra.searchpath"]
        cells = [
            checked_cell([*job, *searchpath], f"cell {index} of {len(jobs)}")
            for index, job in enumerate(
                tqdm(jobs, desc="composing cells", unit="cell", disable=not progress), start=1
            )
        ]
    sweep_name = name or str(base.hydra.runtime.choices.get("experiment") or "sweep")
    return Sweep(check_sweep_name(sweep_name, "+experiment (the default --name)"), base, cells)


def check_jobs(jobs: list[list[str]], origin: str) -> None:
    """Each job of a plan composed and checked as `plan` checked its cell (`origin`: the plan
    file): a plan written by an older dwbench, or edited, is refused before SLURM queues it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="dwbench"):
        for line, job in enumerate(jobs, start=1):
            checked_cell(job, f"{origin} line {line}")


def varying_overrides(cells: list[Cell]) -> list[list[str]]:
    """Each cell's overrides that differ between cells: the axes, for compact tables."""
    common = set.intersection(*(set(c.overrides) for c in cells)) if cells else set()
    return [[o for o in c.overrides if o not in common] for c in cells]
