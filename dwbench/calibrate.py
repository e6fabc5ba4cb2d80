"""Can the embedded task rank selection methods? `python -m dwbench.bench calibrate`.

For each setting (difficulty x corrupted share, at one pool size, evaluation size and budget)
it measures, on the embedded model, only references, never a method under test:

- zero-shot exact match of the untuned target;
- the selector's in-context accuracy on clean evaluation questions after clean demonstrations
  and after corrupted ones (Data Whisperer's separate layout, generated answers): whether the
  model can read the difference in context at all;
- exact match after fine-tuning on the whole pool, on a random k and on an oracle_clean k (a
  random k of the clean examples) at the budget, over the seeds, and the paired bootstrap
  interval of oracle_clean minus Random (same seed, same problem).

The rule that picks the default (written before any number was measured):
    A setting has power when (1) oracle_clean minus Random at the default budget has a 95% paired
    bootstrap interval entirely above zero over 3 seeds, and (2) zero-shot sits well below the
    whole pool: whole pool minus zero-shot >= 10 points. Among the settings with power, the
    default is the hardest difficulty (closest to GSM8K), then the smallest corrupted share
    (closest to the 30% used so far). The pool and evaluation sizes are fixed by cost first
    (`make demo` in 15 minutes on 2 cores, at least 200 evaluation problems). If no setting has
    power, raise the corrupted share or the pool and measure again. Data Whisperer's or any other
    method's numbers never enter: that would tune the benchmark to a method.

Cells run through the pipeline (`python -m dwbench -m ...`), so they are cached, logged to MLflow
and reused by `make demo` and the embedded sweeps. The table is printed and written to
`results/embedded_calibration.csv`.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dwbench.measure import interval_text, measured, run_cells, versus_random

logger = logging.getLogger(__name__)
HARDEST_FIRST = ("multi_step", "two_step", "one_step")
# Answer cap per difficulty: about twice the longest clean answer in SmolLM2 tokens, so an
# untuned model's rambling costs little evaluation time and no right answer is cut.
ANSWER_TOKENS = {"one_step": 64, "two_step": 96, "multi_step": 128}
MIN_WHOLE_POOL_GAIN = 10.0  # points of whole pool over zero-shot for "well below"
COLUMNS = (
    "difficulty",
    "corrupt share",
    "pool",
    "eval",
    "budget",
    "zero-shot EM",
    "ICL clean demos",
    "ICL corrupted demos",
    "whole pool EM",
    "random EM",
    "oracle_clean EM",
    "oracle - random",
    "ci low",
    "ci high",
    "eval s / problem",
    "power",
)


@dataclass(frozen=True)
class Setting:
    difficulty: str
    corrupt_share: float
    pool_size: int
    eval_size: int
    budget: float

    def task_overrides(self) -> list[str]:
        return [
            "task=embedded_gsm",
            f"task.generator.difficulty={self.difficulty}",
            f"task.generator.corrupt_share={self.corrupt_share}",
            f"task.generator.pool_size={self.pool_size}",
            f"task.generator.eval_size={self.eval_size}",
            f"task.answer_max_tokens={ANSWER_TOKENS[self.difficulty]}",
        ]


def reference_cells(setting: Setting, seeds: Sequence[int], whole_seeds: Sequence[int]) -> list:
    """The three sweeps of references: zero-shot, whole pool, random vs oracle_clean at k."""
    task = setting.task_overrides()
    seed_list = ",".join(str(s) for s in seeds)
    return [
        [*task, "method=random", "budget=0", "seed=0"],
        [*task, "method=random", "budget=1.0", f"seed={','.join(str(s) for s in whole_seeds)}"],
        [*task, "method=random,oracle_clean", f"budget={setting.budget}", f"seed={seed_list}"],
    ]


def icl_accuracy(setting: Setting, n_demos: int, n_queries: int, overrides: Sequence[str]):
    """The selector's accuracy on clean evaluation questions after clean vs corrupted demos.

    Data Whisperer's own episodes (separate layout, generated answers, validation queries) over
    a pool of only clean or only corrupted examples, equally many of each, so both read the
    same number of questions.
    """
    from dwbench.bench import compose
    from dwbench.data.loading import load_task
    from dwbench.methods.base import ScoringContext
    from dwbench.methods.data_whisperer import DataWhisperer
    from dwbench.models import resolve_device

    cfg = compose(
        "data_whisperer",
        "embedded_gsm",
        setting.pool_size,
        0,
        [
            *setting.task_overrides()[1:],
            "method.query_layout=separate",
            "method.query_scoring=generate",
            "method.query_source=validation",
            f"method.n_demos={n_demos}",
            f"method.n_queries={n_queries}",
            *overrides,
        ],
    )
    splits = load_task(cfg.task)
    flags = splits.clean_flags or {}
    clean = [ex for ex in splits.pool if flags[ex.id]]
    corrupted = [ex for ex in splits.pool if not flags[ex.id]]
    size = min(len(clean), len(corrupted))
    accuracy = {}
    for name, demos in (("clean", clean[:size]), ("corrupted", corrupted[:size])):
        with tempfile.TemporaryDirectory() as work_dir:
            method = DataWhisperer(
                ScoringContext(
                    method_cfg=cfg.method,
                    task_cfg=cfg.task,
                    selector_cfg=cfg.selector_model,
                    queries=splits.eval,
                    seed=0,
                    device=resolve_device(str(cfg.device)),
                    cache_dir=Path(str(cfg.cache_dir)).expanduser(),
                    work_dir=Path(work_dir),
                )
            )
            method.score(demos)
        accuracy[name] = 100 * method.stats["query_accuracy"]
    return accuracy


def calibration_row(
    setting: Setting,
    seeds: Sequence[int],
    whole_seeds: Sequence[int],
    icl: dict[str, float],
) -> dict:
    """One setting's references, from the cells the pipeline finished."""
    found = [measured(cells) for cells in reference_cells(setting, seeds, whole_seeds)]
    cells = pd.concat([m.cells for m in found], ignore_index=True)
    examples = pd.concat([m.examples for m in found], ignore_index=True)
    for m in found:
        for missing in m.missing:
            logger.warning("not finished: %s", missing)

    def mean(method: str, budget: float) -> float | None:
        hit = cells[(cells["method"] == method) & (cells["budget"] == budget)]
        return float(hit["score"].mean()) if len(hit) else None

    zero_shot, whole = mean("random", 0.0), mean("random", 1.0)
    interval = versus_random(examples, "oracle_clean", setting.budget)
    trained = cells[cells["budget"] > 0]
    power = (
        interval is not None
        and interval.low > 0
        and zero_shot is not None
        and whole is not None
        and whole - zero_shot >= MIN_WHOLE_POOL_GAIN
    )
    return {
        "difficulty": setting.difficulty,
        "corrupt share": setting.corrupt_share,
        "pool": setting.pool_size,
        "eval": setting.eval_size,
        "budget": setting.budget,
        "zero-shot EM": zero_shot,
        "ICL clean demos": icl.get("clean"),
        "ICL corrupted demos": icl.get("corrupted"),
        "whole pool EM": whole,
        "random EM": mean("random", setting.budget),
        "oracle_clean EM": mean("oracle_clean", setting.budget),
        "oracle - random": None if interval is None else interval.difference,
        "ci low": None if interval is None else interval.low,
        "ci high": None if interval is None else interval.high,
        "eval s / problem": float((trained["eval_s"] / trained["n_eval"]).mean())
        if len(trained)
        else None,
        "power": "yes" if power else "no",
        "interval": interval_text(interval),
    }


