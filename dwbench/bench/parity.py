"""`python -m dwbench.bench parity --reference DIR`: dwbench's released preset against a trace of
the authors' released code, episode by episode.

DIR holds a reference run of the released code: `settings.json` (dataset, `model_type` prompt
family, batch_train / batch_test, layer, token cap, dtype, query source), `pool.json`,
`queries.json` (when the run used a validation split; otherwise the plan is the released
2-fold KFold over the pool), `episodes.jsonl` (per episode: plan, prompt token ids, generated
token ids and text, parsed answers, each query's metric, raw and normalised attention weights)
and `scores.csv` (final scores and the released output order). The released preset
(`method=data_whisperer_released`) runs over the same pool with those settings and the task's
own prompt template, and every episode is compared: the plan, prompt token ids, generated
token ids, parsed answers, metrics and attention weights; then the final scores (max |diff|,
Spearman, order). Episodes are logged as they finish under `<out>/<dataset>-work/`, so a
killed comparison resumes. The table goes to `<out>/<dataset>.csv`.

The exit code is 1 when a final score differs by more than `--score-tolerance` (default 1e-4:
the same float32 computation on CPU reproduces the float16 scores bit for bit; 1e-4 is below one
float16 step at the scores' scale, 0.06-0.125, so any real difference fails) or a raw attention
weight by more than `--weight-tolerance` (1e-5: float32 rounding of the layer's weights, after
the float16 cast, stays far below it), or when a prompt or generation differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dwbench.bench.common import add_override_option, compose, markdown_table
from dwbench.data.records import Example
from dwbench.errors import ConfigError, DataError

REFERENCE_FILES = ("settings.json", "pool.json", "episodes.jsonl", "scores.csv")
SETTINGS = ("dataset", "model_type", "batch_train", "batch_test", "attn_layer", "max_token")
EPISODE_FIELDS = (
    "episode",
    "demo_indices",
    "query_indices",
    "prompt_token_ids",
    "generated_token_ids",
    "parsed_predictions",
    "attention_weights_raw",
    "attention_weights_normalised",
)
SCORE_COLUMNS = ("pool_index", "score", "released_rank")
RECOPY = "copy it again from the traced run (a copy cut short?)"


def add_parser(commands: Any) -> None:
    command = commands.add_parser(
        "parity",
        help="the released preset against a reference run of the authors' code",
        description=__doc__.split("\n\n")[0],
    )
    command.add_argument("--reference", type=Path, required=True, help="reference run folder")
    command.add_argument(
        "--episodes", type=int, help="compare only the first N episodes (a quick check)"
    )
    command.add_argument("--out", type=Path, default=Path("results/parity"), help="output folder")
    command.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="METHOD",
        help="also score the same pool with these methods (same n_d, n_q, layer, queries) and "
        "report each one's Spearman correlation with the released scores",
    )
    command.add_argument("--score-tolerance", type=float, default=1e-4)
    command.add_argument("--weight-tolerance", type=float, default=1e-5)
    add_override_option(command)
    command.set_defaults(handler=parity)


def read_reference(folder: Path) -> dict[str, Any]:
    """The reference run's files, each checked for what the comparison reads: a damaged or
    incomplete one is a DataError naming the file, before any model is loaded."""
    missing = [name for name in REFERENCE_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{folder} is not a reference run: {', '.join(missing)} missing (it needs "
            f"{', '.join(REFERENCE_FILES)}, and queries.json for a validation-split run)."
        )
    settings = _json_file(folder / "settings.json", dict)
    absent = [name for name in SETTINGS if name not in settings]
    if absent:
        raise DataError(f"{folder / 'settings.json'} has no {', '.join(absent)}; {RECOPY}.")
    for name in SETTINGS[2:]:
        if not _whole(settings[name]):
            raise DataError(
                f"{folder / 'settings.json'}: {name}={settings[name]!r} is not a whole number; "
                f"{RECOPY}."
            )
    queries_path = folder / "queries.json"
    validation = settings.get("query_source") == "validation"
    if validation and not queries_path.is_file():
        raise DataError(f"{folder}/settings.json says query_source=validation: add queries.json")
    pool = _records(folder / "pool.json")
    return {
        "settings": settings,
        "pool": pool,
        "queries": _records(queries_path) if validation else None,
        "episodes": _episodes(folder / "episodes.jsonl"),
        "scores": _scores(folder / "scores.csv", len(pool)),
    }


def _whole(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and int(value) == float(value)
    except (TypeError, ValueError, OverflowError):
        return False


def _json_file(path: Path, kind: type) -> Any:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # not JSON, or not UTF-8
        raise DataError(f"{path} cannot be read as JSON ({error}); {RECOPY}.") from None
    if not isinstance(value, kind):
        raise DataError(
            f"{path} holds a JSON {type(value).__name__}, not the {kind.__name__} the traced run "
            f"writes; {RECOPY}."
        )
    return value


def _records(path: Path) -> list[dict[str, Any]]:
    records = _json_file(path, list)
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: record {bad} is not a JSON object; {RECOPY}.")
    return records


def _episodes(path: Path) -> list[dict[str, Any]]:
    episodes = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            episode = json.loads(line)
        except ValueError as error:
            raise DataError(f"{path}, line {lineno}: not JSON ({error}); {RECOPY}.") from None
        absent = [f for f in EPISODE_FIELDS if not isinstance(episode, dict) or f not in episode]
        if absent:
            raise DataError(f"{path}, line {lineno}: no {', '.join(absent)}; {RECOPY}.")
        if not _whole(episode["episode"]):
            raise DataError(f"{path}, line {lineno}: episode is not a whole number; {RECOPY}.")
        episodes.append(episode)
    return episodes


def _scores(path: Path, n_pool: int) -> pd.DataFrame:
    """The released final scores and order: every pool index once, finite."""
    try:
        scores = pd.read_csv(path)
    except ValueError as error:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise DataError(f"{path} cannot be read as CSV ({error}); {RECOPY}.") from None
    absent = [c for c in SCORE_COLUMNS if c not in scores.columns]
    if absent:
        raise DataError(
            f"{path} has no column {', '.join(absent)} (it needs {', '.join(SCORE_COLUMNS)}); "
            f"{RECOPY}."
        )
    numbers = scores[list(SCORE_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    indices = sorted(numbers["pool_index"].dropna().tolist())
    if indices != list(range(n_pool)) or not numbers.map(math.isfinite).all().all():
        raise DataError(
            f"{path} holds {len(scores)} rows, not one finite score and rank for each of the "
            f"{n_pool} records of pool.json (pool_index 0-{n_pool - 1}); {RECOPY}."
        )
    return scores


def overrides_for(settings: dict[str, Any]) -> list[str]:
    """The released preset set to the reference run's settings."""
    validation = settings.get("query_source") == "validation"
    if not validation and settings.get("k_folds") not in (None, 2):
        raise ConfigError(
            f"the reference used k_folds={settings['k_folds']}; the released plan here is 2-fold"
        )
    return [
        f"method.n_demos={int(settings['batch_train'])}",
        f"method.n_queries={int(settings['batch_test'])}",
        f"method.prompt_family={settings['model_type']}",
        f"method.prompt_dataset={settings['dataset']}",
        f"method.max_token={int(settings['max_token'])}",
        f"method.parallel_batches={int(settings.get('parallel_batches', 1))}",
        f"method.query_source={'validation' if validation else 'pool_kfold'}",
        f"selector_model.attention_layer={int(settings['attn_layer'])}",
        f"selector_model.dtype={settings.get('dtype', 'float32')}",
    ]


