"""MaskCLIP-style dense similarity (Zhou et al., ECCV 2022).

The last block's query-key attention is skipped: each patch's value, out-projected, goes through the block's
residual and MLP, ln_post and the projection as if it were the CLS token, giving a dense embedding per patch;
the map is its cosine with the prompt's text embedding. No gradients.

``templates``: none (each prompt as it is) | authors (the authors' 85-template ensemble, see
mmel.explainers.templates); recorded in ``label``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mmel.explainers import register
from mmel.explainers.base import Explainer
from mmel.explainers.templates import TemplatedText
from mmel.explainers.vit import block_rest, trace_image
from mmel.families import VIT_FAMILIES


@register("maskclip")
class MaskCLIP(TemplatedText, Explainer):
    """Dense patch-text cosine through the value path of the last block."""

    name = "maskclip"
    families = VIT_FAMILIES

    def __init__(self, clip, templates: str = "none") -> None:
        super().__init__(clip)
        self._init_templates(templates)

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        text = F.normalize(self.text_features(prompts), dim=-1)  # [K, E]
        last = self.depth - 1
        trace = trace_image(self.model, images, [last], grad=False)
        rec = trace.records[last]
        blk = self.visual.transformer.resblocks[last]
        v = rec.v.transpose(1, 2).flatten(2)[:, 1:]  # heads concatenated, patches: [B, N, C]
        v = F.linear(v, blk.attn.out_proj.weight, blk.attn.out_proj.bias)
        dense = self.visual.ln_post(block_rest(blk, rec.x_in[:, 1:], v))
        if self.visual.proj is not None:
            dense = dense @ self.visual.proj
        sim = F.normalize(dense, dim=-1) @ text.T  # [B, N, K]
        return sim.transpose(1, 2).unflatten(-1, trace.grid)
