"""Transforms: pixels as CLIP's own preprocessing, boxes moved with the image, box masks, the collate."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from mmel.data import BoxTransform, box_mask, collate_boxes, keep_size
from mmel.data.base import Dropped
from mmel.data.fixtures import COLOURS, canvas

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def _item(size, rects):
    boxes = torch.tensor([r for r, _ in rects], dtype=torch.float32).reshape(-1, 4)
    return {"image": canvas(size, rects), "boxes": boxes, "prompt": "p", "size": size, "sample_id": "x"}


def _colour_of(t: torch.Tensor, box) -> torch.Tensor:
    """Mean de-normalised RGB (0..255) inside an integer box of a [3, H, W] tensor."""
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    rgb = t * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    return rgb[:, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].mean(dim=(1, 2)) * 255


@pytest.mark.parametrize("size", [(60, 100), (100, 60), (64, 64), (33, 47)])
def test_fixed_mode_matches_open_clip_preprocess(size):
    item = _item(size, [((10, 10, 30, 25), "red")])
    ref = open_clip.image_transform(32, is_train=False, mean=MEAN, std=STD)(item["image"])
    out = BoxTransform("fixed", image_size=32, mean=MEAN, std=STD)(item)["image"]
    assert out.shape == ref.shape == (3, 32, 32)
    torch.testing.assert_close(out, ref)


def test_fixed_mode_moves_boxes_with_pixels():
    # 80x160 image -> resized to 64x128 (scale 0.8) -> crop columns 32..96
    item = _item((80, 160), [((60, 10, 100, 50), "red"), ((0, 0, 30, 20), "blue"), ((110, 40, 150, 70), "green")])
    tf = BoxTransform("fixed", image_size=64, mean=MEAN, std=STD)
    out = tf(item)
    # the blue box is entirely cropped away; the green one (x 88..120 resized) is clipped at the right edge
    torch.testing.assert_close(out["boxes"], torch.tensor([[16.0, 8, 48, 40], [56, 32, 64, 56]]))
    assert tf.skipped["box_cropped_out"] == 1 and out["n_boxes_cropped_out"] == 1
    assert torch.equal(out["boxes_orig"], item["boxes"])
    for box, colour in zip(out["boxes"], ["red", "green"], strict=True):
        got = _colour_of(out["image"], box)
        assert (got - torch.tensor(COLOURS[colour], dtype=torch.float32)).abs().max() < 12


def test_sample_whose_boxes_are_all_cropped_out_is_dropped():
    tf = BoxTransform("fixed", image_size=32)
    assert tf(_item((32, 128), [((0, 0, 20, 10), "red")])) is None
    assert tf.skipped["sample_cropped_out"] == 1 and tf(None) is None


def test_keep_mode_sizes_and_boxes():
    assert keep_size((480, 640), 16) == (480, 640)
    assert keep_size((333, 500), 32) == (320, 512)
    assert keep_size((100, 1000), 16, max_side=320) == (32, 320)
    assert keep_size((5, 7), 16) == (16, 16)  # never below one patch
    assert keep_size((40, 56), 16) == (48, 64)  # 2.5 and 3.5 patches both round up
    item = _item((90, 130), [((20, 30, 60, 70), "yellow")])
    out = BoxTransform("keep", patch_size=16, mean=MEAN, std=STD)(item)
    assert out["image"].shape == (3, 96, 128)
    torch.testing.assert_close(out["boxes"], torch.tensor([[20 * 128 / 130, 32.0, 60 * 128 / 130, 70 * 96 / 90]]))
    got = _colour_of(out["image"], out["boxes"][0])
    assert (got - torch.tensor(COLOURS["yellow"], dtype=torch.float32)).abs().max() < 12


def test_box_mask_hard_and_soft():
    boxes = torch.tensor([[0.0, 0, 4, 2], [6, 6, 8, 8]])
    m = box_mask(boxes, (8, 8))
    expect = torch.zeros(8, 8)
    expect[0:2, 0:4] = 1
    expect[6:8, 6:8] = 1
    assert torch.equal(m, expect)
    # the same boxes from a 16x16 image onto a 4x4 map
    m4 = box_mask(boxes * 2, (4, 4), image_size=(16, 16))
    assert torch.equal(m4, expect[::2, ::2])
    # soft: coverage fractions; their sum is the box area in cells
    soft = box_mask(torch.tensor([[1.0, 1, 3, 2]]), (2, 2), image_size=(4, 4), soft=True)
    torch.testing.assert_close(soft, torch.tensor([[0.25, 0.25], [0.0, 0.0]]))
    # non-square image and map
    m = box_mask(torch.tensor([[0.0, 0, 30, 10]]), (2, 3), image_size=(20, 30))
    assert torch.equal(m, torch.tensor([[1.0, 1, 1], [0, 0, 0]]))


def test_box_mask_tiny_box_marks_its_cell():
    m = box_mask(torch.tensor([[13.0, 5, 14, 6]]), (4, 4), image_size=(32, 32))
    assert m.sum() == 1 and m[0, 1] == 1
    assert box_mask(torch.zeros(0, 4), (3, 5)).shape == (3, 5)


def test_box_masks_of_many_sets_equal_box_mask_of_each():
    from mmel.data.transforms import box_masks

    g = torch.Generator().manual_seed(0)
    sets = []
    for k in range(40):
        m = k % 5  # 0 to 4 boxes (0: an empty set)
        xy = torch.rand(m, 2, generator=g) * 70 - 5  # some start outside the 64 px frame
        wh = torch.rand(m, 2, generator=g) * torch.tensor([40.0, 1.0 if k % 3 == 0 else 30.0])  # thin boxes too
        sets.append(torch.cat([xy, xy + wh], 1))
    want = torch.stack([box_mask(b, (64, 48)) for b in sets])
    assert torch.equal(box_masks(sets, (64, 48)), want)
    assert want[0].sum() == 0 and want.sum() > 0
    assert box_masks([], (3, 5)).shape == (0, 3, 5)


def test_collate_pads_and_drops_none():
    tf = BoxTransform("keep", patch_size=16)
    a = tf(_item((40, 70), [((1, 1, 20, 20), "red")]))
    b = tf(_item((70, 30), [((1, 1, 20, 20), "red"), ((5, 5, 9, 9), "blue")]))
    bad = Dropped("corrupt_image", "s9", "f.jpg")
    batch = collate_boxes([a, None, bad, b], pad=True, pad_multiple=16)
    assert batch["images"].shape == (2, 3, 64, 64) and batch["n_dropped"] == 2
    assert batch["skipped"] == {"corrupt_image": 1, "unknown": 1}
    assert batch["valid"][0].sum() == 48 * 64 and batch["valid"][1].sum() == 64 * 32
    assert torch.equal(batch["images"][0, :, :48, :64], a["image"]) and batch["images"][0, :, 48:].abs().sum() == 0
    assert [len(x) for x in batch["boxes"]] == [1, 2] and batch["prompt"] == ["p", "p"]
    lists = collate_boxes([a, b], pad=False)
    assert [t.shape for t in lists["images"]] == [a["image"].shape, b["image"].shape] and "valid" not in lists
    assert collate_boxes([None, None]) is None
    assert collate_boxes([bad, bad], keep_empty=True) == {"n_dropped": 2, "skipped": {"corrupt_image": 2}}


def test_fixed_batch_needs_no_padding():
    tf = BoxTransform("fixed", image_size=32)
    batch = collate_boxes([tf(_item((40, 50), [((1, 1, 30, 30), "red")])) for _ in range(3)])
    assert batch["images"].shape == (3, 3, 32, 32) and bool(batch["valid"].all())
    assert np.allclose(batch["images"][0].numpy(), batch["images"][2].numpy())


def test_training_and_metrics_read_the_same_box_mask():
    """One box rule (mmel.data.boxes): the HSRM's training masks (lit_module.union_masks, the cached and online
    paths alike) are the metrics' masks (pointing game, energy, IoU, specificity), over random fractional boxes
    (some partly outside, some thinner than a pixel) on random grids."""
    from mmel.lit_module import union_masks
    from mmel.metrics._common import box_union_mask, box_union_masks, pad_boxes

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        h, w = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
        sets = []
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            m = int(torch.randint(1, 4, (1,), generator=g))
            xy = torch.rand(m, 2, generator=g) * torch.tensor([w * 1.2, h * 1.2]) - 0.1 * torch.tensor([w, h])
            wh = torch.rand(m, 2, generator=g) * torch.tensor([w, h]) * (torch.rand(m, 1, generator=g) < 0.8)
            sets.append(torch.cat([xy, xy + wh], 1))
        train = union_masks(sets, (h, w))
        assert train.dtype == torch.float32
        scored = torch.stack([box_union_mask(b, (h, w)) for b in sets]).float()
        assert torch.equal(train, scored)
        assert torch.equal(train, box_union_masks(pad_boxes(sets), (h, w)).float())
    # the example that used to differ: 4 cells by the old cell-centre rule, 16 by the metrics' overlap rule
    box = torch.tensor([[0.7, 0.7, 3.2, 3.2]])
    assert union_masks([box], (6, 6)).sum() == 16 == box_union_mask(box, (6, 6)).sum()