def examples(rows: Sequence[dict[str, Any]], task: Any, prefix: str) -> list[Example]:
    """Reference rows as the task's loader would make them (its prompt template and fields)."""
    names = [str(f) for f in task.fields.prompt]
    response = str(task.fields.response)
    made = []
    for position, row in enumerate(rows):
        values = {name: str(row.get(name) or "") for name in names}
        later_empty = len(names) > 1 and not all(values[n].strip() for n in names[1:])
        prompt = values[names[0]] if later_empty else str(task.prompt_template).format(**values)
        made.append(
            Example(
                id=f"{prefix}-{row.get('ref_index', position)}",
                prompt=prompt,
                response=str(row[response]),
                references=(str(row[response]),),
            )
        )
    return made


def compare_episode(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """One episode's differences, as a table row."""
    ours_gen, theirs_gen = ours["generated_token_ids"], _ids(theirs["generated_token_ids"])
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(ours_gen, theirs_gen, strict=False)) if a != b),
        None if len(ours_gen) == len(theirs_gen) else min(len(ours_gen), len(theirs_gen)),
    )
    theirs_predictions = _list(theirs["parsed_predictions"])
    theirs_metric = theirs.get("query_metric")
    ours_metric = None if ours["failed"] else ours["query_scores"]
    metric_diff = (
        max(abs(a - b) for a, b in zip(ours_metric, theirs_metric, strict=True))
        if ours_metric is not None and theirs_metric is not None
        else (0.0 if ours_metric is None and theirs_metric is None else math.inf)
    )
    raw = _max_diff(ours["attention"], theirs["attention_weights_raw"])
    total = sum(ours["attention"]) or 1.0
    normalised = _max_diff(
        [a / total for a in ours["attention"]], theirs["attention_weights_normalised"]
    )
    return {
        "episode": ours["episode"],
        "prompt tokens": len(ours["prompt_token_ids"]),
        "prompt equal": ours["prompt_token_ids"] == _ids(theirs["prompt_token_ids"]),
        "new tokens": len(ours_gen),
        "generation equal": first_diff is None,
        "first differing token": first_diff,
        "answers equal": ours["predictions"] == theirs_predictions[: len(ours["predictions"])]
        and len(theirs_predictions) >= len(ours["predictions"]),
        "failed equal": ours["failed"] == bool(theirs.get("failed")),
        "max |d metric|": metric_diff,
        "max |d weight raw|": raw,
        "max |d weight norm|": normalised,
    }


