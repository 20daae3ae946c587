"""Saliency IoU: binarise a map, compare it with the mask of the union of the target's boxes.

Every rule acts on the map after min-max normalisation to [0, 1] (a map without contrast — constant or all-zero —
becomes all zeros), so results do not depend on a map's scale or offset, and a pixel is selected when its value is
**strictly** above the rule's threshold. Consequently an all-zero or constant map selects nothing (IoU 0). Rules
(``rule=``), with their sources:

* ``"mean"``     — above the mean of the min-max normalised map (Chefer et al., CVPR 2021; their reference
                   code's segmentation evaluation: ``Res.gt(Res.mean())`` after min-max).
* ``"fraction"`` — above ``fraction`` of the range; for non-negative maps with minimum 0 (the explainer contract)
                   this is "above ``fraction`` x max" (CAM, Zhou et al. 2016, used 20%).
* ``"otsu"``     — Otsu's threshold (Otsu 1979) on a 256-bin histogram of the normalised map: the pixels in the
                   bins above the split that maximises the between-class variance (first maximum on ties).
* ``"topk"``     — the ``top_k`` fraction of the area with the highest values: every pixel >= the value of the
                   ``ceil(top_k * H * W)``-th largest (ties at the cut are all kept, so the area may exceed it),
                   except pixels at the map's minimum.

Threshold sweep (MaxBoxAcc-style; Choe et al., CVPR 2020 "Evaluating WSOL Right", MaxBoxAccV2 with
``iou_thresholds`` = {0.3, 0.5, 0.7}): for each threshold ``t`` in ``{0, 1/T, ..., (T-1)/T}`` the normalised map is
binarised at ``> t``; ``BoxAcc(t, d)`` is the fraction of samples whose IoU >= ``d``; ``maxboxacc_<d>`` is its
maximum over ``t`` and ``maxboxacc`` the mean of those over ``d``. Deviation from Choe et al.: we compare the
binarised mask with the box-union mask directly instead of first turning the mask into a box (their
largest-connected-component box estimation has no batched torch form), i.e. a pixel-IoU variant. ``sweep_miou`` is
the best mean IoU over the same thresholds and ``sweep_threshold`` the threshold attaining it.

``compute()`` returns {"miou", "maxboxacc", "maxboxacc_30", "maxboxacc_50", "maxboxacc_70", "sweep_miou",
"sweep_threshold"} (one ``maxboxacc_<d>`` per IoU threshold; NaN when no samples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from mmel.metrics._common import box_union_masks, prepare_groups, scatter_groups
from mmel.metrics.protocol import ItemContext, Output
from mmel.utils.maps import minmax

RULES = ("mean", "fraction", "otsu", "topk")
_NAME = "SaliencyIoU"


def _otsu_mask(n: Tensor, bins: int = 256) -> Tensor:
    """Otsu binarisation of normalised maps n [..., H, W] in [0, 1], each map on its own histogram."""
    shape = n.shape
    n = n.reshape(-1, shape[-2] * shape[-1])  # [N, HW]
    rows = n.shape[0]
    b = (n * bins).floor().long().clamp(0, bins - 1)
    offsets = torch.arange(rows, device=n.device)[:, None] * bins  # one bincount for all maps
    hist = torch.bincount((b + offsets).flatten(), minlength=rows * bins).view(rows, bins).to(n.dtype)
    centres = (torch.arange(bins, device=n.device, dtype=n.dtype) + 0.5) / bins
    w0 = hist.cumsum(1)
    w1 = hist.sum(1, keepdim=True) - w0
    m0 = (hist * centres).cumsum(1)
    m1 = (hist * centres).sum(1, keepdim=True) - m0
    valid = (w0 > 0) & (w1 > 0)
    between = torch.where(valid, w0 * w1 * (m0 / w0.clamp(min=1) - m1 / w1.clamp(min=1)) ** 2, -1.0)
    split = between.argmax(1, keepdim=True)  # first maximum
    return ((b > split) & valid.any(1, keepdim=True)).view(shape)  # no valid split (one bin): nothing


def binarise(m: Tensor, rule: str = "mean", fraction: float = 0.5, top_k: float = 0.2) -> Tensor:
    """Boolean mask [..., H, W] of saliency maps m [..., H, W] (each map on its own) by ``rule`` (see the module
    docstring)."""
    return _select(minmax(m), rule, fraction, top_k)


def _select(n: Tensor, rule: str, fraction: float, top_k: float) -> Tensor:
    """:func:`binarise` of maps already min-max normalised: n [..., H, W] in [0, 1]."""
    if rule == "mean":
        return n > n.mean((-2, -1), keepdim=True)
    if rule == "fraction":
        return n > fraction
    if rule == "otsu":
        return _otsu_mask(n)
    if rule == "topk":
        k = max(1, math.ceil(top_k * n.shape[-2] * n.shape[-1]))
        cut = n.flatten(-2).topk(k, dim=-1).values[..., -1:, None]
        return (n >= cut) & (n > 0)
    raise ValueError(f"{_NAME}: `rule` must be one of {RULES}; got {rule!r}.")


def _check_args(rule: str, fraction: float, top_k: float, sweep_steps: int, iou_thresholds: Sequence[float]) -> None:
    if rule not in RULES:
        raise ValueError(f"{_NAME}: `rule` must be one of {RULES}; got {rule!r}.")
    if not 0 <= fraction < 1:
        raise ValueError(f"{_NAME}: `fraction` must be in [0, 1); got {fraction}.")
    if not 0 < top_k <= 1:
        raise ValueError(f"{_NAME}: `top_k` must be in (0, 1]; got {top_k}.")
    if sweep_steps < 1:
        raise ValueError(f"{_NAME}: `sweep_steps` must be >= 1; got {sweep_steps}.")
    if not iou_thresholds or not all(0 < d <= 1 for d in iou_thresholds):
        raise ValueError(f"{_NAME}: `iou_thresholds` must be non-empty values in (0, 1]; got {iou_thresholds}.")


def sweep_thresholds(steps: int, device: torch.device | None = None) -> Tensor:
    """The sweep's thresholds [T] = {0, 1/T, ..., (T-1)/T} on the normalised map."""
    return torch.arange(steps, device=device, dtype=torch.float32) / steps


