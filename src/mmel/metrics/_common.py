"""Shared plumbing of the localisation metrics: input checks, map resizing and box geometry.

Conventions (used by every metric in this package, documented once here):

* **Maps** ``[N, h, w]`` (one per (image, prompt) pair) are resized to their image's original size ``(H, W)`` with
  bilinear interpolation (``align_corners=False``, torch's default and what the explainers use to upsample) before
  any comparison with boxes, so every threshold and tolerance is measured in pixels of the original image.
* **Boxes** are ``xyxy`` in continuous pixel coordinates of the original image; which pixels a box covers (any
  overlap with positive area; a degenerate box covers the pixel it lies in) is the one rule of
  :mod:`mmel.data.boxes`, shared with the HSRM's training losses. The ground truth of one target is the **union**
  of its boxes (all instances of the named object). Boxes are clipped to the image; a box lying wholly outside the
  image, a reversed box (``x2 < x1``) or a target without boxes is an error here, not a silent zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmel.data.boxes import box_pixel_ranges, box_union_mask, box_union_masks, pad_boxes  # noqa: F401 - the one rule


def check_maps(maps: Tensor, name: str) -> Tensor:
    """Validate ``maps`` [N, h, w] (floating, finite) and return it."""
    if not isinstance(maps, Tensor) or maps.ndim != 3 or not maps.is_floating_point():
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"{name}: `maps` must be a float tensor [N, h, w] (one map per pair); got {shape}.")
    # a finite sum means finite entries (NaN and inf propagate): one reduction; the exact test only otherwise
    if maps.numel() and not torch.isfinite(maps.sum()) and not torch.isfinite(maps).all():
        raise ValueError(f"{name}: `maps` contains NaN or inf.")
    return maps


def check_sizes(sizes: Tensor | Sequence | None, maps: Tensor, name: str) -> list[tuple[int, int]]:
    """Original image sizes as a list of N ``(H, W)``; default: each map's own size."""
    n = maps.shape[0]
    if sizes is None:
        return [(int(maps.shape[1]), int(maps.shape[2]))] * n
    sizes = torch.as_tensor(sizes)
    if sizes.shape != (n, 2) or sizes.is_floating_point() or bool((sizes <= 0).any()):
        raise ValueError(f"{name}: `sizes` must be a positive integer tensor [N={n}, 2] of (H, W); got {sizes!r}.")
    return [(int(h), int(w)) for h, w in sizes.tolist()]


def check_boxes(
    boxes: Sequence[Tensor],
    sizes: list[tuple[int, int]],
    device: torch.device,
    name: str,
    field: str = "boxes",
    allow_empty: bool = False,
) -> list[Tensor]:
    """Validate ``boxes`` (list of N float tensors [M_i, 4] xyxy) and return them on ``device`` as float32.

    ``allow_empty``: an entry may hold no box (returned as [0, 4]), e.g. the other objects of a one-object image.
    The values of all boxes are checked at once; the first bad entry (in order) is reported."""
    if isinstance(boxes, Tensor) and boxes.ndim == 3:
        boxes = list(boxes)
    if not isinstance(boxes, Sequence) or len(boxes) != len(sizes):
        got = len(boxes) if isinstance(boxes, Sequence) else type(boxes).__name__
        raise ValueError(f"{name}: `{field}` must be a list of N={len(sizes)} tensors [M_i, 4] (xyxy); got {got}.")
    out = []
    shape_error = None
    for i, b in enumerate(boxes):
        b = torch.as_tensor(b, dtype=torch.float32, device=device)
        if allow_empty and b.numel() == 0:
            out.append(b.reshape(0, 4))
            continue
        if b.ndim == 1 and b.numel() == 4:
            b = b[None]
        if b.ndim != 2 or b.shape[1] != 4 or b.shape[0] == 0:
            shape_error = f"{name}: {field}[{i}] must be [M>=1, 4] xyxy; got shape {tuple(b.shape)}."
            break  # entries before it are value-checked first, as a one-by-one check would
        out.append(b)
    if out and bool(_bad_boxes(torch.cat(out), _box_sizes(out, sizes, device)).any()):
        for i, (b, (h, w)) in enumerate(zip(out, sizes, strict=False)):
            _check_box_values(b, h, w, name, field, i)
    if shape_error:
        raise ValueError(shape_error)
    return out


def _box_sizes(boxes: list[Tensor], sizes: list[tuple[int, int]], device: torch.device) -> Tensor:
    """(H, W) [sum M_i, 2] of the image each box of ``boxes`` (N tensors [M_i, 4]) lies in."""
    return torch.tensor([s for b, s in zip(boxes, sizes, strict=False) for _ in range(len(b))], dtype=torch.float32,
                        device=device).reshape(-1, 2)  # fmt: skip