def choose(table: pd.DataFrame) -> pd.Series | None:
    """The rule: among settings with power, the hardest difficulty, then the smallest share."""
    with_power = table[table["power"] == "yes"]
    if with_power.empty:
        return None
    order = with_power.assign(
        hardness=with_power["difficulty"].map(HARDEST_FIRST.index)
    ).sort_values(["hardness", "corrupt share"])
    return order.iloc[0]


def calibrate(args: argparse.Namespace) -> None:
    from dwbench.bench import markdown_table

    rows = []
    for difficulty in args.difficulties:
        for share in args.corrupt_shares:
            setting = Setting(difficulty, share, args.pool_size, args.eval_size, args.budget)
            if args.run:
                for cells in reference_cells(setting, args.seeds, args.whole_pool_seeds):
                    run_cells([*cells, *args.override])
            icl = (
                icl_accuracy(setting, args.icl_demos, args.icl_queries, args.override)
                if args.icl
                else {}
            )
            rows.append(calibration_row(setting, args.seeds, args.whole_pool_seeds, icl))
            print(markdown_table(rows[-1:], COLUMNS), flush=True)
    table = pd.DataFrame(rows)
    print(
        f"\nEmbedded task calibration (exact match %, mean over seeds {args.seeds}; whole pool "
        f"over seeds {args.whole_pool_seeds}; oracle - random: paired bootstrap 95% interval)"
    )
    print(markdown_table(rows, COLUMNS))
    chosen = choose(table)
    print(
        "\nRule: power = oracle_clean - Random interval above zero and whole pool - zero-shot "
        f">= {MIN_WHOLE_POOL_GAIN:g} points; default = hardest difficulty with power, then the "
        "smallest corrupted share."
    )
    if chosen is None:
        print("No setting has power: raise the corrupted share or the pool and measure again.")
    else:
        print(
            f"Chosen: difficulty={chosen['difficulty']}, corrupt_share={chosen['corrupt share']}"
            f" (oracle_clean - Random {chosen['interval']} points)"
        )
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["interval"]).to_csv(args.csv, index=False)
    print(f"wrote {args.csv}")


def add_parser(commands: argparse._SubParsersAction, add_override_option) -> None:
    cal = commands.add_parser(
        "calibrate",
        help="references per difficulty: zero-shot, in-context, whole pool, random vs oracle",
        description=__doc__.split("\n")[0],
    )
    cal.add_argument("--difficulties", nargs="+", default=list(HARDEST_FIRST[::-1]))
    cal.add_argument("--corrupt-shares", type=float, nargs="+", default=[0.3])
    cal.add_argument("--pool-size", type=int, default=200, help="training pool size")
    cal.add_argument("--eval-size", type=int, default=200, help="evaluation problems")
    cal.add_argument("--budget", type=float, default=0.1, help="share of the pool kept")
    cal.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    cal.add_argument("--whole-pool-seeds", type=int, nargs="+", default=[0])
    cal.add_argument("--icl-demos", type=int, default=5, help="demonstrations per ICL episode")
    cal.add_argument("--icl-queries", type=int, default=8, help="questions per ICL episode")
    cal.add_argument("--no-icl", dest="icl", action="store_false", help="skip the ICL probe")
    cal.add_argument(
        "--no-run", dest="run", action="store_false", help="only tabulate finished cells"
    )
    cal.add_argument(
        "--csv", type=Path, default=Path("results/embedded_calibration.csv"), help="CSV path"
    )
    add_override_option(cal)
    cal.set_defaults(handler=calibrate)
