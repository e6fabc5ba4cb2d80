"""dwbench/report/paper_reported.csv: the paper's numbers in tidy form, spot-checked by hand."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

CSV = Path(__file__).resolve().parents[1] / "dwbench" / "report" / "paper_reported.csv"
COLUMNS = ["table", "model", "task", "method", "budget", "metric", "value", "note"]
KEY = ["table", "model", "task", "method", "budget", "metric", "note"]
METHODS = {
    "random",
    "data_whisperer",
    "perplexity_low",
    "perplexity_middle",
    "perplexity_high",
    "el2n",
    "grand",
    "ccs",
    "nuggets",
    "staff",
    "less",
    "s2l",
    "full",
    "zero_shot",  # the paper's zero-shot rows (no fine-tuning, budget 0.0)
}
TARGETS = {"llama3_8b_instruct", "qwen2_5_7b_instruct", "mistral_nemo_instruct"}
WEAK_TO_STRONG = {
    "qwen2_5_3b_instruct->qwen2_5_7b_instruct",
    "mistral_7b_instruct_v0_2->mistral_nemo_instruct",
}
ROWS_PER_TABLE = {
    "table1": 72,
    "table2": 198,
    "table3": 63,
    "table4": 60,
    "table5": 45,
    "table6": 192,
    "fig3": 60,
}


@pytest.fixture(scope="module")
def paper() -> pd.DataFrame:
    return pd.read_csv(CSV)


def _value(
    paper: pd.DataFrame,
    table: str,
    model: str,
    task: str,
    method: str,
    budget: float | None,
    metric: str,
    note: str = "",
) -> float:
    rows = paper[
        (paper.table == table)
        & (paper.model == model)
        & (paper.task == task)
        & (paper.method == method)
        & (paper.metric == metric)
        & (paper.budget.isna() if budget is None else paper.budget.eq(budget))
        & paper.note.fillna("").str.contains(note, regex=False)
    ]
    assert len(rows) == 1, rows
    return float(rows.value.iloc[0])


def test_columns_and_dtypes(paper: pd.DataFrame) -> None:
    assert list(paper.columns) == COLUMNS
    for column in ["table", "model", "task", "method", "metric"]:
        assert not paper[column].isna().any(), column
        assert paper[column].map(type).eq(str).all(), column
    assert paper.budget.dtype == "float64"
    assert paper.value.dtype == "float64"
    assert paper.value.notna().all()
    assert paper.budget.dropna().between(0.0, 1.0).all()


def test_row_counts_and_unique_keys(paper: pd.DataFrame) -> None:
    assert paper.table.value_counts().to_dict() == ROWS_PER_TABLE
    keys = paper[KEY].fillna({"budget": -1.0, "note": ""})
    assert not keys.duplicated().any(), keys[keys.duplicated(keep=False)]


def test_names_follow_the_project(paper: pd.DataFrame) -> None:
    assert set(paper.method) <= METHODS
    assert set(paper.model) <= TARGETS | WEAK_TO_STRONG
    assert set(paper.task) <= {
        "gsm8k",
        "dialogsum",
        "bioinstruct",
        "dialogsum_synthetic",
        "average",
    }
    assert set(paper.metric) <= {"exact_match_pct", "rouge_l_pct", "str", "speedup_vs_nuggets"}
    assert (paper[paper.task == "gsm8k"].metric != "rouge_l_pct").all()
    assert not ((paper.model == "llama3_8b_instruct") & (paper.method == "staff")).any()


LLAMA, QWEN, NEMO = "llama3_8b_instruct", "qwen2_5_7b_instruct", "mistral_nemo_instruct"
QWEN_W2S = "qwen2_5_3b_instruct->qwen2_5_7b_instruct"
NEMO_W2S = "mistral_7b_instruct_v0_2->mistral_nemo_instruct"
DW, EM, RL = "data_whisperer", "exact_match_pct", "rouge_l_pct"


@pytest.mark.parametrize(
    ("table", "model", "task", "method", "budget", "metric", "note", "expected"),
    [
        # Table 2, the headline: Llama-3 GSM8K 10% DW vs random vs whole dataset
        ("table2", LLAMA, "gsm8k", DW, 0.1, EM, "", 72.46),
        ("table2", LLAMA, "gsm8k", "random", 0.1, EM, "", 69.66),
        ("table2", LLAMA, "gsm8k", "full", 1.0, EM, "", 71.39),
        ("table2", QWEN, "gsm8k", "zero_shot", 0.0, EM, "", 21.23),
        ("table2", QWEN, "dialogsum", "staff", 0.1, RL, "", 40.54),
        # Table 1: STR and speedup vs Nuggets, Llama-3 GSM8K 10%; DW's BioInstruct average
        ("table1", LLAMA, "gsm8k", DW, 0.1, "str", "", 0.17),
        ("table1", LLAMA, "gsm8k", DW, 0.1, "speedup_vs_nuggets", "", 7.41),
        ("table1", LLAMA, "bioinstruct", DW, None, RL, "", 36.46),
        # Table 3: synthetic DialogSum
        ("table3", QWEN, "dialogsum_synthetic", DW, 0.05, RL, "", 31.27),
        ("table3", NEMO, "dialogsum_synthetic", "full", 1.0, RL, "", 34.36),
        # Table 4 (n_d, n_q) and Table 5 (layer, attention weighting)
        ("table4", QWEN, "gsm8k", DW, 0.1, EM, "n_d=15 n_q=10", 85.03),
        ("table4", LLAMA, "gsm8k", DW, 0.01, EM, "n_d=10 n_q=5", 60.96),
        ("table5", LLAMA, "dialogsum", DW, 0.01, RL, "layer=30", 38.05),
        ("table5", LLAMA, "gsm8k", DW, 0.1, EM, "no attention weighting", 71.72),
        # Table 6: weak-to-strong STR (the 3.71 typo kept as printed), Nuggets, an average
        ("table6", QWEN_W2S, "bioinstruct", DW, 0.01, "str", "", 3.71),
        ("table6", NEMO, "bioinstruct", "nuggets", 0.1, "str", "", 5.36),
        ("table6", QWEN, "dialogsum", DW, None, RL, "", 38.97),
        ("table6", NEMO_W2S, "gsm8k", DW, 0.05, "speedup_vs_nuggets", "", 20.45),
        # Figure 3 (A.5): a bar read off the figure, and the legend's summary STR
        ("fig3", NEMO_W2S, "gsm8k", DW, 0.1, EM, "", 74.5),
        ("fig3", QWEN_W2S, "average", DW, None, "str", "", 0.14),
    ],
)
def test_values_typed_from_paper_md(
    paper: pd.DataFrame,
    table: str,
    model: str,
    task: str,
    method: str,
    budget: float | None,
    metric: str,
    note: str,
    expected: float,
) -> None:
    assert _value(paper, table, model, task, method, budget, metric, note) == pytest.approx(
        expected, abs=1e-9
    )


def test_budget_averages_match_table2_except_the_two_known_cells(paper: pd.DataFrame) -> None:
    """Table 1/6 "Avg. Score" is the mean of Table 2's 1/5/10% cells (the paper)."""
    table2 = paper[(paper.table == "table2") & paper.budget.isin([0.01, 0.05, 0.1])]
    means = table2.groupby(["model", "task", "method"]).value.mean()
    averages = paper[paper.table.isin(["table1", "table6"]) & paper.budget.isna()]
    off = []
    for row in averages.itertuples():
        if (row.model, row.task, row.method) in means.index:
            if abs(means[(row.model, row.task, row.method)] - row.value) > 0.011:
                off.append((row.model, row.task, row.method))
    assert sorted(off) == [
        ("llama3_8b_instruct", "bioinstruct", "data_whisperer"),
        ("llama3_8b_instruct", "gsm8k", "data_whisperer"),
    ]
