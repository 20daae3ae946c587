"""The paper's figures drawn from finished runs' records: deletion / insertion curves, sanity-check curves and
pointing accuracy per category."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmel.evaluation.figures import category_bars, curves_panels, save

from .columns import HIT, MR, item_getter
from .runs import Run


def curves_figure(rows: dict[str, list[Run]], path: Path) -> Path | None:
    """Mean deletion and insertion curves of every method, AUCs in the legend (drawn as an evaluate run draws its
    own: :func:`mmel.evaluation.figures.curves_panels`)."""
    means: dict[str, dict[str, np.ndarray]] = {}
    for label, runs in rows.items():
        for mode in ("deletion", "insertion"):
            cs = [r["metrics"]["deletion_insertion"][f"{mode}_curve"] for run in runs for r in run.items()
                  if f"{mode}_curve" in r.get("metrics", {}).get("deletion_insertion", {})]  # fmt: skip
            if cs:
                means.setdefault(label, {})[mode] = np.mean(np.asarray(cs, dtype=float), axis=0)
    if not means:
        return None
    n = len(next(iter(next(iter(means.values())).values())))
    return curves_panels(means, np.linspace(0, 1, n), path)


def sanity_figure(rows: dict[str, list[Run]], path: Path) -> Path | None:
    """Mean similarity to the original maps after each randomisation step, per mode and measure."""
    curves: dict[str, dict[str, list[float]]] = {}
    steps: list[str] = []
    for label, runs in rows.items():
        items = runs[0].items()
        rec = items[0]["metrics"].get("model_randomisation") if items else None
        if not rec:
            continue
        steps = rec["steps"]
        for key in [k for k in runs[0].metrics if k.startswith(f"{MR}/") and "@" not in k]:
            mode_measure = key[len(MR) + 1 :]
            curves.setdefault(mode_measure, {})[label] = [
                float(np.mean([r.metrics[f"{key}@{s.replace(' ', '')}"] for r in runs])) for s in steps
            ]
    if not curves:
        return None
    plt = _plt()
    keys = sorted(curves)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, ys in curves[key].items():
            ax.plot(range(len(ys) + 1), [1.0, *ys], marker="o", ms=3, label=label)
        ax.set_xticks(range(len(steps) + 1), ["original", *steps], rotation=60, fontsize=6)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_title(key.replace("/", ": "), fontsize=8)
    axes[0][-1].legend(fontsize=6)
    return _save(fig, path)


def category_figure(rows: dict[str, list[Run]], labels: Sequence[str], path: Path) -> Path | None:
    """Pointing accuracy per category for the chosen methods (grouped bars)."""
    hit = item_getter([run for runs in rows.values() for run in runs], HIT) or (lambda r: None)
    acc: dict[str, dict[str, float]] = {}
    for label in labels:
        by_cat: dict[str, list[float]] = {}
        for run in rows.get(label, []):
            for r in run.items():
                if hit(r) is not None:
                    by_cat.setdefault(str(r.get("category")), []).append(hit(r))
        acc[label] = {c: float(np.mean(v)) for c, v in by_cat.items()}
    return category_bars(acc, path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    return save(fig, path, dpi=110)
