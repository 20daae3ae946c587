"""Pixel average precision (mmel.metrics.average_precision): hand-computed cases, ties, torchmetrics' own AP as an
independent reference, the class against the function, and its records replayed."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import binary_average_precision

from mmel.metrics.average_precision import SaliencyAP, _ap_rows, saliency_ap
from mmel.metrics.protocol import ItemContext


def test_hand_computed_ranking_and_ties():
    # scores 0.9 (+), 0.8 (-), 0.7 (+): P at the two positives 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    ap = _ap_rows(torch.tensor([[0.9, 0.8, 0.7]]), torch.tensor([[True, False, True]]))
    assert float(ap) == pytest.approx((1 + 2 / 3) / 2, abs=1e-6)
    # a flat map: one threshold holding everything -> the positives' share
    flat = _ap_rows(torch.ones(1, 10), torch.tensor([[True] * 3 + [False] * 7]))
    assert float(flat) == pytest.approx(0.3, abs=1e-6)
    # a tie of a positive and a negative at the top: enters as one threshold (precision 1/2), not best case
    tie = _ap_rows(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[True, False, False]]))
    assert float(tie) == pytest.approx(0.5, abs=1e-6)


def test_equals_torchmetrics_average_precision_on_random_maps():
    """torchmetrics' binary AP (thresholds=None: every distinct score) is an independent implementation of the same
    step-wise AP; float32 scores, float64 sums here: agreement to 1e-5."""
    g = torch.Generator().manual_seed(0)
    maps = (torch.rand(6, 16, 16, generator=g) * 8).round() / 8  # coarse values: many ties
    boxes = [torch.tensor([[2.0 + k, 3.0, 9.0 + k, 12.0]]) for k in range(6)]
    from mmel.data.boxes import union_masks

    masks = union_masks(boxes, (16, 16))
    pairs = zip(maps, masks, strict=True)
    want = torch.stack([binary_average_precision(m.flatten(), t.flatten().long()) for m, t in pairs])
    got = torch.stack([saliency_ap(m[None], [b]) for m, b in zip(maps, boxes, strict=True)])
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)


def test_class_equals_function_and_replay_equals_update():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(5, 8, 8, generator=g)
    boxes = [torch.tensor([[0.0, 0.0, 4.0 + k % 3, 4.0]]) for k in range(5)]
    sizes = torch.tensor([[32, 32]] * 5)  # scored in a larger frame: maps are resized first
    m = SaliencyAP()
    m.update(maps[:2], boxes[:2], sizes[:2])
    m.update(maps[2:], boxes[2:], sizes[2:])
    assert float(m.compute()) == pytest.approx(float(saliency_ap(maps, boxes, sizes)), abs=1e-6)
    replayed = SaliencyAP()
    replayed.update(records=SaliencyAP().item_values(ItemContext(maps=maps, boxes=boxes, sizes=sizes)))
    assert float(replayed.compute()) == pytest.approx(float(m.compute()), abs=1e-6)
