"""The README's results table is the rendering of the committed demo results, never typed by hand."""

from __future__ import annotations

import json

from experiments.readme_table import RESULTS, ROOT, from_summary, readme_block, render


def test_readme_table_equals_the_committed_results():
    results = json.loads(RESULTS.read_text())
    assert readme_block((ROOT / "README.md").read_text()) == render(results)
    assert results["command"] == "make demo" and results["spec"] == "shapes"


def test_render_from_a_summary_shows_spreads_missing_values_bold_and_the_test():
    cell = {"value": 0.5, "std": None, "low": 0.4, "high": 0.6}
    summary = {
        "spec": "shapes",
        "commit": "0123456789abcdef-dirty",
        "table-1": {
            "title": "Table 1 — localisation",
            "rows": ["A", "B"],
            "columns": ["pointing game", "mIoU"],
            "cells": [
                [{"value": 0.7, "std": 0.01, "low": 0.65, "high": 0.75}, cell],
                [cell, {"value": None, "std": None, "low": None, "high": None}],
            ],
        },
        "significance": {
            "a": "A",
            "b": "B",
            "mcnemar_per_seed": [{"b": 30, "c": 4, "p": 1e-5, "n": 100}],
            "energy": {"diff": 0.1, "low": 0.05, "high": 0.15, "p": 0.001, "n": 100},
        },  # fmt: skip
    }
    text = render(from_summary(summary, summary["commit"]))
    assert "| A | **0.700 ± 0.010 [0.650, 0.750]** | **0.500 [0.400, 0.600]** |" in text
    assert "| B | 0.500 [0.400, 0.600] | — |" in text
    assert "30 vs 4 (p = 1e-05)" in text and "+0.100 [+0.050, +0.150]" in text
    assert "`0123456789ab-dirty`" in text and "`make demo`" in text


def test_the_readme_says_which_machine_reproduces_every_digit():
    """The committed results record the machine that made them; the README names it and what reproduces how."""
    results = json.loads(RESULTS.read_text())
    assert results["machine"]["key"] and results["machine"]["cpu_model"]
    block = readme_block((ROOT / "README.md").read_text())
    assert f"machine key `{results['machine']['key']}`" in block and "reproduces every digit" in block


def test_a_demo_on_another_machine_says_so():
    from experiments.readme_table import machine_note

    here = {"key": "aaaa", "cpu_model": "CPU A", "cpu_capability": "AVX512", "threads": 2}
    assert machine_note(here, dict(here)) == ""
    note = machine_note(here, {**here, "key": "bbbb", "cpu_model": "CPU B", "cpu_capability": "AVX2"})
    assert "CPU A" in note and "CPU B" in note and "within the intervals" in note
    assert "unrecorded machine" in machine_note(here, None)
