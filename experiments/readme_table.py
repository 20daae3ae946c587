"""The README's results table and figure, generated — never typed — from the demo's output.

    make demo                                   # = python -m experiments.paper shapes: every paper table
    python -m experiments.readme_table          # results/shapes/summary.json -> results/readme_table.json,
                                                # the README block and docs/results_qualitative.png
    python -m experiments.readme_table --render # only re-render README.md from results/readme_table.json

The table is the paper's Table 1 (localisation on the shapes world's held-out split; MMEL = mean ± std over the
training seeds, every value with its 95 % bootstrap interval over items) plus the MMEL vs Grad-ECLIP significance
line; the figure is the paper's qualitative grid. ``results/readme_table.json`` (committed) holds what the README
shows, with the commit and command that made it; ``tests/test_readme_table.py`` fails when the two disagree.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .report import git_commit
from .tables import Cell, Column, Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "readme_table.json"
SUMMARY = ROOT / "results" / "shapes" / "summary.json"
FIGURE = ("results/shapes/figures/qualitative.png", "docs/results_qualitative.png")
START, END = "<!-- readme-table:start -->", "<!-- readme-table:end -->"
TABLE = "table-1"  # summary.json key of the localisation table
COMMAND = "make demo"


def from_summary(summary: dict, commit: str) -> dict:
    """What the README shows, taken from the paper's summary.json."""
    t = summary[TABLE]
    return {
        "commit": commit,
        "command": COMMAND,
        "spec": summary.get("spec"),
        "title": t["title"],
        "rows": t["rows"],
        "columns": t["columns"],
        "cells": t["cells"],
        "legend": t.get("legend", ""),  # what the significance marks mean (absent in older summaries)
        "significance": summary.get("significance", {}),
        "samples": summary.get("samples"),
        "machine": summary.get("machine"),
    }


def describe(m: dict | None) -> str:
    """A machine entry (mmel.utils.machine, plus its ``key``) in a few words."""
    if not m:
        return "an unrecorded machine"
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m.get('cpu_model') or 'unknown CPU'} (torch CPU kernels {m.get('cpu_capability')}, "
            f"{m.get('threads')} threads{gpu}; machine key `{m.get('key')}`)")  # fmt: skip


def machine_note(made_on: dict | None, recorded: dict | None) -> str:
    """ "" when the demo ran on the kind of machine that made the README's table (every digit must agree), else the
    sentence that says it did not and what to expect."""
    if made_on and recorded and made_on.get("key") == recorded.get("key"):
        return ""
    return (
        f"This run was made on {describe(made_on)}; the README's table was made on {describe(recorded)}. "
        "Another kind of machine sums floats in another order: expect differences in the last digits, within "
        "the intervals shown (training, and so the MMEL rows, moves more than the training-free rows)."
    )


def render(results: dict) -> str:
    """The Markdown block for the README (between the markers)."""
    cols = [Column(c) for c in results["columns"]]
    cells = [[Cell(**c) for c in row] for row in results["cells"]]
    table = Table(results["title"], results["rows"], cols, cells, label_header="explainer",
                  legend=results.get("legend") or "")  # fmt: skip
    md = table.markdown().strip("\n")
    md = "\n".join(line for line in md.splitlines() if not line.startswith("#")).strip("\n")
    lines = [md, ""]
    sig = results.get("significance") or {}
    tests = sig.get("mcnemar_per_seed") or []
    if tests:
        e = sig.get("energy") or {}
        per_seed = ", ".join(f"{t['b']} vs {t['c']} (p = {t['p']:.2g})" for t in tests)
        energy = (f"; energy PG difference {e['diff']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}], paired bootstrap "
                  f"p = {e['p']:.2g}" if e else "")  # fmt: skip
        lines += [
            f"{sig['a']} vs {sig['b']} on the same {tests[0]['n']} items — items only one of them hits, per "
            f"training seed: {per_seed} (exact McNemar){energy}.",
            "",
        ]
    lines.append(
        f"Generated from the output of `{results['command']}` (`python -m experiments.paper {results['spec']}`) by "
        f"`python -m experiments.readme_table` at commit `{_short(results['commit'])}`. Values: mean ± std over "
        f"training seeds where there are several, [95 % bootstrap interval over items]; bold: best per column."
    )
    lines += [
        "",
        f"Made on {describe(results.get('machine'))}. A fresh clone's `make demo` reproduces every digit on a "
        "machine of the same key (same CPU kernels and thread count); on another CPU or a GPU the values move within "
        "their intervals, and `make demo` says so next to its Table 1 (report and log).",
    ]
    return "\n".join(lines)


def _short(commit: str) -> str:
    """12 characters of the sha, keeping a ``-dirty`` mark (the tree had uncommitted changes to tracked files)."""
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def readme_block(readme: str) -> str:
    """The text between the README's markers."""
    if START not in readme or END not in readme:
        raise ValueError(f"README.md lacks the markers {START} ... {END}")
    return readme.split(START, 1)[1].split(END, 1)[0].strip("\n")


def write_readme(results: dict, readme_path: Path = ROOT / "README.md") -> None:
    text = readme_path.read_text()
    readme_block(text)  # checks the markers
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    readme_path.write_text(f"{before}{START}\n{render(results)}\n{END}{after}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", action="store_true", help="only re-render README.md from results/readme_table.json")
    ap.add_argument("--summary", default=str(SUMMARY), help="the paper run's summary.json")
    args = ap.parse_args(argv)
    if not args.render:
        summary = Path(args.summary)
        if not summary.is_file():
            print(f"{summary} not found: run `make demo` (python -m experiments.paper shapes) first", file=sys.stderr)
            return 1
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        provenance = json.loads(summary.read_text()).get("commit") or git_commit(ROOT)
        RESULTS.write_text(json.dumps(from_summary(json.loads(summary.read_text()), provenance), indent=2) + "\n")
        src, dst = (summary.parent / "figures" / Path(FIGURE[0]).name), ROOT / FIGURE[1]
        if src.is_file():
            shutil.copyfile(src, dst)
            print(f"copied {src} -> {dst}")
    if not RESULTS.is_file():
        print(f"{RESULTS} not found: run without --render first", file=sys.stderr)
        return 1
    write_readme(json.loads(RESULTS.read_text()))
    print(f"README.md table rendered from {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