def _saliency_iou_update(
    maps: Tensor,
    boxes: Sequence[Tensor],
    sizes: Tensor | None = None,
    rule: str = "mean",
    fraction: float = 0.5,
    top_k: float = 0.2,
    sweep_steps: int = 100,
) -> tuple[Tensor, Tensor]:
    """Per-sample IoU [N] at ``rule`` and IoU at every sweep threshold [N, T]."""
    _check_args(rule, fraction, top_k, sweep_steps, (0.5,))
    groups = prepare_groups(maps, boxes, sizes, _NAME)
    if not groups:
        return maps.new_zeros(0), maps.new_zeros(0, sweep_steps)
    ts = sweep_thresholds(sweep_steps, maps.device)
    ious, sweeps = [], []
    for idx, size, m, b in groups:  # all maps of one size at once
        gt = box_union_masks(b, size)  # [n, H, W]
        n = minmax(m)
        pred = _select(n, rule, fraction, top_k)
        ious.append((idx, ((pred & gt).sum((-2, -1)) / (pred | gt).sum((-2, -1))).float()))
        # All thresholds at once, exact float comparisons: with bin(v) = #{k: t_k < v}, v > t_k iff bin(v) > k, so
        # the count above t_k is the number of values with bin > k (a histogram of bins, summed from the top).
        rows, pixels = n.shape[0], n.shape[-2] * n.shape[-1]
        bins = (
            torch.searchsorted(ts, n.reshape(rows, pixels))
            + (sweep_steps + 1) * torch.arange(rows, device=n.device)[:, None]
        )
        gt = gt.reshape(rows, pixels)
        hist = torch.bincount(bins.flatten(), minlength=rows * (sweep_steps + 1)).view(rows, -1)
        hist_gt = torch.bincount(bins[gt], minlength=rows * (sweep_steps + 1)).view(rows, -1)
        above = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # [n, T]: values above t_k
        inter = hist_gt.flip(1).cumsum(1).flip(1)[:, 1:]
        sweeps.append((idx, (inter / (above + gt.sum(1, keepdim=True) - inter)).float()))
    return scatter_groups(ious, maps.shape[0], maps.new_zeros(0)), scatter_groups(
        sweeps, maps.shape[0], maps.new_zeros(0, sweep_steps)
    )


def _accumulate(iou: Tensor, sweep: Tensor, iou_thresholds: Sequence[float]) -> dict[str, Tensor]:
    """Sum states: IoU sum, sample count, IoU sum per threshold [T], hit counts per (threshold, IoU level) [T, D]."""
    deltas = torch.tensor(list(iou_thresholds), device=sweep.device, dtype=sweep.dtype)
    return {
        "iou": iou.sum(),
        "total": torch.tensor(float(iou.numel()), device=iou.device),
        "sweep_iou": sweep.sum(0),
        "sweep_hits": (sweep[:, :, None] >= deltas).sum(0).float(),
    }


