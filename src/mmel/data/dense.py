"""Dense targets through the CLIP transform: a segmentation mask or labelled points follow the image's geometry.

Datasets with masks (:mod:`mmel.data.imagenet_s`) or points (:mod:`mmel.data.openimages`) put ``mask`` (int8
[H, W]: 1 target, 0 background, -1 ignored) or ``points`` (float [P, 3]: x, y in original pixels, label) in their
items. :class:`mmel.data.transforms.BoxTransform` calls :func:`dense_fields`, which adds them in the model input's
frame (``mask`` / ``points``; a fixed-size crop resizes the mask with nearest neighbour and drops the points the
crop cuts away, counted in ``n_points_cropped_out``) and keeps the originals (``mask_orig`` / ``points_orig``) for
keep-size evaluation, which scores in the original frame — the same pairing as ``boxes`` / ``boxes_orig``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def transform_mask(mask: np.ndarray, geometry) -> torch.Tensor:
    """mask [H, W] -> int8 [h, w] in the output frame (nearest neighbour; ``geometry`` = BoxTransform.geometry)."""
    (rh, rw), _, (top, left, ch, cw) = geometry
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None]
    if (rh, rw) != tuple(m.shape[-2:]):
        m = F.interpolate(m, size=(rh, rw), mode="nearest")
    return m[0, 0, top : top + ch, left : left + cw].to(torch.int8)


def transform_points(points: np.ndarray, geometry) -> torch.Tensor:
    """points [P, 3] (x, y, label) in original pixels -> [P', 3] in the output frame (the crop's leftovers dropped)."""
    _, (sy, sx), (top, left, ch, cw) = geometry
    p = torch.as_tensor(np.asarray(points), dtype=torch.float32).reshape(-1, 3).clone()
    p[:, 0] = p[:, 0] * sx - left
    p[:, 1] = p[:, 1] * sy - top
    keep = (p[:, 0] >= 0) & (p[:, 0] <= cw) & (p[:, 1] >= 0) & (p[:, 1] <= ch)
    return p[keep]


def dense_fields(geometry, item: dict[str, Any]) -> dict[str, Any]:
    """The transformed and original dense targets of a dataset item ({} when it has none)."""
    out: dict[str, Any] = {}
    if item.get("mask") is not None:
        out["mask"] = transform_mask(item["mask"], geometry)
        out["mask_orig"] = torch.as_tensor(np.asarray(item["mask"]), dtype=torch.int8)
    if item.get("points") is not None:
        pts = torch.as_tensor(np.asarray(item["points"]), dtype=torch.float32).reshape(-1, 3)
        out["points"] = transform_points(pts.numpy(), geometry)
        out["points_orig"] = pts
        out["n_points_cropped_out"] = len(pts) - len(out["points"])
    return out


def relation_fields(transform, size: tuple[int, int], item: dict[str, Any]) -> dict[str, Any]:
    """The transformed relation fields of an item ({} for items of other datasets): the look-alike and mentioned
    boxes in the output frame (empty ones dropped, not counted as the referent's), their originals, and the
    counterfactual image as the model sees it (None when the item has none)."""
    if "lookalikes" not in item:
        return {}
    out: dict[str, Any] = {}
    for key in ("lookalikes", "mentioned"):
        orig = torch.as_tensor(np.asarray(item[key]), dtype=torch.float32).reshape(-1, 4)
        out[key] = transform.boxes(orig, size, count=False)
        out[f"{key}_orig"] = orig
    cf = item.get("counterfactual") or ""
    if cf:
        from mmel.data.base import DatasetError, load_image

        image = load_image(cf)
        if (image.height, image.width) != tuple(size):
            raise DatasetError(f"{cf}: counterfactual image is {(image.height, image.width)}, its scene {size}")
        out["counterfactual_image"] = transform.image(image)
    else:
        out["counterfactual_image"] = None
    return out
