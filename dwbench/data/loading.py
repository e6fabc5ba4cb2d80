"""Load a task's pool, query and evaluation splits from the hub, a local folder or the generator.

Decisions worth knowing:
- `task.path` wins over `task.source`: a local folder in the authors' released format holds
  `train.json` (pool) and `test.json` (eval), plus `validation.json` (queries) when
  `task.query_source=validation`. Each file may be a JSON array or JSON Lines (`.jsonl` is also
  found); the format is detected from the first character.
- From the hub, `hub.eval_split: null` holds out part of `hub.pool_split` with
  `datasets.Dataset.train_test_split(**hub.holdout)`, which reproduces the paper's splits
  (GSM8K 6,725/748, BioInstruct 9:1).
- Records without an id field get `<split>-<index>` ids (`pool-00000`), numbered in file order
  before shuffling, so an id names the same record whatever the shuffle seed or limit.
- A UTF-8 byte order mark (what Windows editors and Excel write) is skipped, at the start of the
  file and of each JSON Lines line (files joined with `cat`).
- A record field the task reads that is NaN or Infinity (how pandas writes a missing value), an id
  that is null, and a record longer than `MAX_RECORD_CHARS` (no model reads it; tokenizing it
  alone takes gigabytes) are refused with the file, the record and the field, before any work.
- Eval rows with identical prompts become one example with all their responses as references
  (DialogSum's test split has three summaries per dialogue).
- With several prompt fields, an empty later field (BioInstruct's `input`) makes the prompt the
  first field alone, so no dangling "Input:" section reaches the model.
- Every split is shuffled with `random.Random(task.shuffle_seed)`, then cut to
  `task.pool_limit` / `task.eval_limit`: the data order does not depend on the run seed.
- `task.noise` (dwbench/data/noise.py) then plants seeded noise in the pool, on any source, so
  every later stage and method sees only the noisy pool, with `is_clean` flags and corruption
  kinds recorded as the embedded task records its own. On the embedded task it is refused while
  the generator corrupts answers itself (`task.generator.corrupt_share` > 0): two noise models
  in one pool would make the flags mean two things; set one of the shares to 0.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dwbench.data.embedded import check_generator_args, generate_embedded_task
from dwbench.data.noise import DEFAULTS as NOISE_DEFAULTS
from dwbench.data.noise import check_noise, plant_noise
from dwbench.data.records import Example, TaskSplits
from dwbench.errors import ConfigError, DataError

_DEFAULTS: dict[str, Any] = {
    "name": None,
    "source": "hub",
    "path": None,
    "hub": {
        "id": None,
        "config": None,
        "revision": None,
        "pool_split": "train",
        "eval_split": None,
        "query_split": None,
        "holdout": {"test_size": 0.1, "seed": 42},
    },
    "generator": None,
    "fields": {"prompt": ["question"], "response": "answer", "id": None},
    "prompt_template": "{question}",
    "metric": "exact_match_number",
    "answer_max_tokens": 256,
    "anchor_examples": 100,
    "query_source": "pool_kfold",
    "pool_limit": None,
    "eval_limit": None,
    "shuffle_seed": 0,
    "lm_eval_task": None,
    "noise": NOISE_DEFAULTS,
    # what finetune=lora_embedded needs for this task's examples (its YAML reads it); no data
    "fit": {"max_seq_len": None, "micro_batch_size": None},
}
_SOURCES = ("hub", "local", "embedded")
_QUERY_SOURCES = ("pool_kfold", "validation")
_GENERATOR_KEYS = ("pool_size", "eval_size", "corrupt_share", "seed", "difficulty")
_GENERATOR_DEFAULTS = {"difficulty": "multi_step"}  # configs written before the key still load
# A record's prompt and response together: about 250,000 tokens of English, twice the longest
# context of any model in conf/model (128k). A 50 MB line was read, then tokenized to 10 million
# tokens in evaluation, and the machine ran out of memory with no message.
MAX_RECORD_CHARS = 1_000_000


@dataclass
class _Rows:
    """Raw records of one split and where they came from, for error messages."""

    origin: str
    rows: list[dict[str, Any]]


def load_task(task: Mapping[str, Any]) -> TaskSplits:
    """The task's splits, shuffled and limited; `task` is the `task` config group (or a dict)."""
    cfg = _resolve(task)
    if cfg["path"] is not None:
        pool, eval_rows, queries = _load_local(Path(cfg["path"]), cfg["query_source"])
    elif cfg["source"] == "hub":
        pool, eval_rows, queries = _load_hub(cfg["hub"], cfg["query_source"])
    else:
        return _load_embedded(cfg)
    return _finish(cfg, pool, eval_rows, queries, corruption=None)


