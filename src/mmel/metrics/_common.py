"""Shared plumbing of the localisation metrics: input checks, map resizing and box geometry.

Conventions (used by every metric in this package, documented once here):

* **Maps** ``[N, h, w]`` (one per (image, prompt) pair) are resized to their image's original size ``(H, W)`` with
  bilinear interpolation (``align_corners=False``, torch's default and what the explainers use to upsample) before
  any comparison with boxes, so every threshold and tolerance is measured in pixels of the original image.
* **Boxes** are ``xyxy`` in continuous pixel coordinates of the original image (COCO / Flickr30k convention:
  pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``). A pixel belongs to a box when it overlaps the box with positive
  area, i.e. columns ``floor(x1) .. ceil(x2) - 1`` (rows likewise). For integer boxes that is exactly the
  ``(x2 - x1) * (y2 - y1)`` pixels the box spans; a degenerate box (``x1 == x2``) still covers the pixel it lies
  in, so a point annotation is never silently empty. Boxes are clipped to the image; a box lying wholly outside
  the image, a reversed box (``x2 < x1``) or a target without boxes is an error, not a silent zero.
* The ground truth of one target is the **union** of its boxes (all instances of the named object).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def check_maps(maps: Tensor, name: str) -> Tensor:
    """Validate ``maps`` [N, h, w] (floating, finite) and return it."""
    if not isinstance(maps, Tensor) or maps.ndim != 3 or not maps.is_floating_point():
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"{name}: `maps` must be a float tensor [N, h, w] (one map per pair); got {shape}.")
    if maps.numel() and not torch.isfinite(maps).all():
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

    ``allow_empty``: an entry may hold no box (returned as [0, 4]), e.g. the other objects of a one-object image."""
    if isinstance(boxes, Tensor) and boxes.ndim == 3:
        boxes = list(boxes)
    if not isinstance(boxes, Sequence) or len(boxes) != len(sizes):
        got = len(boxes) if isinstance(boxes, Sequence) else type(boxes).__name__
        raise ValueError(f"{name}: `{field}` must be a list of N={len(sizes)} tensors [M_i, 4] (xyxy); got {got}.")
    out = []
    for i, (b, (h, w)) in enumerate(zip(boxes, sizes, strict=True)):
        b = torch.as_tensor(b, dtype=torch.float32, device=device)
        if allow_empty and b.numel() == 0:
            out.append(b.reshape(0, 4))
            continue
        if b.ndim == 1 and b.numel() == 4:
            b = b[None]
        if b.ndim != 2 or b.shape[1] != 4 or b.shape[0] == 0:
            raise ValueError(f"{name}: {field}[{i}] must be [M>=1, 4] xyxy; got shape {tuple(b.shape)}.")
        if not torch.isfinite(b).all() or bool((b[:, 2] < b[:, 0]).any() | (b[:, 3] < b[:, 1]).any()):
            raise ValueError(f"{name}: {field}[{i}] must be finite xyxy with x2 >= x1 and y2 >= y1; got {b.tolist()}.")
        outside = (b[:, 0] > w) | (b[:, 2] < 0) | (b[:, 1] > h) | (b[:, 3] < 0)
        if bool(outside.any()):
            raise ValueError(
                f"{name}: {field}[{i}] {b[outside].tolist()} lie outside the image of size (H, W)=({h}, {w}). "
                "Boxes must be in pixels of the ORIGINAL image (pass `sizes`)."
            )
        out.append(b)
    return out


def box_pixel_ranges(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Inclusive pixel ranges ``[M, 4]`` = (c0, r0, c1, r1) covered by boxes [M, 4] xyxy (see module docstring)."""
    h, w = size
    x1, y1, x2, y2 = boxes.unbind(-1)
    c0 = x1.floor().clamp(0, w - 1)
    r0 = y1.floor().clamp(0, h - 1)
    c1 = torch.maximum(x2.ceil() - 1, c0).clamp(0, w - 1)
    r1 = torch.maximum(y2.ceil() - 1, r0).clamp(0, h - 1)
    return torch.stack([c0, r0, c1, r1], dim=-1).long()


def box_union_mask(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Boolean mask [H, W] of the union of boxes [M, 4] xyxy."""
    h, w = size
    c0, r0, c1, r1 = box_pixel_ranges(boxes, size).unbind(-1)
    rows = torch.arange(h, device=boxes.device)
    cols = torch.arange(w, device=boxes.device)
    in_rows = (rows[None] >= r0[:, None]) & (rows[None] <= r1[:, None])  # [M, H]
    in_cols = (cols[None] >= c0[:, None]) & (cols[None] <= c1[:, None])  # [M, W]
    return (in_rows[:, :, None] & in_cols[:, None, :]).any(0)


def resize_maps(maps: Tensor, sizes: list[tuple[int, int]]) -> list[Tensor]:
    """Resize each map [h, w] of ``maps`` [N, h, w] to its size (H, W), bilinear; returns N tensors [H, W]."""
    out: list[Tensor | None] = [None] * maps.shape[0]
    # Group equal sizes so a batch of same-sized images costs one interpolate call.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(s, []).append(i)
    for size, idx in groups.items():
        sub = maps[idx].float()
        if tuple(sub.shape[-2:]) != size:
            sub = F.interpolate(sub[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
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


def check_mask(mask: Tensor | Sequence | None, n: int, name: str, field: str, device: torch.device) -> Tensor | None:
    """An optional per-sample boolean flag [N] (e.g. ``difficult``)."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=device)
    if mask.shape != (n,):
        raise ValueError(f"{name}: `{field}` must be a bool tensor [N={n}]; got shape {tuple(mask.shape)}.")
    return mask.bool()
