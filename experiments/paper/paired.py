"""Every row of a table against its reference row, item by item and seed by seed: the p-values behind the marks.

A row's runs are one per training seed (MMEL, the ablations; in the order of the spec's seeds) or one (a
training-free explainer). A pair is (item i, seed s) of the row with (item i, seed s) of the reference; a one-run
side stands for every seed (its value of item i repeated), and two one-run sides pair once. Items are matched by
``sample_id``; an item with a value in one run of a pair and none in the other is left out and counted.

The test follows the values: 0/1 values on both sides (pointing-game hits) get the exact McNemar test on every
(item, seed) pair; any other values the sign-flip permutation test of the mean difference, with all of an item's
seeds flipped together (:func:`experiments.stats.sign_flip`): an item repeated over seeds is one unit of evidence
there. ``docs/statistics.md`` says why, and what a mark does and does not mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ..stats import DEFAULT_RESAMPLES, SIGNIFICANCE_MARKS, mcnemar, sign_flip
from ..tables import Cell, Table
from .runs import Run

Getter = Callable[[dict], float | None]  # an item record -> its value of one output (None: it has none)
MCNEMAR, SIGN_FLIP = "exact McNemar", "sign-flip"
FEW_SEEDS = 3  # fewer training seeds than this: a table's legend says its spreads and tests rest on too few runs


@dataclass(frozen=True)
class Versus:
    """One row against the reference on one output: the test used, its p-value, the pairs it counted (and the
    distinct items among them), the pairs left out (an item with a value in one run of a pair only), and the mean
    difference row − reference over the pairs."""

    test: str
    p: float
    pairs: int
    items: int
    left_out: int
    diff: float


def values(run: Run, get: Getter, records: dict | None = None) -> dict[str, float]:
    """sample_id -> the run's finite value of one output (items without one are absent); a sample id recorded twice
    is an error naming the run (pairing by id would be ambiguous). ``records``: run folder -> its records, filled
    on first read (a table reads each run's items.jsonl once)."""
    records = {} if records is None else records
    if run.out not in records:
        records[run.out] = run.items()
    out: dict[str, float] = {}
    seen: set[str] = set()
    for r in records[run.out]:
        if "sample_id" not in r:
            raise ValueError(f"{run.out / 'items.jsonl'}: a record without `sample_id` (cannot pair items): {r}")
        sid = str(r["sample_id"])
        if sid in seen:
            raise ValueError(f"{run.out / 'items.jsonl'}: sample_id {sid!r} recorded twice (cannot pair items)")
        seen.add(sid)
        v = get(r)
        if v is not None and math.isfinite(v):
            out[sid] = float(v)
    return out


def paired(
    row: Sequence[Run], reference: Sequence[Run], get: Getter, records: dict | None = None
) -> tuple[list[float], list[float], list[str], int]:
    """The (item, seed) pairs of ``row`` and ``reference``: their values, each pair's item (the unit a sign flip
    keeps together), and how many pairs were left out. Runs are in seed order; a one-run side repeats per seed."""
    if not row or not reference:
        return [], [], [], 0
    n = max(len(row), len(reference))
    for side in (row, reference):
        if len(side) not in (1, n):
            raise ValueError(f"paired: {len(row)} and {len(reference)} runs cannot be paired by seed "
                             f"(expected one run or one per seed: {side[0].out.parent})")  # fmt: skip
    records = {} if records is None else records
    a: list[float] = []
    b: list[float] = []
    units: list[str] = []
    left_out = 0
    for s in range(n):
        va = values(row[s if len(row) > 1 else 0], get, records)
        vb = values(reference[s if len(reference) > 1 else 0], get, records)
        left_out += len(va.keys() ^ vb.keys())
        for sid in sorted(va.keys() & vb.keys()):
            a.append(va[sid])
            b.append(vb[sid])
            units.append(sid)
    return a, b, units, left_out


def versus(row: Sequence[Run], reference: Sequence[Run], get: Getter, records: dict | None = None) -> Versus | None:
    """The paired test of ``row`` against ``reference`` on one output (None: no pair)."""
    a, b, units, left_out = paired(row, reference, get, records)
    if not a:
        return None
    items = len(set(units))
    diff = float(sum(a) - sum(b)) / len(a)
    if all(v in (0.0, 1.0) for v in (*a, *b)):
        return Versus(MCNEMAR, mcnemar(a, b).p_value, len(a), items, left_out, diff)
    return Versus(SIGN_FLIP, sign_flip(a, b, clusters=units).p_value, len(a), items, left_out, diff)


def with_test(cell: Cell, test: Versus | None) -> Cell:
    """``cell`` carrying ``test``'s p-value and pairs (unchanged when there is no test)."""
    if test is None:
        return cell
    return Cell(cell.value, cell.std, cell.low, cell.high, p=test.p, pairs=test.pairs)


def legend(reference: str, tests: dict[str, dict[str, Versus]], untested: Sequence[str], n_seeds: int,
           single: Sequence[str] = ()) -> str:  # fmt: skip
    """The line under a table: what its marks mean, which tests, how many pairs over how many seeds, what was left
    out and what was not tested. ``tests``: row -> column -> its test; ``single``: rows of one run."""
    every = [t for cols in tests.values() for t in cols.values()]
    if not every:
        return ""
    marks = ", ".join(f"{m} p < {level:g}" for level, m in reversed(SIGNIFICANCE_MARKS))
    kinds = sorted({t.test for t in every})
    how = {
        MCNEMAR: "pointing hits (0/1): exact McNemar over every (item, seed) pair",
        SIGN_FLIP: f"continuous values: sign-flip permutation test of the mean difference, an item's seeds flipped "
        f"together (exact, or {DEFAULT_RESAMPLES:,} seeded sign sets)",
    }
    pairs = sorted({t.pairs for t in every})
    span = f"{pairs[0]}" if len(pairs) == 1 else f"{pairs[0]}–{pairs[-1]}"
    parts = [
        f"Marks: difference from “{reference}” ({marks}, two-sided, each test on its own: not corrected for the "
        f"{len(every)} tests of this table); " + "; ".join(how[k] for k in kinds) + ".",
        f"Pairs: (item, seed), pooled over {n_seeds} training seed{'s' if n_seeds != 1 else ''}: {span} per test.",
    ]
    if single:
        parts.append(f"Rows of one run (training-free: {', '.join(single)}) are paired with each seed of the "
                     "reference, their value of an item repeated per seed.")  # fmt: skip
    dropped = {row: max(t.left_out for t in cols.values()) for row, cols in tests.items()
               if any(t.left_out for t in cols.values())}  # fmt: skip
    if dropped:
        parts.append("Left out (an item with a value in one run of a pair only): "
                     + ", ".join(f"{row} {n} pairs" for row, n in dropped.items()) + ".")  # fmt: skip
    if untested:
        parts.append(f"Not tested (no per-item values): {', '.join(untested)}.")
    if n_seeds < FEW_SEEDS:
        parts.append(f"Only {n_seeds} training seed{'s' if n_seeds != 1 else ''}: spreads and tests over seeds need "
                     f"at least {FEW_SEEDS}; a quick check, not for citing.")  # fmt: skip
    return " ".join(parts)


def marked_table(table: Table, rows: dict[str, Sequence[Run]], reference: str, getters: dict[str, Getter | None],
                 n_seeds: int) -> Table:  # fmt: skip
    """``table`` (one row per label of ``rows``, in order) with every row but ``reference`` tested against it on each
    column that has a getter (``getters``: column name -> item value, None: not a mean over items), and the legend.
    A table without the reference row is returned as it is."""
    if reference not in rows:
        return table
    records: dict = {}
    tests: dict[str, dict[str, Versus]] = {}
    cells = [list(r) for r in table.cells]
    for i, (label, runs) in enumerate(rows.items()):
        if label == reference:
            continue
        for j, col in enumerate(table.columns):
            get = getters.get(col.name)
            if get is None or cells[i][j].missing:  # no per-item values, or nothing shown to mark
                continue
            t = versus(runs, rows[reference], get, records)
            if t is not None:
                tests.setdefault(label, {})[col.name] = t
                cells[i][j] = with_test(cells[i][j], t)
    untested = [c.name for c in table.columns if getters.get(c.name) is None]
    pooled = max(len(runs) for runs in rows.values())  # the seeds a pair can come from
    single = [label for label, runs in rows.items() if len(runs) == 1 < pooled]
    text = legend(reference, tests, untested, min(n_seeds, pooled), single)
    return replace(table, cells=cells, legend=" ".join(x for x in (table.legend, text) if x))
