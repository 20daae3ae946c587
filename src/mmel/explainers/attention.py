"""Prompt-independent attention baselines: last-layer CLS attention and attention rollout (Abnar & Zuidema 2020).

Both read the softmax attention of the traced forward (open_clip never materialises it, see vit.py). The map is
the same for every prompt; it is repeated over the K axis to keep the contract's [B, K, H, W] shape.

Last-layer attention has two variants, each labelled (``label``):
  * ``native`` (default): the model's own heads, CLS row averaged over heads;
  * ``grad_eclip_paper``: the baseline of the Grad-ECLIP paper's comparison (github.com/Cyang-Zhao/Grad-Eclip,
    ``generate_emap.py``: ``clip_encode_dense`` then ``attn[0, :1, 1:]``): the block is recomputed with ONE head
    over the full width (scale 1/√C), the same modified block as Grad-ECLIP's ``official`` mode, and its CLS row is
    the map.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmel.explainers import register
from mmel.explainers.base import Explainer
from mmel.explainers.vit import resolve_layers, trace_image
from mmel.families import VIT_FAMILIES

VARIANTS = ("native", "grad_eclip_paper")


def check_variant(variant: str, what: str) -> str:
    """``variant`` if it is one of :data:`VARIANTS`, else a clear error naming ``what``."""
    if variant not in VARIANTS:
        raise ValueError(f"{what}: variant={variant!r}; expected one of {VARIANTS}")
    return variant


@register("attention")
class CLSAttention(Explainer):
    """Attention of the CLS query to the patches in block ``layer`` (default: the last): averaged over the model's
    heads (``variant="native"``) or of the block recomputed with one full-width head (``"grad_eclip_paper"``)."""

    name = "attention"
    families = VIT_FAMILIES

    def __init__(self, clip, layer: int = -1, variant: str = "native") -> None:
        super().__init__(clip)
        (self.layer,) = resolve_layers([layer], self.depth, "attention.layer")
        self.variant = check_variant(variant, "attention")

    def label_options(self) -> dict[str, object]:
        return {"variant": self.variant}

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        heads = 1 if self.variant == "grad_eclip_paper" else None
        trace = trace_image(self.model, images, [self.layer], heads=heads, grad=False)
        cls_attn = trace.records[self.layer].attn[:, :, 0, 1:].mean(dim=1)  # [B, N] (one head: the mean is a no-op)
        maps = cls_attn.unflatten(-1, trace.grid)[:, None]
        return maps.expand(-1, len(prompts), -1, -1)


@register("rollout")
class AttentionRollout(Explainer):
    """Attention rollout from block ``start_layer`` to the last: R = Π_l norm(mean_h A_l + I); map = R[CLS, patches]."""

    name = "rollout"
    families = VIT_FAMILIES

    def __init__(self, clip, start_layer: int = 0) -> None:
        super().__init__(clip)
        (self.start,) = resolve_layers([start_layer], self.depth, "rollout.start_layer")

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        layers = list(range(self.start, self.depth))
        trace = trace_image(self.model, images, layers, grad=False)
        rollout = None
        for i in layers:
            a = trace.records[i].attn.mean(dim=1)  # [B, T, T]
            a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # the residual path
            a = a / a.sum(dim=-1, keepdim=True)
            rollout = a if rollout is None else a @ rollout
        maps = rollout[:, 0, 1:].unflatten(-1, trace.grid)[:, None]
        return maps.expand(-1, len(prompts), -1, -1)
