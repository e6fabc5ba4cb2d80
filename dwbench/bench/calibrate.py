"""Can a task rank selection methods? `python -m dwbench.bench calibrate`.

For each setting (on the embedded task: difficulty x corrupted share; on any other task:
the share of planted text noise, `task.noise.share`; each at one pool size, evaluation size and
one or more budgets) it measures only references, never a method under test:

- zero-shot exact match of the untuned target;
- (embedded task only) the selector's in-context accuracy on clean evaluation questions after
  clean demonstrations and after corrupted ones (Data Whisperer's separate layout, generated
  answers): whether the model can read the difference in context at all;
- the task's metric after fine-tuning on the whole pool, on a random k and on an oracle_clean k
  (a random k of the clean examples) at each budget, over the seeds, and the paired bootstrap
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

On any other task (`--task dialogsum`) the same power rule applies with the task's own metric
(ROUGE-L points for DialogSum); among the settings with power the smallest noise share, then
the smallest budget, is reported. The pool, evaluation set and answer cap are the task
config's, set with `-o` overrides or an experiment preset, so the cells are the preset's:

    python -m dwbench.bench calibrate --task dialogsum --budgets 0.05 0.1 0.2 \
        -o +experiment=dialogsum_noise_table2 -o task.path=DIR

Cells run through the pipeline (`python -m dwbench -m ...`), so they are cached, logged to MLflow
and reused by `make demo` and the sweeps whose cells they are. The table is printed and written
to `results/embedded_calibration.csv` (another task: `results/<task>_calibration.csv`; `--csv`).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dwbench.bench.common import add_override_option, compose, markdown_table
from dwbench.bench.measure import interval_text, measured, run_cells, versus_random
from dwbench.report.bootstrap import Interval

logger = logging.getLogger(__name__)
EMBEDDED = "embedded_gsm"
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
NOISE_COLUMNS = (  # any task with planted noise; scores in the task's metric, points
    "task",
    "metric",
    "noise share",
    "pool",
    "eval",
    "budget",
    "k",
    "zero-shot",
    "whole pool",
    "random",
    "oracle_clean",
    "oracle - random",
    "ci low",
    "ci high",
    "random precision",
    "train s / cell",
    "eval s / example",
    "power",
)


@dataclass(frozen=True)
class Setting:
    """One calibrated setting. On the embedded task the generator makes the pool (`difficulty`,
    `corrupt_share`, sizes); on any other task `corrupt_share` is `task.noise.share`, and sizes
    left None are the task config's (`task.pool_limit`, `task.eval_limit`)."""

    difficulty: str | None
    corrupt_share: float
    pool_size: int | None
    eval_size: int | None
    budget: float
    task: str = EMBEDDED

    def task_overrides(self) -> list[str]:
        if self.task != EMBEDDED:
            sizes = [
                f"task.{key}={value}"
                for key, value in (("pool_limit", self.pool_size), ("eval_limit", self.eval_size))
                if value is not None
            ]
            return [f"task={self.task}", f"task.noise.share={self.corrupt_share}", *sizes]
        difficulty = self.difficulty or HARDEST_FIRST[-1]
        return [
            "task=embedded_gsm",
            f"task.generator.difficulty={difficulty}",
            f"task.generator.corrupt_share={self.corrupt_share}",
            f"task.generator.pool_size={self.pool_size or 200}",
            f"task.generator.eval_size={self.eval_size or 200}",
            f"task.answer_max_tokens={ANSWER_TOKENS[difficulty]}",
        ]


def reference_cells(
    setting: Setting,
    seeds: Sequence[int],
    whole_seeds: Sequence[int],
    budgets: Sequence[float] | None = None,
) -> list:
    """The three sweeps of references: zero-shot, whole pool, random vs oracle_clean at k (at
    the setting's budget, or at each of `budgets` in one sweep)."""
    task = setting.task_overrides()
    seed_list = ",".join(str(s) for s in seeds)
    budget_list = ",".join(str(b) for b in budgets or [setting.budget])
    return [
        [*task, "method=random", "budget=0", "seed=0"],
        [*task, "method=random", "budget=1.0", f"seed={','.join(str(s) for s in whole_seeds)}"],
        [*task, "method=random,oracle_clean", f"budget={budget_list}", f"seed={seed_list}"],
    ]


def icl_accuracy(setting: Setting, n_demos: int, n_queries: int, overrides: Sequence[str]):
    """The selector's accuracy on clean evaluation questions after clean vs corrupted demos.

    Data Whisperer's own episodes (separate layout, generated answers, validation queries) over
    a pool of only clean or only corrupted examples, equally many of each, so both read the
    same number of questions.
    """
    from dwbench.data.loading import load_task
    from dwbench.methods.base import GivenData, ScoringContext
    from dwbench.methods.data_whisperer import DataWhisperer

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
                ScoringContext.for_cell(cfg, GivenData(queries=splits.eval), Path(work_dir))
            )
            method.score(demos)
        accuracy[name] = 100 * method.stats["query_accuracy"]
    return accuracy


