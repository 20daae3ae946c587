"""The generated shapes world read back by the real-data loaders: exactly the boxes the generator wrote."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import torch

from mmel.data import CocoBoxes, Flickr30kEntities, ShapesDataModule

SMALL = {"n_train": 6, "n_val": 3, "n_test": 5}


@pytest.fixture(scope="module")
def world(shapes_world):
    return shapes_world(seed=3, **SMALL)


def _truth(root, split):
    """What the generator wrote in the COCO JSON, read without our loader: {(image, category): [xyxy]}, by ann id."""
    d = json.loads((root / "coco" / "annotations" / f"instances_{split}.json").read_text())
    names = {c["id"]: c["name"] for c in d["categories"]}
    by_pair, by_ann = defaultdict(list), {}
    for a in d["annotations"]:
        x, y, w, h = a["bbox"]
        by_pair[(a["image_id"], names[a["category_id"]])].append([x, y, x + w, y + h])
        by_ann[a["id"]] = (a["image_id"], [x, y, x + w, y + h])
    return by_pair, by_ann, d


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_coco_boxes_are_exactly_the_written_ones(world, split):
    by_pair, _, d = _truth(world, split)
    ds = CocoBoxes(world / "coco", split)
    assert not ds.skipped and len(ds) == len(by_pair)
    assert {(r.image_id, r.category) for r in ds.records} == set(by_pair)
    for i in range(len(ds)):
        item = ds[i]
        want = torch.tensor(sorted(by_pair[(item["image_id"], item["category"])]), dtype=torch.float32)
        got = item["boxes"][torch.argsort(item["boxes"][:, 0] * 1e4 + item["boxes"][:, 1])]
        assert torch.equal(got, want), item["sample_id"]
        assert item["prompt"] == f"a photo of a {item['category']}." and item["image"].size == (64, 64)
    assert len({r.file for r in ds.records}) == len(d["images"])


def test_flickr_phrases_name_the_written_objects(world):
    _, by_ann, d = _truth(world, "test")
    names = {c["id"]: c["name"] for c in d["categories"]}
    cat_of = {a["id"]: names[a["category_id"]] for a in d["annotations"]}
    ds = Flickr30kEntities(world / "flickr30k", "test")
    n_phrases = sum(
        line.count("[/EN#")
        for iid in {im["id"] for im in d["images"]}
        for line in (world / "flickr30k" / "Sentences" / f"{iid}.txt").read_text().splitlines()
    )
    assert len(ds) == n_phrases and not ds.skipped  # every phrase of the world has its box
    for r in ds.records:
        image_id, _ = by_ann[int(r.extra["entity_id"])]  # the generator numbers entities like annotations
        assert int(r.image_id) == image_id and r.prompt == f"a {cat_of[int(r.extra['entity_id'])]}"
        assert r.category == cat_of[int(r.extra["entity_id"])].split()[-1]


def test_flickr_boxes_are_exactly_the_written_ones(world):
    # the XML holds 1-based inclusive corners (the release's convention); read back they are the COCO boxes
    _, by_ann, _ = _truth(world, "test")
    ds = Flickr30kEntities(world / "flickr30k", "test")
    for r in ds.records:
        want = np.array([by_ann[int(r.extra["entity_id"])][1]], dtype=np.float32)
        np.testing.assert_array_equal(r.boxes, want, err_msg=r.sample_id)


def test_shapes_datamodule_generates_on_first_use_and_batches(tmp_path):
    root = tmp_path / "w"
    dm = ShapesDataModule(root, seed=1, generate_kwargs=SMALL, image_size=64, patch_size=8, batch_size=4)
    assert not root.exists()  # the constructor touches no disk
    dm.prepare_data()
    stamp = (root / "MANIFEST.json").stat().st_mtime_ns
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 64, 64) and len(batch["boxes"]) == 4
    assert all(b.shape[1] == 4 and len(b) >= 1 for b in batch["boxes"])
    flickr = ShapesDataModule(root, seed=1, format="flickr30k", generate_kwargs=SMALL, image_size=64)
    flickr.prepare_data()  # same world: not generated again
    assert (root / "MANIFEST.json").stat().st_mtime_ns == stamp
    assert flickr.dataset("test")[0]["prompt"].startswith("a ")  # the phrase itself, no "a photo of"
    assert dm.dataset("val").name == "coco/val" and not dm.skipped
    other = ShapesDataModule(root, seed=2, generate_kwargs=SMALL)
    other.prepare_data()  # another seed on the same root: the world is made again to match the config
    assert json.loads((root / "MANIFEST.json").read_text())["params"]["seed"] == 2
