"""`python -m dwbench.demo` (`make demo`): Random, Data Whisperer and the clean-data oracle on the
embedded default, then whether each differs from Random.

It runs the three cells through the pipeline (one `python -m dwbench -m` process, which prints
its own results table), then prints one more table: exact match, the difference to Random with
its paired bootstrap 95% interval (same seed, same evaluation problems), selection precision,
and, for the methods that score, the AUROC of the scores against the embedded task's clean flags
and their count of distinct values. Any override goes to the cells:
    python -m dwbench.demo seed=1 budget=0.2
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import pandas as pd

from dwbench.measure import interval_text, measured, run_cells, versus_random

# Data Whisperer as the embedded default runs it, with its variant's overrides: chosen by
# measurement on that default (README, "Calibration"), never by its fine-tuned score.
DATA_WHISPERER = ("data_whisperer_likelihood", ("method.query_layout=separate",))
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


def sweeps(overrides: Sequence[str]) -> list[list[str]]:
    """The demo's cells: the references, and Data Whisperer with its variant's overrides."""
    return [
        [f"method={','.join(REFERENCES)}", *overrides],
        [f"method={DATA_WHISPERER[0]}", *DATA_WHISPERER[1], *overrides],
    ]


def demo_rows(overrides: Sequence[str]) -> list[dict]:
    """One row per method of the finished demo cells."""
    found = [measured(cells) for cells in sweeps(overrides)]
    frame = pd.concat([f.cells for f in found], ignore_index=True)
    examples = pd.concat([f.examples for f in found], ignore_index=True)
    rows = []
    for _, cell in frame.iterrows():
        method = cell["method"]
        interval = None
        if method != "random":
            interval = versus_random(examples, method, cell["budget"])
        label = method
        if method == DATA_WHISPERER[0]:
            label += "".join(f", {o.split('.')[-1]}" for o in DATA_WHISPERER[1])
        rows.append(
            {
                "method": label,
                "EM %": cell["score"],
                "vs Random [95% CI]": "-" if method == "random" else interval_text(interval),
                "selection precision": cell.get("selection_precision"),
                "AUROC (clean)": cell.get("auroc"),
                "distinct scores": cell.get("distinct_scores"),
                "selection s": cell.get("selection_s"),
                "eval s / problem": cell["eval_s"] / cell["n_eval"],
            }
        )
    for missing in (m for f in found for m in f.missing):
        rows.append({"method": f"(not finished) {missing}"})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    from dwbench.bench import markdown_table

    overrides = list(sys.argv[1:] if argv is None else argv)
    status = max(run_cells(cells) for cells in sweeps(overrides))
    rows = demo_rows(overrides)
    print("\nDemo: each method against Random (exact match %, paired bootstrap over problems)")
    print(markdown_table(rows, COLUMNS))
    sys.exit(status)


if __name__ == "__main__":
    main()
