"""Pointing game (Zhang et al., ECCV 2016) and energy-based pointing game (Wang et al., Score-CAM, CVPRW 2020).

Both score a saliency map against the boxes of the object the prompt names; maps are first resized to the original
image size (see :mod:`mmel.metrics._common` for the shared map / box conventions).

Pointing game conventions, with their sources:

* **Hit rule** (TorchRay's ``PointingGame.evaluate``, the reference implementation of Zhang et al.'s protocol): the
  maximum at pixel ``p`` hits when some pixel ``q`` of the union of boxes has ``|p - q|^2 < tau^2`` (Euclidean
  distance between pixel centres, **strictly** below ``tau``; a maximum exactly ``tau`` pixels away is a miss).
  A maximum inside a box is always a hit, so ``tau = 0`` means "inside a box" instead of TorchRay's "never".
* **Ties** (``ties=``): ``"all"`` (default) — every pixel attaining the maximum must hit. A map with several equal
  peaks only scores when all of them are on the target, so flat or saturated maps are not rewarded for an
  arbitrary choice; a constant map hits only when the target covers the whole image (up to ``tau``). Bilinear
  upsampling commonly creates 2x2 plateaus at a patch-grid maximum; those lie within a pixel of each other and do
  not change the outcome. ``"first"`` — the first maximum in raster order (``torch.argmax``; TorchRay's behaviour).
  ``"any"`` — some maximum hits (lenient; reported for comparison only).
* An **all-zero map** points nowhere: always a miss (whatever ``ties`` says).
* **Per-category mean accuracy** is the unweighted mean over categories of each category's accuracy (Zhang et al.
  report it per class and averaged). ``categories`` may be strings or integer ids; strings are turned into ids with
  a stable hash (blake2b), so processes agree on them under DDP without sharing a vocabulary.
* **Difficult subset** (Zhang et al.: the target covers less than 1/4 of the image and another category is present):
  the caller flags it with ``difficult`` [N] — :func:`difficult_flags` computes the flags with this module's own
  box rule — and its accuracy is reported next to the overall one.
* Undefined results (no samples, no categorised / difficult samples) are NaN; the key set never changes.

Energy pointing game: the share of the map's mass inside the union of boxes, ``sum(map * mask) / sum(map)``,
averaged over samples (Score-CAM's "energy-based pointing game", with boxes as the target region). Maps must be
non-negative; an all-zero map has no mass and scores 0 (it explains nothing). The functional form is differentiable
in ``maps`` (usable as a training signal).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from mmel.metrics._common import (
    box_pixel_ranges,
    box_union_masks,
    check_mask,
    pad_boxes,
    prepare_groups,
    scatter_groups,
    size_groups,
)
from mmel.metrics.protocol import ItemContext, Output

TIES = ("all", "first", "any")
_NAME = "PointingGame"
DIFFICULT_MAX_SHARE = 0.25  # Zhang et al.: "the total area of the target category is less than 1/4 of the image"


def difficult_flags(
    boxes: Sequence[Tensor], sizes: Tensor | Sequence, distractor: bool | Sequence[bool] | Tensor
) -> Tensor:
    """Zhang et al.'s (ECCV 2016) difficult subset: [N] bool, True when the union of the target's boxes covers less
    than 1/4 of the image *and* another category is present (``distractor``: one flag for all N, or one each).

    boxes: N tensors [M_i, 4] xyxy in pixels of images of ``sizes`` [N, 2] (H, W). The area is counted in pixels
    with the same box rule as the hit test (:func:`mmel.metrics._common.box_union_mask`).
    """
    sizes = [(int(h), int(w)) for h, w in torch.as_tensor(sizes).reshape(-1, 2).tolist()]
    if len(sizes) != len(boxes):
        raise ValueError(f"difficult_flags: {len(boxes)} box sets but {len(sizes)} sizes")
    present = torch.as_tensor(distractor, dtype=torch.bool).expand(len(boxes))
    box_list = [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
    if not box_list:
        return torch.zeros(0, dtype=torch.bool)
    share = torch.zeros(len(box_list), device=box_list[0].device)  # an entry without boxes covers nothing
    for size, idx in size_groups(sizes).items():  # one batched mask per image size
        idx = [i for i in idx if len(box_list[i])]
        if idx:
            share[idx] = box_union_masks(pad_boxes([box_list[i] for i in idx]), size).float().mean((-2, -1))
    return (share < DIFFICULT_MAX_SHARE) & present


def category_ids(categories: Sequence[str] | Tensor | None, n: int, device: torch.device) -> tuple[Tensor, dict]:
    """Integer ids [N] for ``categories`` (strings are hashed stably) and the id -> name map of strings seen."""
    if categories is None:
        return torch.full((n,), -1, dtype=torch.long, device=device), {}
    if isinstance(categories, Tensor):
        if categories.shape != (n,) or categories.is_floating_point() or bool((categories < 0).any()):
            raise ValueError(f"{_NAME}: `categories` must be N={n} strings or a LongTensor [N] of ids >= 0.")
        return categories.to(device=device, dtype=torch.long), {}
    if len(categories) != n or not all(isinstance(c, str) for c in categories):
        raise ValueError(f"{_NAME}: `categories` must be N={n} strings or a LongTensor [N] of ids >= 0.")
    names = {}
    ids = []
    for c in categories:
        # 7 bytes keep the id a positive int64; collisions among a dataset's categories are practically impossible.
        i = int.from_bytes(hashlib.blake2b(c.encode(), digest_size=7).digest(), "big")
        names[i] = c
        ids.append(i)
    return torch.tensor(ids, dtype=torch.long, device=device), names


def _pointing_game_update(
    maps: Tensor,
    boxes: Sequence[Tensor],
    sizes: Tensor | None = None,
    tolerance: float = 15,
    ties: str = "all",
) -> Tensor:
    """Per-sample hits [N] (float 0/1) of maps [N, h, w] against boxes (list of N [M_i, 4] xyxy)."""
    if ties not in TIES:
        raise ValueError(f"{_NAME}: `ties` must be one of {TIES}; got {ties!r}.")
    if tolerance < 0:
        raise ValueError(f"{_NAME}: `tolerance` must be >= 0 pixels; got {tolerance}.")
    groups = prepare_groups(maps, boxes, sizes, _NAME)
    hits = [(idx, _group_hits(m, b, size, tolerance, ties)) for idx, size, m, b in groups]
    return scatter_groups(hits, maps.shape[0], maps.new_zeros(0))


_PAIRS_PER_STEP = 1 << 20  # (maximum, box) distances per step: bounds memory for flat maps with many boxes


def _group_hits(m: Tensor, boxes: Tensor, size: tuple[int, int], tolerance: float, ties: str) -> Tensor:
    """Hits [n] (float 0/1) of same-size maps m [n, H, W] against padded boxes [n, M, 4] (all maps at once).

    Every maximum of every map is a point (item, row, col) in raster order; a point is near when its squared
    distance to some box's pixel span is below tolerance^2 (or 0); per item, "all" needs no far point, "any" one
    near point, "first" the item's first point near."""
    n = m.shape[0]
    flat = m.flatten(1)
    top = flat.amax(1)
    zero = (top == 0) & (flat.amin(1) == 0)  # all-zero map: points nowhere, a miss
    points = ((m == top[:, None, None]) & ~zero[:, None, None]).nonzero()  # [P, 3], raster order per item
    if ties == "first":
        first = torch.ones(len(points), dtype=torch.bool, device=m.device)
        first[1:] = points[1:, 0] != points[:-1, 0]
        points = points[first]
    ranges = box_pixel_ranges(boxes, size)  # [n, M, 4] (c0, r0, c1, r1)
    near_count = torch.zeros(n, device=m.device)
    far_count = torch.zeros(n, device=m.device)
    step = max(1, _PAIRS_PER_STEP // ranges.shape[1])
    for s in range(0, len(points), step):
        p = points[s : s + step]
        c0, r0, c1, r1 = ranges[p[:, 0]].unbind(-1)  # each [P, M]
        r, c = p[:, 1:2], p[:, 2:3]  # [P, 1]
        dy = (r0 - r).clamp(min=0) + (r - r1).clamp(min=0)  # [P, M] distance to the box's row span
        dx = (c0 - c).clamp(min=0) + (c - c1).clamp(min=0)
        d2 = (dx * dx + dy * dy).float()
        near = ((d2 < tolerance**2) | (d2 == 0)).any(-1)  # [P]: this maximum hits some box
        near_count.index_add_(0, p[:, 0], near.float())
        far_count.index_add_(0, p[:, 0], (~near).float())
    hit = near_count > 0 if ties == "any" else far_count == 0
    return (hit & ~zero).float()


def _accumulate(hits: Tensor, difficult: Tensor | None) -> dict[str, Tensor]:
    """Sum states from per-sample hits [N] and an optional difficult mask [N]."""
    d = torch.zeros_like(hits, dtype=torch.bool) if difficult is None else difficult
    return {
        "hits": hits.sum(),
        "total": torch.tensor(float(hits.numel()), device=hits.device),
        "difficult_hits": hits[d].sum(),
        "difficult_total": d.sum().float(),
    }


def _pointing_game_compute(
    hits: Tensor,
    total: Tensor,
    difficult_hits: Tensor,
    difficult_total: Tensor,
    sample_hits: Tensor,
    sample_categories: Tensor,
) -> dict[str, Tensor]:
    """{"accuracy", "mean_per_category", "difficult_accuracy"} from the accumulated states (NaN when undefined)."""
    known = sample_categories >= 0
    per_cat = _per_category(sample_hits[known], sample_categories[known])
    return {
        "accuracy": hits / total,
        "mean_per_category": per_cat[1].mean() if per_cat[1].numel() else hits.new_tensor(float("nan")),
        "difficult_accuracy": difficult_hits / difficult_total,
    }


def _per_category(hits: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(unique ids [C], accuracy per id [C]) of per-sample hits [N] with category ids [N]."""
    uniq, inv = torch.unique(ids, return_inverse=True)
    count = torch.zeros(uniq.numel(), device=hits.device).index_add_(0, inv, torch.ones_like(hits))
    good = torch.zeros(uniq.numel(), device=hits.device).index_add_(0, inv, hits)
    return uniq, good / count.clamp(min=1)


def pointing_game(
    maps: Tensor,
    boxes: Sequence[Tensor],
    sizes: Tensor | None = None,
    categories: Sequence[str] | Tensor | None = None,
    difficult: Tensor | None = None,
    tolerance: float = 15,
    ties: str = "all",
) -> dict[str, Tensor]:
    """Pointing game of maps [N, h, w] against boxes (list of N [M_i, 4] xyxy, original pixels).

    Returns {"accuracy", "mean_per_category", "difficult_accuracy"} (scalar tensors; NaN when undefined).

    Example:
        >>> maps = torch.zeros(2, 20, 20)
        >>> maps[0, 5, 5] = 1.0  # peak inside the box
        >>> maps[1, 18, 18] = 1.0  # peak far from it
        >>> boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]])] * 2
        >>> pointing_game(maps, boxes, tolerance=0)["accuracy"]
        tensor(0.5000)
    """
    hits = _pointing_game_update(maps, boxes, sizes, tolerance, ties)
    ids, _ = category_ids(categories, hits.numel(), hits.device)
    difficult = check_mask(difficult, hits.numel(), _NAME, "difficult", hits.device)
    return _pointing_game_compute(**_accumulate(hits, difficult), sample_hits=hits, sample_categories=ids)


class PointingGame(Metric):
    """Pointing-game accuracy (Zhang et al., 2016) with TorchRay's tolerance rule; see the module docstring.

    ``update(maps [N, h, w], boxes list of N [M_i, 4], sizes [N, 2] = None, categories = None, difficult [N] = None)``;
    ``compute()`` returns {"accuracy", "mean_per_category", "difficult_accuracy"} (NaN when undefined) and
    :meth:`per_category` the accuracy of each category seen.

    Example:
        >>> metric = PointingGame(tolerance=15)
        >>> maps = torch.zeros(2, 100, 100)
        >>> maps[0, 50, 50] = 1.0
        >>> maps[1, 0, 99] = 1.0
        >>> boxes = [torch.tensor([[40.0, 40.0, 60.0, 60.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
        >>> metric.update(maps, boxes, categories=["dog", "cat"])
        >>> {k: round(v.item(), 3) for k, v in metric.compute().items()}
        {'accuracy': 0.5, 'mean_per_category': 0.5, 'difficult_accuracy': nan}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, tolerance: float = 15, ties: str = "all", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if ties not in TIES:
            raise ValueError(f"{_NAME}: `ties` must be one of {TIES}; got {ties!r}.")
        self.tolerance = tolerance
        self.ties = ties
        for name in ("hits", "total", "difficult_hits", "difficult_total"):
            self.add_state(name, torch.tensor(0.0), dist_reduce_fx="sum")
        # Per-sample (hit, category id) pairs: per-category means need them ("cat"; tiny: two numbers a sample).
        self.add_state("sample_hits", [], dist_reduce_fx="cat")
        self.add_state("sample_categories", [], dist_reduce_fx="cat")
        self._category_names: dict[int, str] = {}

    needs = frozenset({"maps", "boxes"})  # (+ sizes, categories, difficult when the context has them)

    @property
    def outputs(self) -> tuple[Output, ...]:
        return (
            Output("accuracy", True, field="hit"),
            Output("mean_per_category", True),
            Output("difficult_accuracy", True, field="hit", where="difficult"),
        )

    def item_values(self, ctx: ItemContext) -> list[dict[str, Any]]:
        """Per item {"hit": 0/1, "difficult": bool, "category": str or None}."""
        ctx.require(self.needs, _NAME)
        hits = _pointing_game_update(ctx.maps.detach(), ctx.boxes, ctx.sizes, self.tolerance, self.ties).tolist()
        n = len(hits)
        difficult = ctx.difficult.tolist() if ctx.difficult is not None else [False] * n
        categories = list(ctx.categories) if ctx.categories is not None else [None] * n
        return [{"hit": h, "difficult": bool(d), "category": c} for h, d, c in zip(hits, difficult, categories,
                                                                                   strict=True)]  # fmt: skip

    def update(
        self,
        maps: Tensor | None = None,
        boxes: Sequence[Tensor] | None = None,
        sizes: Tensor | None = None,
        categories: Sequence[str] | Tensor | None = None,
        difficult: Tensor | None = None,
        *,
        records: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        """Add N (map, boxes) pairs (see :func:`pointing_game` for the arguments), or N per-item ``records`` of
        :meth:`item_values` (replayed from stored items)."""
        if records is not None:
            hits = torch.tensor([float(r["hit"]) for r in records], dtype=torch.float32)
            cats = [r.get("category") for r in records]
            categories = None if any(c is None for c in cats) else cats
            difficult = torch.tensor([bool(r["difficult"]) for r in records], dtype=torch.bool)
        else:
            hits = _pointing_game_update(maps.detach(), boxes, sizes, self.tolerance, self.ties)
        ids, names = category_ids(categories, hits.numel(), hits.device)
        self._category_names.update(names)
        difficult = check_mask(difficult, hits.numel(), _NAME, "difficult", hits.device)
        for name, value in _accumulate(hits, difficult).items():
            setattr(self, name, getattr(self, name) + value.to(getattr(self, name).device))
        self.sample_hits.append(hits)
        self.sample_categories.append(ids)

    def compute(self) -> dict[str, Tensor]:
        return _pointing_game_compute(
            self.hits,
            self.total,
            self.difficult_hits,
            self.difficult_total,
            _cat_or_empty(self.sample_hits, torch.float, self.hits.device),
            _cat_or_empty(self.sample_categories, torch.long, self.hits.device),
        )

    def per_category(self) -> dict[str | int, float]:
        """Accuracy per category seen, keyed by name (string categories) or id (integer categories).

        Under DDP the samples and category names of all processes count (gathered like ``compute()`` does).
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn):
            hits = _cat_or_empty(self.sample_hits, torch.float, self.hits.device).clone()
            ids = _cat_or_empty(self.sample_categories, torch.long, self.hits.device).clone()
        names = dict(self._category_names)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict] = [{}] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, names)
            for other in gathered:
                names.update(other)
        known = ids >= 0
        uniq, acc = _per_category(hits[known], ids[known])
        return {names.get(i, i): a for i, a in zip(uniq.tolist(), acc.tolist(), strict=True)}


def _cat_or_empty(state: Tensor | list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A "cat" state as one tensor: torchmetrics leaves a list before the first sync, a tensor after."""
    if isinstance(state, list) and not state:
        return torch.zeros(0, dtype=dtype, device=device)
    return dim_zero_cat(state).to(dtype)


def _energy_pointing_game_update(maps: Tensor, boxes: Sequence[Tensor], sizes: Tensor | None = None) -> Tensor:
    """Per-sample energy [N]: mass of map inside the union of boxes over its total mass (0 for an all-zero map)."""
    name = "EnergyPointingGame"
    if maps.numel() and bool((maps < 0).any()):
        raise ValueError(f"{name}: maps must be non-negative (a mass); apply ReLU / min-max first.")
    groups = prepare_groups(maps, boxes, sizes, name)
    energies = []
    for idx, size, m, b in groups:  # all maps of one size at once
        total = m.sum((-2, -1))
        inside = (m * box_union_masks(b, size)).sum((-2, -1))
        energies.append((idx, torch.where(total > 0, inside / total.clamp(min=torch.finfo(m.dtype).tiny), 0.0)))
    return scatter_groups(energies, maps.shape[0], maps.new_zeros(0))


def _energy_pointing_game_compute(energy: Tensor, total: Tensor) -> Tensor:
    return energy / total


def energy_pointing_game(maps: Tensor, boxes: Sequence[Tensor], sizes: Tensor | None = None) -> Tensor:
    """Mean energy-based pointing game of maps [N, h, w] (>= 0) against boxes (list of N [M_i, 4] xyxy).

    Example:
        >>> maps = torch.zeros(1, 10, 10)
        >>> maps[0, :5] = 1.0  # top half lit
        >>> energy_pointing_game(maps, [torch.tensor([[0.0, 0.0, 10.0, 2.0]])])  # box = top 2 rows
        tensor(0.4000)
    """
    e = _energy_pointing_game_update(maps, boxes, sizes)
    return _energy_pointing_game_compute(e.sum(), torch.tensor(float(e.numel()), device=e.device))


class EnergyPointingGame(Metric):
    """Mean share of saliency mass inside the target's boxes (Score-CAM); ``compute()`` returns a scalar tensor.

    Example:
        >>> metric = EnergyPointingGame()
        >>> maps = torch.ones(1, 10, 10)
        >>> metric.update(maps, [torch.tensor([[0.0, 0.0, 5.0, 10.0]])])  # left half of a constant map
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable = True
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("energy", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    needs = frozenset({"maps", "boxes"})
    outputs = (Output("", True, field="energy"),)

    def item_values(self, ctx: ItemContext) -> list[dict[str, Any]]:
        """Per item {"energy": share of the map's mass inside the boxes}."""
        ctx.require(self.needs, "EnergyPointingGame")
        return [{"energy": e} for e in _energy_pointing_game_update(ctx.maps.detach(), ctx.boxes, ctx.sizes).tolist()]

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
            e = torch.tensor([float(r["energy"]) for r in records], dtype=torch.float32)
        else:
            e = _energy_pointing_game_update(maps.detach(), boxes, sizes)
        self.energy += e.sum().to(self.energy.device)
        self.total += e.numel()

    def compute(self) -> Tensor:
        return _energy_pointing_game_compute(self.energy, self.total)
