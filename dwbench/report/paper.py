"""Which of the paper's numbers (`paper_reported.csv`, beside this module) stands beside which cell.

A cell matches the paper row of the same table, target model (`<selector>-><target>` when a
weaker model selects), task, method and budget; the whole-dataset run (budget 1.0) is the
paper's `full` row. Ablation cells match by setting: Table 4 by (n_d, n_q), Table 5 by the
layer's role among the experiment's layers (`frame.layer_roles`: shallow / intermediate / deep,
the paper's layers 5 / 13 / 30, SmolLM2's 5 / 15 / 28) or "w/o Attn". A cell without an
ablation that the table itself lacks (Random in Table 4, Figure 3's Random) takes Table 2's
number of the same setting.

The paper has no numbers for the embedded setting (SmolLM2-135M on the embedded GSM8K-format
task). Beside an embedded cell stands the paper's cell of the same method and budget for GSM8K
with the paper's main model of that table: Llama-3-8B-Instruct (Tables 1-5), Qwen-2.5-7B-Instruct
(Table 6, Figure 3). Budgets the paper did not run (20%) get none. Captions say so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dwbench.errors import DataError

PAPER_CSV = Path(__file__).resolve().parent / "paper_reported.csv"  # installed with the package
SCORE_METRICS = ("exact_match_pct", "rouge_l_pct")
PAPER_MODELS = ("llama3_8b_instruct", "qwen2_5_7b_instruct", "mistral_nemo_instruct")
MODEL_LABELS = {
    "llama3_8b_instruct": "Llama-3-8B-Instruct",
    "qwen2_5_7b_instruct": "Qwen-2.5-7B-Instruct",
    "qwen2_5_3b_instruct": "Qwen-2.5-3B-Instruct",
    "mistral_nemo_instruct": "Mistral-Nemo-Instruct-2407",
    "mistral_7b_instruct_v0_2": "Mistral-7B-Instruct-v0.2",
    "smollm2_135m": "SmolLM2-135M-Instruct",
}
TASK_LABELS = {
    "gsm8k": "GSM8K",
    "dialogsum": "DialogSum",
    "bioinstruct": "BioInstruct",
    "dialogsum_synthetic": "synthetic DialogSum",
    "embedded_gsm": "embedded GSM8K-format",
}
EMBEDDED_TASKS = {"embedded_gsm": "gsm8k"}  # embedded task -> the paper task of its format
# Paper notes that qualify the number itself (the paper): such cells get a footnote.
CAVEATS = (
    "default config gives",
    "Table 2 mean is",
    "likely typo",
    "looks like default-config value",
    "approximate",
)


def model_label(name: str) -> str:
    """Display name; a weak-to-strong pair `<selector>-><target>` reads "S selecting for T"."""
    if "->" in name:
        selector, target = name.split("->", 1)
        return f"{model_label(selector)} selecting for {model_label(target)}"
    return MODEL_LABELS.get(name, name)


def task_label(name: str) -> str:
    return TASK_LABELS.get(name, name)


def table_label(table: str) -> str:
    """table2 -> Table 2, fig3 -> Figure 3."""
    return table.replace("table", "Table ").replace("fig", "Figure ")


def stand_in_model(kind: str) -> str:
    """The paper model whose numbers stand beside an embedded model's in a table of this kind."""
    return "qwen2_5_7b_instruct" if kind in ("table6", "fig3") else "llama3_8b_instruct"


@dataclass(frozen=True)
class PaperValue:
    value: float
    table: str
    model: str
    task: str
    note: str

    @property
    def caveat(self) -> bool:
        return any(c in self.note for c in CAVEATS)


