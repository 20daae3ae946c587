"""Real datasets, when present (marker ``data``; set MMEL_COCO_ROOT / MMEL_FLICKR30K_ROOT): indexing and one batch."""

from __future__ import annotations

import os

import pytest
import torch

from mmel.data import CocoBoxes, Flickr30kEntities

pytestmark = pytest.mark.data


def _root(var: str):
    root = os.environ.get(var)
    if not root:
        pytest.skip(f"{var} not set")
    return root


def _sane(ds):
    assert len(ds) > 0
    for i in range(0, len(ds), max(1, len(ds) // 20)):
        item = ds[i]
        if item is None:
            continue
        h, w = item["size"]
        b = item["boxes"]
        assert item["image"].size == (w, h) and len(b) >= 1
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b >= 0).all() and (b[:, [0, 2]] <= w).all() and (b[:, [1, 3]] <= h).all()
        assert b.dtype == torch.float32


def test_coco_val2017():
    ds = CocoBoxes(_root("MMEL_COCO_ROOT"), "val2017")
    assert ds.stats["images_annotated"] == 5000  # COCO 2017 val has 5000 images (48 without any box)
    _sane(ds)


def test_flickr30k_test():
    ds = Flickr30kEntities(_root("MMEL_FLICKR30K_ROOT"), "test")
    assert ds.stats["images_annotated"] == 1000  # the official test split has 1000 images
    _sane(ds)
