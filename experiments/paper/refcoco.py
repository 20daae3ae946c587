"""The RefCOCO table of a paper spec: pointing game on referring sentences, per dataset and official split.

Spec section (``experiments/paper/coco.yaml``)::

    refcoco:
      backbones: [ViT-B/16]            # the backbones (labels of ``backbones:``) that get the table; absent: all
      overrides: [data=refcoco, ...]   # added to every run of the table
      splits: {refcoco: [val, testA, testB], refcoco+: [...], refcocog: [val, test]}
      explainers: [...]                # labels among the spec's explainers

One evaluate run per (explainer, dataset, split) (MMEL rows: one per training seed, with its checkpoint), in
``runs/refcoco/<dataset>/<split>/<explainer>`` (refcoco+: ``refcoco-plus``); a column per (dataset, split).
RefCOCO's images are COCO train2014 images, inside the COCO train2017 the HSRM trains on: its rows need
``allow_train_overlap=true`` and are marked † (mmel.evaluation.overlap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..tables import Column, Table
from .columns import HIT, OVERLAP_MARK, cell, overlap_label
from .spec import slug

if TYPE_CHECKING:
    from . import Paper


def applies(spec: dict) -> bool:
    """Whether this (per-backbone) spec makes the RefCOCO table."""
    r = spec.get("refcoco")
    if not r:
        return False
    wanted = r.get("backbones")
    return not wanted or spec.get("backbone") in wanted


def refcoco_table(paper: Paper) -> Table:
    """Rows: the section's explainers; columns: ``<dataset> <split>`` pointing game (test stage = that split)."""
    r = paper.spec["refcoco"]
    splits = [(ds, sp) for ds, sps in r["splits"].items() for sp in sps]
    by_column = {}
    for ds, sp in splits:
        extra = [*r.get("overrides", []), f"data.dataset={ds}", f"data.splits.test={sp}"]
        by_column[(ds, sp)] = paper.evaluations(
            r["explainers"], f"refcoco/{slug(ds.replace('+', ' plus'))}/{sp}", extra, r.get("limit")
        )
    labels = list(r["explainers"])
    rows = [overlap_label(label, [run for c in by_column.values() for run in c[label]]) for label in labels]
    cells = [[cell(by_column[c][label], HIT) for c in splits] for label in labels]
    title = "Table 6 — referring expressions (RefCOCO / RefCOCO+ / RefCOCOg), pointing game"
    if rows != labels:
        title += f" ({OVERLAP_MARK}: the HSRM was scored on images it was trained on)"
    return Table(title, rows, [Column(f"{ds} {sp}", True) for ds, sp in splits], cells)
