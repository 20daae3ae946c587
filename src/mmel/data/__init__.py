"""Datasets with boxes (COCO, Flickr30k Entities, the shapes world), CLIP transforms, data modules, feature cache.

Items follow DESIGN §6: dicts with ``image_id``, ``image`` (PIL RGB), ``prompt``, ``boxes`` (FloatTensor [M, 4]
xyxy in pixels of the original image), ``category``, ``file``, ``size`` ((H, W)), ``sample_id``. The Lightning data
modules and the feature cache are imported on first use (they pull in pytorch_lightning / datasets).
"""

from __future__ import annotations

import importlib
from typing import Any

from mmel.data.base import BoxDataset, DatasetError, load_image
from mmel.data.coco import CocoBoxes
from mmel.data.flickr30k import Flickr30kEntities
from mmel.data.transforms import BoxTransform, box_mask, collate_boxes, keep_size, normalize

_LAZY = {
    "BoxDataModule": "mmel.data.datamodules",
    "CocoDataModule": "mmel.data.datamodules",
    "Flickr30kDataModule": "mmel.data.datamodules",
    "ShapesDataModule": "mmel.data.datamodules",
    "FeatureCache": "mmel.data.cache",
    "CachedFeatures": "mmel.data.cache",
    "cache_key": "mmel.data.cache",
}

__all__ = [
    "BoxDataset",
    "BoxTransform",
    "CocoBoxes",
    "DatasetError",
    "Flickr30kEntities",
    "box_mask",
    "collate_boxes",
    "keep_size",
    "load_image",
    "normalize",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmel.data' has no attribute {name!r}")
