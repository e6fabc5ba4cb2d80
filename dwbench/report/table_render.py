"""A built paper table (entries in blocks) and its two renderings, Markdown and LaTeX.

Both formats print the same `Entry` the same way ("measured (paper)", with the bootstrap mark),
so the .md and .tex of a report can never disagree; tables.py decides what goes in a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dwbench.report.bootstrap import ABOVE, BELOW
from dwbench.report.paper import PaperValue


@dataclass
class Entry:
    mean: float | None
    std: float | None
    paper: PaperValue | None
    mark: str = ""
    ratio: bool = False  # an STR (a ratio), not a score in %


@dataclass
class Block:
    title: str
    row_header: list[str]
    groups: list[str]  # column group of each data column ("" when the block has none)
    columns: list[str]
    rows: list[tuple[list[str], list[Entry | None]]] = field(default_factory=list)


@dataclass
class Table:
    name: str
    title: str
    caption: list[str]
    blocks: list[Block]
    footnotes: list[str]


def _number(value: float, ratio: bool) -> str:
    """Two decimals, as the paper prints; two significant digits for ratios below 0.01."""
    if ratio and abs(value) < 0.01 and value != 0:
        return f"{value:.2g}"
    return f"{value:.2f}"


def format_entry(entry: Entry | None, tex: bool = False) -> str:
    """ "measured (paper)", e.g. "45.00 ± 3.33† (69.65)"; empty for a blank cell."""
    if entry is None:
        return ""
    dash = "--" if tex else "–"
    if entry.mean is None:
        measured = dash
    else:
        measured = _number(entry.mean, entry.ratio)
        if entry.std is not None:
            measured += (r" $\pm$ " if tex else " ± ") + _number(entry.std, entry.ratio)
        if entry.mark:
            measured += _tex_symbol(entry.mark) if tex else entry.mark
    if entry.paper is None:
        paper = dash
    else:
        paper = _number(entry.paper.value, entry.ratio)
        if entry.paper.caveat:
            paper += "$^*$" if tex else "*"
    return f"{measured} ({paper})"


def _tex_symbol(symbol: str) -> str:
    return {ABOVE: r"$^\dagger$", BELOW: r"$^\ddagger$"}[symbol]


def tex_escape(text: str) -> str:
    """Plain text (labels, captions, notes) as LaTeX: specials escaped, symbols as math."""
    for plain, escaped in (
        ("\\", r"\textbackslash{}"),
        ("$", r"\$"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("#", r"\#"),
        ("~", r"\textasciitilde{}"),
        ("±", r"$\pm$"),
        ("–", "--"),
        (ABOVE, r"$^\dagger$"),
        (BELOW, r"$^\ddagger$"),
    ):
        text = text.replace(plain, escaped)
    return text


def to_markdown(table: Table) -> str:
    lines = [f"## {table.title}", "", " ".join(table.caption), ""]
    for block in table.blocks:
        header = [*block.row_header] + [
            f"{g} {c}".strip() for g, c in zip(block.groups, block.columns, strict=True)
        ]
        lines += [f"### {block.title}", ""]
        lines.append("| " + " | ".join(header) + " |")
        rule = ["---"] * len(block.row_header) + ["---:"] * len(block.columns)
        lines.append("| " + " | ".join(rule) + " |")
        for labels, entries in block.rows:
            cells = [*labels, *(format_entry(e) for e in entries)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"- {note}" for note in table.footnotes]
    return "\n".join(lines) + "\n"


def to_latex(table: Table) -> str:
    """One table environment (booktabs), a tabular per target model; \\usepackage{booktabs}."""
    # LaTeX numbers the table itself: the caption says which of the paper's it reproduces.
    source, _, description = table.title.partition(": ")
    caption = tex_escape(
        f"{description[:1].upper()}{description[1:]} (the paper's {source}). "
        + " ".join(table.caption)
    )
    lines = [r"\begin{table*}[t]", r"\centering", r"\scriptsize", rf"\caption{{{caption}}}"]
    lines.append(rf"\label{{tab:dwbench-{table.name}}}")
    for block in table.blocks:
        n_labels = len(block.row_header)
        spec = "l" * n_labels + "r" * len(block.columns)
        lines += [
            rf"\par\medskip\textbf{{{tex_escape(block.title)}}}\par\smallskip",
            rf"\begin{{tabular}}{{{spec}}}",
            r"\toprule",
        ]
        if any(block.groups):
            lines += _tex_group_header(block, n_labels)
        header = [tex_escape(h) for h in block.row_header] + [tex_escape(c) for c in block.columns]
        lines += [" & ".join(header) + r" \\", r"\midrule"]
        for labels, entries in block.rows:
            cells = [tex_escape(label) for label in labels]
            cells += [format_entry(e, tex=True) for e in entries]
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
    lines.append(r"\par\smallskip\raggedright")
    lines += [_tex_note(note) + r"\\" for note in table.footnotes]
    lines.append(r"\end{table*}")
    return "\n".join(lines) + "\n"


def _tex_note(note: str) -> str:
    """A footnote line; a leading * (a caveat on a paper number) becomes a superscript."""
    if note.startswith("* "):
        return "$^*$ " + tex_escape(note[2:])
    return tex_escape(note)


def _tex_group_header(block: Block, n_labels: int) -> list[str]:
    """A \\multicolumn per run of equal column groups, with \\cmidrule under each."""
    spans: list[tuple[str, int, int]] = []
    for index, group in enumerate(block.groups):
        column = n_labels + index + 1
        if spans and spans[-1][0] == group:
            spans[-1] = (group, spans[-1][1], column)
        else:
            spans.append((group, column, column))
    cells = [""] * n_labels + [
        rf"\multicolumn{{{end - start + 1}}}{{c}}{{{tex_escape(group)}}}"
        for group, start, end in spans
    ]
    rules = " ".join(rf"\cmidrule(lr){{{start}-{end}}}" for _, start, end in spans)
    return [" & ".join(cells) + r" \\", rules]
