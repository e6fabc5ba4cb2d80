"""`python -m dwbench.submit <plan.txt>`: run a plan on SLURM as one array job.

Renders slurm/array.sbatch beside a frozen copy of the plan with `--array=0-(N-1)%P`, where task
i runs line i + 1, and submits it with sbatch. P is `slurm.parallel` from the config (set yours
in conf/local/) unless `--parallel` says otherwise. Nothing has to stay alive after it returns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dwbench.errors import DwbenchError


def main(argv: list[str] | None = None) -> int:
    from dwbench.sweep.slurm import submit

    parser = argparse.ArgumentParser(
        prog="python -m dwbench.submit",
        description="Submit a plan written by `python -m dwbench.plan` as a SLURM array job.",
        epilog="Example: python -m dwbench.submit results/sweeps/embedded_table2/plan.txt",
    )
    parser.add_argument("plan", type=Path, help="plan.txt written by python -m dwbench.plan")
    parser.add_argument("--parallel", type=int, help="tasks at once (default: slurm.parallel)")
    parser.add_argument(
        "--dry-run", action="store_true", help="render the array script, do not submit it"
    )
    args = parser.parse_args(argv)
    try:
        job, script = submit(args.plan, args.parallel, args.dry_run)
    except DwbenchError as error:
        print(f"dwbench: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"Rendered {script} (not submitted)")
    else:
        print(f"Submitted array job {job}: {script}")
        print(f"Logs in {script.parent / 'logs'}; see progress with python -m dwbench.status")
    return 0


if __name__ == "__main__":
    sys.exit(main())
