"""The report on a synthetic MLflow store: no model runs, only what the pipeline would log.

A small embedded_table2 grid (random and Data Whisperer, 5% and 10%, seeds 0 and 1) is prepared
for real (the embedded task is generated in pure Python), and each cell gets the evaluate
output and MLflow evaluation run the pipeline would have written, with per-example scores built
so the answers are known: at 5% Data Whisperer answers exactly what Random answers, at 10% it
answers every example correctly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import DictConfig

from dwbench.artifacts import ArtifactStore
from dwbench.report import snapshot
from dwbench.report.__main__ import main
from dwbench.report.bootstrap import paired_interval
from dwbench.report.cells import load_report_grid
from dwbench.report.frame import WHOLE, ZERO_SHOT
from dwbench.report.paper import Paper
from dwbench.report.table_render import Entry, format_entry
from dwbench.stages import prepare
from dwbench.stages.keys import cell_keys
from dwbench.tracking import Tracker

GRID = ["method=random,data_whisperer", "budget=0.05,0.1", "seed=0,1"]
N_EVAL = 30
SMALL_TASK = f"task.generator.eval_size={N_EVAL}"  # the expected tables count out of 30


def correct(cfg: DictConfig, index: int) -> float:
    """Random gets 10/30 right with seed 0 and 15/30 with seed 1; Data Whisperer the same at 5%
    and without attention weighting, and everything when it weights by attention at 10%. The
    untuned model (budget 0) gets 6/30 right."""
    method, budget = str(cfg.method.name), float(cfg.budget)
    if budget == 0.0:
        return float(index % 5 == 0)
    if method == "data_whisperer" and budget > 0.05 and cfg.method.attention_weighting:
        return 1.0
    return float(index % 3 == 0) if int(cfg.seed) == 0 else float(index % 2 == 0)


def fake_sweep(
    results: Path,
    experiment: str = "embedded_table2",
    grid: tuple[str, ...] = GRID,
    skip: int | None = None,
    companions: bool = False,
) -> list[str]:
    """Log every grid cell (but the `skip`-th; and the companions if asked) as the pipeline
    would; returns the overrides."""
    overrides = [*grid, SMALL_TASK, f"results_dir={results}"]
    report = load_report_grid(experiment, overrides, progress=False)
    cells = [cell for role, cell in report.cells() if companions or role == "grid"]
    cfg = cells[0].cfg
    store = ArtifactStore(results / "artifacts")
    prepared = prepare.run(cfg.task, store)
    ids = [json.loads(line)["id"] for line in prepared.eval_path.read_text().splitlines()]
    assert len(ids) == N_EVAL
    tracker = Tracker(
        str(cfg.tracking.uri),
        str(cfg.tracking.experiment),
        results / "mlartifacts",
        Path(str(cfg.cache_dir)),
    )
    for index, cell in enumerate(cells):
        if index == skip:
            continue
        c = cell.cfg
        method, seed = str(c.method.name), int(c.seed)
        method = "zero_shot" if float(c.budget) == 0.0 else method
        key = cell_keys(c, prepared.key)["evaluate"]
        samples = [{"id": ex, "prediction": "", "score": correct(c, i)} for i, ex in enumerate(ids)]
        score = float(np.mean([s["score"] for s in samples]))
        with store.writing("evaluate", key) as (out, marker):
            (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
            marker.update(score=score)
        tags = {
            "task": str(c.task.name),
            "method": method,
            "budget": str(c.budget),
            "selector": str(c.selector_model.name),
            "target": str(c.target_model.name),
            "seed": str(seed),
        }
        with tracker.stage_run("evaluate", key, tags, {}) as run:
            run.log_artifact(store.stage_dir("evaluate", key) / "samples.jsonl")
            selection_s = 0.01 if method == "random" else 60.0 * (1 + seed)
            selection_s *= 5 if method == "nuggets" else 1
            selection_s *= 0 if method == "zero_shot" else 1  # nothing selected
            run.log_metrics(
                {
                    "score": score,
                    "selection_s": selection_s,
                    "train_s": 100.0,
                    "eval_s": 10.0,
                    "full_train_s": 600.0,
                    "STR": selection_s / 600.0,
                    "peak_memory_mb": 1000.0,
                    "selection_precision": 0.7 if method == "random" else 0.9,
                }
            )
            run.set_tags({"full_train_s_source": "estimated", "metric": "exact_match"})
    return overrides


def report_of(
    tmp_path: Path, experiment: str, grid: tuple[str, ...], companions: bool = True
) -> Path:
    """Log `grid` (and its companions) as the pipeline would, report it (2,000 resamples) and
    return the folder the report wrote."""
    overrides = fake_sweep(tmp_path / "results", experiment, grid, companions=companions)
    out = tmp_path / "figures"
    assert main([experiment, *overrides, "--out-dir", str(out), "--resamples", "2000"]) == 0
    return out / experiment


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The whole grid logged, then reported once (10,000 resamples, the default)."""
    root = tmp_path_factory.mktemp("report")
    results, out = root / "results", root / "paper_figures"
    overrides = fake_sweep(results)
    # One cell's samples only in MLflow (not in the stage cache): the report must fetch them.
    first = sorted((results / "artifacts" / "evaluate").glob("*/samples.jsonl"))[0]
    first.unlink()
    assert main(["embedded_table2", *overrides, "--out-dir", str(out)]) == 0
    return {"root": root, "results": results, "out": out / "embedded_table2"}


