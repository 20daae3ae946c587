"""The paper's figures drawn from finished runs' outputs: deletion / insertion curves, sanity-check curves,
pointing accuracy per category, and the qualitative grid from the maps the runs saved (no model is loaded)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmel.evaluation.figures import category_bars, curves_panels, overlay, save

from .columns import HIT, MR, item_getter
from .runs import Run, compose_run
from .spec import GridSpec


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


def saved_maps(run: Run, ids: Sequence[str], items: Sequence[dict] | None = None) -> dict[str, np.ndarray]:
    """The maps an evaluate run saved (``save_maps=true``: ``maps/chunk_<id>.npz``) for the sample ids asked
    (``items``: the run's records, when already read)."""
    chunk_of = {r["sample_id"]: r["chunk"] for r in (run.items() if items is None else items)}
    out: dict[str, np.ndarray] = {}
    for chunk in sorted({chunk_of[i] for i in ids if i in chunk_of}):
        path = run.out / "maps" / f"chunk_{chunk:06d}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the run's maps are missing (it must run with save_maps=true)")
        with np.load(path) as saved:
            out.update({i: saved[i].astype(np.float32) for i in ids if chunk_of.get(i) == chunk and i in saved})
    return out


def scored_views(run: Run, records: Sequence[dict]) -> list[tuple[np.ndarray, list[list[float]]]]:
    """The image each record was scored on (in the frame of its saved map) and its boxes, rebuilt from the run's
    data config and the preprocessing its run.json records — the model itself is not loaded."""
    from hydra.utils import instantiate

    cfg = compose_run("evaluate", run.overrides, run.out)
    model = json.loads((run.out / "run.json").read_text())["fingerprint"]["model"]
    dm = instantiate(cfg.data, image_size=model["image_size"][0], mean=model["mean"], std=model["std"],
                     patch_size=model["patch_size"])  # fmt: skip
    dm.prepare_data()
    dataset, transform = dm.dataset(cfg.get("split", "test")), dm.transform
    mean, std = np.asarray(transform.mean)[:, None, None], np.asarray(transform.std)[:, None, None]
    views = []
    for r in records:
        raw = dataset[r["index"]]
        item = transform(raw)
        if transform.mode == "keep":  # scored in the original frame
            views.append((np.asarray(raw["image"], dtype=np.float32) / 255.0, item["boxes_orig"].tolist()))
        else:
            views.append((np.clip(item["image"].numpy() * std + mean, 0, 1).transpose(1, 2, 0), item["boxes"].tolist()))
    return views


def grid_figure(grid: GridSpec, rows: dict[str, list[Run]], path: Path) -> Path | None:
    """The same seeded test items across methods: the image with its boxes, then each method's saved map (× its
    peak). An MMEL row shows its first seed's run."""
    runs = {label: rows[label][0] for label in grid.explainers if label in rows}
    if not runs:
        return None
    first = next(iter(runs.values()))
    items = {label: run.items() for label, run in runs.items()}  # each run's records, read once
    shared = set.intersection(*({r["sample_id"] for r in recs} for recs in items.values()))
    records = sorted((r for r in items[next(iter(runs))] if r["sample_id"] in shared), key=lambda r: r["index"])
    if not records:
        return None
    pick = np.random.default_rng(grid.seed).choice(len(records), size=min(grid.items, len(records)), replace=False)
    records = [records[int(i)] for i in sorted(pick)]
    ids = [r["sample_id"] for r in records]
    maps = {label: saved_maps(run, ids, items[label]) for label, run in runs.items()}
    views = scored_views(first, records)
    plt = _plt()
    fig, axes = plt.subplots(len(records), len(maps) + 1, figsize=(1.9 * (len(maps) + 1), 2.0 * len(records)),
                             squeeze=False)  # fmt: skip
    for r, (rec, (img, boxes)) in enumerate(zip(records, views, strict=True)):
        overlay(axes[r][0], img, None, boxes)
        axes[r][0].set_title(rec["prompt"], fontsize=6)
        for c, (label, ms) in enumerate(maps.items(), start=1):
            m = ms[rec["sample_id"]]
            peak = np.unravel_index(int(np.argmax(m)), m.shape)
            overlay(axes[r][c], img, m, [], (int(peak[0]), int(peak[1])), alpha=0.5, ms=6)
            if r == 0:
                axes[r][c].set_title(label, fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    return _save(fig, path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    return save(fig, path, dpi=110)
