"""The dense / labelled-benchmark metrics: the segmentation protocol against masks (mmel.metrics.segmentation),
p-mIoU at points (mmel.metrics.points) and Grad-ECLIP's zero-shot deletion / insertion (mmel.metrics.zeroshot):
hand-computed cases, an independent reference for the AP, the classes against the functions, records replayed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_average_precision

from mmel.metrics.points import PointMIoU, point_miou
from mmel.metrics.protocol import ItemContext
from mmel.metrics.segmentation import MaskSegmentation, mask_segmentation, segmentation_item
from mmel.metrics.zeroshot import ZeroShotDeletionInsertion, ZeroShotRanker


def _mask(h: int, w: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.long)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 1
    return m


def test_segmentation_hand_computed():
    mask = _mask(4, 4, (0, 0, 2, 2))  # 4 fg pixels of 16
    exact = mask.float()[None]
    out = mask_segmentation(exact, [mask])
    assert {k: float(v) for k, v in out.items()} == {"pixel_accuracy": 1.0, "miou": 1.0, "map": 1.0}
    inverted = 1 - exact
    out = mask_segmentation(inverted, [mask])
    assert float(out["pixel_accuracy"]) == 0.0 and float(out["miou"]) == 0.0
    # predicted fg = the top row (4 px, R > mean): fg inter 2, union 6; bg inter 10, union 14; correct 12 of 16
    top = torch.zeros(1, 4, 4)
    top[0, 0] = 1.0
    item = segmentation_item(top[0], mask)
    assert item["correct"] == 12 and item["labeled"] == 16
    assert item["inter"] == [10, 2] and item["union"] == [14, 6]
    assert float(mask_segmentation(top, [mask])["miou"]) == pytest.approx((10 / 14 + 2 / 6) / 2, abs=1e-6)


def test_segmentation_ignores_pixels_and_sums_over_items():
    mask = _mask(4, 4, (0, 0, 2, 2))
    wrong = mask.clone()
    wrong[2:, 2:] = -1  # ignored: a map that marks them fg costs nothing
    m = mask.float().clone()
    m[2:, 2:] = 1.0
    item = segmentation_item(m, wrong)
    assert item["labeled"] == 12 and item["correct"] == 12
    # ratios of sums over items (not means of per-item ratios)
    a, b = segmentation_item(mask.float(), mask), segmentation_item(1 - mask.float(), mask)
    got = mask_segmentation(torch.stack([mask.float(), 1 - mask.float()]), [mask, mask])
    assert float(got["pixel_accuracy"]) == pytest.approx((a["correct"] + b["correct"]) / 32)
    with pytest.raises(ValueError, match=r"masks\[0\] holds values outside"):
        mask_segmentation(m[None], [mask * 3])


def test_segmentation_ap_equals_torchmetrics_on_the_two_channels():
    """Chefer et al.'s AP: the [1 - R, R] channels against one-hot [bg, fg], all labelled pixels ranked together.
    torchmetrics' binary AP is an independent implementation (float32 scores, float64 sums: 1e-5)."""
    g = torch.Generator().manual_seed(0)
    maps = (torch.rand(5, 12, 12, generator=g) * 6).round() / 6  # coarse: ties
    masks = [_mask(12, 12, (k, 2, 6 + k, 9)) for k in range(5)]
    for m, k in zip(maps, masks, strict=True):
        r = (m - m.min()) / (m.max() - m.min())
        want = binary_average_precision(torch.cat([1 - r.flatten(), r.flatten()]),
                                        torch.cat([1 - k.flatten(), k.flatten()]))  # fmt: skip
        assert segmentation_item(m, k)["ap"] == pytest.approx(float(want), abs=1e-5)


def test_segmentation_class_function_and_records():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(6, 8, 8, generator=g)
    masks = [_mask(16, 16, (k, k, 8 + k, 10)) for k in range(6)]  # masks at twice the map's resolution
    want = mask_segmentation(maps, masks)
    metric = MaskSegmentation()
    metric.update(maps[:4], masks[:4])
    metric.update(maps[4:], masks[4:])
    for k, v in metric.compute().items():
        assert float(v) == pytest.approx(float(want[k]), abs=1e-6)
    records = MaskSegmentation().item_values(ItemContext(maps=maps, masks=masks))
    replay = MaskSegmentation()
    replay.update(records=records)
    for k, v in replay.compute().items():
        assert float(v) == pytest.approx(float(want[k]), abs=1e-6)
    with pytest.raises(ValueError, match="provides no"):
        MaskSegmentation().item_values(ItemContext(maps=maps))