def check_task(task: Mapping[str, Any]) -> None:
    """Every check of the task config that needs no data: dwbench.validate runs it, so `plan`
    and `status`, which load no data, refuse what a run would."""
    cfg = _resolve(task)
    if cfg["path"] is None and cfg["source"] == "embedded":
        _generator_args(cfg)


def plants_noise(task: Mapping[str, Any]) -> bool:
    """Whether `task.noise` corrupts part of the pool (share > 0)."""
    noise = task.get("noise")
    return isinstance(noise, Mapping) and bool(noise.get("share"))


def has_clean_flags(task: Mapping[str, Any]) -> bool:
    """Whether the loaded pool will carry `is_clean` flags: the embedded generator's, or planted
    noise's on any task."""
    embedded = task.get("path") is None and task.get("source") == "embedded"
    return embedded or plants_noise(task)


def _resolve(task: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in, unknown keys and bad values rejected before any data is read."""
    given = OmegaConf.to_container(task, resolve=True) if isinstance(task, DictConfig) else task
    cfg = _merge(_DEFAULTS, given, "task.")
    if cfg["source"] not in _SOURCES:
        raise ConfigError(
            f"task.source={cfg['source']!r} is not one of {', '.join(_SOURCES)}; "
            "set task.path=<folder> to read local files instead."
        )
    if cfg["source"] == "local" and cfg["path"] is None:
        raise ConfigError(
            "task.source=local needs task.path=<folder holding train.json and test.json>."
        )
    if cfg["query_source"] not in _QUERY_SOURCES:
        raise ConfigError(
            f"task.query_source={cfg['query_source']!r} is not one of {', '.join(_QUERY_SOURCES)}."
        )
    uses_hub = cfg["path"] is None and cfg["source"] == "hub"
    if cfg["query_source"] == "validation":
        if cfg["path"] is None and cfg["source"] == "embedded":
            raise ConfigError(
                "The embedded task has no validation split; set task.query_source=pool_kfold."
            )
        if uses_hub and cfg["hub"]["query_split"] is None:
            raise ConfigError(
                "task.query_source=validation needs task.hub.query_split (e.g. validation), "
                "or set task.query_source=pool_kfold."
            )
    if uses_hub and not cfg["hub"]["id"]:
        raise ConfigError(
            "task.hub.id is not set; set it to a dataset id (e.g. openai/gsm8k) or set "
            "task.path=<local folder>."
        )
    for key in ("pool_limit", "eval_limit"):
        value = cfg[key]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            raise ConfigError(
                f"task.{key} must be a positive integer or null, got {value!r}; "
                f"e.g. task.{key}=100, or task.{key}=null to keep every example."
            )
    cfg["noise"] = check_noise(cfg["noise"])
    generator = cfg["generator"] if isinstance(cfg["generator"], Mapping) else {}
    embedded = cfg["path"] is None and cfg["source"] == "embedded"
    if embedded and cfg["noise"]["share"] > 0 and generator.get("corrupt_share"):
        raise ConfigError(
            f"task.noise.share={cfg['noise']['share']} on the embedded task, whose generator "
            f"already corrupts task.generator.corrupt_share={generator['corrupt_share']} of the "
            "pool: one noise model per pool, so the is_clean flags mean one thing. Set "
            "task.generator.corrupt_share=0 to plant text noise instead, or task.noise.share=0 "
            "to keep the arithmetic corruptions."
        )
    if isinstance(cfg["shuffle_seed"], bool) or not isinstance(cfg["shuffle_seed"], int):
        raise ConfigError(f"task.shuffle_seed must be an integer, got {cfg['shuffle_seed']!r}.")
    fields = cfg["fields"]
    if isinstance(fields["prompt"], str):
        fields["prompt"] = [fields["prompt"]]
    if not fields["prompt"] or not all(isinstance(f, str) for f in fields["prompt"]):
        raise ConfigError(
            f"task.fields.prompt must be a non-empty list of field names, got {fields['prompt']!r}."
        )
    if not isinstance(cfg["prompt_template"], str):
        raise ConfigError(
            f"task.prompt_template must be a string such as '{{question}}', "
            f"got {cfg['prompt_template']!r}."
        )
    return cfg


def _merge(defaults: Mapping[str, Any], given: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(given, Mapping):
        raise ConfigError(f"{prefix.rstrip('.')} must be a mapping, got {given!r}.")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(
            f"Unknown key {prefix}{unknown[0]}; valid keys under {prefix.rstrip('.')}: "
            f"{', '.join(defaults)}."
        )
    merged = dict(defaults)
    for key, value in given.items():
        if isinstance(defaults[key], dict) and value is not None:
            merged[key] = _merge(defaults[key], value, f"{prefix}{key}.")
        else:
            merged[key] = value
    return merged


def _load_local(folder: Path, query_source: str) -> tuple[_Rows, _Rows, _Rows | None]:
    folder = folder.expanduser()
    if not folder.is_dir():
        raise DataError(
            f"Task folder {folder.resolve()} does not exist (set by task.path); point task.path "
            "at a folder holding train.json and test.json."
        )
    pool = _read_records(_find_file(folder, "train"))
    eval_rows = _read_records(_find_file(folder, "test"))
    queries = (
        _read_records(_find_file(folder, "validation")) if query_source == "validation" else None
    )
    return pool, eval_rows, queries


def _find_file(folder: Path, stem: str) -> Path:
    for suffix in (".json", ".jsonl"):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise DataError(
        f"Missing data file {(folder / stem).resolve()}.json (or .jsonl). task.path points at "
        f"{folder}, which must hold train.json and test.json, plus validation.json when "
        "task.query_source=validation."
    )


def _read_records(path: Path) -> _Rows:
    """A JSON array (the authors' format) or JSON Lines, detected from the first character."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark is not content
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)."
        ) from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}. "
                "Fix the file; it is read as one JSON array because it starts with '['."
            ) from None
    else:
        rows = []
        # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and similar breaks.
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line.removeprefix("\ufeff")))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: malformed JSON on line {lineno}, column {exc.colno}: {exc.msg}. "
                    "Fix the line; the file is read as JSON Lines (one object per line) "
                    "because it does not start with '['."
                ) from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}: record {index} is a JSON {type(row).__name__}, not an object with "
                "named fields."
            )
    return _Rows(str(path), rows)


