"""Where the Hydra configs are: one answer for a checkout, an editable install and a wheel.

In a checkout (and an editable install, which imports the checkout) the configs are the top-level
`conf/` beside the package, where Hydra projects keep them; a wheel ships the same folder inside
the package as `dwbench/conf/` (pyproject.toml maps it). Users' own configs still come in with
`--config-dir` or `hydra.searchpath`, on top of these.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The folder holding config.yaml and every config group."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):  # wheel, then checkout
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"dwbench's configs are missing: neither {PACKAGE_DIR / 'conf'} (an installed wheel) nor "
        f"{PACKAGE_DIR.parent / 'conf'} (a checkout) holds config.yaml; reinstall dwbench"
    )


CONF_DIR = config_dir()
