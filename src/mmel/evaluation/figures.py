"""Figures of an evaluation run, drawn from its per-item records into ``<run dir>/figures/``.

* ``qualitative.png``: a fixed, seeded sample of scored items: the image as scored, its ground-truth boxes, the map,
  the map's peak (the point the pointing game checks) and hit / miss;
* ``curves.png``: mean deletion and insertion curves with their mean AUCs in the legend (when enabled);
* ``per_category.png``: pointing-game accuracy per category.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmel.metrics._common import resize_maps

log = logging.getLogger(__name__)


def _pointing_name(metrics: dict[str, Any]) -> str | None:
    """The metric that scores per category (it declares ``per_category``): the pointing game."""
    return next((k for k, m in metrics.items() if hasattr(m, "per_category")), None)


def _hit(metrics: dict[str, Any], name: str, record: dict[str, Any]) -> float | None:
    """The item's value of that metric's first declared output (the pointing game's hit)."""
    return metrics[name].outputs[0].item_value(record["metrics"].get(name))


def per_category(records: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, float]:
    """Pointing-game accuracy per category of the scored records (empty without a pointing game)."""
    name = _pointing_name(metrics)
    if name is None:
        return {}
    hits: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if "skip" not in r and r.get("category") is not None:
            hits[r["category"]].append(_hit(metrics, name, r))
    return {c: float(np.mean(v)) for c, v in sorted(hits.items())}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_all(
    out: Path, records, metrics, dataset, transform, explainer, keep: bool, seed: int = 0, n: int = 8
) -> dict[str, Path]:
    """Write the run's figures; returns {name: path}. A figure that cannot be drawn is logged, not fatal."""
    folder = out / "figures"
    folder.mkdir(exist_ok=True)
    paths: dict[str, Path] = {}
    cats = per_category(records, metrics)
    if cats:
        paths["per_category"] = category_bars({"this run": cats}, folder / "per_category.png")
    # the metric that keeps perturbation curves (it declares ``curves``): deletion / insertion
    di_name = next((k for k, m in metrics.items() if hasattr(m, "curves")), None)
    di = metrics[di_name] if di_name is not None else None
    scored = [r for r in records if "skip" not in r]
    if di is not None and scored:
        paths["curves"] = curves(scored, di_name, di, folder / "curves.png")
    if scored and n > 0:
        paths["qualitative"] = qualitative(
            scored, metrics, dataset, transform, explainer, keep, folder / "qualitative.png", seed, n
        )
    return paths


def category_bars(acc: dict[str, dict[str, float]], path: Path, ylabel: str = "pointing game") -> Path | None:
    """Grouped bars: per category (x) one bar per label, ``acc`` = {label: {category: accuracy}} (the evaluate run's
    figure has one label, the paper's several). None when there is no category."""
    cats = sorted({c for a in acc.values() for c in a})
    if not cats:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cats) * max(1, len(acc)) / 2), 4))
    w = 0.8 / max(1, len(acc))
    for i, (label, a) in enumerate(acc.items()):
        ax.bar(np.arange(len(cats)) + i * w, [a.get(c, np.nan) for c in cats], w, label=label)
    ax.set_xticks(np.arange(len(cats)) + 0.4 - w / 2, cats, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    if len(acc) > 1:
        ax.legend(fontsize=7)
    return save(fig, path)


def curves_panels(
    curves: dict[str, dict[str, np.ndarray]], x: np.ndarray, path: Path, n_items: str = ""
) -> Path | None:
    """Deletion / insertion: one panel per mode, one mean curve per label with its AUC (trapezoid over ``x``, the
    fraction of the area perturbed) in the legend; ``curves`` = {label: {mode: mean curve [S + 1]}}."""
    modes = [m for m in ("deletion", "insertion") if any(m in c for c in curves.values())]
    if not modes:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for label, by_mode in curves.items():
            if mode in by_mode:
                y = np.asarray(by_mode[mode])
                # a row of another protocol (e.g. Grad-ECLIP's 11 points beside RISE's 21) spans the same axis
                xs = x if len(y) == len(x) else np.linspace(x[0], x[-1], len(y))
                auc = float(np.trapezoid(y, xs))
                ax.plot(xs, y, marker=".", label=f"{label} (AUC {auc:.3f})")
        ax.set_title(f"{mode} (mean over {n_items or 'the'} items)")
        ax.set_xlabel("fraction of pixels " + ("removed" if mode == "deletion" else "inserted"))
        ax.set_ylabel("score")
        ax.legend(fontsize=7)
    return save(fig, path)


def curves(scored, name: str, metric, path: Path) -> Path | None:
    """The run's mean deletion / insertion curves (the metric that keeps curves, ``name``)."""
    mean = {
        mode: np.mean([r["metrics"][name][f"{mode}_curve"] for r in scored], axis=0) for mode in metric.options.modes
    }
    x = (metric.fractions / metric.fractions[-1]).numpy()  # the metric's AUC axis (auc()): legend AUC = its value
    return curves_panels({"this run": mean}, x, path, str(len(scored)))


def save(fig, path: Path, dpi: int = 100) -> Path:
    """Write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def overlay(ax, image: np.ndarray, m: np.ndarray | None, boxes, peak: tuple[int, int] | None = None,
            colour: str = "white", alpha: float = 0.45, ms: float = 10) -> None:  # fmt: skip
    """One panel: the image, the map over it (jet, [0, 1]), the boxes (lime) and the peak (×) — how every map
    figure of the project draws an item (an evaluate run's sample, the paper's grid)."""
    plt = _plt()
    ax.imshow(image)
    if m is not None:
        ax.imshow(m, cmap="jet", alpha=alpha, vmin=0, vmax=1)
    for x0, y0, x1, y1 in boxes:
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.5))
    if peak is not None:
        ax.plot([peak[1]], [peak[0]], marker="x", ms=ms, mew=2.5 if ms >= 8 else 2, color=colour)


def qualitative(scored, metrics, dataset, transform, explainer, keep, path: Path, seed: int, n: int) -> Path:
    """Seeded sample of n items: image, boxes, map overlay, peak marker, hit / miss."""
    plt = _plt()
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(scored), size=min(n, len(scored)), replace=False).tolist())
    pg = _pointing_name(metrics)
    cols = min(4, len(pick))
    rows = (len(pick) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    mean = torch.tensor(transform.mean).view(3, 1, 1)
    std = torch.tensor(transform.std).view(3, 1, 1)
    for ax in axes.flat:
        ax.axis("off")
    for ax, j in zip(axes.flat, pick, strict=False):
        r = scored[j]
        item = transform(dataset[r["index"]])
        if item is None:
            continue
        image = item["image"]
        with torch.enable_grad() if explainer.needs_grad else torch.no_grad():
            m = explainer(image[None], [r["prompt"]])[0].detach().cpu()  # [1, h, w]
        if keep:
            shown = np.asarray(dataset[r["index"]]["image"], dtype=np.float32) / 255.0
            boxes = item["boxes_orig"]
        else:
            shown = (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
            boxes = item["boxes"]
        h, w = shown.shape[:2]
        m = resize_maps(m.float(), [(h, w)])[0].numpy()
        hit = _hit(metrics, pg, r) if pg else None
        colour = "white" if hit is None else ("lime" if hit else "red")
        overlay(ax, shown, m, torch.as_tensor(boxes).tolist(), (r["peak"]["y"], r["peak"]["x"]), colour)
        verdict = "" if hit is None else (" HIT" if hit else " MISS")
        ax.set_title(f"{r['prompt'][:28]}{verdict}", fontsize=8, color="green" if hit else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
