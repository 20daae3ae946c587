"""Saliency IoU: every binarisation rule by hand, the threshold sweep against a brute-force reference, batching."""

from __future__ import annotations

import pytest
import torch

from mmel.metrics import SaliencyIoU, binarise, saliency_iou
from mmel.metrics._common import box_union_mask

COLS = (torch.arange(10.0) / 9).expand(10, 10)[None]  # value = column / 9
LEFT4 = torch.zeros(1, 10, 10)
LEFT4[0, :, :4] = 1.0


def box(*xyxy: float) -> list[torch.Tensor]:
    return [torch.tensor([xyxy], dtype=torch.float32)]


def miou(maps, boxes, **kw) -> float:
    return saliency_iou(maps, boxes, **kw)["miou"].item()


def test_mean_rule_chefer():
    assert miou(LEFT4, box(0, 0, 5, 10)) == pytest.approx(0.8)  # 40 px selected, 50 px box
    assert miou(LEFT4, box(0, 0, 10, 10)) == pytest.approx(0.4)  # box covering the whole image
    assert miou(COLS, box(5, 0, 10, 10)) == pytest.approx(1.0)  # mean 0.5 -> cols 5..9 (5/9 > 0.5)


def test_fraction_rule():
    assert miou(COLS, box(5, 0, 10, 10), rule="fraction", fraction=0.5) == pytest.approx(1.0)
    assert miou(COLS, box(5, 0, 10, 10), rule="fraction", fraction=0.2) == pytest.approx(5 / 8)  # cols 2..9
    shifted = COLS + 3.0  # min-max first: an offset does not change the selection
    assert miou(shifted, box(5, 0, 10, 10), rule="fraction", fraction=0.5) == pytest.approx(1.0)


def test_otsu_rule_on_three_levels():
    # 50 px at 0, 25 px at 0.5, 25 px at 1: the between-class variance is largest for {0} | {0.5, 1}
    # (0.25 * 0.75^2 = 0.141 > 0.1875 * (5/6)^2 = 0.130).
    m = torch.zeros(1, 10, 10)
    m[0, 5:, :5], m[0, 5:, 5:] = 0.5, 1.0
    assert binarise(m[0], "otsu").sum() == 50
    assert miou(m, box(0, 5, 10, 10), rule="otsu") == pytest.approx(1.0)
    two = torch.zeros(1, 10, 10)
    two[0, :, 6:] = 0.7
    assert miou(two + 0.2, box(6, 0, 10, 10), rule="otsu") == pytest.approx(1.0)


def test_topk_rule_keeps_ties_at_the_cut():
    # 25% of 100 px: the 25th largest value is col 7's, and all of col 7 ties -> cols 7..9 (30 px).
    assert binarise(COLS[0], "topk", top_k=0.25).sum() == 30
    assert miou(COLS, box(7, 0, 10, 10), rule="topk", top_k=0.25) == pytest.approx(1.0)
    assert miou(COLS, box(7, 0, 10, 10), rule="topk", top_k=0.2) == pytest.approx(2 / 3)  # cols 8..9


@pytest.mark.parametrize("rule", ["mean", "fraction", "otsu", "topk"])
def test_all_zero_and_constant_maps_select_nothing(rule):
    for m in (torch.zeros(1, 8, 8), torch.full((1, 8, 8), 0.7)):
        assert binarise(m[0], rule).sum() == 0
        out = saliency_iou(m, box(0, 0, 8, 8), rule=rule)
        assert out["miou"].item() == 0.0 and out["sweep_miou"].item() == 0.0 and out["maxboxacc"].item() == 0.0


def test_one_pixel_box_border_box_and_several_boxes():
    m = torch.zeros(1, 10, 10)
    m[0, 3, 3] = 1.0
    assert miou(m, box(3, 3, 4, 4)) == 1.0
    m = torch.zeros(1, 10, 10)
    m[0, 8:, 8:] = 1.0
    assert miou(m, box(8, 8, 14, 12)) == 1.0  # box touching (and crossing) the border is clipped
    m = torch.zeros(1, 10, 10)
    m[0, :2, :2], m[0, 8:, 8:] = 1.0, 1.0
    two = [torch.tensor([[0.0, 0.0, 2.0, 2.0], [8.0, 8.0, 10.0, 10.0]])]
    assert miou(m, two) == 1.0
    assert miou(m, [two[0][:1]]) == pytest.approx(0.5)  # only one of the two lit blobs is the target


