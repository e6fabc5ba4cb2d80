"""Every package the code imports is declared in pyproject.toml (or is the standard library)."""

from __future__ import annotations

import ast
import sys
import tomllib

from test_cli import REPO

# import name -> distribution name, where they differ
DISTRIBUTIONS = {
    "sklearn": "scikit-learn",
    "rouge_score": "rouge-score",
    "lm_eval": "lm-eval",
    "hydra": "hydra-core",
    "huggingface_hub": "huggingface-hub",
    "yaml": "pyyaml",
}


def _imported_packages() -> set[str]:
    names = set()
    for path in (REPO / "dwbench").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"dwbench", "__future__"}


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    names = set()
    for requirement in requirements:
        name = requirement.split(";")[0]
        for stop in "<>=!~[ ":
            name = name.split(stop)[0]
        names.add(name.strip().lower().replace("_", "-"))
    return names


def test_every_imported_package_is_declared() -> None:
    declared = _declared()
    missing = sorted(
        name
        for name in _imported_packages()
        if DISTRIBUTIONS.get(name, name).lower().replace("_", "-") not in declared
    )
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
