"""The small typed records that the data layer hands to every stage.

Stages talk through these and through JSON Lines files on disk, never through a dataset object,
so a method or a test can build a pool by hand.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from dwbench.errors import DataError

_JSONL_KEYS = ("id", "prompt", "response", "references")


@dataclass(frozen=True)
class Example:
    """One example; `references` has at least one entry (train/pool examples: `(response,)`)."""

    id: str
    prompt: str  # the user turn shown to the model, already formatted with the prompt_template
    response: str  # reference answer, used as the fine-tuning target
    references: tuple[str, ...]  # references for evaluation

    def __post_init__(self) -> None:
        if not isinstance(self.references, tuple) or not self.references:
            raise ValueError(f"Example {self.id!r}: references must be a non-empty tuple")


@dataclass
class TaskSplits:
    """A task's data after loading, shuffling and limiting."""

    pool: list[Example]  # training pool that selection methods rank
    queries: list[Example] | None  # the task's own query split (DialogSum validation), else None
    eval: list[Example]  # evaluation split
    # Ground truth of the embedded task or of planted noise (task.noise), else None:
    # id -> is_clean; selection methods must never see it.
    clean_flags: dict[str, bool] | None
    # id -> corruption kind (None: clean), where clean_flags is set; kept out of the fingerprint,
    # as the flags and the content already fix it
    corruptions: dict[str, str | None] | None = None


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> None:
    """Write one JSON object per line (keys id, prompt, response, references), UTF-8."""
    with Path(path).open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(asdict(ex), ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[Example]:
    """Read what `write_jsonl` wrote; a malformed line is a DataError naming file and line."""
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                examples.append(
                    Example(
                        id=row["id"],
                        prompt=row["prompt"],
                        response=row["response"],
                        references=tuple(row["references"]),
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise DataError(
                    f"{path}, line {lineno}: not an example record ({exc}). Each line must be "
                    f"a JSON object with keys {', '.join(_JSONL_KEYS)}; delete the file to "
                    "rebuild it."
                ) from exc
    return examples


def fingerprint(splits: TaskSplits) -> str:
    """A content hash of all splits and the clean flags, stable across processes and hash seeds.

    It goes into every stage key, so changing one character of the data invalidates the cache
    while re-loading the same data from another path does not.
    """
    payload = {
        "pool": [asdict(ex) for ex in splits.pool],
        "queries": None if splits.queries is None else [asdict(ex) for ex in splits.queries],
        "eval": [asdict(ex) for ex in splits.eval],
        "clean_flags": splits.clean_flags,
    }
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
