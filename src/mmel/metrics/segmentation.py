"""The segmentation protocol of Chefer et al. (CVPR 2021) and LeGrad (Bousselham et al. 2024): a map against a
foreground mask (ImageNet-S, or any dataset with masks), as pixel accuracy, mIoU and mAP.

Per item, as in Chefer et al.'s ``baselines/ViT/imagenet_seg_eval.py`` (LeGrad reports these numbers and says it
follows that protocol; its repository ships no evaluation code, so this is checked against Chefer et al.'s):

* the map (resized bilinearly to the mask's frame, :mod:`mmel.metrics._common`) is min-max normalised to ``R``
  (a flat map gives all zeros, never NaN);
* **threshold**: foreground where ``R > mean(R)`` (the mean over the whole map), background where ``R <= mean``;
* **pixel accuracy**: correct pixels / labelled pixels; **IoU** per class (background, foreground):
  intersection / union of the predicted and the true class's pixels. Ignored pixels (mask value -1: ImageNet-S's
  1000, "ignore") are left out of every count, as Chefer et al.'s ``target > 0`` test leaves out label -1;
* **AP**: the average precision of the two-channel score ``[1 - R, R]`` against the one-hot label ``[bg, fg]``,
  all labelled pixels of both channels ranked together (Chefer et al.'s ``get_ap_scores``: scikit-learn's
  ``average_precision_score`` of the flattened two channels; ties are one threshold,
  :func:`mmel.metrics.average_precision._ap_rows`).

Reported, as there: ``pixel_accuracy`` = sum of correct / sum of labelled pixels over the items, ``miou`` = the
mean over the two classes of (summed intersections / summed unions), and ``map`` = the mean of the items' APs.
The first two are ratios of sums (a large image weighs more), the third a mean over items.

Differences from Chefer et al.: their 224 x 224 frame is a plain resize of image and mask; here the frame is the
evaluation's scored frame (a centre crop at the model's input size, or the original image in keep-size mode),
and the mask follows the image through the same geometry (nearest neighbour).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from mmel.metrics._common import check_maps, resize_group
from mmel.metrics.average_precision import _ap_rows
from mmel.metrics.protocol import ItemContext, Output

_NAME = "MaskSegmentation"


def normalise(m: Tensor) -> Tensor:
    """Min-max normalise one map [H, W] (all zeros when flat)."""
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


def _check_masks(masks: Sequence[Tensor], n: int) -> list[Tensor]:
    if masks is None or len(masks) != n:
        got = "None" if masks is None else len(masks)
        raise ValueError(f"{_NAME}: `masks` must be N={n} integer tensors [H, W] (1 fg, 0 bg, -1 ignore); got {got}.")
    out = []
    for i, m in enumerate(masks):
        m = torch.as_tensor(m)
        if m.ndim != 2 or m.is_floating_point():
            raise ValueError(f"{_NAME}: masks[{i}] must be an integer tensor [H, W]; got {m.dtype} {tuple(m.shape)}.")
        if bool(((m < -1) | (m > 1)).any()):
            raise ValueError(f"{_NAME}: masks[{i}] holds values outside {{-1, 0, 1}}.")
        out.append(m.long())
    return out


def segmentation_item(m: Tensor, mask: Tensor) -> dict[str, Any]:
    """One item's counts: map [h, w] (any size), mask [H, W] in {-1, 0, 1} -> {"correct", "labeled", "inter"
    [bg, fg], "union" [bg, fg], "ap"} (ap None when the item has no labelled pixel)."""
    r = normalise(resize_group(m[None].detach().float(), tuple(mask.shape))[0])
    fg_pred = r > r.mean()
    labelled = mask >= 0
    fg_true = mask == 1
    correct = int(((fg_pred == fg_true) & labelled).sum())
    inter, union = [], []
    for pred, true in ((~fg_pred, ~fg_true), (fg_pred, fg_true)):
        pred, true = pred & labelled, true & labelled
        inter.append(int((pred & true).sum()))
        union.append(int((pred | true).sum()))
    ap = None
    n_lab = int(labelled.sum())
    if n_lab:  # the two channels together always hold positives (a pixel is bg or fg)
        scores = torch.cat([1 - r[labelled], r[labelled]])[None]
        labels = torch.cat([~fg_true[labelled], fg_true[labelled]])[None]
        ap = float(_ap_rows(scores, labels)[0])
    return {"correct": correct, "labeled": n_lab, "inter": inter, "union": union, "ap": ap}


def _segmentation_update(maps: Tensor, masks: Sequence[Tensor]) -> list[dict[str, Any]]:
    maps = check_maps(maps, _NAME)
    return [segmentation_item(m, k) for m, k in zip(maps, _check_masks(masks, maps.shape[0]), strict=True)]


def _compute(correct: Tensor, labeled: Tensor, inter: Tensor, union: Tensor, ap: Tensor, n_ap: Tensor) -> dict:
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = inter.double() / union.double().clamp(min=1)
    return {
        "pixel_accuracy": (correct.double() / labeled.double()).float() if labeled > 0 else nan.float(),
        "miou": iou.mean().float() if union.sum() > 0 else nan.float(),
        "map": (ap / n_ap).float() if n_ap > 0 else nan.float(),
    }


def mask_segmentation(maps: Tensor, masks: Sequence[Tensor]) -> dict[str, Tensor]:
    """{"pixel_accuracy", "miou", "map"} of maps [N, h, w] against masks (N int tensors [H, W], 1 fg / 0 bg / -1
    ignore); see the module docstring.

    Example:
        >>> maps = torch.zeros(1, 4, 4)
        >>> maps[0, :2] = 1.0  # the top half
        >>> mask = torch.zeros(4, 4, dtype=torch.long)
        >>> mask[:2] = 1
        >>> {k: round(v.item(), 3) for k, v in mask_segmentation(maps, [mask]).items()}
        {'pixel_accuracy': 1.0, 'miou': 1.0, 'map': 1.0}
    """
    return _compute(*_sums(_segmentation_update(maps, masks)))


def _sums(items: Sequence[dict[str, Any]]) -> tuple[Tensor, ...]:
    """(correct, labeled, inter [2], union [2], AP sum, number of APs) summed over item records."""
    aps = [float(i["ap"]) for i in items if i.get("ap") is not None]
    return (
        torch.tensor(sum(int(i["correct"]) for i in items)),
        torch.tensor(sum(int(i["labeled"]) for i in items)),
        torch.tensor([sum(int(i["inter"][c]) for i in items) for c in (0, 1)]),
        torch.tensor([sum(int(i["union"][c]) for i in items) for c in (0, 1)]),
        torch.tensor(sum(aps), dtype=torch.float64),
        torch.tensor(len(aps)),
    )


class MaskSegmentation(Metric):
    """Pixel accuracy, mIoU (background / foreground) and mAP of maps against foreground masks (module docstring).

    ``update(maps [N, h, w], masks N x [H, W])`` or ``update(records=...)``; ``compute()`` returns
    {"pixel_accuracy", "miou", "map"} (NaN when undefined).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    needs = frozenset({"maps", "masks"})
    outputs = (Output("pixel_accuracy", True), Output("miou", True), Output("map", True, field="ap"))

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("labeled", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("inter", torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ap", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_ap", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def item_values(self, ctx: ItemContext) -> list[dict[str, Any]]:
        """Per item {"correct", "labeled", "inter": [bg, fg], "union": [bg, fg], "ap"}."""
        ctx.require(self.needs, _NAME)
        return _segmentation_update(ctx.maps, ctx.masks)

    def update(
        self,
        maps: Tensor | None = None,
        masks: Sequence[Tensor] | None = None,
        *,
        records: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        """Add N (map, mask) pairs, or N per-item ``records`` of :meth:`item_values`."""
        items = list(records) if records is not None else _segmentation_update(maps, masks)
        c, lab, i, u, ap, n_ap = _sums(items)
        self.correct += c.to(self.correct.device)
        self.labeled += lab.to(self.labeled.device)
        self.inter += i.to(self.inter.device)
        self.union += u.to(self.union.device)
        self.ap += ap.to(self.ap.device)
        self.n_ap += n_ap.to(self.n_ap.device)

    def compute(self) -> dict[str, Tensor]:
        return _compute(self.correct, self.labeled, self.inter, self.union, self.ap, self.n_ap)
