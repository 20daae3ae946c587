"""Paper tables as data, written as Markdown, CSV and LaTeX (booktabs), with the best value per column in bold.

A :class:`Table` holds row labels and, per metric column, one :class:`Cell` per row: the value that ranks the
row, and an optional spread (± std over seeds) or interval ([low, high], a bootstrap CI), and the p-value of a
paired test against the table's reference row (shown as a mark: ``*`` p < 0.05, ``**`` p < 0.01,
:func:`experiments.stats.mark`; the table's ``legend`` says which test). Which way is better is declared per column
(deletion AUC: lower). A missing value is shown as "—" and never ranked; ties are all bold. CSV keeps full
precision and separate low/high/std columns (for plotting), and p / pairs / mark columns when the table has tests;
Markdown and LaTeX are for reading, with the legend under the table.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape as html_escape

from .stats import mark


@dataclass(frozen=True)
class Cell:
    """A value with an optional std (over seeds) or interval (low, high), and the p-value of its paired test against
    the table's reference row over ``pairs`` paired values (None: not tested)."""

    value: float | None
    std: float | None = None
    low: float | None = None
    high: float | None = None
    p: float | None = None
    pairs: int | None = None

    @property
    def mark(self) -> str:
        return mark(self.p)

    @property
    def missing(self) -> bool:
        return self.value is None or (isinstance(self.value, float) and math.isnan(self.value))

    def text(self, digits: int) -> str:
        if self.missing:
            return "—"
        s = f"{self.value:.{digits}f}"
        if self.std is not None:
            s += " ± " + ("n/a" if math.isnan(self.std) else f"{self.std:.{digits}f}")
        if self.low is not None and self.high is not None:
            s += f" [{self.low:.{digits}f}, {self.high:.{digits}f}]"
        return s


@dataclass
class Column:
    """``higher_is_better``: True (↑, the largest is bold), False (↓, the smallest), None (neither: a count, the
    model's own score, a value that is read rather than ranked — no arrow, nothing bold)."""

    name: str
    higher_is_better: bool | None = True

    @property
    def arrow(self) -> str:
        return "" if self.higher_is_better is None else " ↑" if self.higher_is_better else " ↓"


@dataclass
class Table:
    """``rows``: labels; ``columns``: metrics; ``cells[r][c]``: a :class:`Cell`."""

    title: str
    rows: list[str]
    columns: list[Column]
    cells: list[list[Cell]] = field(default_factory=list)
    digits: int = 3
    label_header: str = "method"
    legend: str = ""  # under the table: what the marks mean (which test, how many pairs, over how many seeds)

    def __post_init__(self) -> None:
        if len(self.cells) != len(self.rows) or any(len(r) != len(self.columns) for r in self.cells):
            raise ValueError(f"table {self.title!r}: cells must be {len(self.rows)} rows x {len(self.columns)} columns")

    def best(self) -> list[set[int]]:
        """Per column, the row indices holding the best value (compared at the printed precision)."""
        out = []
        for c, col in enumerate(self.columns):
            vals = {
                r: round(float(self.cells[r][c].value), self.digits)
                for r in range(len(self.rows))
                if not self.cells[r][c].missing
            }
            if not vals or col.higher_is_better is None:
                out.append(set())
                continue
            target = max(vals.values()) if col.higher_is_better else min(vals.values())
            out.append({r for r, v in vals.items() if v == target})
        return out

    @property
    def tested(self) -> bool:
        """Whether any cell carries a paired test (the CSV then has p / pairs / mark columns)."""
        return any(cell.p is not None for row in self.cells for cell in row)

    def markdown(self) -> str:
        best = self.best()
        arrows = [f"{c.name}{c.arrow}" for c in self.columns]
        lines = ["| " + " | ".join([self.label_header, *arrows]) + " |", "|" + "---|" * (len(self.columns) + 1)]
        for r, label in enumerate(self.rows):
            cells = []
            for c in range(len(self.columns)):
                cell = self.cells[r][c]
                t = cell.text(self.digits)
                t = f"**{t}**" if r in best[c] else t
                cells.append(t + (" " + cell.mark.replace("*", "\\*") if cell.mark else ""))  # "*" escaped: not bold
            lines.append("| " + " | ".join([label, *cells]) + " |")
        if self.legend:
            lines += ["", self.legend]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        head = [self.label_header]
        tested = self.tested
        for c in self.columns:
            head += [c.name, f"{c.name}_std", f"{c.name}_low", f"{c.name}_high"]
            head += [f"{c.name}_p", f"{c.name}_pairs", f"{c.name}_mark"] if tested else []
        w.writerow(head)
        for r, label in enumerate(self.rows):
            row: list[object] = [label]
            for cell in self.cells[r]:
                row += ["" if v is None else repr(float(v)) for v in (cell.value, cell.std, cell.low, cell.high)]
                if tested:
                    row += ["" if cell.p is None else repr(float(cell.p)), "" if cell.pairs is None else cell.pairs,
                            cell.mark]  # fmt: skip
            w.writerow(row)
        return buf.getvalue()

    def html(self) -> str:
        """An HTML <table> (escaped; best values in <b>), for the self-contained report."""
        best = self.best()
        esc = html_escape
        arrows = [f"{esc(c.name)}{c.arrow}" for c in self.columns]
        head = "".join(f"<th>{h}</th>" for h in [esc(self.label_header), *arrows])
        rows = []
        for r, label in enumerate(self.rows):
            cells = []
            for c in range(len(self.columns)):
                cell = self.cells[r][c]
                t = esc(cell.text(self.digits))
                t = f"<b>{t}</b>" if r in best[c] else t
                cells.append(f"<td>{t}<sup>{cell.mark}</sup></td>" if cell.mark else f"<td>{t}</td>")
            rows.append(f"<tr><th scope='row'>{esc(label)}</th>{''.join(cells)}</tr>")
        legend = f"<p class='legend'>{esc(self.legend)}</p>" if self.legend else ""
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{legend}\n"

    def latex(self) -> str:
        best = self.best()
        esc = _latex_escape
        cols = "l" + "c" * len(self.columns)
        head = " & ".join(
            [esc(self.label_header)]
            + [
                f"{esc(c.name)}"
                + ("" if c.higher_is_better is None else f" $\\{'uparrow' if c.higher_is_better else 'downarrow'}$")
                for c in self.columns
            ]
        )
        lines = [f"\\begin{{tabular}}{{{cols}}}", "\\toprule", head + " \\\\", "\\midrule"]
        for r, label in enumerate(self.rows):
            cells = []
            for c in range(len(self.columns)):
                cell = self.cells[r][c]
                t = esc(cell.text(self.digits)).replace("±", "$\\pm$")
                t = f"\\textbf{{{t}}}" if r in best[c] else t
                cells.append(t + (f"$^{{{cell.mark}}}$" if cell.mark else ""))
            lines.append(" & ".join([esc(label), *cells]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        lines += [f"% {line}" for line in esc(self.legend).splitlines()]  # the legend, for the caption
        return "\n".join(lines) + "\n"


def _latex_escape(s: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"), ("—", "--")):
        s = s.replace(a, b)
    return s


def column_values(table: Table, name: str) -> Sequence[float | None]:
    """The values of column ``name`` (None where missing)."""
    c = [col.name for col in table.columns].index(name)
    return [None if row[c].missing else row[c].value for row in table.cells]
