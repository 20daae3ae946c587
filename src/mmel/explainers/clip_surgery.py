"""CLIP Surgery (Li et al., 2023, "CLIP Surgery for Better Explainability with Enhancement in Open-Vocabulary Tasks").

Two changes to a frozen CLIP, no gradients (read from the authors' code, github.com/xmed-lab/CLIP_Surgery,
``clip_surgery_model.py`` and ``clip.clip_feature_surgery``):

1. **Architecture surgery** (v-v attention path). From block d = depth - ``layers`` on, a second token stream runs
   beside the unchanged model. Each of these blocks adds to it the v-v self-attention of the ORIGINAL stream's
   tokens: with v the block's value projection of ln_1(x_orig) (per head), out_proj(softmax(v vᵀ/√d_h) v); the new
   stream has no FFN. It starts from the input of block d. Patch embeddings are ln_post/proj of the new stream;
   the CLS embedding stays the original model's.
2. **Feature surgery** against the prompt set (``surgery="prompts"``, default). With normalised patch embeddings
   x_i, CLS embedding x_c and text embeddings t_k: class weights w_k = softmax_k(2·cos(x_c, t_k)) / mean_k(·),
   s_ik = w_k·<x_i, t_k>, and the map is s_ik − mean_k' s_ik' — the component shared by every prompt
   ("redundant features") is removed. Exactly the authors' element-wise form summed over channels, computed
   without the [N, K, C] tensor.
   ``surgery="empty"``: the authors' single-query variant, <x_i, t_k − r> with r the embedding of the empty
   prompt "" (their demo uses the prompt ensemble of ""; we use the plain string, like every prompt here).
   ``surgery="none"``: the v-v path alone, <x_i, t_k>.

With ``surgery="prompts"`` a map depends on the whole prompt set by design (it is a contrast between prompts): K
prompts explained together differ from K single calls, and a single prompt would contrast with itself (a zero
map). So one prompt alone falls back to the ``empty`` variant, as the authors' demo does for one query.

``layers=None`` is min(6, depth): the authors operate on the last 6 blocks of every ViT.

``templates``: none (each prompt as it is) | authors (the authors' 85-template ensemble, for the prompts and for
the "" of ``surgery="empty"``, as their demo; see mmel.explainers.templates); recorded in ``label``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mmel.explainers import register
from mmel.explainers.base import Explainer
from mmel.explainers.templates import TemplatedText
from mmel.explainers.vit import image_embeds, last_layers
from mmel.families import VIT_FAMILIES

SURGERY = ("prompts", "empty", "none")


def vv_attention(blk: nn.Module, h: Tensor) -> Tensor:
    """v-v self-attention of a block: h [B, T, C] (already ln_1'd) -> out_proj(softmax(v vᵀ/√d) v) [B, T, C]."""
    mha = blk.attn
    B, T, C = h.shape
    H = mha.num_heads
    d = C // H
    v = F.linear(h, mha.in_proj_weight[2 * C :], mha.in_proj_bias[2 * C :] if mha.in_proj_bias is not None else None)
    v = v.view(B, T, H, d).transpose(1, 2)  # [B, H, T, d]
    attn = ((v * d**-0.5) @ v.transpose(-1, -2)).softmax(dim=-1)
    o = (attn @ v).transpose(1, 2).reshape(B, T, C)
    return F.linear(o, mha.out_proj.weight, mha.out_proj.bias)


def feature_surgery(patches: Tensor, cls: Tensor, text: Tensor) -> Tensor:
    """Prompt-set feature surgery. patches [B, N, E], cls [B, E], text [K, E], all L2-normalised -> [B, N, K].

    Σ_k of the result is 0 at every patch: whatever every prompt shares is removed.
    """
    w = (2 * cls @ text.T).softmax(dim=-1)  # [B, K]: restrains the influence of obvious classes on the others
    w = w / w.mean(dim=-1, keepdim=True)
    s = (patches @ text.T) * w[:, None]  # [B, N, K]
    # Shifting by the first prompt's column first changes nothing mathematically, but makes prompts that are all
    # equal give exactly 0 (a constant map), not float noise that min-max normalisation would blow up to [0, 1].
    s = s - s[..., :1]
    return s - s.mean(dim=-1, keepdim=True)


@register("clip_surgery")
class CLIPSurgery(TemplatedText, Explainer):
    """CLIP Surgery: v-v attention path in the last ``layers`` blocks + feature surgery (see module docstring)."""

    name = "clip_surgery"
    families = VIT_FAMILIES

    def __init__(self, clip, layers: int | None = None, surgery: str = "prompts", templates: str = "none") -> None:
        super().__init__(clip)
        self._init_templates(templates)
        if surgery not in SURGERY:
            raise ValueError(f"clip_surgery: surgery={surgery!r}; expected one of {SURGERY}")
        self.layers = last_layers(min(6, self.depth) if layers is None else layers, self.depth)
        self.surgery = surgery
        self.set_dependent = surgery == "prompts"

    def __repr__(self) -> str:
        return f"CLIPSurgery(layers={len(self.layers)}, surgery={self.surgery!r})"

    def _head(self, x: Tensor) -> Tensor:
        x = self.visual.ln_post(x)
        return x @ self.visual.proj if self.visual.proj is not None else x

    def dense_features(self, images: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """(patch embeddings [B, N, E] of the v-v path, CLS embedding [B, E] of the unchanged model, grid)."""
        blocks = self.visual.transformer.resblocks
        x, grid = image_embeds(self.visual, images)
        first = self.layers[0]
        for blk in blocks[:first]:
            x = blk(x)
        new = x
        for blk in blocks[first:]:
            new = new + blk.ls_1(vv_attention(blk, blk.ln_1(x)))  # attention of the ORIGINAL stream; no FFN
            x = blk(x)
        return self._head(new[:, 1:]), self._head(x[:, 0]), grid

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        text = F.normalize(self.text_features(prompts), dim=-1)  # [K, E]
        patches, cls, grid = self.dense_features(images)
        patches, cls = F.normalize(patches, dim=-1), F.normalize(cls, dim=-1)
        mode = self.surgery
        if mode == "prompts" and len(prompts) == 1:
            mode = "empty"  # a lone prompt would contrast with itself (see module docstring)
        if mode == "prompts":
            sim = feature_surgery(patches, cls, text)
        elif mode == "empty":
            redundant = F.normalize(self.text_features([""]), dim=-1)  # [1, E]
            sim = patches @ (text - redundant).T
        else:
            sim = patches @ text.T
        return sim.transpose(1, 2).unflatten(-1, grid)  # [B, K, h, w]