def test_snapshot_holds_every_cell_with_metrics_and_per_example_scores(reported) -> None:
    runs = pd.read_csv(reported["results"] / "embedded_table2.csv")
    examples = pd.read_csv(reported["results"] / "embedded_table2_examples.csv")
    assert list(runs.columns) == snapshot.COLUMNS
    assert len(runs) == 8 and set(runs["role"]) == {"grid"}
    assert set(runs["method"]) == {"random", "data_whisperer"}
    assert sorted(runs["budget"].unique()) == [0.05, 0.1] and set(runs["seed"]) == {0, 1}
    assert (runs["n_examples"] == N_EVAL).all() and len(examples) == 8 * N_EVAL
    assert list(examples.columns) == ["cell", "example_id", "score"]
    dw = runs[(runs["method"] == "data_whisperer") & (runs["budget"] == 0.1)]
    assert (dw["score"] == 1.0).all() and (dw["attention_layer"] == 15).all()
    by_cell = examples.groupby("cell")["score"].mean()
    assert np.allclose(runs.set_index("cell")["score"], by_cell.reindex(runs["cell"]))
    assert runs["evaluate_key"].str.len().eq(16).all() and runs["run_id"].notna().all()


def test_table_cells_read_measured_mean_std_and_the_papers_number(reported) -> None:
    text = (reported["out"] / "table2.md").read_text()
    # Random 5%: seeds 0 and 1 score 33.33 and 50.00; the paper's Llama-3 GSM8K Random 5%.
    assert "| Random | 41.67 ± 11.79 (64.71) | 41.67 ± 11.79 (69.66) |" in text
    # DW 5% answers what Random answers: no mark; DW 10% is right everywhere: marked.
    assert "| Data Whisperer | 41.67 ± 11.79 (69.65) | 100.00 ± 0.00† (72.46) |" in text
    assert "Llama-3-8B-Instruct on GSM8K" in text and "SmolLM2-135M-Instruct" in text
    assert "4 of 4" not in text and "8 of 8 grid cells measured" in text
    tex = (reported["out"] / "table2.tex").read_text()
    assert r"100.00 $\pm$ 0.00$^\dagger$ (72.46)" in tex and r"\begin{tabular}" in tex


def test_bootstrap_csv_has_one_interval_per_method_and_budget(reported) -> None:
    intervals = pd.read_csv(reported["out"] / "bootstrap.csv").set_index("budget")
    assert list(intervals["method"]) == ["data_whisperer"] * 2
    same, better = intervals.loc[0.05], intervals.loc[0.1]
    assert (same["ci_low"], same["ci_high"], same["excludes_zero"]) == (0.0, 0.0, False)
    assert better["ci_low"] > 0 and better["excludes_zero"]
    assert better["difference"] == pytest.approx(100 - 125 / 3)  # 100 - mean(33.33, 50)
    assert (intervals["n_seeds"] == 2).all() and (intervals["n_examples"] == N_EVAL).all()