def _saliency_iou_compute(
    iou: Tensor, total: Tensor, sweep_iou: Tensor, sweep_hits: Tensor, iou_thresholds: Sequence[float]
) -> dict[str, Tensor]:
    box_acc = sweep_hits / total  # [T, D]
    best = box_acc.max(0).values  # [D]
    mean_curve = sweep_iou / total
    out = {"miou": iou / total, "maxboxacc": best.mean()}
    for d, value in zip(iou_thresholds, best, strict=True):
        out[f"maxboxacc_{round(d * 100)}"] = value
    out["sweep_miou"] = mean_curve.max()
    out["sweep_threshold"] = sweep_thresholds(mean_curve.numel(), iou.device)[mean_curve.argmax()]
    if not total > 0:
        out["sweep_threshold"] = iou.new_tensor(float("nan"))
    return out


def saliency_iou(
    maps: Tensor,
    boxes: Sequence[Tensor],
    sizes: Tensor | None = None,
    rule: str = "mean",
    fraction: float = 0.5,
    top_k: float = 0.2,
    sweep_steps: int = 100,
    iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7),
) -> dict[str, Tensor]:
    """IoU of binarised maps [N, h, w] with the union of boxes (list of N [M_i, 4] xyxy), plus the threshold sweep.

    Example:
        >>> maps = torch.zeros(1, 10, 10)
        >>> maps[0, :, :4] = 1.0  # left 4 columns lit
        >>> out = saliency_iou(maps, [torch.tensor([[0.0, 0.0, 5.0, 10.0]])])  # box = left 5 columns
        >>> round(out["miou"].item(), 3), round(out["maxboxacc_70"].item(), 3)
        (0.8, 1.0)
    """
    _check_args(rule, fraction, top_k, sweep_steps, iou_thresholds)
    iou, sweep = _saliency_iou_update(maps, boxes, sizes, rule, fraction, top_k, sweep_steps)
    return _saliency_iou_compute(**_accumulate(iou, sweep, iou_thresholds), iou_thresholds=iou_thresholds)


class SaliencyIoU(Metric):
    """Mean IoU of binarised maps with the box-union mask, plus a MaxBoxAcc-style threshold sweep.

    ``update(maps [N, h, w], boxes list of N [M_i, 4], sizes [N, 2] = None)``; ``compute()`` returns a dict (see
    the module docstring for every key and convention).

    Example:
        >>> metric = SaliencyIoU(rule="fraction", fraction=0.5)
        >>> maps = torch.zeros(1, 10, 10)
        >>> maps[0, :5, :5] = 1.0
        >>> metric.update(maps, [torch.tensor([[0.0, 0.0, 10.0, 5.0]])])  # box = top half
        >>> round(metric.compute()["miou"].item(), 3)
        0.5
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        rule: str = "mean",
        fraction: float = 0.5,
        top_k: float = 0.2,
        sweep_steps: int = 100,
        iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        iou_thresholds = tuple(float(d) for d in iou_thresholds)
        _check_args(rule, fraction, top_k, sweep_steps, iou_thresholds)
        self.rule, self.fraction, self.top_k = rule, fraction, top_k
        self.sweep_steps, self.iou_thresholds = sweep_steps, iou_thresholds
        self.add_state("iou", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("sweep_iou", torch.zeros(sweep_steps), dist_reduce_fx="sum")
        self.add_state("sweep_hits", torch.zeros(sweep_steps, len(iou_thresholds)), dist_reduce_fx="sum")

    needs = frozenset({"maps", "boxes"})

    @property
    def outputs(self) -> tuple[Output, ...]:
        rest = [
            "maxboxacc",
            *(f"maxboxacc_{round(d * 100)}" for d in self.iou_thresholds),
            "sweep_miou",
            "sweep_threshold",
        ]
        return (Output("miou", True, field="iou"), *(Output(k, k != "sweep_threshold" or None) for k in rest))

    def item_values(self, ctx: ItemContext) -> list[dict[str, Any]]:
        """Per item {"iou": IoU at the configured rule, "sweep": IoU at each sweep threshold [T]}."""
        ctx.require(self.needs, "SaliencyIoU")
        iou, sweep = _saliency_iou_update(
            ctx.maps.detach(), ctx.boxes, ctx.sizes, self.rule, self.fraction, self.top_k, self.sweep_steps
        )
        return [{"iou": i, "sweep": s} for i, s in zip(iou.tolist(), sweep.tolist(), strict=True)]

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
            iou = torch.tensor([float(r["iou"]) for r in records], dtype=torch.float32)
            sweep = torch.tensor([r["sweep"] for r in records], dtype=torch.float32).reshape(-1, self.sweep_steps)
        else:
            iou, sweep = _saliency_iou_update(
                maps.detach(), boxes, sizes, self.rule, self.fraction, self.top_k, self.sweep_steps
            )
        for name, value in _accumulate(iou, sweep, self.iou_thresholds).items():
            setattr(self, name, getattr(self, name) + value.to(getattr(self, name).device))

    def compute(self) -> dict[str, Tensor]:
        return _saliency_iou_compute(self.iou, self.total, self.sweep_iou, self.sweep_hits, self.iou_thresholds)
