"""Image + box transforms for CLIP, box masks at any map resolution, and a collate for variable image sizes.

Two geometry modes:
  * ``fixed``: CLIP's own preprocessing — resize the shorter side to ``image_size`` (bicubic), centre-crop
    ``image_size`` x ``image_size``. Boxes are mapped with the image and clipped to the crop; a box with nothing left
    inside is dropped (``box_cropped_out``) and a sample with no box left is dropped (``sample_cropped_out``).
  * ``keep``: the aspect ratio is kept and each side is rounded to a multiple of ``patch_size`` (what Grad-ECLIP's
    official code feeds a ViT with interpolated positional embeddings); ``max_side`` optionally scales the image
    down first so the longer side is at most that many pixels.

A transformed sample keeps the dataset item's fields and replaces ``image`` by a normalised FloatTensor [3, H, W]
and ``boxes`` by boxes [M, 4] in that tensor's pixels; ``boxes_orig`` and ``size`` keep the original ones and
``n_boxes_cropped_out`` says how many boxes the crop removed.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from mmel.data.base import Dropped
from mmel.data.boxes import union_masks
from mmel.data.dense import dense_fields, relation_fields

# OpenAI CLIP's normalisation (open_clip.OPENAI_DATASET_MEAN / _STD); the programs pass the loaded model's values.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """PIL RGB -> FloatTensor [3, H, W], (x/255 - mean) / std."""
    return TF.normalize(TF.to_tensor(image), list(mean), list(std))


def keep_size(size: tuple[int, int], patch_size: int, max_side: int | None = None) -> tuple[int, int]:
    """Target (H, W) of keep-size mode: aspect kept, each side rounded to the nearest (nonzero) multiple of
    ``patch_size``."""
    h, w = size
    s = min(1.0, max_side / max(h, w)) if max_side else 1.0
    # half rounds up (Python's round() would send 2.5 patches to 2 and 3.5 to 4)
    return tuple(max(1, math.floor(side * s / patch_size + 0.5)) * patch_size for side in (h, w))


def box_mask(
    boxes: torch.Tensor, size: tuple[int, int], image_size: tuple[int, int] | None = None, soft: bool = False
) -> torch.Tensor:
    """Mask of the union of boxes on an (h, w) grid. boxes [M, 4] xyxy -> [h, w] float in [0, 1].

    ``image_size`` (H, W) is the frame the boxes are in (default: the grid itself); they are scaled onto the grid.
    Hard mask: the cells the boxes cover by the one rule of :mod:`mmel.data.boxes` (any overlap with positive area;
    a box smaller than a cell still marks the cell it lies in). ``soft=True``: the fraction of each cell a box
    covers (max over boxes, a lower bound of the union's coverage when boxes overlap).
    """
    h, w = size
    H, W = image_size if image_size is not None else size
    b = boxes.reshape(-1, 4).to(torch.float32)
    if b.numel() == 0:
        return torch.zeros(h, w)
    b = b * torch.tensor([w / W, h / H, w / W, h / H])  # grid units
    if not soft:
        return union_masks([b], size)[0].to(torch.float32)
    xs = torch.arange(w, dtype=torch.float32)
    ys = torch.arange(h, dtype=torch.float32)
    ox = (torch.minimum(b[:, 2:3], xs + 1) - torch.maximum(b[:, 0:1], xs)).clamp(min=0)  # [M, w] overlap per column
    oy = (torch.minimum(b[:, 3:4], ys + 1) - torch.maximum(b[:, 1:2], ys)).clamp(min=0)  # [M, h]
    return (oy[:, :, None] * ox[:, None, :]).amax(dim=0).clamp(max=1.0)


def box_masks(boxes: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Hard :func:`box_mask` of many box sets at once, boxes in the grid's own pixels: N tensors [M_i, 4] xyxy ->
    [N, h, w] float (each entry equals ``box_mask(boxes[i], size)``; an entry without boxes is all zeros)."""
    return union_masks(boxes, size).to(torch.float32)


class BoxTransform:
    """Dataset item (PIL image, original-pixel boxes) -> normalised tensor and boxes in its pixels.

    Args:
        mode: ``"fixed"`` (resize shorter side + centre crop to ``image_size``) or ``"keep"``.
        image_size: output side in fixed mode.
        patch_size: the ViT's patch size (keep mode rounds each side to a multiple of it).
        max_side: keep mode only — scale down so the longer side is at most this (None: original size).
        mean, std: normalisation (the CLIP model's own).

    Returns ``None`` for a ``None`` item, or when no box survives the crop; counts go to ``self.skipped``.
    """

    def __init__(
        self,
        mode: str = "fixed",
        image_size: int = 224,
        patch_size: int = 16,
        max_side: int | None = None,
        mean=CLIP_MEAN,
        std=CLIP_STD,
    ) -> None:
        if mode not in ("fixed", "keep"):
            raise ValueError(f"mode must be 'fixed' or 'keep', got {mode!r}")
        self.mode, self.image_size, self.patch_size, self.max_side = mode, int(image_size), int(patch_size), max_side
        self.mean, self.std = tuple(mean), tuple(std)
        self.skipped: Counter = Counter()

    def geometry(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[float, float], tuple[int, int, int, int]]:
        """For an original (H, W): resized (H', W'), scale (sy, sx), crop (top, left, height, width)."""
        h, w = size
        if self.mode == "keep":
            rh, rw = keep_size(size, self.patch_size, self.max_side)
            return (rh, rw), (rh / h, rw / w), (0, 0, rh, rw)
        s = self.image_size
        # torchvision's Resize(int) rule: shorter side -> s, longer side truncated (so the pixels match CLIP's)
        rh, rw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        top, left = int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))
        return (rh, rw), (rh / h, rw / w), (top, left, s, s)

    def boxes(self, boxes: torch.Tensor, size: tuple[int, int], count: bool = True) -> torch.Tensor:
        """Map [M, 4] original-pixel boxes into the output frame; clipped, empty ones dropped (counted in
        ``self.skipped`` unless ``count=False``)."""
        _, (sy, sx), (top, left, ch, cw) = self.geometry(size)
        b = boxes.reshape(-1, 4).to(torch.float32) * torch.tensor([sx, sy, sx, sy])
        b = b - torch.tensor([left, top, left, top], dtype=torch.float32)
        b[:, 0::2] = b[:, 0::2].clamp(0, cw)
        b[:, 1::2] = b[:, 1::2].clamp(0, ch)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        if count and not keep.all():
            self.skipped["box_cropped_out"] += int((~keep).sum())
        return b[keep]

    def image(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB -> normalised FloatTensor [3, H', W'] in the output frame."""
        (rh, rw), _, (top, left, ch, cw) = self.geometry((image.height, image.width))
        if self.mode == "fixed":
            image = TF.resize(image, self.image_size, interpolation=InterpolationMode.BICUBIC)
            image = TF.center_crop(image, [ch, cw])
        elif (rh, rw) != (image.height, image.width):
            image = TF.resize(image, [rh, rw], interpolation=InterpolationMode.BICUBIC)
        return normalize(image, self.mean, self.std)

    def __call__(self, item: dict[str, Any] | None) -> dict[str, Any] | None:
        if item is None:
            return None
        size = (item["image"].height, item["image"].width)
        boxes = self.boxes(item["boxes"], size)
        if len(boxes) == 0:
            self.skipped["sample_cropped_out"] += 1
            return None
        n_out = len(item["boxes"]) - len(boxes)  # also carried in the sample: worker processes' counters are lost
        return {
            **item,
            "image": self.image(item["image"]),
            "boxes": boxes,
            "boxes_orig": item["boxes"],
            "n_boxes_cropped_out": n_out,
            **dense_fields(self.geometry(size), item),  # a mask / points follow the image (mmel.data.dense)
            **relation_fields(self, size, item),  # a relational item's other boxes and counterfactual image
        }


def collate_boxes(
    items: list[dict[str, Any] | Dropped | None], pad: bool = True, pad_multiple: int = 1, keep_empty: bool = False
) -> dict[str, Any] | None:
    """Batch transformed samples; ``None`` / :class:`~mmel.data.base.Dropped` items are left out and counted.

    ``pad=True``: ``images`` FloatTensor [B, 3, Hmax, Wmax] (zero-padded at the bottom/right, Hmax/Wmax rounded up to
    ``pad_multiple``) and ``valid`` BoolTensor [B, Hmax, Wmax] marking real pixels; boxes stay in each image's own
    pixels, which padding at the bottom/right does not move. ``pad=False``: ``images`` is a list of [3, H_i, W_i].
    Other fields become lists (``boxes``: list of [M_i, 4]). ``n_dropped``: items left out; ``skipped``: Counter of
    their reasons (``Dropped.reason``, ``"unknown"`` for ``None``) plus ``box_cropped_out`` (boxes the transform
    removed from kept items). When every item was dropped: ``None``, or with ``keep_empty`` a dict with only
    ``n_dropped`` and ``skipped`` (so the counts are not lost; :class:`mmel.data.datamodules.BoxDataLoader` skips it).
    """
    kept = [it for it in items if isinstance(it, dict)]
    skipped: Counter = Counter()
    for it in items:
        if isinstance(it, Dropped):
            skipped[it.reason] += 1
        elif it is None:
            skipped["unknown"] += 1
        elif it.get("n_boxes_cropped_out"):
            skipped["box_cropped_out"] += it["n_boxes_cropped_out"]
    if not kept:
        return {"n_dropped": len(items), "skipped": skipped} if keep_empty else None
    batch: dict[str, Any] = {k: [it[k] for it in kept] for k in kept[0] if k != "image"}
    batch["n_dropped"] = len(items) - len(kept)
    batch["skipped"] = skipped
    images = [it["image"] for it in kept]
    if not pad:
        batch["images"] = images
        return batch
    hmax = math.ceil(max(im.shape[-2] for im in images) / pad_multiple) * pad_multiple
    wmax = math.ceil(max(im.shape[-1] for im in images) / pad_multiple) * pad_multiple
    out = images[0].new_zeros(len(images), images[0].shape[0], hmax, wmax)
    valid = torch.zeros(len(images), hmax, wmax, dtype=torch.bool)
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
        valid[i, : im.shape[-2], : im.shape[-1]] = True
    batch["images"] = out
    batch["valid"] = valid
    return batch