def _bad_boxes(b: Tensor, hw: Tensor) -> Tensor:
    """[M] True for boxes b [M, 4] that are not finite, reversed, or wholly outside their image of size hw [M, 2]."""
    reversed_ = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    outside = (b[:, 0] > hw[:, 1]) | (b[:, 2] < 0) | (b[:, 1] > hw[:, 0]) | (b[:, 3] < 0)
    return ~torch.isfinite(b).all(1) | reversed_ | outside


def _check_box_values(b: Tensor, h: int, w: int, name: str, field: str, i: int) -> None:
    """The error of entry i's boxes b [M, 4] in an image (h, w), if any."""
    if not torch.isfinite(b).all() or bool((b[:, 2] < b[:, 0]).any() | (b[:, 3] < b[:, 1]).any()):
        raise ValueError(f"{name}: {field}[{i}] must be finite xyxy with x2 >= x1 and y2 >= y1; got {b.tolist()}.")
    outside = (b[:, 0] > w) | (b[:, 2] < 0) | (b[:, 1] > h) | (b[:, 3] < 0)
    if bool(outside.any()):
        raise ValueError(
            f"{name}: {field}[{i}] {b[outside].tolist()} lie outside the image of size (H, W)=({h}, {w}). "
            "Boxes must be in pixels of the ORIGINAL image (pass `sizes`)."
        )


def size_groups(sizes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """Indices of the entries of each distinct size, in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(tuple(s), []).append(i)
    return groups


def resize_group(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """maps [n, h, w] -> [n, H, W] float, bilinear (one interpolate call; unchanged when already that size)."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return maps


def resize_maps(maps: Tensor, sizes: list[tuple[int, int]]) -> list[Tensor]:
    """Resize each map [h, w] of ``maps`` [N, h, w] to its size (H, W), bilinear; returns N tensors [H, W]."""
    out: list[Tensor | None] = [None] * maps.shape[0]
    # Group equal sizes so a batch of same-sized images costs one interpolate call.
    for size, idx in size_groups(sizes).items():
        sub = resize_group(maps[idx], size)
        for j, i in enumerate(idx):
            out[i] = sub[j]
    return out  # type: ignore[return-value]


def prepare(
    maps: Tensor, boxes: Sequence[Tensor], sizes: Tensor | Sequence | None, name: str
) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]:
    """Check inputs and return (maps resized to original size [H_i, W_i], boxes [M_i, 4], sizes)."""
    maps = check_maps(maps, name)
    size_list = check_sizes(sizes, maps, name)
    box_list = check_boxes(boxes, size_list, maps.device, name)
    return resize_maps(maps, size_list), box_list, size_list


def prepare_groups(
    maps: Tensor, boxes: Sequence[Tensor], sizes: Tensor | Sequence | None, name: str
) -> list[tuple[list[int], tuple[int, int], Tensor, Tensor]]:
    """Checked inputs grouped by original size, for batched metrics: a list of (indices into the N entries,
    (H, W), maps resized [n, H, W], boxes [n, M, 4] padded by :func:`pad_boxes`)."""
    maps = check_maps(maps, name)
    size_list = check_sizes(sizes, maps, name)
    box_list = check_boxes(boxes, size_list, maps.device, name)
    out = []
    for size, idx in size_groups(size_list).items():
        sub = maps if len(idx) == len(maps) else maps[idx]  # all of one size (the usual case): no copy
        out.append((idx, size, resize_group(sub, size), pad_boxes([box_list[i] for i in idx])))
    return out


def scatter_groups(groups: Sequence[tuple[list[int], Tensor]], n: int, template: Tensor) -> Tensor:
    """Per-group results (indices, values [n_g, ...]) -> one tensor [N, ...] in entry order (like ``template``).

    Differentiable: a single group in entry order is returned as is, otherwise the groups are concatenated and
    reordered."""
    if not groups:
        return template.new_zeros(0, *template.shape[1:])
    if len(groups) == 1 and groups[0][0] == list(range(n)):
        return groups[0][1]
    order = torch.tensor([i for idx, _ in groups for i in idx], device=template.device)
    values = torch.cat([v for _, v in groups])
    return values[torch.argsort(order)]


def check_mask(mask: Tensor | Sequence | None, n: int, name: str, field: str, device: torch.device) -> Tensor | None:
    """An optional per-sample boolean flag [N] (e.g. ``difficult``)."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=device)
    if mask.shape != (n,):
        raise ValueError(f"{name}: `{field}` must be a bool tensor [N={n}]; got shape {tuple(mask.shape)}.")
    return mask.bool()
