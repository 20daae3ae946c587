"""Zero-shot check of the tiny CLIP: does its top-1 colour-shape prompt name an object that is in the image?"""

from __future__ import annotations

import torch
from torch import nn

from mmel.data.shapes.world import CATEGORIES, category_phrase


def category_prompts() -> list[str]:
    """One prompt per category, worded as the captions word it ("a red circle"); index = category_id - 1."""
    return [category_phrase(c, s) for c, s in CATEGORIES]


@torch.no_grad()
def zero_shot_scores(model: nn.Module, tokens: torch.Tensor, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Cosine similarities [N, K] of images [N, 3, S, S] against the K tokenised prompts [K, L]."""
    text = nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
    out = []
    for chunk in images.split(batch):
        out.append(nn.functional.normalize(model.encode_image(chunk).float(), dim=-1) @ text.T)
    return torch.cat(out)


def top1_present(scores: torch.Tensor, image_objects: torch.Tensor) -> float:
    """Fraction of images whose best prompt (scores [N, C]) names a present object (image_objects [N, C])."""
    best = scores.argmax(1)
    return image_objects.gather(1, best[:, None]).squeeze(1).float().mean().item()
