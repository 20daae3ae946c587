"""ClearCLIP (Lan et al., ECCV 2024, "ClearCLIP: Decomposing CLIP Representations for Dense Vision-Language
Inference"): training-free dense patch-text similarity.

Why ClearCLIP of the open-vocabulary segmentation line (ClearCLIP, SCLIP, GEM): it is the one whose change to
CLIP is a clean decomposition of the last block with no free hyperparameters — SCLIP's correlative attention and
GEM's iterated self-self attention carry temperatures and iteration counts tuned for segmentation benchmarks —
and it differs from the MaskCLIP baseline already here by exactly the paper's three findings, so the comparison
isolates them. In the last block, with h = ln_1(x) and q, v the block's own projections (per head):

    dense_i = proj( ln_post( out_proj( softmax(q qᵀ/√d_h) v )_i ) )

i.e. query-query attention replaces query-key attention, and the residual connection and the FFN of the last
block are dropped (the authors' ``custom_attn(model_type="ClearCLIP")`` with ``ignore_residual=True``,
github.com/mc-lan/ClearCLIP). The map is cos(dense_i, t_k). No gradients; prompts only enter the final cosine,
so K prompts batched equal K single calls.

``templates``: none (each prompt as it is) | authors (the authors' ensemble of OpenAI's 80 ImageNet templates, see
mmel.explainers.templates); recorded in ``label``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mmel.explainers import register
from mmel.explainers.base import Explainer
from mmel.explainers.templates import TemplatedText
from mmel.explainers.vit import trace_image
from mmel.families import VIT_FAMILIES


@register("clearclip")
class ClearCLIP(TemplatedText, Explainer):
    """Dense patch-text cosine from the last block's q-q attention without residual or FFN."""

    name = "clearclip"
    families = VIT_FAMILIES

    def __init__(self, clip, templates: str = "none") -> None:
        super().__init__(clip)
        self._init_templates(templates)

    def dense_features(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Dense patch embeddings [B, N, E] (unnormalised) and the patch grid."""
        last = self.depth - 1
        trace = trace_image(self.model, images, [last], grad=False)
        rec = trace.records[last]  # q, v: [B, H, T, d] of the last block on ln_1(x)
        d = rec.q.shape[-1]
        attn = ((rec.q * d**-0.5) @ rec.q.transpose(-1, -2)).softmax(dim=-1)
        o = (attn @ rec.v).transpose(1, 2).flatten(2)[:, 1:]  # heads concatenated, patches: [B, N, C]
        out_proj = self.visual.transformer.resblocks[last].attn.out_proj
        dense = self.visual.ln_post(F.linear(o, out_proj.weight, out_proj.bias))
        if self.visual.proj is not None:
            dense = dense @ self.visual.proj
        return dense, trace.grid

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        text = F.normalize(self.text_features(prompts), dim=-1)  # [K, E]
        dense, grid = self.dense_features(images)
        sim = F.normalize(dense, dim=-1) @ text.T  # [B, N, K]
        return sim.transpose(1, 2).unflatten(-1, grid)