def _ids(value: Any) -> list[int]:
    return json.loads(value) if isinstance(value, str) else list(value)


def _list(value: Any) -> list[Any]:
    if isinstance(value, str):
        import ast

        return list(ast.literal_eval(value))
    return list(value)


def _max_diff(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) != len(b):
        return math.inf
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def parity(args: argparse.Namespace) -> None:
    from dwbench.methods.base import GivenData, ScoringContext
    from dwbench.methods.data_whisperer import DataWhisperer
    from dwbench.methods.data_whisperer.episodes import CHECKPOINT_FILE, accumulate_float16
    from dwbench.models import resolve_model_source

    reference = read_reference(args.reference)
    settings = reference["settings"]
    dataset = str(settings["dataset"])
    overrides = [*overrides_for(settings), *args.override]
    cfg = compose("data_whisperer_released", dataset, len(reference["pool"]), 0, overrides)
    pool = examples(reference["pool"], cfg.task, "pool")
    queries = (
        None if reference["queries"] is None else examples(reference["queries"], cfg.task, "query")
    )
    cache_dir = Path(str(cfg.cache_dir)).expanduser()
    resolve_model_source(cfg.selector_model, cache_dir)
    work_dir = args.out / f"{dataset}-work"
    context = ScoringContext.for_cell(cfg, GivenData(queries), work_dir, device="cpu")
    method = DataWhisperer(context)
    plan, _, plan_id = method._plan(pool)
    n_episodes = len(plan) if args.episodes is None else min(args.episodes, len(plan))
    theirs = {int(e["episode"]): e for e in reference["episodes"]}
    traced = next((i for i, e in enumerate(plan) if e.index not in theirs), len(plan))
    if traced < n_episodes:  # before any episode is scored: that takes minutes each
        shorter = f"compare the {traced} traced with --episodes {traced}, or " if traced else ""
        raise DataError(
            f"{args.reference / 'episodes.jsonl'} has no episode {plan[traced].index} of the "
            f"{n_episodes} to compare ({len(theirs)} traced: a run stopped early?); {shorter}"
            "trace the released run again."
        )
    per_call = method.settings.episodes_per_call("cpu")
    method.score_units(pool, range(0, -(-n_episodes // per_call)), work_dir)
    from dwbench.methods.data_whisperer.episodes import read_episode_log

    records = read_episode_log(work_dir / CHECKPOINT_FILE, plan_id)
    rows = []
    for episode in plan[:n_episodes]:
        ours = records[episode.index]
        ref = theirs[episode.index]
        row = compare_episode(ours, ref)
        row["plan equal"] = list(episode.demos) == list(ref["demo_indices"]) and list(
            episode.queries
        ) == list(ref["query_indices"])
        rows.append(row)
    index = {ex.id: i for i, ex in enumerate(pool)}
    done = [records[e.index] for e in plan[:n_episodes]]
    final, order = accumulate_float16(
        len(pool),
        (
            ([index[i] for i in r["demo_ids"]], r["query_scores"], r["attention"])
            for r in done
            if not r["failed"]
        ),
    )
    covered = sorted({index[i] for r in done for i in r["demo_ids"]})
    ref_scores = reference["scores"].set_index("pool_index")["score"]
    ours_scores = pd.Series(final, index=range(len(pool)))
    diff = (ours_scores[covered] - ref_scores.reindex(covered)).abs()
    spearman = (
        float(ours_scores[covered].corr(ref_scores.reindex(covered), method="spearman"))
        if len(covered) > 2
        else float("nan")
    )
    same_order = n_episodes == len(plan) and list(order) == list(
        reference["scores"].sort_values("released_rank")["pool_index"]
    )
    columns = [
        "episode",
        "plan equal",
        "prompt tokens",
        "prompt equal",
        "new tokens",
        "generation equal",
        "first differing token",
        "answers equal",
        "failed equal",
        "max |d metric|",
        "max |d weight raw|",
        "max |d weight norm|",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=columns)
    summary = {
        "episodes": n_episodes,
        "pool items compared": len(covered),
        "max |d score|": float(diff.max()),
        "Spearman": spearman,
        "same output order": same_order,
        "episodes byte-identical": int(
            (table["prompt equal"] & table["generation equal"] & table["answers equal"]).sum()
        ),
    }
    table.to_csv(args.out / f"{dataset}.csv", index=False)
    (args.out / f"{dataset}-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown_table(rows, columns))
    print()
    print(markdown_table([summary], list(summary)))
    bad = (
        summary["max |d score|"] > args.score_tolerance
        or not table["prompt equal"].all()
        or not table["generation equal"].all()
        or not table["plan equal"].all()
        or table["max |d weight raw|"].max() > args.weight_tolerance
    )
    if args.compare:
        compare_methods(args, reference, pool, queries, ref_scores)
    if bad:
        print(
            f"parity: FAILED (score tolerance {args.score_tolerance}, weight tolerance "
            f"{args.weight_tolerance}); see {args.out / f'{dataset}.csv'}",
            file=sys.stderr,
        )
        sys.exit(1)
    print(f"parity: OK on {n_episodes} episode(s); table in {args.out / f'{dataset}.csv'}")


def compare_methods(
    args: argparse.Namespace,
    reference: dict[str, Any],
    pool: list[Example],
    queries: list[Example] | None,
    ref_scores: pd.Series,
) -> None:
    """Other methods (dwbench's default) on the same pool: how far their ranking is from the
    released one, with their own diagnostics."""
    from dwbench.methods.base import GivenData, ScoringContext, method_stats
    from dwbench.methods.registry import method_class

    settings = reference["settings"]
    dataset = str(settings["dataset"])
    validation = settings.get("query_source") == "validation"
    shared = [
        f"method.n_demos={int(settings['batch_train'])}",
        f"method.n_queries={int(settings['batch_test'])}",
        f"method.query_source={'validation' if validation else 'pool_kfold'}",
        f"selector_model.attention_layer={int(settings['attn_layer'])}",
        f"selector_model.dtype={settings.get('dtype', 'float32')}",
    ]
    rows = []
    for name in args.compare:
        cfg = compose(name, dataset, len(pool), 0, [*shared, *args.override])
        context = ScoringContext.for_cell(
            cfg, GivenData(queries), args.out / f"{dataset}-{name}-work", device="cpu"
        )
        method = method_class(cfg.method)(context)
        scores = method.score(pool)["score"].to_numpy()
        stats = method_stats(method)
        released = ref_scores.sort_index().to_numpy()
        rows.append(
            {
                "method": name,
                "Spearman with released": float(
                    pd.Series(scores).corr(pd.Series(released), method="spearman")
                ),
                "distinct scores": int(len(set(scores.tolist()))),
                "parse failures": stats.get("parse_failure_rate"),
                "new tokens / episode": stats.get("generated_tokens_per_episode"),
                "s / example": stats.get("seconds_per_example"),
            }
        )
    columns = list(rows[0])
    pd.DataFrame(rows).to_csv(args.out / f"{dataset}-compare.csv", index=False)
    print()
    print(markdown_table(rows, columns))
