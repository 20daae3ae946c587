"""Paper tables as data, written as Markdown, CSV and LaTeX (booktabs), with the best value per column in bold.

A :class:`Table` holds row labels and, per metric column, one :class:`Cell` per row: the value that ranks the
row, and an optional spread (± std over seeds) or interval ([low, high], a bootstrap CI). Which way is better is
declared per column (deletion AUC: lower). A missing value is shown as "—" and never ranked; ties are all bold.
CSV keeps full precision and separate low/high/std columns (for plotting); Markdown and LaTeX are for reading.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape as html_escape


@dataclass(frozen=True)
class Cell:
    """A value with an optional std (over seeds) or interval (low, high)."""

    value: float | None
    std: float | None = None
    low: float | None = None
    high: float | None = None

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
    name: str
    higher_is_better: bool = True


@dataclass
class Table:
    """``rows``: labels; ``columns``: metrics; ``cells[r][c]``: a :class:`Cell`."""

    title: str
    rows: list[str]
    columns: list[Column]
    cells: list[list[Cell]] = field(default_factory=list)
    digits: int = 3
    label_header: str = "method"

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
            if not vals:
                out.append(set())
                continue
            target = max(vals.values()) if col.higher_is_better else min(vals.values())
            out.append({r for r, v in vals.items() if v == target})
        return out

    def markdown(self) -> str:
        best = self.best()
        arrows = [f"{c.name} {'↑' if c.higher_is_better else '↓'}" for c in self.columns]
        lines = ["| " + " | ".join([self.label_header, *arrows]) + " |", "|" + "---|" * (len(self.columns) + 1)]
        for r, label in enumerate(self.rows):
            cells = []
            for c in range(len(self.columns)):
                t = self.cells[r][c].text(self.digits)
                cells.append(f"**{t}**" if r in best[c] else t)
            lines.append("| " + " | ".join([label, *cells]) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        head = [self.label_header]
        for c in self.columns:
            head += [c.name, f"{c.name}_std", f"{c.name}_low", f"{c.name}_high"]
        w.writerow(head)
        for r, label in enumerate(self.rows):
            row: list[object] = [label]
            for cell in self.cells[r]:
                row += ["" if v is None else repr(float(v)) for v in (cell.value, cell.std, cell.low, cell.high)]
            w.writerow(row)
        return buf.getvalue()

    def html(self) -> str:
        """An HTML <table> (escaped; best values in <b>), for the self-contained report."""
        best = self.best()
        esc = html_escape
        arrows = [f"{esc(c.name)} {'↑' if c.higher_is_better else '↓'}" for c in self.columns]
        head = "".join(f"<th>{h}</th>" for h in [esc(self.label_header), *arrows])
        rows = []
        for r, label in enumerate(self.rows):
            cells = []
            for c in range(len(self.columns)):
                t = esc(self.cells[r][c].text(self.digits))
                cells.append(f"<td><b>{t}</b></td>" if r in best[c] else f"<td>{t}</td>")
            rows.append(f"<tr><th scope='row'>{esc(label)}</th>{''.join(cells)}</tr>")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>\n"

    def latex(self) -> str:
        best = self.best()
        esc = _latex_escape
        cols = "l" + "c" * len(self.columns)
        head = " & ".join(
            [esc(self.label_header)]
            + [f"{esc(c.name)} $\\{'uparrow' if c.higher_is_better else 'downarrow'}$" for c in self.columns]
        )
        lines = [f"\\begin{{tabular}}{{{cols}}}", "\\toprule", head + " \\\\", "\\midrule"]
        for r, label in enumerate(self.rows):
            cells = []
            for c in range(len(self.columns)):
                t = esc(self.cells[r][c].text(self.digits)).replace("±", "$\\pm$")
                cells.append(f"\\textbf{{{t}}}" if r in best[c] else t)
            lines.append(" & ".join([esc(label), *cells]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"


def _latex_escape(s: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"), ("—", "--")):
        s = s.replace(a, b)
    return s


def column_values(table: Table, name: str) -> Sequence[float | None]:
    """The values of column ``name`` (None where missing)."""
    c = [col.name for col in table.columns].index(name)
    return [None if row[c].missing else row[c].value for row in table.cells]
