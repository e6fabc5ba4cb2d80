"""Selection methods: a class anywhere importable, named by its config's `_target_`.

A method is one class (`SelectionMethod`: `score` and `select`) plus one YAML whose `_target_`
names it and whose `name` is what tags and tables call it. The YAML lives in dwbench's own
`conf/method/` or in your config folder (`python -m dwbench --config-dir my_conf`, or
`hydra.searchpath`), so comparing your own method needs no fork (docs/compare-your-method.md).
An installed package can also register methods through the entry-point group `dwbench.methods`
(`my_method = "my_package.module:MyMethod"`): `method=my_method` then composes a config made of
the class's `default_config` (a dict, optional), its `name` and its `_target_`.

Classes are imported only when a run needs them, so `--help`, config checks and light tests stay
free of torch.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Mapping
from typing import Any

from dwbench.errors import ConfigError
from dwbench.methods.base import SelectionMethod

ENTRY_POINT_GROUP = "dwbench.methods"


def method_class(method_cfg: Mapping[str, Any]) -> type[SelectionMethod]:
    """The class a method config's `_target_` names, imported now."""
    target = _target(method_cfg)
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"method.name={method_cfg.get('name')}: method._target_={target} cannot be imported "
            f"({error}); install the package that defines it, or correct the dotted path."
        ) from error
    found = getattr(module, attr, None)
    if not isinstance(found, type):
        raise ConfigError(
            f"method._target_={target}: {module_name} has no class {attr!r}; "
            "point _target_ at the method's class (package.module.ClassName)."
        )
    return found


def check_method(method_cfg: Mapping[str, Any]) -> None:
    """Fail early on a `_target_` whose module cannot be found, without importing it."""
    target = _target(method_cfg)
    module_name = target.rpartition(".")[0]
    try:
        spec = importlib.util.find_spec(module_name)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        raise ConfigError(
            f"method.name={method_cfg.get('name')}: method._target_={target} names module "
            f"{module_name!r}, which is not installed; install it or correct the dotted path."
        )


def _target(method_cfg: Mapping[str, Any]) -> str:
    target = method_cfg.get("_target_")
    if not target or "." not in str(target):
        raise ConfigError(
            f"method {method_cfg.get('name')!r} has no _target_ (the dotted path of its class, "
            "e.g. _target_: my_package.selection.MyMethod); add it to the method's YAML."
        )
    return str(target)


def check_method_name(name: str, available: list[str]) -> None:
    """Fail early, with a suggestion, on a method that no config defines."""
    if name in available:
        return
    close = difflib.get_close_matches(name, available, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"Unknown method '{name}' (config group method).{hint} Available: "
        f"{', '.join(sorted(available))}. Pick one with method=<name>, or add "
        f"method/{name}.yaml with its _target_ to your config folder (--config-dir)."
    )


def installed_methods() -> dict[str, str]:
    """name -> `_target_` of the methods installed packages register (entry points)."""
    found = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        module, _, attr = entry.value.partition(":")
        found[entry.name] = f"{module}.{attr}" if attr else module
    return found


def register_installed_methods() -> None:
    """Put each entry-point method into Hydra's ConfigStore as `method/<name>`, so that
    `method=<name>` composes without a YAML (a YAML of the same name wins)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, target in installed_methods().items():
        defaults: dict[str, Any] = {}
        try:
            defaults = dict(getattr(method_class({"_target_": target}), "default_config", {}))
        except ConfigError:
            pass  # a broken package: its runs fail with the import error, not every run
        store.store(group="method", name=name, node={**defaults, "name": name, "_target_": target})
