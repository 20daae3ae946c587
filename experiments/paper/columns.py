"""Table values from finished runs: each column an output named as in metrics.json, its direction and per-item
values read from the runs' declarations (mmel.metrics.protocol); cells with seed spreads and item intervals; the
paired MMEL vs Grad-ECLIP tests."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmel.metrics.protocol import output_of

from ..stats import bootstrap_ci, mcnemar, mean_std, paired_bootstrap
from ..tables import Cell, Column, Table
from .runs import Run

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ values
# A column is a label and the output it shows, named as in metrics.json under the stage ("test/"). What the output
# means — higher is better or not, the per-item record field it averages (for the bootstrap interval over items) —
# is read from the runs' own declarations (metrics.json "outputs", mmel.metrics.protocol): a new metric's column is
# one line here.
STAGE = "test"
LOCALISATION = {
    "pointing game": "pointing_game/accuracy",
    "per-category mean": "pointing_game/mean_per_category",
    "difficult subset": "pointing_game/difficult_accuracy",
    "energy PG": "energy_pointing_game",
    "mIoU": "saliency_iou/miou",
    "specificity": "prompt_specificity/specificity",  # with metrics.prompt_specificity on
}
# Table 4: the HSRM ablations, each row's evaluate runs (one per seed) scored like Table 1's MMEL row
ABLATIONS = {
    "pointing game": "pointing_game/accuracy",
    "energy PG": "energy_pointing_game",
    "mIoU": "saliency_iou/miou",
}
FAITHFULNESS = {"deletion AUC": "deletion_insertion/deletion_auc", "insertion AUC": "deletion_insertion/insertion_auc"}
TRUST = {
    "cascading: Spearman": "model_randomisation/cascading/spearman",
    "cascading: SSIM": "model_randomisation/cascading/ssim",
    "cascading: HOG": "model_randomisation/cascading/hog",
    "independent: Spearman": "model_randomisation/independent/spearman",
    "prompt randomisation: Spearman": "prompt_randomisation/spearman",
    "specificity": "prompt_specificity/specificity",
    "hard-case specificity": "prompt_specificity/hard_specificity",
    "absent prompt on an object": "prompt_specificity/absent_on_object",
}
HIT, ENERGY = "pointing_game/accuracy", "energy_pointing_game"  # the outputs the significance tests pair items on
MR = f"{STAGE}/model_randomisation"  # the sanity-curve figure: every "<mode>/<measure>@<step>" output


def declared(runs: Sequence[Run], output: str) -> dict[str, Any] | None:
    """The declaration of ``<stage>/<output>`` in the first of ``runs`` that has one (None: no run has it)."""
    return next((r.metrics["outputs"][f"{STAGE}/{output}"] for r in runs
                 if f"{STAGE}/{output}" in r.metrics.get("outputs", {})), None)  # fmt: skip


def item_getter(runs: Sequence[Run], output: str) -> Callable[[dict], float | None] | None:
    """A record -> the item's value of ``output`` (None: the output is not a mean over items, or unknown)."""
    d = declared(runs, output)
    if d is None or d.get("field") is None:
        return None
    out, name = output_of(d), d["metric"]
    return lambda r: out.item_value(r.get("metrics", {}).get(name))


def per_item(runs: Sequence[Run], get: Callable[[dict], float | None]) -> dict[str, float]:
    """sample_id -> the item's value averaged over ``runs`` (seeds); items missing in a run are left out."""
    acc: dict[str, list[float]] = {}
    for run in runs:
        for r in run.items():
            v = get(r)
            if v is not None and math.isfinite(v):
                acc.setdefault(str(r["sample_id"]), []).append(v)
    return {k: float(np.mean(v)) for k, v in acc.items() if len(v) == len(runs)}


def cell(runs: Sequence[Run], output: str) -> Cell:
    """``<stage>/<output>``: mean over runs (± std when several seeds) and a 95 % bootstrap interval over items when
    the output is a mean over items."""
    key, get = f"{STAGE}/{output}", item_getter(runs, output)
    vals = [float(r.metrics[key]) for r in runs if isinstance(r.metrics.get(key), int | float)]
    if not vals:
        return Cell(None)
    m, s = mean_std(vals) if len(vals) > 1 else (vals[0], None)
    low = high = None
    if get is not None:
        items = per_item(runs, get)
        if len(items) > 1:
            ci = bootstrap_ci(list(items.values()))
            low, high = ci.low, ci.high
    return Cell(m, std=s, low=low, high=high)


