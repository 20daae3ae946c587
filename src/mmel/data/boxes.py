"""The one rule for which pixels a box covers, shared by the training losses and every metric.

Boxes are ``xyxy`` in continuous pixel coordinates: pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)`` (COCO and
Flickr30k Entities convention). A pixel belongs to a box when it overlaps the box with positive area, i.e. columns
``floor(x1) .. ceil(x2) - 1`` (rows likewise). For integer boxes that is exactly the ``(x2 - x1) * (y2 - y1)``
pixels the box spans; a box smaller than a pixel, or a degenerate one (``x1 == x2``, a point), still covers the pixel
it lies in, so no target is silently empty on a coarse grid. Ranges are clipped to the grid. The ground truth of one
target is the **union** of its boxes.

Why one rule: the HSRM's box losses (:mod:`mmel.lit_module`) and the metrics (:mod:`mmel.metrics`) read the same
masks, so training optimises the target that evaluation scores. (They once differed: a cell-centre rule in training
marked 4 cells of a 6x6 grid for the box [0.7, 0.7, 3.2, 3.2], the metrics 16.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def box_pixel_ranges(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Inclusive pixel ranges ``[..., 4]`` = (c0, r0, c1, r1) covered by boxes [..., 4] xyxy on an (h, w) grid."""
    h, w = size
    x1, y1, x2, y2 = boxes.unbind(-1)
    c0 = x1.floor().clamp(0, w - 1)
    r0 = y1.floor().clamp(0, h - 1)
    c1 = torch.maximum(x2.ceil() - 1, c0).clamp(0, w - 1)
    r1 = torch.maximum(y2.ceil() - 1, r0).clamp(0, h - 1)
    return torch.stack([c0, r0, c1, r1], dim=-1).long()


def box_union_mask(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Boolean mask [H, W] of the union of boxes [M >= 1, 4] xyxy."""
    return box_union_masks(boxes[None], size)[0]


def pad_boxes(boxes: Sequence[Tensor]) -> Tensor:
    """N box sets [M_i >= 1, 4] -> [N, max M_i, 4], each padded with copies of its own first box (the union of an
    entry's boxes, its pixel ranges and its distances are unchanged by a repeated box)."""
    m = max(len(b) for b in boxes)
    return torch.stack([torch.cat([b, b[:1].expand(m - len(b), 4)]) if len(b) < m else b for b in boxes])


def box_union_masks(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Batched :func:`box_union_mask`: boxes [N, M, 4] xyxy (see :func:`pad_boxes`) -> bool masks [N, H, W]."""
    h, w = size
    c0, r0, c1, r1 = box_pixel_ranges(boxes, size).unbind(-1)  # each [N, M]
    rows = torch.arange(h, device=boxes.device)
    cols = torch.arange(w, device=boxes.device)
    in_rows = (rows >= r0[..., None]) & (rows <= r1[..., None])  # [N, M, H]
    in_cols = (cols >= c0[..., None]) & (cols <= c1[..., None])  # [N, M, W]
    union = in_rows[:, 0, :, None] & in_cols[:, 0, None, :]
    for j in range(1, boxes.shape[1]):  # one box slot at a time: memory stays [N, H, W]
        union |= in_rows[:, j, :, None] & in_cols[:, j, None, :]
    return union


def union_masks(boxes: Sequence[Tensor], size: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """Bool masks [N, H, W] of each box set's union, for N sets [M_i, 4] xyxy in the grid's own pixels (a set without
    boxes: nothing marked)."""
    sets = [torch.as_tensor(b).reshape(-1, 4).to(device=device, dtype=torch.float32) for b in boxes]
    out = torch.zeros(len(sets), *size, dtype=torch.bool, device=device)
    full = [k for k, b in enumerate(sets) if b.shape[0]]
    if full:
        out[full] = box_union_masks(pad_boxes([sets[k] for k in full]), size)
    return out
