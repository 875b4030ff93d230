"""A ``tables.Table`` as Markdown, LaTeX, CSV or HTML text.

Accuracies print with two decimals, seconds with three significant digits; a mean over several
seeds prints as "mean ± std"; a missing figure as "–". Markdown and LaTeX bold the best
figures and end with the table's notes (sources); CSV has one column per figure plus a
``<column>_std`` column, no marking and no notes. HTML is a ``<table>`` fragment (the report
page styles it): best figures in ``<b class="best">``, the title as its caption, the notes in a
list after it.
"""
from __future__ import annotations

import csv
import io
from html import escape

from .reference import Value
from .tables import Table

FORMATS = ("md", "latex", "csv", "html")
MISSING = "–"
TEXT_METRICS = ("cite", "seeds", "per_seed", "against")  # columns of text, never numbers


def render(table: Table, form: str) -> str:
    if form not in FORMATS:
        raise ValueError(f"unknown table format {form!r}; use one of {', '.join(FORMATS)}")
    return {"md": markdown, "latex": latex, "csv": as_csv, "html": as_html}[form](table)


def _number(value: float, unit: str) -> str:
    return f"{value:.2f}" if unit == "%" else f"{value:.3g}"


def cell_text(value: Value | None, unit: str, plus_minus: str = "±") -> str:
    if value is None or (value.text is None and value.mean is None):
        return MISSING
    if value.text is not None:
        return value.text
    text = _number(value.mean, unit)
    return f"{text} {plus_minus} {_number(value.std, unit)}" if value.std is not None else text


def _grid(table: Table, bold, plus_minus: str = "±", escape=lambda text: text) -> list[list[str]]:
    """Rows of cell strings: setting (first row of its group only), method, then the columns."""
    grid, previous = [], None
    for number, row in enumerate(table.rows):
        cells = [escape(row.setting) if row.setting != previous else "", escape(row.method_name)]
        for column in table.columns:
            value = row.cells.get(column.key)
            if value is not None and value.mean is not None:  # a number: its markup (plus_minus) stays as is
                text = cell_text(value, table.unit, plus_minus)
            else:
                text = escape(cell_text(value, table.unit))
            cells.append(bold(text) if (number, column.key) in table.best else text)
        grid.append(cells)
        previous = row.setting
    return grid


def markdown(table: Table) -> str:
    header = ["Setting", "Method", *(column.header for column in table.columns)]
    lines = [f"**{table.title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines += ["| " + " | ".join(cells) + " |" for cells in _grid(table, lambda text: f"**{text}**", escape=escape)]
    if table.notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for char, replacement in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                              ("$", r"\$"), ("{", r"\{"), ("}", r"\}"), ("≈", r"$\approx$")):
        text = text.replace(char, replacement)
    return text


def latex(table: Table) -> str:
    header = ["Setting", "Method", *(column.header for column in table.columns)]
    lines = [f"% {table.title}", r"\begin{tabular}{ll" + "r" * len(table.columns) + "}", r"\toprule",
             " & ".join(_latex_escape(text) for text in header) + r" \\", r"\midrule"]
    grid = _grid(table, lambda text: rf"\textbf{{{text}}}", plus_minus=r"$\pm$", escape=_latex_escape)
    for number, cells in enumerate(grid):
        if number and cells[0]:
            lines.append(r"\midrule")
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        lines += [r"\par\smallskip\footnotesize", " ".join(_latex_escape(note) for note in table.notes)]
    return "\n".join(lines) + "\n"


def as_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    numeric = [column for column in table.columns if column.metric not in TEXT_METRICS]
    header = ["setting", "method"]
    for column in table.columns:
        header += [column.key, f"{column.key}_std"] if column in numeric else [column.key]
    writer.writerow(header)
    for row in table.rows:
        cells = [row.setting, row.method]
        for column in table.columns:
            value = row.cells.get(column.key)
            if column not in numeric:
                cells.append("" if value is None or value.text is None else value.text)
                continue
            cells += _csv_number(value)
        writer.writerow(cells)
    return buffer.getvalue()


def _csv_number(value: Value | None) -> list:
    """[mean or text, std] of a figure, empty strings where there is none."""
    if value is None:
        return ["", ""]
    if value.text is not None:
        return [value.text, ""]
    return ["" if value.mean is None else value.mean, "" if value.std is None else value.std]


def as_html(table: Table) -> str:
    header = ["Setting", "Method", *(column.header for column in table.columns)]
    lines = ['<table class="results">', f"<caption>{escape(table.title)}</caption>",
             "<thead><tr>" + "".join(f"<th>{escape(text)}</th>" for text in header) + "</tr></thead>", "<tbody>"]
    for cells in _grid(table, lambda text: f'<b class="best">{text}</b>', escape=escape):
        lines.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    lines.append("</tbody></table>")
    if table.notes:
        lines.append('<ul class="notes">' + "".join(f"<li>{escape(note)}</li>" for note in table.notes) + "</ul>")
    return "\n".join(lines) + "\n"