OVERLAP_MARK = "†"


def overlap_label(label: str, runs: Sequence[Run]) -> str:
    """A row's label, marked when one of its runs scored an HSRM on images it was trained on
    (``train_overlap`` in metrics.json, written under ``allow_train_overlap=true``: mmel.evaluation.overlap)."""
    shared = max((int((r.metrics.get("train_overlap") or {}).get("images") or 0) for r in runs), default=0)
    return f"{label} {OVERLAP_MARK}" if shared else label


def overlap_marks(title: str, rows: dict[str, Sequence[Run]]) -> tuple[list[str], str]:
    """Every table's row labels with :func:`overlap_label`'s mark, and its title saying what † means when used."""
    labels = [overlap_label(label, runs) for label, runs in rows.items()]
    if labels != list(rows):
        title = f"{title} ({OVERLAP_MARK}: the HSRM was scored on images it was trained on)"
    return labels, title


def metric_table(title: str, rows: dict[str, Sequence[Run]], columns: dict[str, str]) -> Table:
    """One row per label of ``rows``, one column per (label, output) of ``columns``; a row scored on the HSRM's own
    training images is marked † (and the title says what † means)."""
    every = [run for runs in rows.values() for run in runs]
    hib = {name: (declared(every, output) or {}).get("higher_is_better") for name, output in columns.items()}
    labels, title = overlap_marks(title, rows)
    return Table(
        title,
        labels,
        [Column(name, hib[name]) for name in columns],
        [[cell(runs, output) for output in columns.values()] for runs in rows.values()],
    )


def significance(a: Sequence[Run], b: Sequence[Run]) -> dict[str, Any]:
    """MMEL vs Grad-ECLIP on the same items: exact McNemar on pointing hits per seed of ``a`` (the largest p is
    reported: every seed must win), and a paired bootstrap of the energy difference on seed-averaged items."""
    hit, energy_of = item_getter([*a, *b], HIT), item_getter([*a, *b], ENERGY)
    if hit is None or energy_of is None:
        return {"mcnemar": [], "energy": None}
    hits_b = per_item(b, hit)
    tests = []
    for run in a:
        hits_a = per_item([run], hit)
        common = sorted(set(hits_a) & set(hits_b))
        if common:
            t = mcnemar([hits_a[k] for k in common], [hits_b[k] for k in common])
            tests.append({"b": t.b, "c": t.c, "p": t.p_value, "n": len(common)})
    ea, eb = (
        per_item(a, energy_of),
        per_item(b, energy_of),
    )
    common = sorted(set(ea) & set(eb))
    energy = None
    if len(common) > 1:
        d = paired_bootstrap([ea[k] for k in common], [eb[k] for k in common])
        energy = {"diff": d.diff.value, "low": d.diff.low, "high": d.diff.high, "p": d.p_value, "n": len(common)}
    return {"mcnemar_per_seed": tests, "max_p": max((t["p"] for t in tests), default=None), "energy": energy}


def _significance_note(a: str | None, b: str | None, sig: dict | None, n_seeds: int) -> str:
    if not sig or not sig.get("mcnemar_per_seed"):
        return ""
    parts = [f"{a} vs {b}, same items: exact McNemar on pointing hits per training seed"]
    parts += [f"seed {i}: {t['b']} items only {a.split(' (')[0]} hits, {t['c']} only {b.split(' (')[0]}, "
              f"p = {t['p']:.2g}" for i, t in enumerate(sig["mcnemar_per_seed"])]  # fmt: skip
    e = sig.get("energy")
    if e:
        parts.append(f"energy PG difference {e['diff']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}] (paired bootstrap, "
                     f"p = {e['p']:.2g}, {e['n']} items, {n_seeds}-seed average)")  # fmt: skip
    return "; ".join(parts) + "."