def test_figures_are_written_as_png_and_pdf(reported) -> None:
    for name in ("score_vs_budget", "str", "selection_precision"):
        for suffix in ("png", "pdf"):
            path = reported["out"] / f"{name}.{suffix}"
            assert path.is_file() and path.stat().st_size > 1000, path
    assert not (reported["out"] / "ablation.png").exists()  # no ablation in Table 2
    assert not (reported["out"] / "weak_to_strong.png").exists()  # no weaker selector


def test_rebuild_from_snapshot_alone_gives_identical_tables(reported, tmp_path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for name in ("embedded_table2.csv", "embedded_table2_examples.csv"):
        shutil.copy(reported["results"] / name, results / name)  # no MLflow, no stage cache
    overrides = [*GRID, SMALL_TASK, f"results_dir={results}"]
    out = tmp_path / "figures"
    assert main(["embedded_table2", *overrides, "--from-snapshot", "--out-dir", str(out)]) == 0
    assert not (results / "mlflow.db").exists()
    for name in ("table2.md", "table2.tex", "bootstrap.csv"):
        rebuilt = (out / "embedded_table2" / name).read_text()
        assert rebuilt == (reported["out"] / name).read_text(), name
    for name in ("score_vs_budget.png", "score_vs_budget.pdf", "str.pdf"):  # no timestamps
        rebuilt_figure = (out / "embedded_table2" / name).read_bytes()
        assert rebuilt_figure == (reported["out"] / name).read_bytes(), name


def test_missing_cells_fail_with_their_list_unless_allowed(tmp_path, capsys) -> None:
    overrides = fake_sweep(tmp_path / "results", skip=3)
    out = tmp_path / "figures"
    assert main(["embedded_table2", *overrides, "--out-dir", str(out)]) == 2
    printed = capsys.readouterr()
    assert "1 of 8 cells of embedded_table2 are missing" in printed.err
    assert "--allow-missing" in printed.err and "missing" in printed.out
    assert "7 of 8 grid cells found" in printed.out
    assert not (tmp_path / "results" / "embedded_table2.csv").exists()  # nothing frozen
    assert main(["embedded_table2", *overrides, "--allow-missing", "--out-dir", str(out)]) == 0
    assert len(pd.read_csv(tmp_path / "results" / "embedded_table2.csv")) == 7
    table = (out / "embedded_table2" / "table2.md").read_text()
    assert "7 of 8 grid cells measured" in table


def test_a_fresh_freeze_keeps_the_earlier_snapshots_cells_mlflow_lacks(
    reported, tmp_path, capsys
) -> None:
    """Another machine's store lacks one cell the committed snapshot holds: the cell stays."""
    results = tmp_path / "results"
    overrides = fake_sweep(results, skip=3)
    for name in ("embedded_table2.csv", "embedded_table2_examples.csv"):
        shutil.copy(reported["results"] / name, results / name)
    assert main(["embedded_table2", *overrides, "--out-dir", str(tmp_path / "out")]) == 0
    assert "1 cell(s) not in MLflow here kept from the earlier snapshot" in capsys.readouterr().out
    runs = pd.read_csv(results / "embedded_table2.csv")
    earlier = pd.read_csv(reported["results"] / "embedded_table2.csv")
    assert len(runs) == 8 and set(runs["cell"]) == set(earlier["cell"])
    assert len(pd.read_csv(results / "embedded_table2_examples.csv")) == 8 * N_EVAL
    table = (tmp_path / "out" / "embedded_table2" / "table2.md").read_text()
    assert "8 of 8 grid cells measured" in table


def test_an_empty_store_is_an_error_even_with_allow_missing(tmp_path, capsys) -> None:
    args = ["embedded_table2", *GRID, SMALL_TASK, f"results_dir={tmp_path}", "--allow-missing"]
    assert main([*args, "--out-dir", str(tmp_path / "out")]) == 2
    assert "nothing to report" in capsys.readouterr().err


def test_unknown_experiment_names_the_choices(capsys) -> None:
    assert main(["table9"]) == 2
    err = capsys.readouterr().err
    assert "Unknown experiment 'table9'" in err and "embedded_table2" in err
    assert main(["gsm8k_10pct"]) == 2
    assert "no paper table or figure" in capsys.readouterr().err


def test_ablation_table_has_randoms_column_layer_roles_and_a_heatmap(tmp_path) -> None:
    """embedded_table5 with Random from embedded_table2 (a companion), 10% only."""
    out = report_of(tmp_path, "embedded_table5", ("budget=0.1", "seed=0,1"))
    text = (out / "table5.md").read_text()
    header = "| Dataset | Budget | Random | w/o Attn | Layer 5 (shallow) | Layer 15 (intermediate) "
    assert header + "| Layer 28 (deep) |" in text
    random, unweighted, weighted = "41.67 ± 11.79", "41.67 ± 11.79", "100.00 ± 0.00†"
    row = f"| {random} (69.66) | {unweighted} (71.72) | {weighted} (71.25) | {weighted} (72.46) |"
    assert f"| embedded GSM8K-format | 10% {row} {weighted} (71.79) |" in text
    assert "Random: cells of a companion preset" in text
    for suffix in ("png", "pdf"):
        assert (out / f"ablation.{suffix}").stat().st_size > 1000
    snapshot_rows = pd.read_csv(tmp_path / "results" / "embedded_table5.csv")
    # 2 seeds x (w/o Attn + 3 layers) x both scorings (generate, likelihood)
    assert sorted(snapshot_rows["role"].value_counts().items()) == [("companion", 2), ("grid", 16)]


def test_table4_has_the_zero_shot_row_under_every_setting(tmp_path) -> None:
    """embedded_table4 with Random and the untuned model (6/30 right) as companions."""
    out = report_of(tmp_path, "embedded_table4", ("budget=0.1", "seed=0"))
    text = (out / "table4.md").read_text()
    assert "| Random | n_d=5, n_q=3 | n_d=10, n_q=5 | n_d=15, n_q=10 |" in text
    zero = "20.00 (57.49)"  # the paper's 0% row for Llama-3 GSM8K
    assert f"| embedded GSM8K-format | 0% (zero-shot) | {zero} | {zero} | {zero} | {zero} |" in text
    assert text.index("0% (zero-shot)") < text.index("| embedded GSM8K-format | 10% |")


def diffs(values: np.ndarray) -> pd.DataFrame:
    """A (seed x example) array of differences as the bootstrap's long frame, one group."""
    seeds, examples = np.indices(values.shape)
    return pd.DataFrame(
        {
            "group": 0.1,
            "seed": seeds.ravel(),
            "example_id": [f"e{i}" for i in examples.ravel()],
            "diff": values.ravel(),
        }
    )


def test_bootstrap_interval_of_identical_scores_is_zero_and_not_marked() -> None:
    interval = paired_interval(diffs(np.zeros((3, 50))))
    assert (interval.difference, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert not interval.excludes_zero


def test_bootstrap_interval_of_a_method_better_everywhere_excludes_zero() -> None:
    rng = np.random.default_rng(1)
    interval = paired_interval(diffs(rng.uniform(1, 5, (3, 50))))
    assert 0 < interval.low < interval.difference < interval.high and interval.excludes_zero


def test_bootstrap_interval_of_noise_covers_zero_and_is_reproducible() -> None:
    noise = diffs(np.random.default_rng(2).choice([-100.0, 0.0, 100.0], (3, 200)))
    first, second = paired_interval(noise, resamples=2000), paired_interval(noise, resamples=2000)
    assert first == second and first.low < 0 < first.high and not first.excludes_zero
    assert paired_interval(noise, resamples=2000, seed=1) != first


def test_mean_std_formatting() -> None:
    assert format_entry(Entry(41.6667, 11.7851, None)) == "41.67 ± 11.79 (–)"
    assert format_entry(Entry(50.0, None, None, mark="‡")) == "50.00‡ (–)"
    assert format_entry(Entry(None, None, None)) == "– (–)"
    assert format_entry(Entry(0.00031, 0.00002, None, ratio=True)) == "0.00031 ± 2e-05 (–)"
    assert format_entry(None) == ""


def cell(**fields: object) -> pd.Series:
    base = {
        "task": "gsm8k",
        "target": "llama3_8b_instruct",
        "selector": "llama3_8b_instruct",
        "method": "data_whisperer",
        "ablation": "",
        "budget": 0.01,
        "n_demos": 10,
        "n_queries": 5,
        "attention": "on",
        "layer_role": "",
    }
    return pd.Series({**base, **fields})


def test_paper_values_follow_table_setting_and_stand_ins() -> None:
    table2 = Paper("table2", embedded=False)
    assert table2.score(cell()).value == 62.57  # Table 2 as printed (an ablation's value)
    assert table2.score(cell()).caveat  # ... which its note says, so the cell gets a *
    assert table2.score(cell(budget=1.0, method="random")).value == 71.39  # whole dataset
    assert table2.score(cell(ablation="nd5_nq3")) is None  # ablated: not Table 2's number
    table4 = Paper("table4", embedded=False)
    assert table4.score(cell(ablation="nd5_nq3", n_demos=5, n_queries=3)).value == 62.57
    assert table4.score(cell(ablation="nd10_nq5")).value == 60.96  # the default config
    assert table4.score(cell(method="random")).value == 56.95  # from Table 2
    table5 = Paper("table5", embedded=False)
    assert table5.score(cell(ablation="layer30", layer_role="deep")).value == 62.30
    assert table5.score(cell(ablation="no_attention", attention="off")).value == 60.56
    w2s = cell(selector="qwen2_5_3b_instruct", target="qwen2_5_7b_instruct", budget=0.1)
    assert Paper("fig3", embedded=False).score(w2s).value == 84.2
    assert Paper("table6", embedded=False).str_ratio(w2s).value == 0.06
    embedded = cell(task="embedded_gsm", target="smollm2_135m", selector="smollm2_135m")
    assert Paper("table2", embedded=True).score(embedded.copy()).value == 62.57
    assert Paper("table2", embedded=True).score(cell(**{**embedded, "budget": 0.2})) is None
    assert Paper("table6", embedded=True).average(embedded).value == 64.21  # Qwen stands in


def test_table2_shows_the_zero_shot_and_whole_dataset_rows_of_its_companions(tmp_path) -> None:
    """Companion cells of table2_zero_shot (budget 0) and table2_reference (budget 1) become the
    paper's reference rows, beside its Llama-3 GSM8K numbers; neither gets a bootstrap interval."""
    grid = ("method=random,data_whisperer", "budget=0.1", "seed=0")
    out = report_of(tmp_path, "embedded_table2", grid)
    runs = pd.read_csv(tmp_path / "results" / "embedded_table2.csv")
    companions = runs[runs["role"] == "companion"].set_index("budget")
    assert sorted(companions.index) == [0.0, 1.0]
    assert companions.loc[0.0, "method"] == "zero_shot" and companions.loc[0.0, "STR"] == 0.0
    text, versus_random = (out / "table2.md").read_text().split("\n## Against Random")
    rows = text.splitlines()
    table = [line for line in rows if line.startswith("| ") and "Method" not in line][1:]
    assert table[0] == "| Zero-shot | 20.00 (57.49) |"  # 6/30; the paper's Llama-3 zero-shot
    assert table[-1] == "| Whole dataset | 33.33 (71.39) |"
    intervals = pd.read_csv(out / "bootstrap.csv")
    assert list(intervals["budget"]) == [0.1] and list(intervals["method"]) == ["data_whisperer"]
    # the report's own win / tie / loss: one setting, Data Whisperer against Random
    assert "| Data Whisperer | 1 | " in versus_random and "| Random | 1 | - |" in versus_random
    assert (out / "standing.png").is_file()


def test_the_whole_dataset_line_is_in_view_above_low_budget_scores() -> None:
    """Budgets all at 0 % and the whole dataset at 20 %: the y range must reach the line."""
    from dwbench.report import figures

    rows = [("Random", (0, 0), 0.1, 0.0), ("Data Whisperer", (1, 0), 0.1, 0.0)]
    rows.append((WHOLE, (99, 0), 1.0, 20.0))
    rows.append((ZERO_SHOT, (-1, 0), 0.0, 5.0))
    frame = pd.DataFrame(
        [
            {
                "variant": name,
                "variant_order": order,
                "budget": budget,
                "budget_label": f"{budget * 100:g}%",
                "score_pct": score,
                "score": score / 100,
                "task": "embedded_gsm",
                "target": "smollm2_135m",
                "metric": "exact_match_number",
            }
            for name, order, budget, score in rows
        ]
    )
    figure = figures.score_vs_budget(figures._labelled(frame), "table2")
    (ax,) = figure.axes
    low, high = ax.get_ylim()
    assert low <= 0.0 and high > 20.0
    styles = {line.get_linestyle(): list(line.get_ydata()) for line in ax.get_lines()}
    assert styles["--"] == [20.0, 20.0] and styles[":"] == [5.0, 5.0]  # whole data, zero-shot
    assert [t.get_text() for t in figure.legends[0].texts][-2:] == [
        "whole dataset",
        "zero-shot (untuned)",
    ]
    assert "0%" not in [t.get_text() for t in ax.get_xticklabels()]  # zero-shot is no budget


def test_heatmap_colour_range_stays_in_percent_and_spans_ten_points() -> None:
    from dwbench.report.figures import _colour_range

    assert _colour_range(pd.DataFrame({"10%": [0.0, 0.0]})) == {"vmin": 0.0, "vmax": 10.0}
    assert _colour_range(pd.DataFrame({"10%": [98.0, 99.0]})) == {"vmin": 90.0, "vmax": 100.0}
    assert _colour_range(pd.DataFrame({"5%": [20.0], "10%": [60.0]})) == {
        "vmin": 20.0,
        "vmax": 60.0,
    }


def test_str_table_has_the_speedup_over_nuggets_per_seed(tmp_path) -> None:
    """Nuggets takes 5x Data Whisperer's selection time under each seed: speedup 5.00 ± 0.00,
    beside the paper's Table 1 speedup for Llama-3-8B on GSM8K at 10% (7.41)."""
    grid = ("method=random,nuggets,data_whisperer", "budget=0.1", "seed=0,1")
    out = report_of(tmp_path, "embedded_table1", grid, companions=False)
    text = (out / "table1.md").read_text()
    assert "| Nuggets | 0.75 ± 0.35 (1.26) | 41.67 ± 11.79 (66.07) |" in text  # 300, 600 s / 600 s
    assert "| Data Whisperer | 0.15 ± 0.07 (0.17) | 100.00 ± 0.00† (68.14*) |" in text
    assert "| Speedup: Nuggets / Data Whisperer | 5.00 ± 0.00 (7.41) |  |" in text
    tex = (out / "table1.tex").read_text()
    assert r"Speedup: Nuggets / Data Whisperer & 5.00 $\pm$ 0.00 (7.41) &  \\" in tex


def test_latex_table_compiles_with_booktabs(reported, tmp_path) -> None:
    """The .tex is a whole table environment: caption (not "Table 2: Table 2"), label, tabular."""
    tex = reported["out"] / "table2.tex"
    text = tex.read_text()
    assert r"\caption{Score by selection method and budget (the paper's Table 2)." in text
    assert r"\label{tab:dwbench-table2}" in text
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed (Debian: texlive-latex-recommended)")
    document = tmp_path / "doc.tex"
    document.write_text(
        "\\documentclass{article}\n\\usepackage[utf8]{inputenc}\n\\usepackage{booktabs}\n"
        f"\\begin{{document}}\n\\input{{{tex}}}\n\\end{{document}}\n"
    )
    done = subprocess.run(
        ["pdflatex", "-halt-on-error", "-interaction=nonstopmode", document.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_oracle_is_a_reference_row_beside_whole_dataset() -> None:
    from dwbench.report.frame import variant

    ranks = {
        m: variant(cell(method=m, budget=0.1), "table2")[1]
        for m in ("random", "data_whisperer", "s2l", "oracle_clean")
    }
    whole = variant(cell(method="random", budget=1.0), "table2")[1]
    assert max(ranks["random"], ranks["data_whisperer"], ranks["s2l"]) < ranks["oracle_clean"]
    assert ranks["oracle_clean"] < whole
    assert variant(cell(method="oracle_clean", budget=0.1), "table2")[0] == "Oracle (clean only)"


def test_a_twin_on_another_setting_takes_its_own_reference_rows(tmp_path) -> None:
    """dialogsum_noise_table2 renders as Table 2 with its own whole-pool and zero-shot presets."""
    report = load_report_grid(
        "dialogsum_noise_table2",
        [f"task.path={tmp_path}", "method=random", "seed=0"],
        progress=False,
    )
    assert report.kind == "table2" and report.embedded  # the paper's numbers as stand-ins only
    assert sorted(s.name for s in report.companions) == [
        "dialogsum_noise_table2_reference",
        "dialogsum_noise_table2_zero_shot",
    ]
    budgets = sorted(float(c.cfg.budget) for s in report.companions for c in s.cells)
    assert budgets == [0.0, 1.0]