def test_point_miou_hand_computed_and_per_category():
    left = torch.zeros(1, 4, 4)
    left[0, :, :2] = 1.0
    # item 1 (cat): TP, FN; item 2 (cat): FP -> cat IoU = 1 / 3; item 3 (dog): TP -> 1; mean 2 / 3
    pts = [
        torch.tensor([[0.5, 0.5, 1], [3.5, 3.5, 1]]),
        torch.tensor([[1.5, 2.5, 0]]),
        torch.tensor([[0.5, 3.5, 1], [3.0, 1.0, 0]]),
    ]
    maps = left.expand(3, 4, 4).contiguous()
    cats = ["cat", "cat", "dog"]
    assert float(point_miou(maps, pts, cats)) == pytest.approx((1 / 3 + 1) / 2, abs=1e-6)
    metric = PointMIoU()
    metric.update(maps[:2], pts[:2], cats[:2])
    metric.update(maps[2:], pts[2:], cats[2:])
    assert float(metric.compute()) == pytest.approx((1 / 3 + 1) / 2, abs=1e-6)
    records = metric.item_values(ItemContext(maps=maps, points=pts, categories=cats, sizes=torch.tensor([[4, 4]] * 3)))
    assert records[0] == {"tp": 1, "fp": 0, "fn": 1, "category": "cat"}
    replay = PointMIoU()
    replay.update(records=records)
    assert float(replay.compute()) == pytest.approx(float(metric.compute()), abs=1e-7)
    with pytest.raises(ValueError, match=r"points\[0\] has a point outside"):
        point_miou(maps[:1], [torch.tensor([[9.0, 1.0, 1]])], ["cat"])


def test_zero_shot_ranker_averages_templates(micro_clip):
    classes = ["red circle", "blue square", "green star"]
    templates = ["a photo of a {}.", "a drawing of the {}."]
    ranker = ZeroShotRanker(micro_clip, classes, templates)
    with torch.no_grad():
        e = F.normalize(
            micro_clip.model.encode_text(
                micro_clip.tokenize([t.format(c) for c in classes for t in templates])
            ).float(),
            dim=-1,
        )
    want = F.normalize(e.view(3, 2, -1).mean(1), dim=-1)
    torch.testing.assert_close(ranker.weights, want, atol=1e-6, rtol=0)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 0])
    logits = ranker.logits(images)
    want_rank = torch.tensor([(logits[i] > logits[i, t]).sum() for i, t in enumerate(targets)]).float()
    torch.testing.assert_close(ranker(images, targets), want_rank)


def test_zero_shot_deletion_insertion(micro_clip):
    classes = ["red circle", "blue square", "green star", "cyan cross"]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g)
    maps = torch.rand(3, 4, 4, generator=g)
    labels = torch.tensor([0, 2, 3])
    metric = ZeroShotDeletionInsertion(templates="single", step=0.25, max_fraction=0.5)
    ctx = ItemContext(maps=maps, images=images, labels=labels, classes=classes,
                      scorer=type("S", (), {"clip": micro_clip})())  # fmt: skip
    records = metric.item_values(ctx)
    ranker = metric.ranker(micro_clip, classes)
    clean = ranker(images, labels)
    for r, c in zip(records, clean.tolist(), strict=True):
        assert len(r["deletion_rank"]) == 3 and r["deletion_rank"][0] == c == r["clean_rank"]  # 0 % deleted = clean
        assert r["deletion_curve"] == [float(v < 1) for v in r["deletion_rank"]]
        assert r["deletion_top1_auc"] <= r["deletion_top5_auc"] <= r["deletion_top10_auc"]
    # insertion at 0 %: the black canvas, whatever the map
    black = ranker(((torch.zeros(3, 3, 32, 32) - torch.tensor(metric.options.pixel_mean).view(1, 3, 1, 1))
                    / torch.tensor(metric.options.pixel_std).view(1, 3, 1, 1)), labels)  # fmt: skip
    assert [r["insertion_rank"][0] for r in records] == black.int().tolist()
    metric.update(maps, images, labels, ranker)
    replay = ZeroShotDeletionInsertion(templates="single", step=0.25, max_fraction=0.5)
    replay.update(records=records)
    direct, again = metric.compute(), replay.compute()
    for k in direct:
        assert float(direct[k]) == pytest.approx(float(again[k]), abs=1e-6), k
        if k.endswith("_auc") and "top" not in k:
            assert float(direct[k]) == pytest.approx(sum(r[k] for r in records) / 3, abs=1e-6)
    assert float(direct["clean_top10"]) == 1.0  # 4 classes: the true one is always in the top 10
    with pytest.raises(ValueError, match="labels must be"):
        metric.update(maps, images, torch.tensor([0, 1, 9]), ranker)