def _load_hub(hub: Mapping[str, Any], query_source: str) -> tuple[_Rows, _Rows, _Rows | None]:
    import datasets

    name = hub["id"]
    try:
        dataset = datasets.load_dataset(name, hub["config"], revision=hub["revision"])
    except Exception as exc:  # network, gated repo, missing config: all fixed the same way
        raise DataError(
            f"Could not load {name!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Without network access, or for a gated dataset, download it once and set "
            "task.path=<local folder> holding train.json and test.json."
        ) from exc

    def split(key: str) -> datasets.Dataset:
        if hub[key] not in dataset:
            raise DataError(
                f"{name} has no split {hub[key]!r} (task.hub.{key}); it has: {', '.join(dataset)}."
            )
        return dataset[hub[key]]

    pool = split("pool_split")
    if hub["eval_split"] is None:
        parts = pool.train_test_split(**hub["holdout"])
        source = f"{hub['pool_split']} split, task.hub.holdout"
        pool_rows = _Rows(f"{name} ({source}: kept part)", parts["train"].to_list())
        eval_rows = _Rows(f"{name} ({source}: held-out part)", parts["test"].to_list())
    else:
        pool_rows = _Rows(f"{name} ({hub['pool_split']} split)", pool.to_list())
        eval_rows = _Rows(f"{name} ({hub['eval_split']} split)", split("eval_split").to_list())
    queries = None
    if query_source == "validation":
        queries = _Rows(f"{name} ({hub['query_split']} split)", split("query_split").to_list())
    return pool_rows, eval_rows, queries


