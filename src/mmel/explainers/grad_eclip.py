"""Grad-ECLIP (Zhao et al., ICML 2024; arXiv 2502.18816): image maps, text token weights, per-layer evidence.

For a block with CLS/EOS row c, S = cos(f_image, f_text) (unscaled):
    w   = dS/d o_c                              channel weights (o: attention output before out_proj)
    λ_i = minmax_i cos(q_c, k_i)                "loosened" attention, no softmax
    E_i = λ_i · <w, v_i>                        signed evidence;  map = normalise(Σ_layers ReLU(E)) (image side)

Modes (docs/grad_eclip.md), every result labelled with its mode:
  * ``native`` (default): the unmodified multi-head CLIP. dS/do is recovered from the attention module's output
    y = o W_Oᵀ + b_O as (dS/dy)·W_O; λ and <w, v> are per head, E summed over heads.
  * ``official``: as the authors' ``generate_emap.py``: the traced blocks are recomputed with one head over the
    full width (scale 1/sqrt(C)), dS/do taken directly, q and k passed through out_proj (with bias) before the
    cosine. This explains a slightly modified model: its cosines differ from stock CLIP's. Keep-size input is
    the explain program's ``resize=keep``.

Image side: λ over the patch tokens, w at the CLS row; ``layers=n`` sums ReLU(E) over the last n blocks (the
authors' multi-layer notebook). Text side: w at the EOS row, λ over all context positions (as the official code),
signed E of the last n text blocks summed, then ReLU, start and end tokens dropped, normalised to sum 1.

All K prompts share one image forward and one batched vector-Jacobian product (docs/grad_eclip.md, Batching).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmel.explainers import register
from mmel.explainers.base import Explainer, batched_vjp, cosine_scores, minmax, tokenize
from mmel.explainers.vit import (
    BlockRecord,
    check_text_tower,
    encode_image,
    eos_positions,
    last_layers,
    resolve_layers,
    trace_image,
    trace_text,
)
from mmel.families import VIT_FAMILIES

MODES = ("native", "official")


@dataclass
class LayerEvidence:
    """Per-layer Grad-ECLIP evidence for the HSRM (native mode). L = len(layers), N = h*w patches.

    evidence:      [B, K, L, h, w] signed λ_i·<w, v_i> summed over heads, before ReLU / normalisation
    keys:          [B, L, N, C] patch-token keys of each selected block (heads concatenated, C = width)
    patch_tokens:  [B, N, C] output tokens of the last vision block for the patches (before ln_post)
    text_features: [K, E] encode_text output (unnormalised); [B, E] when ``paired``
    grid:          (h, w) patch grid
    layers:        the block indices (non-negative) in the order of the L axis
    paired:        image b was explained for prompt b only (K = 1)
    """

    evidence: Tensor
    keys: Tensor
    patch_tokens: Tensor
    text_features: Tensor
    grid: tuple[int, int]
    layers: list[int]
    paired: bool = False


@dataclass
class TextExplanation:
    """Text-side Grad-ECLIP. weights: [B, K, L] per context position, non-negative, summing to 1 over the real
    tokens of each prompt (start/end and padding are 0; all zeros if no token has positive evidence);
    mask: [K, L] bool, the real tokens; tokens: per prompt, the real tokens' strings in order."""

    weights: Tensor
    mask: Tensor
    tokens: list[list[str]]


def spatial_weights(q_c: Tensor, k: Tensor) -> Tensor:
    """λ = minmax over positions of cos(q_c, k_i): q_c [..., H, d], k [..., H, N, d] -> [..., H, N]."""
    cos = (F.normalize(q_c, dim=-1).unsqueeze(-2) * F.normalize(k, dim=-1)).sum(-1)
    return minmax(cos, dims=(-1,))


def pull_back_through_out_proj(grad_y: Tensor, out_proj_weight: Tensor) -> Tensor:
    """dS/do from dS/dy for y = o W_Oᵀ + b_O: (dS/dy) W_O. grad_y [..., C], W_O [C, C] -> [..., C]."""
    return grad_y @ out_proj_weight


def _out_project(x: Tensor, rec_weight: Tensor, rec_bias: Tensor | None) -> Tensor:
    """Official mode: q or k [B, 1, T, C] (one head) through out_proj with bias -> [B, 1, T, C]."""
    return F.linear(x, rec_weight, rec_bias)