class Paper:
    """Lookups into paper_reported.csv for one report; remembers what it used, for captions."""

    def __init__(self, kind: str, embedded: bool, path: Path = PAPER_CSV) -> None:
        if not path.is_file():
            raise DataError(
                f"{path} does not exist: the paper's numbers ship with the repository "
                "(dwbench/report/paper_reported.csv); pass --paper with its location."
            )
        self.frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
        self.frame["note"] = self.frame["note"].fillna("")
        self.kind = kind
        self.embedded = embedded
        self.used: set[tuple[str, str, str]] = set()  # (table, paper model, paper task)

    def model(self, target: str, selector: str) -> str:
        """The paper's model column for a cell (its stand-in in an embedded report)."""
        if self.embedded and target not in PAPER_MODELS:
            return stand_in_model(self.kind) if selector == target else ""
        return target if selector == target else f"{selector}->{target}"

    def task(self, task: str) -> str:
        return EMBEDDED_TASKS.get(task, task) if self.embedded else task

    def score(self, row: pd.Series) -> PaperValue | None:
        """The paper's score for the cell `row` describes (method, setting, budget)."""
        method = {1.0: "full", 0.0: "zero_shot"}.get(float(row["budget"]), row["method"])
        tables = [self.kind]
        if not row["ablation"] and self.kind != "table2":
            tables.append("table2")
        for table in tables:
            note = self._note_pattern(table, row)
            if row["ablation"] and note is None:
                continue  # an ablated cell matches only its ablation table's setting
            found = self._find(table, row, method, row["budget"], SCORE_METRICS, note)
            if found is not None:
                return found
        return None

    def str_ratio(self, row: pd.Series) -> PaperValue | None:
        """The paper's STR of the cell (Tables 1 and 6 print it per budget)."""
        if row["ablation"]:
            return None
        return self._find(self.kind, row, row["method"], row["budget"], ("str",), None)

    def speedup(self, row: pd.Series, budget: float) -> PaperValue | None:
        """Tables 1 and 6's "Speedup vs Nuggets" of the Data Whisperer cell `row` describes."""
        return self._find(self.kind, row, "data_whisperer", budget, ("speedup_vs_nuggets",), None)

    def average(self, row: pd.Series) -> PaperValue | None:
        """Tables 1 and 6's "Avg. Score": the mean over the 1/5/10% budgets."""
        if row["ablation"]:
            return None
        return self._find(self.kind, row, row["method"], None, SCORE_METRICS, None)

    def _note_pattern(self, table: str, row: pd.Series) -> str | None:
        """The note that names this cell's ablation setting in Table 4 or 5."""
        if row["method"] != "data_whisperer" or not row["ablation"]:
            return None
        if table == "table4":
            return rf"^n_d={int(row['n_demos'])} n_q={int(row['n_queries'])}\b"
        if table == "table5":
            if row["attention"] == "off":
                return r"^no attention weighting"
            if row.get("layer_role"):
                return rf"\({row['layer_role']}\b"
        return None

    def _find(
        self,
        table: str,
        row: pd.Series,
        method: str,
        budget: float | None,
        metrics: tuple[str, ...],
        note: str | None,
    ) -> PaperValue | None:
        model, task = self.model(row["target"], row["selector"]), self.task(row["task"])
        frame = self.frame
        hits = frame[
            (frame["table"] == table)
            & (frame["model"] == model)
            & (frame["task"] == task)
            & (frame["method"] == method)
            & frame["metric"].isin(metrics)
        ]
        if budget is None:
            hits = hits[hits["budget"].isna()]
        else:
            hits = hits[np.isclose(hits["budget"].astype(float), float(budget))]
        if note is not None:
            hits = hits[hits["note"].map(lambda text: re.search(note, text) is not None)]
        if len(hits) != 1:
            return None
        hit = hits.iloc[0]
        self.used.add((table, model, task))
        return PaperValue(float(hit["value"]), table, model, task, str(hit["note"]))

    def source_text(self, measured_models: list[str], measured_tasks: list[str]) -> str:
        """A caption sentence: where the parenthesised numbers come from."""
        if not self.used:
            return "The paper has no number for any of these cells: every parenthesis is –."
        tables = sorted(
            {
                table.replace("table", "Table ").replace("fig3", "Figure 3")
                for table, _, _ in self.used
            }
        )
        if not self.embedded:
            return (
                f"In parentheses: the paper's number for the same cell ({', '.join(tables)}); "
                "– where the paper has none."
            )
        settings = sorted({f"{model_label(m)} on {task_label(t)}" for _, m, t in self.used})
        measured = ", ".join(model_label(m) for m in measured_models)
        on = ", ".join(task_label(t) for t in measured_tasks)
        return (
            f"The paper has no numbers for {measured} on {on}. In parentheses, for "
            f"orientation only: the paper's {'; '.join(settings)} ({', '.join(tables)}) at the "
            "same method, setting and budget; – where the paper has no such cell (e.g. a budget "
            "it did not run). Different model, data and scale: compare trends, not values."
        )
