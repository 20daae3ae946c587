"""Pixel average precision: how well a map ranks the target's pixels above the rest.

The "mAP" of the segmentation protocol of Chefer et al. (2021) and LeGrad, scored here against the union of the
target's boxes (the metrics' box rule, :mod:`mmel.data.boxes`): every pixel of the map (resized to the scored frame,
:mod:`mmel.metrics._common`) is a detection with the map's value as its score and "inside a box" as its label, and
the item's AP is the area under the precision-recall steps of that ranking,

    AP = sum over distinct scores t (descending) of (R(t) - R(t_prev)) * P(t),

with P, R the precision and recall of {pixels with value >= t}. Pixels of equal value enter together (ties are one
threshold, as in scikit-learn's ``average_precision_score``), so a flat map scores the boxes' area share and a
map that puts every box pixel above every other pixel scores 1. Unlike the pointing game it reads the whole
ranking; unlike energy it is invariant to any monotone rescaling of the map. The reported value is the mean AP over
items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from mmel.metrics._common import box_union_masks, prepare_groups, scatter_groups
from mmel.metrics.protocol import ItemContext, Output

_NAME = "SaliencyAP"


def _ap_rows(scores: Tensor, labels: Tensor) -> Tensor:
    """AP of each row's ranking: scores [n, P] float, labels [n, P] bool (each row with >= 1 positive) -> [n]."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    s = scores.gather(1, order).double()
    tp = labels.gather(1, order).double().cumsum(1)  # true positives among the top k+1
    # the last pixel of each group of equal scores closes a threshold
    end = torch.ones_like(s, dtype=torch.bool)
    end[:, :-1] = s[:, :-1] != s[:, 1:]
    rank = torch.arange(1, s.shape[1] + 1, dtype=torch.float64, device=s.device)
    tp_end = torch.where(end, tp, 0.0)
    prev = torch.zeros_like(tp_end)
    prev[:, 1:] = tp_end[:, :-1].cummax(1).values  # tp at the previous threshold (tp never decreases)
    gain = torch.where(end, (tp - prev) * (tp / rank), 0.0)  # (delta recall * positives) * precision
    return (gain.sum(1) / tp[:, -1]).float()


def _saliency_ap_update(maps: Tensor, boxes: Sequence[Tensor], sizes: Tensor | None = None) -> Tensor:
    """Per-item AP [N] of maps [N, h, w] against boxes (N tensors [M_i, 4] xyxy in the frame of ``sizes``)."""
    groups = prepare_groups(maps, boxes, sizes, _NAME)
    out = []
    for idx, size, m, b in groups:  # all maps of one size at once
        out.append((idx, _ap_rows(m.detach().flatten(1), box_union_masks(b, size).flatten(1))))
    return scatter_groups(out, maps.shape[0], maps.new_zeros(0))


def saliency_ap(maps: Tensor, boxes: Sequence[Tensor], sizes: Tensor | None = None) -> Tensor:
    """Mean pixel AP of maps [N, h, w] against boxes (see the module docstring).

    Example:
        >>> maps = torch.zeros(1, 4, 4)
        >>> maps[0, :2, :2] = 1.0  # the box, exactly
        >>> saliency_ap(maps, [torch.tensor([[0.0, 0.0, 2.0, 2.0]])])
        tensor(1.)
    """
    return _saliency_ap_update(maps, boxes, sizes).mean()


class SaliencyAP(Metric):
    """Mean pixel average precision of maps against their targets' boxes; ``compute()`` returns a scalar tensor.

    ``update(maps [N, h, w], boxes N x [M_i, 4], sizes [N, 2] = None)`` or ``update(records=...)``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    needs = frozenset({"maps", "boxes"})
    outputs = (Output("", True, field="ap"),)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("ap", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def item_values(self, ctx: ItemContext) -> list[dict[str, Any]]:
        """Per item {"ap": its pixel AP}."""
        ctx.require(self.needs, _NAME)
        return [{"ap": a} for a in _saliency_ap_update(ctx.maps, ctx.boxes, ctx.sizes).tolist()]

    def update(
        self,
        maps: Tensor | None = None,
        boxes: Sequence[Tensor] | None = None,
        sizes: Tensor | None = None,
        *,
        records: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        """Add N (map, boxes) pairs, or N per-item ``records`` of :meth:`item_values`."""
        if records is not None:
            ap = torch.tensor([float(r["ap"]) for r in records], dtype=torch.float32)
        else:
            ap = _saliency_ap_update(maps, boxes, sizes)
        self.ap += ap.sum().to(self.ap.device)
        self.total += ap.numel()

    def compute(self) -> Tensor:
        return self.ap / self.total
