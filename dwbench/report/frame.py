"""The one frame tables and figures draw from: every cell of the report (from the grid, so a
missing cell keeps its place) joined with the snapshot's measurements, plus display labels."""

from __future__ import annotations

import pandas as pd

from dwbench.report.paper import model_label
from dwbench.report.snapshot import MEASURED

METHOD_LABELS = {
    "random": "Random",
    "oracle_clean": "Oracle (clean only)",
    "grand": "GraNd",
    "el2n": "EL2N",
    "ccs": "CCS",
    "nuggets": "Nuggets",
    "staff": "STAFF",
    "data_whisperer": "Data Whisperer",
    "data_whisperer_likelihood": "Data Whisperer (likelihood)",
    "data_whisperer_separate": "Data Whisperer (separate)",
    "one_shot_gain": "One-shot gain",
    "one_shot_gain_16q": "One-shot gain (16 queries)",
    # their names before the rename, in snapshots committed then
    "data_whisperer_one_shot": "One-shot gain",
    "data_whisperer_one_shot_16q": "One-shot gain (16 queries)",
    "perplexity_low": "Perplexity (low)",
    "perplexity_middle": "Perplexity (middle)",
    "perplexity_high": "Perplexity (high)",
    "less": "LESS",
    "s2l": "S2L",
    "rds_plus": "RDS+",
    "ifd": "IFD",
    "length_longest": "Longest response",
    "length_shortest": "Shortest response",
    "format_rules": "Format rules",
}
# rows that bound the task, listed with Whole dataset: the oracle reads the labels, format rules
# show what the answers' form alone gives away
REFERENCE_METHODS = ("oracle_clean", "format_rules")
DATA_WHISPERERS = ("data_whisperer", "data_whisperer_likelihood")  # ablated in Tables 4 and 5
METHOD_ORDER = list(METHOD_LABELS)  # the paper's row order, then the baselines it did not run
TASK_ORDER = ["gsm8k", "dialogsum", "bioinstruct", "dialogsum_synthetic", "embedded_gsm"]
MODEL_ORDER = ["llama3_8b_instruct", "qwen2_5_7b_instruct", "mistral_nemo_instruct"]
LAYER_ROLES = ("shallow", "intermediate", "deep")
WHOLE = "Whole dataset"
ZERO_SHOT = "Zero-shot"
METRIC_LABELS = {"exact_match_number": "exact match (%)", "rouge_l": "ROUGE-L (%)"}


def build(cells: pd.DataFrame, measured: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Grid descriptors left-joined with measurements by cell key, with labels for display."""
    frame = cells.merge(measured[["cell", *MEASURED]], on="cell", how="left")
    frame["score_pct"] = frame["score"] * 100
    frame["precision_pct"] = frame["selection_precision"] * 100
    frame["budget_label"] = frame["budget"].map(budget_label)
    weighting = frame["attention_weighting"]
    frame["attention"] = weighting.map(
        lambda v: "" if v is None or pd.isna(v) else "on" if v else "off"
    )
    frame["layer_role"] = layer_roles(frame)
    labels = frame.apply(lambda row: variant(row, kind), axis=1, result_type="expand")
    frame["variant"], frame["variant_order"] = labels[0], labels[1]
    return frame


def selected_budget(budgets: pd.Series) -> pd.Series:
    """Cells that select a subset: not the zero-shot (0) or whole-dataset (1) reference rows."""
    return (budgets > 0.0) & (budgets < 1.0)


def budget_label(budget: float) -> str:
    return f"{budget * 100:g}%"


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, f"{metric} (%)")


def layer_roles(frame: pd.DataFrame) -> pd.Series:
    """shallow / intermediate / deep for attention-weighted Data Whisperer cells, by the layer's
    rank among the experiment's three layers (Table 5's design); "" for every other cell."""
    weighted = frame["method"].isin(DATA_WHISPERERS) & (frame["attention"] == "on")
    weighted &= frame["ablation"] != ""
    layers = sorted(frame.loc[weighted, "attention_layer"].dropna().unique())
    roles = dict(zip(layers, LAYER_ROLES, strict=True)) if len(layers) == 3 else {}
    return frame["attention_layer"].map(roles).where(weighted, "").fillna("")


def variant(row: pd.Series, kind: str) -> tuple[str, tuple]:
    """A cell's row (or column) label within its table, and where it sorts: (method rank,
    numeric setting, textual setting, weak-to-strong)."""
    if row["budget"] >= 1.0:
        return WHOLE, (len(METHOD_ORDER) + 1, 0, 0, "", 0)
    if row["budget"] <= 0.0:
        return ZERO_SHOT, (-1, 0, 0, "", 0)
    method = row["method"]
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    if method in REFERENCE_METHODS:  # a reference row, beside Whole dataset, not a competitor
        rank = len(METHOD_ORDER) + 0.5
    label = METHOD_LABELS.get(method, method)
    setting: tuple = (0, 0, "")
    if row["ablation"]:
        scoring = " (likelihood)" if method == "data_whisperer_likelihood" else ""
        if kind == "table4" and method in DATA_WHISPERERS:
            n_demos, n_queries = int(row["n_demos"]), int(row["n_queries"])
            label = f"n_d={n_demos}, n_q={n_queries}{scoring}"
            setting = (n_demos, n_queries, "")
        elif kind == "table5" and row["attention"] == "off":
            label, setting = f"w/o Attn{scoring}", (-1, 0, "")
        elif kind == "table5" and method in DATA_WHISPERERS:
            layer = int(row["attention_layer"])
            role = f" ({row['layer_role']})" if row["layer_role"] else ""
            label, setting = f"Layer {layer}{role}{scoring}", (layer, 0, "")
        else:
            label, setting = f"{label} [{row['ablation']}]", (0, 0, row["ablation"])
    weaker = int(row["selector"] != row["target"])
    if weaker:
        label = f"{label} (w2s: {model_label(row['selector'])})"
    return label, (rank, *setting, weaker)


def sort_values(values: list[str], order: list[str]) -> list[str]:
    """Known names in the paper's order, then the rest alphabetically."""
    return sorted(values, key=lambda v: (order.index(v) if v in order else len(order), v))


def variants(frame: pd.DataFrame) -> list[str]:
    """The frame's variant labels in table order."""
    pairs = frame[["variant", "variant_order"]].drop_duplicates("variant")
    return [v for v, _ in sorted(pairs.itertuples(index=False), key=lambda p: (p[1], p[0]))]
