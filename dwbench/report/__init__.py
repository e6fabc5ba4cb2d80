"""The report: finished evaluation runs of one experiment -> frozen CSV snapshots in `results/`
-> tables and figures in `paper_figures/`, side by side with the paper's numbers.

One module per concern, in the order the report runs them:
- `cells`: which cells the report needs (the experiment's grid, plus companion cells such as
  Random for the ablation tables) and what each cell is (task, models, method, setting);
- `collect`: MLflow and the stage cache -> one row per cell and per-example scores;
- `snapshot`: the two CSVs under `results/`, written and read back (the only input of what follows);
- `paper`: `paper_reported.csv` and which paper number stands beside which cell;
- `bootstrap`: paired bootstrap intervals of each method's difference to Random;
- `tables` (with `table_layouts`, the blocks of each layout, and `table_render`, Markdown and
  LaTeX) and `figures`: the paper's tables and seaborn figures.

`python -m dwbench.report <experiment> [overrides]` runs it (`__main__`).
"""
