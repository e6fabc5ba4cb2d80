"""Which cells a report needs, and what each one is.

The grid is exactly the sweep `python -m dwbench -m +experiment=<name> [overrides]` runs
(`dwbench.sweep.grid.load_sweep`), so the report checks the cells that plan and status list, by
the same cell keys. Some paper tables also show cells another preset runs: the ablation tables'
Random column and Figure 3's GraNd and same-model bars are Table 2's cells, Table 2's
whole-dataset and zero-shot rows (Table 4's 0% row too) are table2_reference's and
table2_zero_shot's, Table 6's weak-to-strong rows are Figure 3's. Those are companions: shown,
and used as the bootstrap's Random, when they exist; never required.

A cell's description (task, models, method, its ablation setting, budget, seed) comes from its
composed config, so it is known without any run and is the same whether the report reads MLflow
or a snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from dwbench.config_files import CONF_DIR
from dwbench.context import method_name
from dwbench.errors import ConfigError
from dwbench.sweep.grid import Cell, Sweep, load_sweep

KINDS = ("table1", "table2", "table3", "table4", "table5", "table6", "fig3")
REFERENCE_SUFFIXES = ("_reference", "_zero_shot")  # presets of a table's reference rows
GRID, COMPANION = "grid", "companion"
DESCRIPTORS = [
    "cell",
    "role",
    "task",
    "metric",
    "target",
    "selector",
    "method",
    "ablation",
    "n_demos",
    "n_queries",
    "attention_layer",
    "attention_weighting",
    "budget",
    "seed",
    "pool_clean_share",
]


@dataclass(frozen=True)
class Companion:
    """Cells of another preset that a table shows beside the experiment's own."""

    preset: str  # preset name without the setting's prefix (embedded_, dialogsum_noise_)
    keep: tuple[str, ...]  # sweep axes taken over from the experiment (and the command line)
    fixed: dict[str, str] = field(default_factory=dict)  # axes the companion sets itself
    models: str | None = None  # "same" | "weaker": model_pair presets for the grid's targets


_RANDOM = Companion("table2", ("task", "model_pair", "budget", "seed"), {"method": "random"})
_ZERO_SHOT = Companion("table2_zero_shot", ("task", "model_pair"))  # greedy decoding: one seed
COMPANIONS: dict[str, list[Companion]] = {
    "table2": [
        Companion("table2_reference", ("task", "model_pair", "seed")),
        _ZERO_SHOT,
    ],
    "table3": [Companion("table3_reference", ("task", "model_pair", "seed"))],
    "table4": [_RANDOM, _ZERO_SHOT],
    "table5": [_RANDOM],
    "fig3": [
        Companion(
            "table2",
            ("task", "budget", "seed"),
            {"method": "random,grand,data_whisperer"},
            models="same",
        )
    ],
    "table6": [Companion("fig3", ("task", "budget", "seed"), models="weaker")],
}


@dataclass
class Missing:
    """A cell the report has no measurement for, and why (in dwbench.sweep.status's words)."""

    role: str
    cell: Cell
    state: str
    detail: str


@dataclass
class ReportGrid:
    """The experiment's grid and its companion cells."""

    name: str  # snapshot and output name (default: the experiment)
    experiment: str  # conf/experiment preset
    kind: str  # the paper table or figure it renders: table1 ... table6, fig3
    grid: Sweep
    companions: list[Sweep]

    @property
    def embedded(self) -> bool:
        """A twin on a setting the paper did not run (embedded_*, dialogsum_noise_*): its cells
        stand beside the paper's for orientation only."""
        return bool(preset_parts(self.experiment)[0])

    def cells(self) -> list[tuple[str, Cell]]:
        """(role, cell) for every cell, grid first; a companion equal to a grid cell is dropped."""
        seen = {cell.key for cell in self.grid.cells}
        out = [(GRID, cell) for cell in self.grid.cells]
        for sweep in self.companions:
            for cell in sweep.cells:
                if cell.key not in seen:
                    seen.add(cell.key)
                    out.append((COMPANION, cell))
        return out

    def frame(self) -> pd.DataFrame:
        """One row per cell: what it is (DESCRIPTORS), known without any run."""
        return pd.DataFrame(
            [describe(cell, role) for role, cell in self.cells()], columns=DESCRIPTORS
        )


def preset_parts(experiment: str) -> tuple[str, str | None]:
    """(prefix, kind) of a preset name: `table2` -> ("", "table2"); a twin on another setting
    such as `embedded_table2_reference` or `dialogsum_noise_table2` -> ("embedded_", "table2"),
    ("dialogsum_noise_", "table2"); kind None for a preset that is no paper table or figure."""
    name = experiment
    for suffix in REFERENCE_SUFFIXES:
        name = name.removesuffix(suffix)
    for kind in KINDS:
        if name == kind or name.endswith(f"_{kind}"):
            return name.removesuffix(kind), kind
    return "", None


