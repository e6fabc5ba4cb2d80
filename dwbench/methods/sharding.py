"""Sharded scoring for methods whose scores come from per-example values (perplexity, EL2N,
GraNd, ...): a unit is one batch of the method's own batching, so a shard computes exactly the
batches an unsharded run would, and the merge puts the values back in pool order.

A method mixes in `PerExampleShards` and provides `unit_size` (its batch size), `example_values`
(the values of the examples in some units, with their pool positions) and `scores_from_values`
(the score table from the whole pool's values). Values travel in `.npz` files, bit for bit.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from dwbench.data.records import Example
from dwbench.errors import DataError

PART_FILE = "values.npz"
IDS = "__ids__"


def save_part(folder: Path, ids: list[str], values: dict[str, np.ndarray]) -> None:
    """One shard's values, each array aligned with `ids`."""
    folder.mkdir(parents=True, exist_ok=True)
    if IDS in values:
        raise ValueError(f"{IDS} is reserved")
    np.savez(folder / PART_FILE, **{IDS: np.asarray(ids, dtype=str)}, **values)


def merge_parts(pool: list[Example], folders: list[Path]) -> dict[str, np.ndarray]:
    """The shards' values in pool order; every pool example exactly once, else a clear error."""
    position = {ex.id: i for i, ex in enumerate(pool)}
    seen = np.zeros(len(pool), dtype=np.int64)
    merged: dict[str, np.ndarray] = {}
    for folder in folders:
        path = folder / PART_FILE
        if not path.is_file():
            raise DataError(
                f"{path} is missing: score its shard again (python -m dwbench.sweep.plan)."
            )
        with np.load(path) as part:
            ids = [str(i) for i in part[IDS]]
            unknown = [i for i in ids if i not in position]
            if unknown:
                raise DataError(
                    f"{path} holds ids that are not in the pool ({unknown[:3]}): it was scored "
                    "for other data; delete its shard folder and score it again."
                )
            rows = np.array([position[i] for i in ids], dtype=np.int64)
            seen[rows] += 1
            for name in part.files:
                if name == IDS:
                    continue
                values = part[name]
                if name not in merged:
                    merged[name] = np.zeros(len(pool), dtype=values.dtype)
                merged[name][rows] = values
    if (seen != 1).any():
        missing = [pool[i].id for i in np.flatnonzero(seen == 0)]
        twice = [pool[i].id for i in np.flatnonzero(seen > 1)]
        raise DataError(
            f"the score shards in {folders[0].parent} do not cover the pool once: missing "
            f"{missing[:3]} ({len(missing)}), twice {twice[:3]} ({len(twice)}); score the "
            "missing shard again (python -m dwbench.sweep.plan lists it)."
        )
    return merged


class PerExampleShards:
    """ShardableMethod for scores built from per-example values computed in batches."""

    def unit_size(self) -> int:
        """Examples per unit: the method's batch size."""
        raise NotImplementedError

    def example_values(
        self, pool: list[Example], units: range | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(pool positions, values aligned with them) of the examples in `units` (None: all)."""
        raise NotImplementedError

    def scores_from_values(
        self, pool: list[Example], values: dict[str, np.ndarray]
    ) -> pd.DataFrame:
        """The score table from every pool example's values, in pool order."""
        raise NotImplementedError

    def score(self, pool: list[Example]) -> pd.DataFrame:
        positions, values = self.example_values(pool, None)
        ordered = {}
        for name, array in values.items():
            ordered[name] = np.zeros(len(pool), dtype=array.dtype)
            ordered[name][positions] = array
        return self.scores_from_values(pool, ordered)

    def shard_units(self, pool: list[Example]) -> int:
        return -(-len(pool) // self.unit_size())

    def score_units(self, pool: list[Example], units: range, work_dir: Path) -> dict[str, float]:
        start = time.perf_counter()
        positions, values = self.example_values(pool, units)
        save_part(work_dir, [pool[i].id for i in positions], values)
        return {"examples": float(len(positions)), "seconds": time.perf_counter() - start}

    def merge_units(self, pool: list[Example], shard_dirs: list[Path]) -> pd.DataFrame:
        return self.scores_from_values(pool, merge_parts(pool, shard_dirs))