@dataclass
class References:
    """One setting's finished reference cells and what the rule reads from them."""

    cells: pd.DataFrame
    zero_shot: float | None
    whole: float | None
    interval: Interval | None
    power: bool

    def mean(self, method: str, budget: float, column: str = "score") -> float | None:
        hit = self.cells[(self.cells["method"] == method) & (self.cells["budget"] == budget)]
        if column not in hit or hit[column].isna().all():
            return None
        return float(hit[column].mean())


def references(
    setting: Setting, seeds: Sequence[int], whole_seeds: Sequence[int], overrides: Sequence[str]
) -> References:
    """The setting's references, from the cells the pipeline finished."""
    sweeps = reference_cells(setting, seeds, whole_seeds)
    found = [measured([*cells, *overrides]) for cells in sweeps]
    for m in found:
        for missing in m.missing:
            logger.warning("not finished: %s", missing)
    cells = pd.concat([m.cells for m in found], ignore_index=True)
    examples = pd.concat([m.examples for m in found], ignore_index=True)
    refs = References(cells, None, None, None, False)
    if cells.empty:
        return refs
    refs.zero_shot, refs.whole = refs.mean("random", 0.0), refs.mean("random", 1.0)
    refs.interval = versus_random(examples, "oracle_clean", setting.budget)
    refs.power = (
        refs.interval is not None
        and refs.interval.low > 0
        and refs.zero_shot is not None
        and refs.whole is not None
        and refs.whole - refs.zero_shot >= MIN_WHOLE_POOL_GAIN
    )
    return refs


def calibration_row(
    setting: Setting,
    seeds: Sequence[int],
    whole_seeds: Sequence[int],
    icl: dict[str, float],
    overrides: Sequence[str] = (),
) -> dict:
    """One embedded setting's references, from the cells the pipeline finished."""
    refs = references(setting, seeds, whole_seeds, overrides)
    cells, interval = refs.cells, refs.interval
    trained = cells[cells["budget"] > 0] if len(cells) else cells
    return {
        "difficulty": setting.difficulty,
        "corrupt share": setting.corrupt_share,
        "pool": setting.pool_size,
        "eval": setting.eval_size,
        "budget": setting.budget,
        "zero-shot EM": refs.zero_shot,
        "ICL clean demos": icl.get("clean"),
        "ICL corrupted demos": icl.get("corrupted"),
        "whole pool EM": refs.whole,
        "random EM": refs.mean("random", setting.budget),
        "oracle_clean EM": refs.mean("oracle_clean", setting.budget),
        **interval_columns(interval),
        "eval s / problem": float((trained["eval_s"] / trained["n_eval"]).mean())
        if len(trained)
        else None,
        "power": "yes" if refs.power else "no",
        "interval": interval_text(interval),
    }


def interval_columns(interval: Interval | None) -> dict[str, float | None]:
    """oracle_clean minus Random and its 95% interval, as table columns (None if unmeasured)."""
    if interval is None:
        return {"oracle - random": None, "ci low": None, "ci high": None}
    return {
        "oracle - random": interval.difference,
        "ci low": interval.low,
        "ci high": interval.high,
    }


def noise_row(
    setting: Setting, seeds: Sequence[int], whole_seeds: Sequence[int], overrides: Sequence[str]
) -> dict:
    """One budget of a task with planted noise: its references, in the task's metric."""
    refs = references(setting, seeds, whole_seeds, overrides)
    cells, interval = refs.cells, refs.interval
    at_budget = cells[cells["budget"] == setting.budget] if len(cells) else cells

    def first(column: str) -> object:
        found = at_budget[column].dropna() if column in at_budget else []
        return found.iloc[0] if len(found) else None

    return {
        "task": setting.task,
        "metric": first("metric"),
        "noise share": setting.corrupt_share,
        "pool": first("n_pool"),
        "eval": first("n_eval"),
        "budget": setting.budget,
        "k": first("k"),
        "zero-shot": refs.zero_shot,
        "whole pool": refs.whole,
        "random": refs.mean("random", setting.budget),
        "oracle_clean": refs.mean("oracle_clean", setting.budget),
        **interval_columns(interval),
        "random precision": refs.mean("random", setting.budget, "selection_precision"),
        "train s / cell": float(at_budget["train_s"].mean()) if "train_s" in at_budget else None,
        "eval s / example": float((at_budget["eval_s"] / at_budget["n_eval"]).mean())
        if len(at_budget)
        else None,
        "power": "yes" if refs.power else "no",
        "interval": interval_text(interval),
    }


def choose(table: pd.DataFrame) -> pd.Series | None:
    """The rule: among settings with power, the hardest difficulty (embedded task) or the
    smallest noise share (any other), then the smallest share and budget."""
    with_power = table[table["power"] == "yes"]
    if with_power.empty:
        return None
    if "difficulty" not in with_power:
        return with_power.sort_values(["noise share", "budget"]).iloc[0]
    order = with_power.assign(
        hardness=with_power["difficulty"].map(HARDEST_FIRST.index)
    ).sort_values(["hardness", "corrupt share"])
    return order.iloc[0]