def experiment_kind(experiment: str) -> str:
    """table1 ... table6 or fig3 from a preset name; a clear error for anything else."""
    presets = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    if experiment not in presets:
        raise ConfigError(
            f"Unknown experiment '{experiment}': there is no experiment/{experiment}.yaml. "
            f"Available: {', '.join(presets)}."
        )
    kind = preset_parts(experiment)[1]
    if kind is None:
        reportable = [
            p for p in presets if preset_parts(p)[1] and not p.endswith(REFERENCE_SUFFIXES)
        ]
        raise ConfigError(
            f"Experiment '{experiment}' is no paper table or figure, so the report has no layout "
            f"for it. Report one of: {', '.join(reportable)}."
        )
    return kind


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def load_report_grid(
    experiment: str, overrides: list[str], name: str | None = None, progress: bool = True
) -> ReportGrid:
    """The experiment's cells as a multirun would run them, plus its companions."""
    kind = experiment_kind(experiment)
    if any(_key(o) == "experiment" for o in overrides):
        raise ConfigError(
            "Give the experiment as the first argument only (python -m dwbench.report "
            f"{experiment} ...), not as +experiment=... among the overrides."
        )
    name = name or experiment
    grid = load_sweep([f"+experiment={experiment}", *overrides], name, progress=progress)
    companions = []
    if not experiment.endswith(REFERENCE_SUFFIXES):
        prefix = preset_parts(experiment)[0]
        for companion in COMPANIONS.get(kind, []):
            sweep = _companion_sweep(companion, prefix, grid, overrides)
            if sweep is not None:
                companions.append(sweep)
    return ReportGrid(name, experiment, kind, grid, companions)


def _companion_sweep(
    companion: Companion, prefix: str, grid: Sweep, overrides: list[str]
) -> Sweep | None:
    """The companion preset's cells on the axes it shares with the experiment (`keep`), as the
    experiment and its command line set them; other axes are the companion's own."""
    params = dict(grid.base.hydra.sweeper.params or {})
    axes = [f"{k}={params[k]}" for k in companion.keep if k in params]
    fixed = [f"{k}={v}" for k, v in companion.fixed.items()]
    axes_not_kept = {k.lstrip("+~") for k in params} - set(companion.keep)
    dropped = {"method", "ablation", *companion.fixed, *axes_not_kept}
    if companion.models is not None:
        targets = {str(cell.cfg.target_model.name) for cell in grid.cells}
        presets = models_presets(targets, companion.models)
        if not presets:
            return None
        fixed.append(f"model_pair={','.join(presets)}")
        dropped.add("model_pair")
    passed = [o for o in overrides if _key(o) not in dropped]
    preset = f"{prefix}{companion.preset}"
    return load_sweep([f"+experiment={preset}", *axes, *fixed, *passed], preset, progress=False)


def models_presets(targets: set[str], relation: str) -> list[str]:
    """`model_pair` presets whose target is one of `targets`: selector the same, or another."""
    found = []
    for path in sorted((CONF_DIR / "model_pair").glob("*.yaml")):
        roles: dict[str, str] = {}
        for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []):
            if isinstance(entry, dict):
                for key, value in entry.items():
                    roles[str(key).rsplit("@", 1)[-1]] = str(value)
        selector, target = roles.get("selector_model"), roles.get("target_model")
        if target in targets and (selector == target) == (relation == "same"):
            found.append(path.stem)
    return found


def describe(cell: Cell, role: str) -> dict[str, Any]:
    """What a cell is, from its config: the columns tables, figures and pairing group by."""
    cfg = cell.cfg
    method = cfg.method
    dw = str(method.name).startswith("data_whisperer")  # either scoring
    generator = cfg.task.get("generator")
    ablation = [o.split("=", 1)[1] for o in cell.overrides if _key(o) == "ablation"]
    return {
        "cell": cell.key,
        "role": role,
        "task": str(cfg.task.name),
        "metric": str(cfg.task.metric),
        "target": str(cfg.target_model.name),
        "selector": str(cfg.selector_model.name),
        "method": method_name(cfg),
        "ablation": ablation[-1] if ablation else "",
        "n_demos": int(method.n_demos) if dw else None,
        "n_queries": int(method.n_queries) if dw else None,
        "attention_layer": cfg.selector_model.get("attention_layer") if dw else None,
        "attention_weighting": bool(method.attention_weighting) if dw else None,
        "budget": float(cfg.budget),
        "seed": int(cfg.seed),
        "pool_clean_share": None if generator is None else 1 - float(generator.corrupt_share),
    }
