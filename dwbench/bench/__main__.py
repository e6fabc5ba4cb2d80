"""`python -m dwbench.bench <command>`: the benchmarks that later work compares against, one
module each in this folder: `selection` (time and quality of one method's scores), `methods` (the
cells of an experiment end to end, one table), `calibrate` (does the task have the power to rank
methods: references only), `gpu` (the GPU checks before a first sweep), `parity` (the released
preset against a run of the authors' code), `attribution` (Data Whisperer's variants on one pool),
`rerun` (a rerun's snapshot against the committed one: same results, stage seconds) and `demo`
(`make demo`). Examples:
    python -m dwbench.bench selection --pool-sizes 64 128 256
    python -m dwbench.bench selection --pool-sizes 64 -o method.attention_weighting=false
    python -m dwbench.bench selection --task gsm8k --pool-sizes 120 --variants all \
        -o task.path=/data/gsm8k -o method.n_demos=5 -o method.n_queries=3 \
        -o selector_model.attention_layer=15
    python -m dwbench.bench methods --experiment embedded_table2 --budget 0.1 --seed 0 \
        --methods random oracle_clean perplexity_low less s2l rds_plus ifd data_whisperer
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dwbench.bench import (
    attribution,
    calibrate,
    demo,
    gpu,
    method_runs,
    parity,
    rerun,
    selection,
)
from dwbench.errors import DwbenchError


def parser() -> argparse.ArgumentParser:
    """Every benchmark command as a subcommand; each module adds its own."""
    top = argparse.ArgumentParser(
        prog="python -m dwbench.bench", description=__doc__.split("\n")[0]
    )
    commands = top.add_subparsers(dest="command", required=True)
    for command in (selection, method_runs, calibrate, gpu, parity, attribution, demo, rerun):
        command.add_parser(commands)
    return top


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.handler(args)
    except DwbenchError as error:
        print(f"dwbench.bench: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