@register("grad_eclip")
class GradECLIP(Explainer):
    """Grad-ECLIP explainer. ``mode``: native | official; ``layers``: number of last vision blocks summed;
    ``text_layers``: number of last text blocks for :meth:`explain_text` (default: same as ``layers``)."""

    name = "grad_eclip"
    families = VIT_FAMILIES
    needs_grad = True

    def __init__(self, clip, mode: str = "native", layers: int = 1, text_layers: int | None = None) -> None:
        super().__init__(clip)
        if mode not in MODES:
            raise ValueError(f"grad_eclip: mode={mode!r}; expected one of {MODES}")
        self.mode = mode
        self.layers = last_layers(layers, self.depth)
        self.text_layers = text_layers if text_layers is not None else layers

    def __repr__(self) -> str:
        return f"GradECLIP(mode={self.mode!r}, layers={len(self.layers)})"

    @property
    def heads(self) -> int | None:
        """Head count of the traced blocks: the model's own (native) or 1 over the full width (official)."""
        return 1 if self.mode == "official" else None

    # -------------------------------------------------------------------------------------------- image side
    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.raw_maps_text(images, self.text_features(prompts))

    def raw_maps_text(self, images: Tensor, text_features: Tensor) -> Tensor:
        evidence, _ = self._image_evidence(images, text_features, self.layers)
        return evidence.relu().sum(dim=2)  # ReLU per layer, summed: [B, K, h, w]

    def _channel_weights(self, rec: BlockRecord, grad: Tensor, block) -> Tensor:
        """dS/do at the CLS/EOS rows. grad: [..., C] gradient w.r.t. y (native) or o (official)."""
        if self.mode == "official":
            return grad
        return pull_back_through_out_proj(grad, block.attn.out_proj.weight)

    def _qk(self, rec: BlockRecord, block) -> tuple[Tensor, Tensor]:
        """q, k [B, H, T, d] used for λ: raw per head (native) or out-projected with bias (official)."""
        if self.mode == "native":
            return rec.q, rec.k
        w, b = block.attn.out_proj.weight, block.attn.out_proj.bias
        return _out_project(rec.q, w, b), _out_project(rec.k, w, b)

    def _image_evidence(
        self, images: Tensor, text_features: Tensor, layers: Sequence[int], paired: bool = False, tokens=False
    ):
        """Signed evidence [B, K, L, h, w] (K = 1 when paired) and the trace it came from. text_features [K, E]
        (shared prompts), [B, E] (paired) or [B, K, E] (per-image prompts, zero rows = padding)."""
        blocks = self.visual.transformer.resblocks
        trace = trace_image(self.model, images, layers, heads=self.heads, need_tokens=tokens)
        f = trace.features
        if paired:
            scores = (F.normalize(f, dim=-1) * F.normalize(text_features, dim=-1)).sum(-1, keepdim=True)  # [B, 1]
        else:
            scores = cosine_scores(f, text_features)  # [B, K]
        recs = [trace.records[i] for i in layers]
        grads = batched_vjp(scores, [r.o_cls if self.mode == "official" else r.y_cls for r in recs])  # [K, B, 1, C]
        per_layer = []
        for i, rec, g in zip(layers, recs, grads, strict=True):
            B, H, T, d = rec.v.shape
            w = self._channel_weights(rec, g[:, :, 0], blocks[i]).view(-1, B, H, d)  # [K, B, H, d]
            q, k = self._qk(rec, blocks[i])
            lam = spatial_weights(q[:, :, 0], k[:, :, 1:])  # [B, H, N]
            wv = torch.einsum("kbhd,bhnd->bkhn", w, rec.v[:, :, 1:])  # [B, K, H, N]
            per_layer.append((wv * lam[:, None]).sum(dim=2))  # summed over heads: [B, K, N]
        evidence = torch.stack(per_layer, dim=2).detach()
        return evidence.unflatten(-1, trace.grid), trace

    def layer_evidence(
        self, images: Tensor, prompts: Sequence[str], layers: Sequence[int], paired: bool = False
    ) -> LayerEvidence:
        """Per-layer signed evidence, keys and tokens for the HSRM (see :class:`LayerEvidence`).

        images [B, 3, H, W]; ``layers`` block indices (negative = from the end), kept in the given order.
        ``paired``: len(prompts) == B and image b is explained for prompt b only (K = 1): one forward and one
        backward for the whole batch. The map of ``layers=n`` equals normalise(Σ_l ReLU(evidence_l)), resized.
        """
        if self.mode != "native":
            raise ValueError("layer_evidence is defined for mode='native' (the unmodified model) only")
        images, prompts = self._prepare(images, prompts)
        if paired and len(prompts) != images.shape[0]:
            raise ValueError(
                f"paired=True needs one prompt per image: got {len(prompts)} prompts, {len(images)} images"
            )
        return self.layer_evidence_text(images, self.text_features(prompts), layers, paired)

    def layer_evidence_text(
        self, images: Tensor, text_features: Tensor, layers: Sequence[int], paired: bool = False
    ) -> LayerEvidence:
        """:meth:`layer_evidence` for text embeddings: [K, E] shared by the images, [B, E] paired, or [B, K, E] per
        image (zero rows: padding, whose evidence is 0). Images as already prepared by the caller."""
        if self.mode != "native":
            raise ValueError("layer_evidence is defined for mode='native' (the unmodified model) only")
        idx = resolve_layers(layers, self.depth)
        with torch.enable_grad():
            evidence, trace = self._image_evidence(images, text_features, idx, paired, True)
        keys = torch.stack([trace.records[i].k[:, :, 1:].transpose(1, 2).flatten(2) for i in idx], dim=1)
        return LayerEvidence(
            evidence=evidence,
            keys=keys.detach(),
            patch_tokens=trace.tokens[:, 1:].detach(),
            text_features=text_features,
            grid=trace.grid,
            layers=idx,
            paired=paired,
        )

    # --------------------------------------------------------------------------------------------- text side
    def explain_text(self, images: Tensor, prompts: Sequence[str]) -> TextExplanation:
        """Per-token weights [B, K, L] of each prompt for each image (see :class:`TextExplanation`)."""
        images, prompts = self._prepare(images, prompts)
        check_text_tower(self.model)
        tokens = tokenize(self.clip, prompts)
        text_blocks = self.model.transformer.resblocks
        layers = last_layers(self.text_layers, len(text_blocks))
        image_features = encode_image(self.model, images)  # [B, E], no graph
        with torch.enable_grad():
            trace = trace_text(self.model, tokens, layers, heads=self.heads)
            scores = cosine_scores(image_features, trace.features).T  # [K, B]: batch the VJP over images
            recs = [trace.records[i] for i in layers]
            grads = batched_vjp(scores, [r.o if self.mode == "official" else r.y for r in recs])  # [B, K, L, C]
        K, L = tokens.shape
        eos = eos_positions(tokens)
        rows = torch.arange(K, device=tokens.device)
        total = 0.0
        for i, rec, g in zip(layers, recs, grads, strict=True):
            _, H, _, d = rec.v.shape
            w = self._channel_weights(rec, g[:, rows, eos], text_blocks[i]).view(-1, K, H, d)  # [B, K, H, d]
            q, k = self._qk(rec, text_blocks[i])
            lam = spatial_weights(q[rows, :, eos], k)  # [K, H, L], over all positions
            wv = torch.einsum("bkhd,khld->bkhl", w, rec.v)
            total = total + (wv * lam[None]).sum(dim=2)  # signed, summed over heads and layers: [B, K, L]
        pos = torch.arange(L, device=tokens.device)
        mask = (pos[None] >= 1) & (pos[None] < eos[:, None])  # real tokens: start and end dropped
        weights = total.detach().relu() * mask[None]
        mass = weights.sum(-1, keepdim=True)
        weights = torch.where(mass > 0, weights / mass.clamp_min(torch.finfo(weights.dtype).tiny), weights)
        return TextExplanation(weights=weights, mask=mask, tokens=self._token_strings(tokens, eos))

    def _token_strings(self, tokens: Tensor, eos: Tensor) -> list[list[str]]:
        tok = self.clip.tokenizer
        out = []
        for row, e in zip(tokens.tolist(), eos.tolist(), strict=True):
            ids = row[1:e]
            out.append([tok.decode([t]).strip() if hasattr(tok, "decode") else str(t) for t in ids])
        return out