def calibrate(args: argparse.Namespace) -> None:
    if args.task != EMBEDDED:
        calibrate_noise(args)
        return

    rows = []
    for difficulty in args.difficulties:
        for share in args.corrupt_shares:
            for budget in args.budgets:
                sizes = (args.pool_size or 200, args.eval_size or 200)
                setting = Setting(difficulty, share, *sizes, budget)
                if args.run:
                    for cells in reference_cells(setting, args.seeds, args.whole_pool_seeds):
                        run_cells([*cells, *args.override])
                icl = (
                    icl_accuracy(setting, args.icl_demos, args.icl_queries, args.override)
                    if args.icl
                    else {}
                )
                rows.append(
                    calibration_row(setting, args.seeds, args.whole_pool_seeds, icl, args.override)
                )
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
    csv = args.csv or Path("results/embedded_calibration.csv")
    csv.parent.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["interval"]).to_csv(csv, index=False)
    print(f"wrote {csv}")


def calibrate_noise(args: argparse.Namespace) -> None:
    """Any task with planted noise: zero-shot, whole pool, random and oracle_clean per budget."""

    csv = args.csv or Path(f"results/{args.task}_calibration.csv")
    rows = []
    for share in args.corrupt_shares:
        settings = [
            Setting(None, share, args.pool_size, args.eval_size, budget, task=args.task)
            for budget in args.budgets
        ]
        if args.run:
            sweeps = reference_cells(settings[0], args.seeds, args.whole_pool_seeds, args.budgets)
            for cells in sweeps:
                run_cells([*cells, *args.override])
        for setting in settings:
            rows.append(noise_row(setting, args.seeds, args.whole_pool_seeds, args.override))
            print(markdown_table(rows[-1:], NOISE_COLUMNS), flush=True)
    table = pd.DataFrame(rows)
    print(
        f"\n{args.task} calibration with planted noise (task metric in points, mean over seeds "
        f"{args.seeds}; whole pool over seeds {args.whole_pool_seeds}; oracle - random: paired "
        "bootstrap 95% interval; train and eval seconds per cell at the budget)"
    )
    print(markdown_table(rows, NOISE_COLUMNS))
    chosen = choose(table)
    print(
        "\nRule: power = oracle_clean - Random interval above zero and whole pool - zero-shot "
        f">= {MIN_WHOLE_POOL_GAIN:g} points; default = the smallest noise share with power, "
        "then the smallest budget."
    )
    if chosen is None:
        print(
            "No setting has power: oracle_clean never beats Random with an interval clear of "
            "zero (or fine-tuning barely moves the metric); see the table for which."
        )
    else:
        print(
            f"Chosen: task.noise.share={chosen['noise share']}, budget={chosen['budget']} "
            f"(oracle_clean - Random {chosen['interval']} points)"
        )
    csv.parent.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["interval"]).to_csv(csv, index=False)
    print(f"wrote {csv}")


def add_parser(commands: argparse._SubParsersAction) -> None:
    cal = commands.add_parser(
        "calibrate",
        help="references per setting: zero-shot, in-context, whole pool, random vs oracle",
        description=__doc__.split("\n")[0],
    )
    cal.add_argument(
        "--task",
        default=EMBEDDED,
        help="conf/task choice; any but embedded_gsm plants noise with task.noise",
    )
    cal.add_argument(
        "--difficulties", nargs="+", default=list(HARDEST_FIRST[::-1]), help="embedded task only"
    )
    cal.add_argument(
        "--corrupt-shares",
        type=float,
        nargs="+",
        default=[0.3],
        help="share of the pool corrupted (embedded: by the generator; else task.noise.share)",
    )
    cal.add_argument(
        "--pool-size",
        type=int,
        help="training pool size (embedded: 200; else task.pool_limit, default the task's)",
    )
    cal.add_argument(
        "--eval-size",
        type=int,
        help="evaluation examples (embedded: 200; else task.eval_limit, default the task's)",
    )
    cal.add_argument(
        "--budgets", type=float, nargs="+", default=[0.1], help="shares of the pool kept"
    )
    cal.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    cal.add_argument("--whole-pool-seeds", type=int, nargs="+", default=[0])
    cal.add_argument("--icl-demos", type=int, default=5, help="demonstrations per ICL episode")
    cal.add_argument("--icl-queries", type=int, default=8, help="questions per ICL episode")
    cal.add_argument("--no-icl", dest="icl", action="store_false", help="skip the ICL probe")
    cal.add_argument(
        "--no-run", dest="run", action="store_false", help="only tabulate finished cells"
    )
    cal.add_argument(
        "--csv",
        type=Path,
        help="CSV path (default: results/embedded_calibration.csv, results/<task>_calibration.csv)",
    )
    add_override_option(cal)
    cal.set_defaults(handler=calibrate)
