"""Entry point: `python -m dwbench`."""

from dwbench.cli import main

main()
