"""Sweeps: the paper's grids as cells, what is done, what to run, and running it on SLURM.

`grid` expands a sweep exactly as `python -m dwbench -m` does; `progress` decides per cell whether
it is done, running, failed or missing and what it will cost; `slurm` renders and submits the
array job and asks SLURM about it. The commands are `python -m dwbench.sweep.plan`, `.submit` and
`.status`.
"""
