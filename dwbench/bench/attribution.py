"""`python -m dwbench.bench attribution`: which reading of Data Whisperer's episodes ranks a pool.

Data Whisperer credits each demonstration with its episode's score times the attention the
queries paid it. On a small selector that signal can be mostly noise: the attention mostly says
where a demonstration sits, one draw per pass is one noisy episode, and an easy query raises
every demonstration beside it. This study scores one pool (one generator seed) with a list of
variants, each a list of Hydra overrides on a Data Whisperer preset (or another method, e.g.
`perplexity_low` as the sanity baseline), and reports per variant:

- AUROC of the scores against the task's `is_clean` flags, with a bootstrap 95% interval
  (examples resampled), read only here, after scoring;
- distinct scores, selection seconds and s / example, and STR against a stated fine-tune time
  (a whole-pool LoRA fine-tune of the embedded default measured on the machine and day the
  study's selection seconds were, 169 s on 2 CPU cores, unless `--finetune-seconds` says
  otherwise: this command fine-tunes nothing; measure yours and pass it);
- selection precision at `--budget` (the share of clean examples in the top k);
- the label-free split-half reliability: Spearman between the scores accumulated from the even
  and from the odd passes of the same episode log (episode_order=random and passes >= 2), and
  its Spearman-Brown step-up 2r / (1 + r), the reliability of the full run.

Variants that differ only in how the log is accumulated (method.attention_correction,
query_baseline, aggregation) share one episode log under `--work-dir`, so they cost one run:
their selection seconds are the run that wrote the log plus their own accumulation (and the
zero-shot rows, with query_baseline=zero_shot, whichever call scored them).

Diagnostics, one row per quantity, per episode log, read from its records (demo_ids,
attention, score): mean attention weight by demonstration position, mean weight and mean
episode score of clean and of corrupted demonstrations, and the slope of an episode's score
per corrupted demonstration in it. Outputs: `results/dw_attribution.csv`,
`results/dw_attribution_diagnostics.csv`, `paper_figures/dw_attribution.png`.

    python -m dwbench.bench attribution --generator-seed 0
    python -m dwbench.bench attribution --generator-seed 1 --variants faithful likelihood-p4
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dwbench.bench.common import add_override_option, auroc, compose, markdown_table
from dwbench.data.records import TaskSplits
from dwbench.errors import ConfigError

logger = logging.getLogger(__name__)

# STR's denominator here, as this study fine-tunes nothing: the whole-pool LoRA fine-tune of the
# embedded default (`+experiment=embedded_table2_reference seed=0`, 3.55 examples/s on 2 CPU
# cores), measured on the day and machine the study's selection seconds were. Earlier days'
# runs of the same recipe took 332-345 s (1.7 examples/s): compare seconds only within a day.
WHOLE_POOL_FINETUNE_SECONDS = 169.0
_P4 = ("method=data_whisperer_likelihood", "method.episode_order=random", "method.passes=4")
_SEPARATE_P4 = ("method=data_whisperer_separate", "method.episode_order=random", "method.passes=4")
_POSITION = "method.attention_correction=position"
_BASELINE = "method.query_baseline=mean"
_RIDGE = "method.aggregation=ridge"
_NO_ATTENTION = "method.attention_weighting=false"
_ZERO_SHOT = "method.query_baseline=zero_shot"
_LOG_PROBABILITY = "method.likelihood_score=log_probability"
# One demonstration per episode: the episode's score is that example's alone (nothing to share
# out, so no attention), and against zero-shot it is a paired with-minus-without effect.
_ONE_SHOT = (
    "method=data_whisperer_likelihood",
    "method.n_demos=1",
    "method.n_queries=8",
    "method.episode_order=random",
    "method.passes=2",
)
# Leave-one-out: each demonstration's paired effect, its episode's queries with it and with it
# hidden (a 4D mask over the shared prefix), so neither attention nor query difficulty enters.
_LEAVE_ONE_OUT = (
    "method=data_whisperer_likelihood",
    "method.attention_weighting=false",
    "method.leave_one_out=true",
    "method.episode_order=random",
)
_LOO_D4 = (*_LEAVE_ONE_OUT, "method.n_demos=4", "method.n_queries=8", "method.passes=2")
_LOO_D10 = (*_LEAVE_ONE_OUT, "method.passes=4")
# More queries per episode: the likelihood rows are cheap next to a generated answer.
_ONE_SHOT_Q16 = tuple(o.replace("n_queries=8", "n_queries=16") for o in _ONE_SHOT)
_Q20_P4 = (*_P4, "method.n_queries=20")
# label -> overrides; a leading "method=..." picks the preset (data_whisperer otherwise).
VARIANTS: dict[str, tuple[str, ...]] = {
    "faithful": ("method=data_whisperer",),
    "perplexity_low": ("method=perplexity_low",),
    "separate": ("method=data_whisperer_separate",),
    "likelihood": ("method=data_whisperer_likelihood",),
    "likelihood-p4": _P4,
    "likelihood-p4-position": (*_P4, _POSITION),
    "likelihood-p4-baseline": (*_P4, _BASELINE),
    "likelihood-p4-ridge": (*_P4, _RIDGE),
    "likelihood-p4-position-baseline": (*_P4, _POSITION, _BASELINE),
    "likelihood-p4-baseline-ridge": (*_P4, _BASELINE, _RIDGE),
    "likelihood-p4-position-baseline-ridge": (*_P4, _POSITION, _BASELINE, _RIDGE),
    "likelihood-p4-noattn": (*_P4, _NO_ATTENTION),
    "likelihood-p4-noattn-baseline": (*_P4, _NO_ATTENTION, _BASELINE),
    "likelihood-p4-noattn-baseline-ridge": (*_P4, _NO_ATTENTION, _BASELINE, _RIDGE),
    "likelihood-p4-zeroshot": (*_P4, _ZERO_SHOT),
    "oneshot-p2": _ONE_SHOT,
    "oneshot-p2-baseline": (*_ONE_SHOT, _BASELINE),
    "oneshot-p2-zeroshot": (*_ONE_SHOT, _ZERO_SHOT),
    "oneshot-p2-logprob": (*_ONE_SHOT, _LOG_PROBABILITY),
    "oneshot-p2-logprob-zeroshot": (*_ONE_SHOT, _LOG_PROBABILITY, _ZERO_SHOT),
    "separate-p4": _SEPARATE_P4,
    "separate-p4-position-baseline": (*_SEPARATE_P4, _POSITION, _BASELINE),
    "loo-d4-q8-p2": _LOO_D4,
    "loo-d4-q8-p2-logprob": (*_LOO_D4, _LOG_PROBABILITY),
    "loo-d10-q5-p4": _LOO_D10,
    "loo-d10-q5-p4-logprob": (*_LOO_D10, _LOG_PROBABILITY),
    "oneshot-q16-p2-baseline": (*_ONE_SHOT_Q16, _BASELINE),
    "oneshot-q16-p2-zeroshot": (*_ONE_SHOT_Q16, _ZERO_SHOT),
    "likelihood-q20-p4-baseline": (*_Q20_P4, _BASELINE),
    "likelihood-q20-p4-position-baseline": (*_Q20_P4, _POSITION, _BASELINE),
}
FAITHFUL, BASELINE_METHOD = "data_whisperer", "perplexity_low"
COLUMNS = (
    "variant",
    "method",
    "overrides",
    "pool",
    "generator_seed",
    "auroc",
    "auroc_low",
    "auroc_high",
    "precision_at_budget",
    "distinct_scores",
    "selection_s",
    "s_per_example",
    "finetune_s",
    "str",
    "split_half_reliability",
    "spearman_brown",
    "passes",
    "queries_right",
    "parse_failure_rate",
    "log_reused",
)


def add_parser(commands: Any) -> None:
    command = commands.add_parser(
        "attribution",
        help="Data Whisperer's variants on one pool: AUROC [95%% CI], cost, split-half reliability",
        description=__doc__.split("\n\n")[0],
    )
    command.add_argument("--task", default="embedded_gsm", help="a task with is_clean flags")
    command.add_argument("--pool-size", type=int, default=200, help="pool examples")
    command.add_argument("--generator-seed", type=int, default=0, help="which generated pool")
    command.add_argument("--seed", type=int, default=0, help="run seed (episodes, shuffles)")
    command.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        help=f"labels from the built-in list ({', '.join(VARIANTS)}), or LABEL=OV1,OV2 for "
        "your own (e.g. mine=method=data_whisperer_likelihood,method.n_queries=10)",
    )
    command.add_argument("--budget", type=float, default=0.1, help="share kept, for precision")
    command.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    command.add_argument(
        "--finetune-seconds",
        type=float,
        default=WHOLE_POOL_FINETUNE_SECONDS,
        help="STR's denominator (default: the embedded default's measured whole-pool fine-tune)",
    )
    command.add_argument("--work-dir", type=Path, default=Path("results/dw_attribution_work"))
    command.add_argument("--csv", type=Path, default=Path("results/dw_attribution.csv"))
    command.add_argument(
        "--diagnostics", type=Path, default=Path("results/dw_attribution_diagnostics.csv")
    )
    command.add_argument("--figure", type=Path, default=Path("paper_figures/dw_attribution.png"))
    add_override_option(command)
    command.set_defaults(handler=attribution)


def parse_variants(names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Built-in labels, or LABEL=OV1,OV2 (overrides split at commas)."""
    variants: dict[str, tuple[str, ...]] = {}
    for name in names:
        if name in VARIANTS:
            variants[name] = VARIANTS[name]
        elif "=" in name:
            label, _, overrides = name.partition("=")
            variants[label] = tuple(o for o in overrides.split(",") if o)
        else:
            raise ConfigError(
                f"unknown variant {name!r}; choose from {', '.join(VARIANTS)} or write "
                "LABEL=OVERRIDE,OVERRIDE."
            )
    return variants


