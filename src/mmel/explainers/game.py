"""Chefer et al. 2021 ("Generic Attention-model Explainability", GAME) for CLIP's image tower.

For each block l from ``start_layer`` to the last: Ā_l = mean_h ReLU(∇A_l ⊙ A_l) (A: softmax attention, ∇A: its
gradient from the authors' score S = logit_scale · cos(f_image, f_text), CLIP's logit for the pair), and
R ← R + Ā_l R starting from R = I; the map is R[CLS, patches]. The scale matters across several blocks: R = I +
Ā_l + Ā_l' Ā_l + ... mixes first and second powers of the gradient, so a plain cosine would weight the identity
differently (for one block it only rescales R − I, the map is the same). The default start_layer = -1 (last block
only) follows the authors' CLIP notebook (github.com/hila-chefer/Transformer-MM-Explainability, ``CLIP_explainability
.ipynb``, ``interpret``). The gradients of all K
prompts w.r.t. every attention matrix come from one batched vector-Jacobian product.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmel.explainers import register
from mmel.explainers.base import Explainer, batched_vjp, cosine_scores
from mmel.explainers.vit import resolve_layers, trace_image
from mmel.families import VIT_FAMILIES


@register("game")
class GAME(Explainer):
    """Gradient-weighted attention relevance (Chefer et al. 2021) from block ``start_layer`` on."""

    name = "game"
    families = VIT_FAMILIES
    needs_grad = True

    def __init__(self, clip, start_layer: int = -1) -> None:
        super().__init__(clip)
        (self.start,) = resolve_layers([start_layer], self.depth, "game.start_layer")

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.raw_maps_text(images, self.text_features(prompts))

    def raw_maps_text(self, images: Tensor, text: Tensor) -> Tensor:
        layers = list(range(self.start, self.depth))
        trace = trace_image(self.model, images, layers)
        attns = [trace.records[i].attn for i in layers]
        scale = self.model.logit_scale.detach().exp() if getattr(self.model, "logit_scale", None) is not None else 1.0
        grads = batched_vjp(scale * cosine_scores(trace.features, text), attns)  # each [K, B, H, T, T]
        B, _, T, _ = attns[0].shape
        R = torch.eye(T, dtype=attns[0].dtype, device=attns[0].device).expand(B, grads[0].shape[0], T, T)
        for a, g in zip(attns, grads, strict=True):
            cam = (g * a.detach()).clamp(min=0).mean(dim=2).transpose(0, 1)  # [B, K, T, T]
            R = R + cam @ R
        return R[:, :, 0, 1:].unflatten(-1, trace.grid)
