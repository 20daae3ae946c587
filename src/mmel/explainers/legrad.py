"""LeGrad (Bousselham et al., 2024, "LeGrad: An Explainability Method for Vision Transformers via Feature Formation
Sensitivity"), for open_clip ViTs.

For every block l from ``start_layer`` to the last, the block's output tokens z^l are pooled and passed through the
model's own head (``ln_post``, ``proj``) to an intermediate image embedding f^l; its score is s^l = cos(f^l, t)
for the prompt's text embedding t. The map is

    M = Σ_l  mean_{heads, query rows} ReLU( ∂s^l / ∂A^l )[:, patches]

with A^l the softmax attention of block l (gradient of each layer's OWN score w.r.t. that layer's attention only),
reshaped to the patch grid and min-max normalised by the base class.

Details taken from the authors' code (github.com/WalBouss/LeGrad, ``LeWrapper.compute_legrad_clip``):
  * ``pool="mean"`` (default): f^l pools z^l by the mean over ALL tokens (CLS and patches), as the official code
    does (``feat_post_mlp.mean(dim=0)`` on sequence-first tokens), not the CLS token alone. ``pool="cls"`` uses the
    CLS token (the reading of the paper's text); then only the CLS row of ∂s^l/∂A^l is non-zero and the row mean
    is that row divided by T.
  * the row average runs over every query token (CLS + patches), heads are averaged, and only columns of patch
    tokens are kept;
  * ``start_layer=-2`` is the wrapper's default ``layer_index`` (the last two blocks).

Batching (docs/grad_eclip.md, Batching): one forward over the traced blocks for all prompts, one batched VJP
of Σ_l s^l [B, K]; ``explain_batch`` runs B images with their own prompts in one forward and one VJP of K_max rows.
To make the gradient w.r.t. A^l carry s^l alone (and not the later layers' scores, which also depend on A^l),
each traced block's input is a fresh leaf detached from the previous block's output: then ∂(Σ_m s^m)/∂A^l =
∂s^l/∂A^l exactly, and one VJP serves every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmel.explainers import register
from mmel.explainers.base import Explainer, batched_vjp, cosine_scores
from mmel.explainers.vit import block_attention, block_rest, image_embeds, resolve_layers
from mmel.families import VIT_FAMILIES

POOLS = ("mean", "cls")


@register("legrad")
class LeGrad(Explainer):
    """LeGrad: layer-wise gradients of the intermediate scores w.r.t. the attention maps, ReLU, averaged.

    ``start_layer``: first block used (negative counts from the end; default -2 as the official wrapper);
    ``pool``: "mean" (official code: token mean) or "cls" (CLS token) for the intermediate embeddings.
    """

    name = "legrad"
    families = VIT_FAMILIES
    needs_grad = True

    def __init__(self, clip, start_layer: int = -2, pool: str = "mean") -> None:
        super().__init__(clip)
        if pool not in POOLS:
            raise ValueError(f"legrad: pool={pool!r}; expected one of {POOLS}")
        (self.start,) = resolve_layers([start_layer], self.depth, "legrad.start_layer")
        self.pool = pool

    def __repr__(self) -> str:
        return f"LeGrad(start_layer={self.start}, pool={self.pool!r})"

    def intermediate_embedding(self, tokens: Tensor) -> Tensor:
        """Block output tokens [B, T, C] -> intermediate image embedding [B, E] through ln_post / proj."""
        pooled = tokens.mean(dim=1) if self.pool == "mean" else tokens[:, 0]
        pooled = self.visual.ln_post(pooled)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.raw_maps_text(images, self.text_features(prompts))

    def raw_maps_text(self, images: Tensor, text: Tensor) -> Tensor:
        """Maps [B, K, h, w] for text embeddings [K, E] shared by the images, or [B, K, E] per image (zero rows:
        padding, whose score and so whose map is 0). Images are independent, so one VJP row per prompt slot
        carries that slot's score of every image."""
        blocks = self.visual.transformer.resblocks
        x, grid = image_embeds(self.visual, images)
        with torch.no_grad():
            for blk in blocks[: self.start]:
                x = blk(x)
        attns: list[Tensor] = []
        total = 0.0
        for blk in blocks[self.start :]:
            # a fresh leaf per block: the gradient w.r.t. this block's attention then carries its own score only
            x = x.detach().requires_grad_(True)
            rec = block_attention(blk, x)
            x = block_rest(blk, x, rec.y)
            total = total + cosine_scores(self.intermediate_embedding(x), text)  # [B, K]
            attns.append(rec.attn)
        grads = batched_vjp(total, attns)  # each [K, B, H, T, T]
        relevance = sum(g.clamp(min=0).mean(dim=(2, 3))[..., 1:] for g in grads)  # [K, B, N]
        return relevance.transpose(0, 1).unflatten(-1, grid)
