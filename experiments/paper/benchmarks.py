"""The benchmark tables other papers report: ImageNet-S segmentation (Chefer et al. / LeGrad), OpenImages V7 p-mIoU
(LeGrad) and ImageNet deletion / insertion (Grad-ECLIP's protocol), one table each, from a spec's ``benchmarks``::

    benchmarks:
      imagenet:                              # the kind: imagenet | imagenet_s | openimages_points
        title: Table 6 — ...
        overrides: [data=imagenet]           # evaluate.py overrides of every run of the table
        limit: 5000                          # sample cap (null: the whole split)
        explainers: [Grad-ECLIP (native), ...]   # labels of the spec's explainers
        columns: {label: output}             # optional: replaces the kind's default columns
        backbones: [ViT-B/16]                # optional: only in these backbones' results (specs with `backbones`)

A kind's default columns are below; the imagenet kind also draws its deletion / insertion curves (top-1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..tables import Table
from .columns import metric_table
from .figures import curves_figure

DI = "deletion_insertion"
COLUMNS: dict[str, dict[str, str]] = {
    "imagenet": {
        "clean top-1": f"{DI}/clean_top1",
        **{f"deletion top-{k} AUC": f"{DI}/deletion_top{k}_auc" for k in (1, 5, 10)},
        **{f"insertion top-{k} AUC": f"{DI}/insertion_top{k}_auc" for k in (1, 5, 10)},
    },
    "imagenet_s": {
        "pixel accuracy": "segmentation/pixel_accuracy",
        "mIoU": "segmentation/miou",
        "mAP": "segmentation/map",
        "pointing game": "pointing_game/accuracy",
    },  # fmt: skip
    "openimages_points": {"p-mIoU": "point_miou"},
}


def benchmark_tables(paper: Any, fig_dir: Path | None = None) -> list[tuple[Table, list[tuple[Path, str]]]]:
    """(table, figures) of each of ``paper.spec["benchmarks"]`` (its runs made or reused by ``paper``; planned
    only while it plans)."""
    out = []
    for kind, b in (paper.spec.get("benchmarks") or {}).items():
        only = b.get("backbones")
        if only is not None and paper.spec.get("backbone") not in only:
            continue  # e.g. the real-data tables are made with ViT-B/16 only
        base = str(b.get("kind", kind))
        if base not in COLUMNS and not b.get("columns"):
            raise ValueError(f"paper spec {paper.spec['name']!r}: benchmark {kind!r} has no default columns (kinds: "
                             f"{sorted(COLUMNS)}); give it `columns:`")  # fmt: skip
        rows = paper.evaluations(b["explainers"], f"benchmarks/{kind}", b.get("overrides", []), b.get("limit"))
        columns = {str(k): str(v) for k, v in (b.get("columns") or COLUMNS[base]).items()}
        table = metric_table(str(b.get("title", kind)), rows, columns)
        figs: list[tuple[Path, str]] = []
        if base == "imagenet" and fig_dir is not None and not paper._planning:
            curves = curves_figure(rows, fig_dir / f"{kind}_deletion_insertion.png")
            if curves:
                figs.append((curves, "zero-shot top-1 accuracy after each deletion / insertion step"))
        out.append((table, figs))
    return out
