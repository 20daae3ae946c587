"""Confidence and significance for paper tables, computed from per-item records (``items.jsonl``).

* :func:`bootstrap_ci` — percentile bootstrap interval of a mean over items (default 95 %, 10 000 resamples,
  seeded: the same records always give the same interval).
* :func:`mcnemar` — exact McNemar test for two methods scored on the *same* binary items (pointing-game hits): only
  the discordant pairs carry information; the p-value is two-sided binomial with p = 1/2 on them.
* :func:`paired_bootstrap` — for continuous paired scores (energy, IoU, AUCs): the interval of the mean difference
  and a two-sided p-value from the bootstrap distribution of that difference (Efron & Tibshirani's shift method).
* :func:`sign_flip` — for continuous paired scores pooled over seeds: a two-sided permutation test of the mean
  difference that flips the sign of each item's differences (all of the item's seeds together), exact when there are
  few items, else a fixed-seed Monte Carlo (the same records always give the same p).
* :func:`mark` — the significance mark a table prints beside a value (``*`` p < 0.05, ``**`` p < 0.01).
* :func:`mean_std` — mean ± sample standard deviation over training seeds (ddof = 1; a single seed has std NaN, and
  a table says so instead of printing 0).

Everything is plain numpy/scipy over 1-D arrays, so it is tested against hand-computed cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

DEFAULT_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval [low, high] at ``level``."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def fmt(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _as_1d(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name}: no items")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: {int((~np.isfinite(a)).sum())} non-finite values (filter skipped items first)")
    return a


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, level: float = 0.95, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of the mean of ``values`` [N]."""
    a = _as_1d(values, "bootstrap_ci")
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(resamples, a.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(a.mean()), float(lo), float(hi), level)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test: ``b`` items only A hits, ``c`` only B hits; two-sided p-value."""

    b: int
    c: int
    p_value: float


def mcnemar(hits_a: Sequence[float] | np.ndarray, hits_b: Sequence[float] | np.ndarray) -> McNemar:
    """Exact McNemar test on paired binary outcomes [N] (1 = hit) of two methods on the same items."""
    a, b = _as_1d(hits_a, "mcnemar"), _as_1d(hits_b, "mcnemar")
    if a.shape != b.shape:
        raise ValueError(f"mcnemar: paired outcomes need equal lengths, got {a.size} and {b.size}")
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ValueError("mcnemar: outcomes must be 0/1 hits")
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_a, n, 0.5, alternative="two-sided").pvalue)
    return McNemar(only_a, only_b, p)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of A − B over paired items with its bootstrap interval, and a two-sided bootstrap p-value."""

    diff: Interval
    p_value: float


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PairedDifference:
    """Paired bootstrap of the mean difference of two methods' scores on the same items [N].

    The p-value tests "no difference": the bootstrap differences are shifted to mean 0 and the share at least as
    extreme as the observed mean difference is counted (plus one, so it is never exactly 0)."""
    x, y = _as_1d(a, "paired_bootstrap"), _as_1d(b, "paired_bootstrap")
    if x.shape != y.shape:
        raise ValueError(f"paired_bootstrap: paired scores need equal lengths, got {x.size} and {y.size}")
    d = x - y
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    observed = d.mean()
    extreme = np.abs(means - means.mean()) >= abs(observed) - 1e-15
    p = (int(extreme.sum()) + 1) / (resamples + 1)
    return PairedDifference(Interval(float(observed), float(lo), float(hi), level), float(min(1.0, p)))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) over seeds; std is NaN for one seed."""
    a = _as_1d(values, "mean_std")
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else math.nan)


@dataclass(frozen=True)
class SignFlip:
    """Mean of A − B over ``pairs`` paired values, its two-sided sign-flip p-value, and how many independent units
    (``clusters``: items) were flipped; ``exact``: every sign pattern enumerated (else ``resamples`` drawn)."""

    diff: float
    p_value: float
    pairs: int
    clusters: int
    exact: bool


def sign_flip(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    clusters: Sequence[object] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> SignFlip:
    """Paired sign-flip permutation test of "no difference" between two methods' scores [N] on the same pairs.

    Under the null hypothesis an item's difference A − B is as likely negated: the statistic |sum of differences|
    is compared with its value under every (or ``resamples`` seeded random) sign patterns. ``clusters`` [N] groups
    pairs that are not independent (the same item under several training seeds): a cluster's differences are
    flipped together, so an item repeated over seeds counts as one unit of evidence, not several. With at most
    ``resamples`` sign patterns all of them are enumerated (exact p); otherwise p = (1 + #{at least as extreme}) /
    (1 + resamples), never 0. All differences zero: p = 1."""
    x, y = _as_1d(a, "sign_flip"), _as_1d(b, "sign_flip")
    if x.shape != y.shape:
        raise ValueError(f"sign_flip: paired scores need equal lengths, got {x.size} and {y.size}")
    d = x - y
    if clusters is None:
        sums = d
    else:
        if len(clusters) != d.size:
            raise ValueError(f"sign_flip: {len(clusters)} cluster labels for {d.size} pairs")
        _, unit = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
        sums = np.bincount(unit, weights=d)
    n = sums.size
    observed = abs(float(sums.sum()))
    # the same sum computed in another order differs in its last bits: "as extreme" allows for that rounding
    tol = 1e-9 * max(1.0, float(np.abs(sums).sum()))
    if observed <= tol:
        return SignFlip(float(d.mean()), 1.0, int(d.size), n, True)
    if n <= 20 and 2**n <= resamples:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0
        extreme = int((np.abs(signs @ sums) >= observed - tol).sum())
        return SignFlip(float(d.mean()), extreme / 2**n, int(d.size), n, True)
    rng = np.random.default_rng(seed)
    extreme, left = 0, resamples
    while left:
        m = min(left, 1000)  # 1000 sign patterns at a time: memory stays ~1000 x N bytes
        signs = rng.integers(0, 2, size=(m, n), dtype=np.int8) * 2 - 1
        extreme += int((np.abs(signs @ sums) >= observed - tol).sum())
        left -= m
    return SignFlip(float(d.mean()), (extreme + 1) / (resamples + 1), int(d.size), n, False)


SIGNIFICANCE_MARKS = ((0.01, "**"), (0.05, "*"))  # the thresholds a table marks, strictest first


def mark(p: float | None) -> str:
    """``**`` for p < 0.01, ``*`` for p < 0.05, else "" (also for no test)."""
    if p is None or math.isnan(p):
        return ""
    return next((m for level, m in SIGNIFICANCE_MARKS if p < level), "")
