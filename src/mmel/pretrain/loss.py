"""Multi-positive contrastive loss: every caption whose objects are all in an image is a match for that image.

The plain CLIP loss treats only the paired caption as positive; in the shapes world a caption "a red circle" is
just as true of every other image that holds a red circle, and punishing it there taught the prototype colour
only. Here the target of each row (image → captions) and each column (caption → images) is uniform over its
true matches, and the loss is the cross-entropy against those soft targets.

The caption set may be larger than the image batch (the trainer adds the 36 one-object captions "a red circle",
... to every step, so that each image is contrasted against every colour-shape pair at almost no cost: text is
cheap, images are not). A caption that matches no image of the batch has no caption → image target and is left
out of that direction; every image must match at least one caption.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def caption_matches(image_objects: torch.Tensor, caption_objects: torch.Tensor) -> torch.Tensor:
    """Match matrix [B_img, B_cap] (bool): caption j names only objects present in image i.

    image_objects [B_img, C] and caption_objects [B_cap, C] are multi-hot over the C categories.
    """
    missing = caption_objects.float() @ (1.0 - image_objects.float()).T  # [B_cap, B_img] named-but-absent count
    return (missing == 0).T


def multi_positive_contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, matches: torch.Tensor
) -> torch.Tensor:
    """Symmetric soft-target InfoNCE.

    image_features [B, D], text_features [T, D] (L2-normalised), logit_scale scalar (already exp'd),
    matches [B, T] bool, every row with at least one match. Returns a scalar.
    """
    if not bool(matches.any(1).all()):
        raise ValueError("multi_positive_contrastive_loss: every image must match at least one caption.")
    logits = logit_scale * image_features @ text_features.T  # [B, T]
    target = matches.float()
    loss_i2t = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    cols = matches.any(0)  # captions with at least one matching image
    t = target[:, cols]
    loss_t2i = -(t / t.sum(0, keepdim=True) * F.log_softmax(logits[:, cols], dim=0)).sum(0).mean()
    return (loss_i2t + loss_t2i) / 2


def category_spread_loss(category_features: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    """Keep the C one-object captions apart: cross-entropy of their scaled self-similarities [C, C] against I.

    Why: early in training the vision tower sees colour long before shape, so the contrastive loss is indifferent
    to whether "a red circle" and "a red square" differ, and the text tower merges them (measured: cosine 1.0000
    after 500 steps, zero-shot shape at chance). Merged texts give the vision tower no shape gradient at all — a
    stable dead end. This term (a uniformity regulariser on the category captions only) keeps them distinct.
    category_features [C, D] L2-normalised; fixed temperature 1/scale.
    """
    logits = scale * category_features @ category_features.T
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))
