"""Entry point: `python -m dwbench`."""

from dwbench.cli import run

run()
