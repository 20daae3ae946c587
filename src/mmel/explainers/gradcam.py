"""Grad-CAM on ViT tokens (Selvaraju et al. 2017, as applied to CLIP ViTs in the Grad-ECLIP paper's comparison).

The feature map is the token sequence entering block ``layer`` (default: the last block, i.e. the output of the
second-to-last block, as the official comparison code). Channel weights are the gradient of S = cos(f_image,
f_text) averaged over all tokens; the map is ReLU(Σ_c weight_c · x_i,c) over the patch tokens. All K prompts
share one forward and one batched vector-Jacobian product.

Two variants, each labelled (``label``), differ only in the model the gradient runs through:
  * ``native`` (default): the unmodified CLIP (its own heads);
  * ``grad_eclip_paper`` (ViTs only): the Grad-ECLIP paper's baseline (github.com/Cyang-Zhao/Grad-Eclip,
    ``generate_emap.py``: ``clip_encode_dense`` then ``grad_cam(c, last_input, ...)``): the last block is
    recomputed with ONE head over the full width (scale 1/√C), the same modified block as Grad-ECLIP's
    ``official`` mode, and S is the cosine of that modified model's embedding. Their code takes the input of the
    last block, so this variant needs ``layer=-1``.

On a CNN tower (ModifiedResNet, ConvNeXt: docs/model_families.md) it is the original Grad-CAM: the feature map
[C, h, w] leaving stage ``layer`` (default the last stage), channel weights = the gradient of S averaged over the
h·w positions, map = ReLU(Σ_c weight_c · A_c).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmel.explainers import register
from mmel.explainers.attention import check_variant
from mmel.explainers.base import Explainer, batched_vjp, cosine_scores
from mmel.explainers.cnn import resolve_stage, split_tower, stages
from mmel.explainers.vit import resolve_layers, trace_image
from mmel.families import CNN_FAMILIES, VIT_FAMILIES


@register("gradcam")
class GradCAM(Explainer):
    """Grad-CAM on the tokens entering block ``layer``; ``variant``: native | grad_eclip_paper (module docstring)."""

    name = "gradcam"
    needs_grad = True
    families = VIT_FAMILIES | CNN_FAMILIES
    reads = "the tokens entering a native ViT block, or the feature map of a CNN stage"
    needs = "ViT blocks or CNN stages"

    def __init__(self, clip, layer: int = -1, variant: str = "native") -> None:
        super().__init__(clip)
        self.variant = check_variant(variant, "gradcam")
        if self.family in CNN_FAMILIES:
            self.layer = resolve_stage(layer, len(stages(self.visual, self.family)), "gradcam.layer")
            if self.variant != "native":
                raise ValueError(f"gradcam: variant={variant!r} recomputes a ViT block; a CNN tower takes 'native'")
            return
        (self.layer,) = resolve_layers([layer], self.depth, "gradcam.layer")
        if self.variant == "grad_eclip_paper" and self.layer != self.depth - 1:
            raise ValueError(
                f"gradcam: variant='grad_eclip_paper' takes the input of the last block (layer=-1), got layer={layer}"
            )

    def label_options(self) -> dict[str, object]:
        return {"variant": self.variant}

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.raw_maps_text(images, self.text_features(prompts))

    def raw_maps_text(self, images: Tensor, text: Tensor) -> Tensor:
        if self.family in CNN_FAMILIES:
            return self._cnn_maps(images, text)
        heads = 1 if self.variant == "grad_eclip_paper" else None  # the paper's single-head last block
        trace = trace_image(self.model, images, [self.layer], heads=heads)
        x = trace.records[self.layer].x_in  # [B, T, C], the leaf of the graph
        (g,) = batched_vjp(cosine_scores(trace.features, text), [x])  # [K, B, T, C]
        weights = g.mean(dim=2)  # [K, B, C]
        cam = torch.einsum("kbc,bnc->bkn", weights, x[:, 1:].detach())
        return cam.relu().unflatten(-1, trace.grid)

    def _cnn_maps(self, images: Tensor, text: Tensor) -> Tensor:
        """[B, K, h, w] Grad-CAM on the feature map leaving CNN stage ``layer``."""
        front, back = split_tower(self.visual, self.family, self.layer)
        with torch.no_grad():
            a = front(images)  # [B, C, h, w]
        a = a.detach().requires_grad_(True)
        (g,) = batched_vjp(cosine_scores(back(a), text), [a])  # [K, B, C, h, w]
        weights = g.mean(dim=(-1, -2))  # [K, B, C]
        return torch.einsum("kbc,bchw->bkhw", weights, a.detach()).relu()
