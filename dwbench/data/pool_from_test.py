"""A task folder for `task.path` from released files that lack the training split.

Some released task folders (DialogSum's as the authors share it) hold only `validation.json`
and `test.json`. This writes the folder `dwbench.data.loading` reads, with no example in two
roles:

- `train.json` (the pool): the test file's records, one per distinct `--key` value (DialogSum's
  test file has three summaries per dialogue; the first is kept);
- `validation.json` (queries: Data Whisperer's, and the targets of LESS and RDS+): `--queries`
  validation records drawn with `--seed`;
- `test.json` (evaluation): the other validation records, in file order (`task.eval_limit`
  keeps a seeded subset at run time).

    python -m dwbench.data.pool_from_test SOURCE_DIR OUT_DIR --queries 100
    python -m dwbench task=dialogsum task.path=OUT_DIR task.eval_limit=200
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dwbench.errors import DataError


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(
            f"Missing {path}; the source folder must hold validation.json and test.json."
        )
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}.") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise DataError(f"{path}: expected a JSON array of objects (the authors' format).")
    return rows


def split_folder(
    source: Path, out: Path, queries: int, seed: int = 0, key: str = "dialogue"
) -> dict[str, int]:
    """Write train/validation/test.json under `out`; returns each file's record count."""
    test, validation = _records(source / "test.json"), _records(source / "validation.json")
    pool: dict[str, dict[str, Any]] = {}
    for index, row in enumerate(test):
        if key not in row:
            raise DataError(
                f"{source / 'test.json'}: record {index} has no field {key!r} (--key); it has: "
                f"{', '.join(row)}."
            )
        pool.setdefault(str(row[key]), row)
    if not 0 < queries < len(validation):
        raise DataError(
            f"--queries {queries} must leave evaluation records: validation.json has "
            f"{len(validation)}; pick 1 to {len(validation) - 1}."
        )
    chosen = set(random.Random(seed).sample(range(len(validation)), queries))
    splits = {
        "train": list(pool.values()),
        "validation": [row for i, row in enumerate(validation) if i in chosen],
        "test": [row for i, row in enumerate(validation) if i not in chosen],
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (out / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return {name: len(rows) for name, rows in splits.items()}


def parser() -> argparse.ArgumentParser:
    command = argparse.ArgumentParser(
        prog="python -m dwbench.data.pool_from_test", description=__doc__.split("\n")[0]
    )
    command.add_argument("source", type=Path, help="folder with validation.json and test.json")
    command.add_argument("out", type=Path, help="folder to write (outside the repository)")
    command.add_argument("--queries", type=int, default=100, help="validation records as queries")
    command.add_argument("--seed", type=int, default=0, help="seeds which records are queries")
    command.add_argument("--key", default="dialogue", help="field whose repeats are one example")
    return command


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        counts = split_folder(args.source, args.out, args.queries, args.seed, args.key)
    except DataError as error:
        print(f"dwbench.data.pool_from_test: {error}", file=sys.stderr)
        return 2
    print(", ".join(f"{name}.json: {n}" for name, n in counts.items()), f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
