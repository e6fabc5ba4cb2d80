"""`python -m dwbench.sweep.submit <plan.txt>`: a plan on SLURM as one dependency chain of arrays.

Renders dwbench/sweep/array.sbatch beside a frozen copy of the plan once per step of the chain (the
unsplittable part of sharded scoring, score shards, merges, cells; most plans have only cells)
with `--array=0-(N-1)%P`, and submits each with sbatch, after the step before it. P is
`slurm.parallel` from the config (set yours in conf/local/) unless `--parallel` says
otherwise. Nothing has to stay alive after it returns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dwbench.errors import DwbenchError
from dwbench.storage import storage_problem


def parser() -> argparse.ArgumentParser:
    command = argparse.ArgumentParser(
        prog="python -m dwbench.sweep.submit",
        description="Submit a plan written by `python -m dwbench.sweep.plan` as a SLURM array job.",
        epilog="Example: python -m dwbench.sweep.submit results/sweeps/embedded_table2/plan.txt",
    )
    command.add_argument("plan", type=Path, help="plan.txt written by python -m dwbench.sweep.plan")
    command.add_argument("--parallel", type=int, help="tasks at once (default: slurm.parallel)")
    command.add_argument(
        "--dry-run", action="store_true", help="render the array script, do not submit it"
    )
    return command


def main(argv: list[str] | None = None) -> int:
    from dwbench.sweep.slurm import submit

    args = parser().parse_args(argv)
    try:
        submitted = submit(args.plan, args.parallel, args.dry_run)
    except DwbenchError as error:
        print(f"dwbench: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a read-only or full disk, met freezing the plan or its scripts
        problem = storage_problem(error)
        if problem is None:
            raise
        print(f"dwbench: {problem}", file=sys.stderr)
        return 1
    previous = None
    for step, script in submitted.scripts.items():
        if args.dry_run:
            print(f"Rendered {script} (not submitted)")
            continue
        waits = f", after job {previous}" if previous else ""
        print(f"Submitted array job {submitted.jobs[step]} ({step}{waits}): {script}")
        previous = submitted.jobs[step]
    logs = submitted.script.parent / "logs"
    print(f"Logs in {logs}; see progress with python -m dwbench.sweep.status")
    return 0


if __name__ == "__main__":
    sys.exit(main())
