"""`python -m dwbench.bench demo` (`make demo`): Random, Data Whisperer and the clean-data oracle
on the embedded default, then whether each differs from Random.

It runs the three cells through the pipeline (one `python -m dwbench -m` process, which prints
its own results table), then prints one more table: exact match, the difference to Random with
its paired bootstrap 95% interval (same seed, same evaluation problems), selection precision,
and, for the methods that score, the AUROC of the scores against the embedded task's clean flags
and their count of distinct values. Any override goes to the cells:
    python -m dwbench.bench demo seed=1 budget=0.2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dwbench.bench.common import markdown_table
from dwbench.bench.measure import interval_text, measured, run_cells, versus_random

# Data Whisperer as the embedded default runs it. Chosen on that default by
# `python -m dwbench.bench selection --pool-sizes 200 --variants all` and a rule that reads no
# label and no fine-tuned score (written before measuring): keep the variants whose queries are
# answered right in 5-95% of cases (demonstrations can move an answer either way), with at most
# 10% parse failures and more distinct scores than the budget's k (the top k is no tie-break); of
# those, the one closest to the paper: joint-generate, separate-generate, joint-likelihood,
# separate-likelihood. AUROC against the clean flags is reported, never used. Measured (seed 0):
# joint-generate 1% right with 45% parse failures (out); separate-generate 26% right, 5% parse
# failures, 151 distinct scores (kept, so chosen).
DATA_WHISPERER = "data_whisperer_separate"
REFERENCES = ("random", "oracle_clean")
COLUMNS = (
    "method",
    "EM %",
    "vs Random [95% CI]",
    "selection precision",
    "AUROC (clean)",
    "distinct scores",
    "selection s",
    "eval s / problem",
)


def demo_cells(overrides: Sequence[str]) -> list[str]:
    """The demo's cells as one multirun: the references and Data Whisperer."""
    return [f"method={','.join((*REFERENCES, DATA_WHISPERER))}", *overrides]


def demo_rows(overrides: Sequence[str]) -> list[dict]:
    """One row per method of the finished demo cells."""
    found = measured(demo_cells(overrides))
    frame, examples = found.cells, found.examples
    rows = []
    for _, cell in frame.iterrows():
        method = cell["method"]
        interval = None
        if method != "random":
            interval = versus_random(examples, method, cell["budget"])
        rows.append(
            {
                "method": method,
                "EM %": cell["score"],
                "vs Random [95% CI]": "-" if method == "random" else interval_text(interval),
                "selection precision": cell.get("selection_precision"),
                "AUROC (clean)": cell.get("auroc"),
                "distinct scores": cell.get("distinct_scores"),
                "selection s": cell.get("selection_s"),
                "eval s / problem": cell["eval_s"] / cell["n_eval"],
            }
        )
    for missing in found.missing:
        rows.append({"method": f"(not finished) {missing}"})
    return rows


def demo(args: argparse.Namespace) -> None:
    status = run_cells(demo_cells(args.overrides))
    rows = demo_rows(args.overrides)
    print("\nDemo: each method against Random (exact match %, paired bootstrap over problems)")
    print(markdown_table(rows, COLUMNS))
    sys.exit(status)


def add_parser(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "demo",
        help="make demo: Random, Data Whisperer and the oracle on the embedded default",
        description=__doc__.split("\n\n")[0],
    )
    command.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides for the three cells"
    )
    command.set_defaults(handler=demo)