def _load_embedded(cfg: dict[str, Any]) -> TaskSplits:
    generator = _generator_args(cfg)
    pool, eval_rows = generate_embedded_task(
        generator["seed"],
        generator["pool_size"],
        generator["eval_size"],
        generator["corrupt_share"],
        difficulty=generator["difficulty"],
    )
    origin = "the embedded generator (task.generator)"
    corruption = [row["corruption"] for row in pool]
    return _finish(cfg, _Rows(origin, pool), _Rows(origin, eval_rows), None, corruption=corruption)


def _generator_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """task.generator with its defaults, checked (no problem is generated)."""
    generator = cfg["generator"]
    if not isinstance(generator, Mapping):
        raise ConfigError(
            "task.source=embedded needs task.generator: {pool_size, eval_size, corrupt_share, "
            "seed}."
        )
    unknown = sorted(set(generator) - set(_GENERATOR_KEYS))
    if unknown:
        raise ConfigError(
            f"Unknown key task.generator.{unknown[0]}; valid keys: {', '.join(_GENERATOR_KEYS)}."
        )
    generator = {**_GENERATOR_DEFAULTS, **generator}
    for key in _GENERATOR_KEYS:
        if generator.get(key) is None:
            raise ConfigError(f"task.generator.{key} is not set; the embedded task needs it.")
    if isinstance(generator["seed"], bool) or not isinstance(generator["seed"], int):
        raise ConfigError(f"task.generator.seed must be an integer, got {generator['seed']!r}.")
    check_generator_args(
        generator["pool_size"],
        generator["eval_size"],
        generator["corrupt_share"],
        generator["difficulty"],
    )
    return generator


def _finish(
    cfg: dict[str, Any],
    pool_rows: _Rows,
    eval_rows: _Rows,
    query_rows: _Rows | None,
    corruption: list[str | None] | None,
) -> TaskSplits:
    """Rows -> examples, eval references grouped, every split shuffled and limited, noise
    planted in the pool; `corruption` is the generator's kind per pool row (None: clean)."""
    pool = _examples(pool_rows, "pool", cfg)
    eval_examples = _group_references(_examples(eval_rows, "eval", cfg))
    queries = None if query_rows is None else _examples(query_rows, "queries", cfg)
    loaded = [(pool_rows, pool), (eval_rows, eval_examples)]
    if query_rows is not None and queries is not None:
        loaded.append((query_rows, queries))
    for rows, examples in loaded:
        if not examples:
            raise DataError(
                f"{rows.origin}: no records; the pool, eval and query splits must not be empty."
            )
        _check_unique_ids(rows.origin, examples, cfg["fields"]["id"])

    kinds = (
        None
        if corruption is None
        else {ex.id: kind for ex, kind in zip(pool, corruption, strict=True)}
    )
    seed = cfg["shuffle_seed"]
    for field, split in (("pool_limit", pool), ("eval_limit", eval_examples)):
        if cfg[field] is not None and cfg[field] > len(split):
            raise ConfigError(
                f"task.{field}={cfg[field]} is above the {len(split)} examples the split has; "
                f"lower it, or set task.{field}=null to keep them all."
            )
    pool = _shuffled(pool, seed)[: cfg["pool_limit"]]
    eval_examples = _shuffled(eval_examples, seed)[: cfg["eval_limit"]]
    kind_of = None if kinds is None else {ex.id: kinds[ex.id] for ex in pool}
    if cfg["noise"]["share"] > 0:
        noisy = plant_noise(pool, cfg["noise"])
        pool, kind_of = noisy.pool, noisy.corruption
    return TaskSplits(
        pool=pool,
        queries=None if queries is None else _shuffled(queries, seed),
        eval=eval_examples,
        clean_flags=None if kind_of is None else {i: k is None for i, k in kind_of.items()},
        corruptions=kind_of,
    )