def test_sweep_hand_computed():
    # COLS against the right half: thresholds t = 0, .1, ..., .9 select cols >= 1,1,2,3,4,5,6,7,8,9 (of 10), so
    # IoU(t) = 5/9, 5/9, 5/8, 5/7, 5/6, 1, 4/5, 3/5, 2/5, 1/5.
    out = saliency_iou(COLS, box(5, 0, 10, 10), sweep_steps=10, iou_thresholds=(0.5, 0.9))
    assert out["sweep_miou"].item() == pytest.approx(1.0)
    assert out["sweep_threshold"].item() == pytest.approx(0.5)
    # a second sample whose box is the left half: IoU(t) = 4/10, 4/10, 3/10, 2/10, 1/10, 0, ...
    maps = torch.cat([COLS, COLS])
    boxes = box(5, 0, 10, 10) + box(0, 0, 5, 10)
    out = saliency_iou(maps, boxes, sweep_steps=10, iou_thresholds=(0.5, 0.9))
    curve = torch.tensor([5 / 9 + 0.4, 5 / 9 + 0.4, 5 / 8 + 0.3, 5 / 7 + 0.2, 5 / 6 + 0.1, 1, 0.8, 0.6, 0.4, 0.2]) / 2
    assert out["sweep_miou"].item() == pytest.approx(curve.max().item())
    assert out["sweep_threshold"].item() == pytest.approx(0.5)
    assert out["maxboxacc_50"].item() == pytest.approx(0.5)  # never both >= 0.5 at one threshold
    assert out["maxboxacc_90"].item() == pytest.approx(0.5)
    assert out["maxboxacc"].item() == pytest.approx(0.5)


def brute_force_sweep(maps, boxes, steps, deltas):
    ious = []
    for m, b in zip(maps, boxes, strict=True):
        n = (m - m.min()) / (m.max() - m.min())
        gt = box_union_mask(b, tuple(m.shape))
        row = []
        for j in range(steps):
            pred = n > j / steps
            row.append(((pred & gt).sum() / (pred | gt).sum()).item())
        ious.append(row)
    ious = torch.tensor(ious)
    acc = torch.stack([(ious >= d).float().mean(0).max() for d in deltas])
    return ious.mean(0).max(), acc


def test_sweep_matches_brute_force_and_class_matches_functional():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(9, 16, 16, generator=g) ** 3
    boxes = [torch.tensor([[2.0 + i, 1.0, 9.0 + i, 12.0]]) for i in range(9)]
    best, acc = brute_force_sweep(maps, boxes, 20, (0.3, 0.35, 0.4))
    ref = saliency_iou(maps, boxes, rule="otsu", sweep_steps=20, iou_thresholds=(0.3, 0.35, 0.4))
    assert ref["sweep_miou"].item() == pytest.approx(best.item(), abs=1e-6)
    for d, a in zip((30, 35, 40), acc, strict=True):
        assert ref[f"maxboxacc_{d}"].item() == pytest.approx(a.item())
    assert ((acc > 0) & (acc < 1)).any()  # the reference case is not degenerate
    metric = SaliencyIoU(rule="otsu", sweep_steps=20, iou_thresholds=(0.3, 0.35, 0.4))
    metric.update(maps[:4], boxes[:4])
    metric.update(maps[4:], boxes[4:])
    out = metric.compute()
    assert out.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])


def test_resizing_to_original_size():
    m = torch.zeros(1, 5, 5)
    m[0, :, :2] = 1.0  # left 2 of 5 columns; bilinear upsampling to 50 px blurs the edge symmetrically
    out = saliency_iou(m, box(0, 0, 20, 50), sizes=torch.tensor([[50, 50]]), rule="fraction", fraction=0.5)
    assert out["miou"].item() == pytest.approx(1.0)


def test_flags_and_bad_options():
    assert SaliencyIoU.higher_is_better is True and SaliencyIoU.full_state_update is False
    with pytest.raises(ValueError, match="rule"):
        SaliencyIoU(rule="median")
    with pytest.raises(ValueError, match="top_k"):
        SaliencyIoU(rule="topk", top_k=0)
    with pytest.raises(ValueError, match="iou_thresholds"):
        SaliencyIoU(iou_thresholds=())