def method_of(overrides: Sequence[str]) -> tuple[str, list[str]]:
    """(method preset, the other overrides) of a variant."""
    methods = [o.split("=", 1)[1] for o in overrides if o.startswith("method=")]
    rest = [o for o in overrides if not o.startswith("method=")]
    return (methods[-1] if methods else FAITHFUL), rest


def auroc_interval(
    scores: Sequence[float], positives: Sequence[bool], resamples: int, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95% interval of the AUROC over examples resampled with replacement."""

    values = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(positives, dtype=bool)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(resamples):
        pick = rng.integers(0, len(values), len(values))
        stats.append(auroc(values[pick], labels[pick]))
    finite = np.asarray([s for s in stats if np.isfinite(s)])
    if not len(finite):
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def log_key(task: str, pool: int, generator_seed: int, seed: int, overrides: Sequence[str]) -> str:
    """The episode log's folder: everything but the accumulation switches decides the episodes."""
    from dwbench.content_hash import stable_hash
    from dwbench.methods.data_whisperer.episodes import READING_SWITCHES

    switches = {f"method.{s}" for s in READING_SWITCHES}
    kept = sorted(o for o in overrides if o.split("=", 1)[0] not in switches)
    return stable_hash({"task": task, "pool": pool, "gen": generator_seed, "seed": seed, "o": kept})


def run_variant(
    overrides: Sequence[str],
    task: str,
    pool_size: int,
    generator_seed: int,
    seed: int,
    work_dir: Path,
) -> tuple[pd.DataFrame, dict[str, float], TaskSplits, float, bool]:
    """Score the pool with one variant: (scores, stats, the task's splits with its clean flags
    and corruption kinds, selection s, log reused).

    The episode log stays in `work_dir`, so a later variant with the same episodes reuses it;
    the seconds of the run that wrote it are kept beside it and counted as its cost.
    """
    from dwbench.data.loading import load_task
    from dwbench.methods.base import ScoringContext, method_stats
    from dwbench.methods.registry import method_class
    from dwbench.models import resolve_model_source

    method, rest = method_of(overrides)
    generator = [f"task.generator.seed={generator_seed}"] if task.startswith("embedded") else []
    cfg = compose(method, task, pool_size, seed, [*generator, *rest])
    splits = load_task(cfg.task)
    if not splits.clean_flags:
        raise ConfigError(f"task {task!r} has no is_clean flags; the study needs them.")
    cache_dir = Path(str(cfg.cache_dir)).expanduser()
    method_type = method_class(cfg.method)
    if method_type.needs_selector:
        resolve_model_source(cfg.selector_model, cache_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    cost_file = work_dir / "selection_seconds.json"
    reused = cost_file.is_file()
    context = ScoringContext.for_cell(cfg, splits, work_dir)
    instance = method_type(context)
    start = time.perf_counter()
    scores = instance.score(splits.pool)
    stats = method_stats(instance)
    passes = cfg.method.get("passes") if needs_passes(cfg.method) else None
    stats["passes"] = float("nan") if passes is None else float(passes)
    seconds = time.perf_counter() - start - stats.get("load_seconds", 0.0)
    if reused:  # the run that wrote the log, and zero-shot rows an earlier variant scored
        seconds += float(json.loads(cost_file.read_text())["seconds"])
        seconds += stats.get("resumed_zero_shot_seconds", 0.0)
    elif (work_dir / "episodes.jsonl").is_file():
        cost_file.write_text(json.dumps({"seconds": seconds}))
    return scores, stats, splits, seconds, reused


def needs_passes(method_cfg: Any) -> bool:
    """Whether the method plans episodes in passes (Data Whisperer's presets)."""
    return "passes" in method_cfg and "n_demos" in method_cfg


def diagnostics(records: Sequence[Mapping[str, Any]], flags: Mapping[str, bool]) -> list[dict]:
    """Where the attention goes, and what a corrupted demonstration does to its episode."""
    from dwbench.methods.data_whisperer.episodes import episode_weights

    ran = [r for r in records if r["demo_ids"] and r["attention"]]
    rows: list[dict] = []
    by_position: dict[int, list[float]] = {}
    weight = {True: [], False: []}
    episode_score = {True: [], False: []}
    corrupted, scores = [], []
    for r in ran:
        w = episode_weights(r["attention"])
        for p, (demo, value) in enumerate(zip(r["demo_ids"], w, strict=True)):
            by_position.setdefault(p, []).append(float(value))
            weight[bool(flags.get(demo, False))].append(float(value))
            episode_score[bool(flags.get(demo, False))].append(float(r["score"]))
        corrupted.append(sum(not flags.get(d, False) for d in r["demo_ids"]))
        scores.append(float(r["score"]))
    for p in sorted(by_position):
        rows.append(_row("weight_by_position", p, by_position[p]))
    for clean, name in ((True, "clean"), (False, "corrupted")):
        rows.append(_row(f"weight_{name}", None, weight[clean]))
        rows.append(_row(f"episode_score_{name}", None, episode_score[clean]))
    if len(set(corrupted)) > 1:
        slope = float(np.polyfit(corrupted, scores, 1)[0])
        rows.append({"quantity": "score_per_corrupted_demo", "value": slope, "n": len(scores)})
    return rows


def auroc_by_kind(
    scores: pd.DataFrame, flags: Mapping[str, bool], kinds: Mapping[str, str | None]
) -> list[dict]:
    """AUROC of clean examples against each corruption kind alone: what a score can see (a
    missing final line, a final number that contradicts the working) and what it cannot."""

    value = dict(zip(scores["id"], scores["score"], strict=True))
    clean = [i for i in value if flags.get(i, False)]
    rows = []
    for kind in sorted({k for k in kinds.values() if k}):
        bad = [i for i in value if kinds.get(i) == kind]
        if clean and bad:
            both = clean + bad
            score = auroc(
                np.array([value[i] for i in both]),
                np.array([flags[i] for i in both]),
            )
            rows.append({"quantity": f"auroc_vs_{kind}", "value": score, "n": len(bad)})
    return rows


def _row(quantity: str, position: int | None, values: Sequence[float]) -> dict:
    return {
        "quantity": quantity,
        "position": position,
        "value": float(np.mean(values)) if values else float("nan"),
        "sd": float(np.std(values)) if values else float("nan"),
        "n": len(values),
    }


def read_records(work_dir: Path) -> list[dict[str, Any]]:
    """The episode log's records (the header line skipped)."""
    path = work_dir / "episodes.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [json.loads(line) for line in lines if line.strip()]


def study(
    variants: Mapping[str, Sequence[str]],
    task: str,
    pool_size: int,
    generator_seed: int,
    seed: int,
    budget: float,
    resamples: int,
    finetune_seconds: float,
    work_root: Path,
    extra: Sequence[str] = (),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per variant, diagnostics per episode log)."""
    from dwbench.methods.base import top_k

    rows, diagnostic_rows, seen_logs = [], [], set()
    for label, overrides in variants.items():
        overrides = [*overrides, *extra]
        key = log_key(task, pool_size, generator_seed, seed, overrides)
        work_dir = work_root / key
        scores, stats, splits, seconds, reused = run_variant(
            overrides, task, pool_size, generator_seed, seed, work_dir
        )
        flags = dict(splits.clean_flags or {})
        clean = [flags.get(i, False) for i in scores["id"]]
        low, high = auroc_interval(scores["score"], clean, resamples)
        k = max(1, int(budget * len(scores)))
        kept = set(top_k(scores, k, seed))
        reliability = stats.get("split_half_reliability", float("nan"))
        rows.append(
            {
                "variant": label,
                "method": method_of(overrides)[0],
                "overrides": " ".join(method_of(overrides)[1]),
                "pool": len(scores),
                "generator_seed": generator_seed,
                "auroc": auroc(scores["score"], clean),
                "auroc_low": low,
                "auroc_high": high,
                "precision_at_budget": float(np.mean([flags.get(i, False) for i in kept])),
                "distinct_scores": int(scores["score"].nunique()),
                "selection_s": seconds,
                "s_per_example": seconds / len(scores),
                "finetune_s": finetune_seconds,
                "str": seconds / finetune_seconds,
                "split_half_reliability": reliability,
                "spearman_brown": 2 * reliability / (1 + reliability),
                "passes": stats.get("passes", float("nan")),
                "queries_right": stats.get("query_accuracy", float("nan")),
                "parse_failure_rate": stats.get("parse_failure_rate", float("nan")),
                "log_reused": reused,
            }
        )
        print(rows[-1], flush=True)
        diagnostic_rows += [
            {"variant": label, "log": key, **r}
            for r in auroc_by_kind(scores, flags, splits.corruptions or {})
        ]
        records = read_records(work_dir)
        if records and key not in seen_logs:
            seen_logs.add(key)
            diagnostic_rows += [
                {"variant": label, "log": key, **r} for r in diagnostics(records, flags)
            ]
    return pd.DataFrame(rows, columns=list(COLUMNS)), pd.DataFrame(diagnostic_rows)


def figure(table: pd.DataFrame, path: Path) -> None:
    """AUROC [95% CI] against selection seconds, one point per variant; the faithful method
    and perplexity_low marked, chance as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    kind = np.where(
        (table["method"] == FAITHFUL) & (table["overrides"] == ""),
        "faithful data_whisperer",
        np.where(table["method"] == BASELINE_METHOD, "perplexity_low", "variant"),
    )
    frame = table.assign(kind=kind)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.errorbar(
        frame["selection_s"],
        frame["auroc"],
        yerr=[frame["auroc"] - frame["auroc_low"], frame["auroc_high"] - frame["auroc"]],
        fmt="none",
        ecolor="0.6",
        capsize=3,
    )
    sns.scatterplot(
        data=frame,
        x="selection_s",
        y="auroc",
        hue="kind",
        style="kind",
        markers={"faithful data_whisperer": "*", "perplexity_low": "s", "variant": "o"},
        s=120,
        ax=ax,
    )
    for _, row in frame.iterrows():
        ax.annotate(
            row["variant"],
            (row["selection_s"], row["auroc"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.axhline(0.5, ls="--", color="0.4", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("selection seconds (log scale)")
    ax.set_ylabel("AUROC vs is_clean [bootstrap 95% CI]")
    seeds = ", ".join(str(s) for s in sorted(set(table["generator_seed"])))
    ax.set_title(f"Data Whisperer variants, pool {table['pool'].iloc[0]}, generator seed {seeds}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def attribution(args: argparse.Namespace) -> None:

    logging.basicConfig(level=logging.WARNING)
    variants = parse_variants(args.variants)
    table, diagnostic = study(
        variants,
        args.task,
        args.pool_size,
        args.generator_seed,
        args.seed,
        args.budget,
        args.resamples,
        args.finetune_seconds,
        args.work_dir,
        args.override,
    )
    for path in (args.csv, args.diagnostics):
        path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.csv, index=False)
    diagnostic.to_csv(args.diagnostics, index=False)
    figure(table, args.figure)
    hidden = {"method", "overrides", "pool", "generator_seed", "finetune_s", "spearman_brown"}
    hidden |= {"passes", "queries_right", "parse_failure_rate", "log_reused"}  # in the CSV
    shown = [c for c in COLUMNS if c not in hidden]
    print(markdown_table(table.to_dict("records"), shown))
    print(f"wrote {args.csv}, {args.diagnostics}, {args.figure}")