def _examples(rows: _Rows, split: str, cfg: dict[str, Any]) -> list[Example]:
    fields = cfg["fields"]
    id_field, response_field = fields["id"], fields["response"]
    needed = [*fields["prompt"], response_field, *([id_field] if id_field else [])]
    examples = []
    for index, row in enumerate(rows.rows):
        for field in needed:
            if field not in row:
                raise DataError(
                    f"{rows.origin}: record {index} has no field {field!r}; it has: "
                    f"{', '.join(row) or 'no fields'}. Set task.fields to this data's field names."
                )
            value = row[field]
            if isinstance(value, float) and not math.isfinite(value):
                raise DataError(
                    f"{rows.origin}: record {index} field {field!r} is {value} (JSON NaN or "
                    "Infinity, how pandas writes a missing value); fill it in or drop the record."
                )
        if id_field and row[id_field] is None:
            raise DataError(
                f"{rows.origin}: record {index} field {id_field!r} (task.fields.id) is null; give "
                "every record an id, or set task.fields.id=null to number the records instead."
            )
        response = row[response_field]
        if not isinstance(response, str):
            raise DataError(
                f"{rows.origin}: record {index} field {response_field!r} is "
                f"{type(response).__name__}, expected text (task.fields.response)."
            )
        prompt = _prompt(row, fields["prompt"], cfg["prompt_template"], rows.origin, index)
        size = len(prompt) + len(response)
        if size > MAX_RECORD_CHARS:
            raise DataError(
                f"{rows.origin}: record {index} is {size:,} characters long (prompt and "
                f"response), above the {MAX_RECORD_CHARS:,} any model here can read (the "
                "longest context in conf/model is 128k tokens); cut it or drop the record."
            )
        examples.append(
            Example(
                id=str(row[id_field]) if id_field else f"{split}-{index:05d}",
                prompt=prompt,
                response=response,
                references=(response,),
            )
        )
    return examples


def _prompt(
    row: dict[str, Any], prompt_fields: list[str], template: str, origin: str, index: int
) -> str:
    """`template` filled from the record; the first prompt field alone if a later one is empty."""
    values = {key: "" if value is None else value for key, value in row.items()}
    if any(not str(values[field]).strip() for field in prompt_fields[1:]):
        return str(values[prompt_fields[0]])
    try:
        return template.format_map(values)
    except KeyError as exc:
        raise ConfigError(
            f"task.prompt_template uses {{{exc.args[0]}}}, but record {index} of {origin} has "
            f"only: {', '.join(row)}."
        ) from None
    except (IndexError, ValueError) as exc:
        raise ConfigError(
            f"task.prompt_template {template!r} is not a valid format string ({exc}); use named "
            "fields such as {question} and write literal braces as {{ }}."
        ) from None


def _group_references(examples: list[Example]) -> list[Example]:
    """One example per distinct prompt, with every response as a reference, in first-seen order."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.prompt, []).append(ex)
    return [
        Example(
            id=group[0].id,
            prompt=group[0].prompt,
            response=group[0].response,
            references=tuple(ex.response for ex in group),
        )
        for group in groups.values()
    ]


def _check_unique_ids(origin: str, examples: list[Example], id_field: str | None) -> None:
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise DataError(
                f"{origin}: id {ex.id!r} (field {id_field!r}, task.fields.id) appears more than "
                "once; ids must be unique. Set task.fields.id=null to number the records instead."
            )
        seen.add(ex.id)


def _shuffled(examples: list[Example], seed: int) -> list[Example]:
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    return examples
