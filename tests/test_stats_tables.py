"""Confidence intervals, paired tests and the table writers, against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments.stats import bootstrap_ci, mcnemar, mean_std, paired_bootstrap
from experiments.tables import Cell, Column, Table


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, big = rng.integers(0, 2, 50), rng.integers(0, 2, 5000)
    a, b = bootstrap_ci(small), bootstrap_ci(big)
    assert a.low <= a.value <= a.high and b.low <= b.value <= b.high
    assert (b.high - b.low) < (a.high - a.low) / 5  # width ~ 1/sqrt(n): 10x more precise for 100x the items
    # a binomial proportion's normal-approximation half-width at n = 5000 is 1.96*sqrt(p(1-p)/n)
    half = 1.96 * math.sqrt(b.value * (1 - b.value) / big.size)
    assert abs((b.high - b.low) / 2 - half) < 0.2 * half
    assert bootstrap_ci(small) == bootstrap_ci(small)  # seeded
    assert bootstrap_ci([1.0, 1.0, 1.0]).low == 1.0  # no spread, no interval
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([1.0, float("nan")])


def test_mcnemar_exact_counts_only_discordant_pairs():
    a = [1] * 10 + [0] * 2 + [1] * 30 + [0] * 8
    b = [0] * 10 + [1] * 2 + [1] * 30 + [0] * 8
    r = mcnemar(a, b)
    assert (r.b, r.c) == (10, 2)
    # two-sided exact binomial: 2 * P(X <= 2 | n = 12, p = 1/2) = 2 * (1 + 12 + 66) / 4096
    assert r.p_value == pytest.approx(2 * 79 / 4096)
    assert mcnemar([1, 0, 1], [1, 0, 1]).p_value == 1.0
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([0.5], [1])


def test_paired_bootstrap_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(1)
    base = rng.normal(size=400)
    shifted = paired_bootstrap(base + 0.3 + rng.normal(scale=0.1, size=400), base)
    assert shifted.diff.low > 0.2 and shifted.p_value < 0.001
    same = paired_bootstrap(base + rng.normal(scale=0.1, size=400), base)
    assert same.diff.low < 0 < same.diff.high and same.p_value > 0.05


def test_mean_std_over_seeds():
    m, s = mean_std([0.8, 0.9, 1.0])
    assert m == pytest.approx(0.9) and s == pytest.approx(0.1)
    assert math.isnan(mean_std([0.5])[1])


def _table():
    return Table(
        "t",
        ["A", "B_1", "C"],
        [Column("pointing"), Column("deletion", higher_is_better=False)],
        [
            [Cell(0.5, std=0.01), Cell(0.2, low=0.1, high=0.3)],
            [Cell(0.7, std=float("nan")), Cell(0.2)],
            [Cell(None), Cell(0.4)],
        ],
    )


def test_table_markdown_bolds_the_best_per_column_and_shows_missing():
    md = _table().markdown()
    assert "| method | pointing ↑ | deletion ↓ |" in md
    assert "| B_1 | **0.700 ± n/a** | **0.200** |" in md  # higher pointing, tied lowest deletion
    assert "| A | 0.500 ± 0.010 | **0.200 [0.100, 0.300]** |" in md
    assert "| C | — | 0.400 |" in md


def test_table_latex_and_csv():
    tex = _table().latex()
    assert tex.startswith("\\begin{tabular}{lcc}\n\\toprule") and "\\bottomrule" in tex
    assert "B\\_1 & \\textbf{0.700 $\\pm$ n/a} & \\textbf{0.200} \\\\" in tex
    assert "C & -- & 0.400 \\\\" in tex
    rows = _table().csv().splitlines()
    assert (
        rows[0]
        == "method,pointing,pointing_std,pointing_low,pointing_high,deletion,deletion_std,deletion_low,deletion_high"
    )
    assert rows[1] == "A,0.5,0.01,,,0.2,,0.1,0.3"
    with pytest.raises(ValueError, match="cells must be"):
        Table("bad", ["x"], [Column("a")], [])


def test_a_column_that_is_neither_better_high_nor_low_has_no_arrow_and_no_bold():
    from experiments.tables import Cell, Column, Table

    t = Table("t", ["a", "b"], [Column("score"), Column("model's own", None), Column("error", False)],
              [[Cell(0.5), Cell(0.7), Cell(0.1)], [Cell(0.6), Cell(0.9), Cell(0.2)]])  # fmt: skip
    assert t.best() == [{1}, set(), {0}]
    head = t.markdown().splitlines()[0]
    assert "score ↑" in head and "| model's own |" in head and "error ↓" in head
    assert "**0.900**" not in t.markdown() and "**0.600**" in t.markdown()
    assert "model's own &" in t.latex() or "model's own \\\\" in t.latex()
