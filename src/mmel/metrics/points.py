"""Point-wise mIoU (p-mIoU): a map scored at labelled points, as LeGrad reports it on OpenImages V7.

OpenImages V7's point labels say, at a point of an image, whether a class is there (``yes``) or not (``no``);
Benenson & Ferrari (2022) score a segmentation at those points: per class, TP = ``yes`` points predicted inside,
FP = ``no`` points predicted inside, FN = ``yes`` points predicted outside, summed over the class's images,
IoU_c = TP / (TP + FP + FN), and p-mIoU = the mean of IoU_c over the classes with at least one labelled point
(``unsure`` points are dropped by the loader). LeGrad (Bousselham et al. 2024) applies it to explanation maps; its
repository ships no evaluation code, so two choices here are ours and configurable: the map (min-max normalised
after the bilinear resize to the scored frame) is **inside** where its value is ``> threshold`` (default 0.5),
and a point at continuous pixel coordinates (x, y) reads the pixel ``(floor(y), floor(x))``.

Per item the record holds its counts and category; ``compute()`` sums them per category, so the result equals
one pass over every point of the split (items of the same class add up, as in the benchmark).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from mmel.metrics._common import check_maps, check_sizes, resize_group
from mmel.metrics.pointing import category_ids
from mmel.metrics.protocol import ItemContext, Output
from mmel.metrics.segmentation import normalise

_NAME = "PointMIoU"


def _check_points(points: Sequence[Tensor] | None, sizes: list[tuple[int, int]]) -> list[Tensor]:
    if points is None or len(points) != len(sizes):
        got = "None" if points is None else len(points)
        raise ValueError(f"{_NAME}: `points` must be N={len(sizes)} tensors [P, 3] (x, y, label); got {got}.")
    out = []
    for i, (p, (h, w)) in enumerate(zip(points, sizes, strict=True)):
        p = torch.as_tensor(p, dtype=torch.float32).reshape(-1, 3) if len(p) else torch.zeros(0, 3)
        x, y, lab = p[:, 0], p[:, 1], p[:, 2]
        if bool(((x < 0) | (x > w) | (y < 0) | (y > h)).any()):
            raise ValueError(f"{_NAME}: points[{i}] has a point outside its (H, W)=({h}, {w}) frame.")
        if bool(((lab != 0) & (lab != 1)).any()):
            raise ValueError(f"{_NAME}: points[{i}] labels must be 1 (yes) or 0 (no).")
        out.append(p)
    return out


def point_counts(m: Tensor, p: Tensor, size: tuple[int, int], threshold: float) -> tuple[int, int, int]:
    """(TP, FP, FN) of one map [h, w] at points [P, 3] in a frame of ``size`` (H, W)."""
    h, w = size
    r = normalise(resize_group(m[None].detach().float(), size)[0])
    if not len(p):
        return 0, 0, 0
    ys = p[:, 1].floor().long().clamp(0, h - 1)
    xs = p[:, 0].floor().long().clamp(0, w - 1)
    inside = r[ys, xs] > threshold
    yes = p[:, 2] == 1
    return int((inside & yes).sum()), int((inside & ~yes).sum()), int((~inside & yes).sum())


def _point_update(maps: Tensor, points: Sequence[Tensor], sizes: Tensor | None, threshold: float) -> list[tuple]:
    maps = check_maps(maps, _NAME)
    size_list = check_sizes(sizes, maps, _NAME)
    pts = _check_points(points, size_list)
    return [point_counts(m, p, s, threshold) for m, p, s in zip(maps, pts, size_list, strict=True)]


def _p_miou(counts: Tensor, ids: Tensor) -> Tensor:
    """Mean over categories of TP / (TP + FP + FN) summed per category; counts [N, 3], ids [N]."""
    if not len(ids):
        return torch.tensor(float("nan"))
    uniq, inv = ids.unique(return_inverse=True)
    sums = torch.zeros(len(uniq), 3, dtype=torch.float64).index_add_(0, inv.cpu(), counts.double().cpu())
    denom = sums.sum(1)
    defined = denom > 0
    if not defined.any():
        return torch.tensor(float("nan"))
    return (sums[defined, 0] / denom[defined]).mean().float()


def point_miou(
    maps: Tensor,
    points: Sequence[Tensor],
    categories: Sequence[str],
    sizes: Tensor | None = None,
    threshold: float = 0.5,
) -> Tensor:
    """p-mIoU of maps [N, h, w] at points (N tensors [P_i, 3]: x, y, label 1/0) grouped by ``categories``.

    Example:
        >>> maps = torch.zeros(1, 4, 4)
        >>> maps[0, :, :2] = 1.0  # the left half
        >>> pts = torch.tensor([[0.5, 0.5, 1], [3.5, 0.5, 0], [3.5, 3.5, 1]])  # 1 TP, 1 TN, 1 FN
        >>> round(point_miou(maps, [pts], ["cat"]).item(), 3)
        0.5
    """
    counts = torch.tensor(_point_update(maps, points, sizes, threshold), dtype=torch.long).reshape(-1, 3)
    ids, _ = category_ids(list(categories), counts.shape[0], torch.device("cpu"))
    return _p_miou(counts, ids)


class PointMIoU(Metric):
    """Point-wise mIoU of maps at labelled points (module docstring); ``compute()`` returns a scalar tensor.

    ``update(maps [N, h, w], points N x [P_i, 3], categories N strings, sizes [N, 2] = None)`` or
    ``update(records=...)``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    needs = frozenset({"maps", "points", "categories", "sizes"})
    outputs = (Output("", True),)

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= float(threshold) < 1.0:
            raise ValueError(f"{_NAME}: threshold must be in [0, 1); got {threshold}.")
        self.threshold = float(threshold)
        self.add_state("counts", [], dist_reduce_fx="cat")
        self.add_state("ids", [], dist_reduce_fx="cat")

    def item_values(self, ctx: ItemContext) -> list[dict[str, Any]]:
        """Per item {"tp", "fp", "fn", "category"}."""
        ctx.require(self.needs, _NAME)
        counts = _point_update(ctx.maps, ctx.points, ctx.sizes, self.threshold)
        return [{"tp": c[0], "fp": c[1], "fn": c[2], "category": str(k)}
                for c, k in zip(counts, ctx.categories, strict=True)]  # fmt: skip

    def update(
        self,
        maps: Tensor | None = None,
        points: Sequence[Tensor] | None = None,
        categories: Sequence[str] | None = None,
        sizes: Tensor | None = None,
        *,
        records: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        """Add N items, or N per-item ``records`` of :meth:`item_values`."""
        if records is not None:
            counts = [(int(r["tp"]), int(r["fp"]), int(r["fn"])) for r in records]
            categories = [str(r["category"]) for r in records]
        else:
            if categories is None:
                raise ValueError(f"{_NAME}: update needs `categories` (p-mIoU is a mean over classes).")
            counts = _point_update(maps, points, sizes, self.threshold)
        c = torch.tensor(counts, dtype=torch.long).reshape(-1, 3)
        ids, _ = category_ids(list(categories), c.shape[0], torch.device("cpu"))
        self.counts.append(c.to(self.device))
        self.ids.append(ids.to(self.device))

    def compute(self) -> Tensor:
        if isinstance(self.counts, list) and not self.counts:
            return torch.tensor(float("nan"))
        return _p_miou(dim_zero_cat(self.counts), dim_zero_cat(self.ids))
