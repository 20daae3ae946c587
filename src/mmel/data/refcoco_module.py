"""The RefCOCO / RefCOCO+ / RefCOCOg data module (``data=refcoco``, ``data.dataset=refcoco|refcoco+|refcocog``).

Splits as COCO's: ``test`` defaults to ``val`` (evaluate reads ``data.splits.test``; pass ``data.splits.test=testA``
/ ``testB`` / ``test`` for the other official splits). ``data.source=refer`` reads the refer layout under
``data.root``, ``data.source=parquet`` the tables of :mod:`mmel.data.refcoco_parquet`.
"""

from __future__ import annotations

import os
from typing import Any

from mmel.data.datamodules import BoxDataModule
from mmel.data.refcoco import DATASETS, RefCOCO


class RefCOCODataModule(BoxDataModule):
    """Referring expressions, one sample per (sentence, referent box); options go to :class:`RefCOCO`."""

    dataset_cls = RefCOCO

    def __init__(self, root: str | os.PathLike, dataset: str = "refcoco", **kwargs: Any) -> None:
        if dataset not in DATASETS:
            raise ValueError(f"data.dataset must be one of {DATASETS}, got {dataset!r}")
        super().__init__(root, dataset=dataset, **kwargs)

    def default_splits(self) -> dict[str, str | None]:
        return {"train": "train", "val": "val", "test": "val"}
