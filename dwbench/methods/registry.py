"""Selection method registry: name -> "module:attr", imported only when used.

Lazy entries keep `--help`, config checks and light tests free of torch. Adding a method is one
file in this package, one line here and one YAML in dwbench/conf/method/.
"""

from __future__ import annotations

import difflib
import importlib

from dwbench.errors import ConfigError
from dwbench.methods.base import SelectionMethod

METHODS: dict[str, str] = {
    "random": "dwbench.methods.random_method:RandomSelection",
    "oracle_clean": "dwbench.methods.oracle_clean:OracleClean",
    "data_whisperer": "dwbench.methods.data_whisperer:DataWhisperer",
    "data_whisperer_likelihood": "dwbench.methods.data_whisperer:DataWhisperer",
    "data_whisperer_separate": "dwbench.methods.data_whisperer:DataWhisperer",
    "perplexity_low": "dwbench.methods.perplexity:Perplexity",
    "perplexity_middle": "dwbench.methods.perplexity:Perplexity",
    "perplexity_high": "dwbench.methods.perplexity:Perplexity",
    "el2n": "dwbench.methods.el2n:EL2N",
    "grand": "dwbench.methods.grand:GraNd",
    "ccs": "dwbench.methods.ccs:CCS",
    "nuggets": "dwbench.methods.nuggets:Nuggets",
    "staff": "dwbench.methods.staff:STAFF",
    "less": "dwbench.methods.less:LESS",
    "s2l": "dwbench.methods.s2l:S2L",
}


def method_names() -> list[str]:
    return sorted(METHODS)


def check_method_name(name: str) -> None:
    """Fail early, with a suggestion, on a name that no method is registered under."""
    if name in METHODS:
        return
    close = difflib.get_close_matches(name, METHODS, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"Unknown method '{name}' (config field method.name).{hint} "
        f"Available: {', '.join(method_names())}. Pick one with method=<name>."
    )


def get_method(name: str) -> type[SelectionMethod]:
    check_method_name(name)
    module_name, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), attr)
