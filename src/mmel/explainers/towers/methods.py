"""The explainers on towers (timm-trunk and Hugging Face ViTs), read through the tower's pooling query.

The query a CLIP explanation follows is the token whose output becomes the image embedding: the CLS row of the
last blocks for a CLS-pooled tower (EVA02), the pool's learned latent for an attention-pooled tower (SigLIP,
SigLIP2, PE-Core, HF SigLIP). The score is the model's own: SigLIP's logit exp(logit_scale)·cos + logit_bias when the
model has a bias, else the unscaled cosine (docs/towers.md derives each reading):

  * ``grad_eclip``: E_i = λ_i · <w, v_i> summed over heads, w = dS/do at the query row (o = Σ_j A_j v_j, before the
    output norm / projection), λ = min-max of cos(q, k_i) (q, k as the softmax sees them: after q/k norm and
    rotary embedding). Attention pool: the latent's q, k_i, v_i of the pool (one attention; ``layers=1``).
  * ``legrad``: Σ_l mean_heads,rows ReLU(∂s^l/∂A^l) at the patch columns. Attention pool: s^l is the score of the
    pool applied to block l's tokens, A^l the pool's attention (legrad-torch's SigLIP path); ``norm`` adds the
    final norm before the pool (legrad-torch leaves it out). CLS tower: A^l the block's own attention, s^l the
    score of the block's tokens pooled by ``pool`` (mean | cls) through the final norm and the heads.
  * ``attention``: the query's attention over the patches, averaged over heads.
  * ``gradcam``: Grad-CAM on the tokens entering block ``layer`` (gradient averaged over tokens).
  * ``maskclip``: the query's final attention replaced by each patch's own value (one embedding per patch).

Other methods refuse (:func:`build_tower_explainer`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmel.explainers.base import Explainer, batched_vjp, tokenize
from mmel.explainers.towers.core import Tower, trace
from mmel.explainers.vit import last_layers, resolve_layers
from mmel.families import classify
from mmel.utils.maps import minmax


class TowerExplainer(Explainer):
    """Base of the tower explainers: the tower replaces the open_clip ViT checks; text features and scores are the
    model's own (:meth:`Tower.score`)."""

    needs_grad = False

    def __init__(self, clip, tower: Tower) -> None:  # noqa: D107 - no super().__init__: it checks for a native ViT
        self.clip = clip
        self.model = clip.model
        self.tower = tower
        self.patch = tower.patch
        self.depth = tower.depth
        self.family = classify(clip)  # mmel.families (what the base class's checks read)

    def text_features(self, prompts) -> Tensor:
        with torch.no_grad():
            return self.tower.encode_text(tokenize(self.clip, prompts))

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.raw_maps_text(images, self.text_features(prompts))

    def _patches(self, t: Tensor, pool: bool) -> Tensor:
        """The patch columns of a last axis over the pool's keys (``pool``) or the block's tokens."""
        return t[..., (self.tower.pool_prefix if pool else self.tower.prefix) :]


def value_evidence(w: Tensor, q_c: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Grad-ECLIP's signed evidence summed over heads: w [K, B, C] = dS/do at the query row, q_c [B, H, d] the
    query, k, v [B, H, N, d] the keys / values of the patches -> [B, K, N]."""
    B, H, N, d = v.shape
    cos = (torch.nn.functional.normalize(q_c, dim=-1)[:, :, None] * torch.nn.functional.normalize(k, dim=-1)).sum(-1)
    lam = minmax(cos, dims=(-1,))  # [B, H, N]
    wv = torch.einsum("kbhd,bhnd->bkhn", w.reshape(-1, B, H, d), v)
    return (wv * lam[:, None]).sum(dim=2)


class TowerGradECLIP(TowerExplainer):
    """Grad-ECLIP through the tower's query (module docstring). ``layers``: last blocks summed (CLS towers); an
    attention-pooled tower explains its pool (``layers=1``). Only ``mode='native'`` (the unmodified model)."""

    name = "grad_eclip"
    needs_grad = True

    def __init__(self, clip, tower: Tower, mode: str = "native", layers: int = 1, text_layers: int | None = None):
        super().__init__(clip, tower)
        if mode != "native":
            raise ValueError(
                f"grad_eclip: mode={mode!r} is defined for open_clip's native ViT blocks only; on a {tower.family} "
                "tower only mode='native' (the unmodified model) exists"
            )
        self.mode = mode
        if tower.attn_pool and layers != 1:
            raise ValueError(
                f"grad_eclip: layers={layers} on an attention-pooled {tower.family} tower. Its blocks have no token "
                "that becomes the embedding; the map explains the pool's latent query (one attention): use layers=1"
            )
        self.layers = [] if tower.attn_pool else last_layers(layers, self.depth)

    def explain_text(self, images: Tensor, prompts) -> None:
        raise NotImplementedError(
            f"grad_eclip: the text side is written for open_clip's causal CLIP text tower; on a {self.tower.family} "
            "tower only image maps exist"
        )

    def layer_evidence(self, images: Tensor, prompts, layers, paired: bool = False) -> None:
        raise NotImplementedError(
            f"grad_eclip: per-layer evidence (the HSRM's input) is defined for open_clip's native ViT; a "
            f"{self.tower.family} tower has image maps only"
        )

    def raw_maps_text(self, images: Tensor, text: Tensor) -> Tensor:
        tr = trace(self.tower, images, self.layers)
        scores = self.tower.score(tr.features, text)
        if self.tower.attn_pool:
            p = tr.pool
            (g,) = batched_vjp(scores, [p.o])  # [K, B, 1, C]
            n = self.tower.pool_prefix
            ev = value_evidence(g[:, :, 0], p.q[:, :, 0], p.k[:, :, n:], p.v[:, :, n:])
            return ev.relu().unflatten(-1, tr.grid)
        recs = [tr.records[i] for i in self.layers]
        grads = batched_vjp(scores, [r.o_cls for r in recs])
        total = 0.0
        for rec, g in zip(recs, grads, strict=True):
            n = self.tower.prefix
            total = total + value_evidence(g[:, :, 0], rec.q[:, :, 0], rec.k[:, :, n:], rec.v[:, :, n:]).relu()
        return total.unflatten(-1, tr.grid)


POOLS = ("mean", "cls")


EMPTY_PROMPT = "a photo of a"  # legrad-torch's "empty" prompt for its SigLIP correction


class TowerLeGrad(TowerExplainer):
    """LeGrad through the tower's query (module docstring). ``start_layer`` (default -2, legrad-torch's default);
    ``norm``: final norm before an attention pool (default False, as legrad-torch); ``pool``: mean | cls pooling of
    a CLS tower's intermediate tokens (default mean, as the authors' CLIP code); ``correction`` (attention-pooled
    towers): legrad-torch's SigLIP correction, zeroing the patches where the min-max normalised map of the prompt
    "a photo of a" exceeds ``threshold`` (legrad-torch's default is on; mmel's is off, docs/towers.md)."""

    name = "legrad"
    needs_grad = True

    def __init__(
        self,
        clip,
        tower: Tower,
        start_layer: int = -2,
        pool: str = "mean",
        norm: bool = False,
        correction: bool = False,
        threshold: float = 0.8,
    ):
        super().__init__(clip, tower)
        if pool not in POOLS:
            raise ValueError(f"legrad: pool={pool!r}; expected one of {POOLS}")
        if correction and not tower.attn_pool:
            raise ValueError("legrad: correction=True is legrad-torch's step for attention-pooled (SigLIP) towers")
        (self.start,) = resolve_layers([start_layer], self.depth, "legrad.start_layer")
        self.pool, self.norm, self.correction, self.threshold = pool, bool(norm), bool(correction), float(threshold)

    def label_options(self) -> dict[str, object]:
        if self.tower.attn_pool:
            return {"norm": self.norm, "correction": self.correction}
        return {"pool": self.pool}

    def raw_maps_text(self, images: Tensor, text: Tensor) -> Tensor:
        if not self.correction:
            return self._relevance(images, text)
        empty = self.text_features([EMPTY_PROMPT])  # [1, E]
        if text.dim() == 3:  # per-image prompts [B, K, E]
            empty = empty.expand(text.shape[0], 1, -1)
        rel = self._relevance(images, torch.cat([text, empty], dim=-2))  # the empty prompt as one more VJP row
        maps, empty_map = rel[:, :-1], rel[:, -1:]
        return maps.masked_fill(minmax(empty_map) > self.threshold, 0.0)

    def _relevance(self, images: Tensor, text: Tensor) -> Tensor:
        tw = self.tower
        x, grid, aux = tw.embed(images)
        with torch.no_grad():
            for i in range(self.start):
                x = tw.block(i, x, aux)
        total, targets = 0.0, []
        for i in range(self.start, self.depth):
            x = x.detach().requires_grad_(True)  # a fresh leaf: ∂(Σ s)/∂A^l then carries s^l alone
            rec = tw.attention(i, x, aux)
            x = tw.rest(i, x, rec.y)
            if tw.attn_pool:
                f, prec = tw.readout(x, norm=self.norm)
                targets.append(prec.attn)  # [B, H, 1, N]
            else:
                f, _ = tw.readout(x, pool=self.pool)
                targets.append(rec.attn)  # [B, H, T, T]
            total = total + tw.score(f, text)
        grads = batched_vjp(total, targets)  # each [K, B, H, rows, cols]
        rel = sum(self._patches(g.clamp(min=0).mean(dim=(2, 3)), tw.attn_pool) for g in grads)  # [K, B, N]
        return rel.transpose(0, 1).unflatten(-1, grid)


class TowerAttention(TowerExplainer):
    """The query's attention over the patches (pool latent, or the CLS row of block ``layer``), mean over heads."""

    name = "attention"

    def __init__(self, clip, tower: Tower, layer: int = -1, variant: str = "native"):
        super().__init__(clip, tower)
        if variant != "native":
            raise ValueError(f"attention: variant={variant!r} exists for open_clip's native ViT only; use 'native'")
        if tower.prefix == 0 and not tower.attn_pool:
            raise ValueError("attention: this tower has neither a CLS token nor an attention pool")
        (self.layer,) = resolve_layers([layer], self.depth, "attention.layer")

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        layers = [] if self.tower.attn_pool else [self.layer]
        tr = trace(self.tower, images, layers, grad=False)
        if self.tower.attn_pool:
            a = self._patches(tr.pool.attn[:, :, 0], True)
        else:
            a = tr.records[self.layer].attn[:, :, 0, self.tower.prefix :]
        return a.mean(dim=1).unflatten(-1, tr.grid)[:, None].expand(-1, len(prompts), -1, -1)


class TowerGradCAM(TowerExplainer):
    """Grad-CAM on the tokens entering block ``layer`` (default the last): channel weights = gradient of the score
    averaged over all tokens; map = ReLU(Σ_c weight_c · x_i,c) at the patches."""

    name = "gradcam"
    needs_grad = True

    def __init__(self, clip, tower: Tower, layer: int = -1, variant: str = "native"):
        super().__init__(clip, tower)
        if variant != "native":
            raise ValueError(f"gradcam: variant={variant!r} exists for open_clip's native ViT only; use 'native'")
        (self.layer,) = resolve_layers([layer], self.depth, "gradcam.layer")

    def raw_maps_text(self, images: Tensor, text: Tensor) -> Tensor:
        tr = trace(self.tower, images, [self.layer])
        x = tr.records[self.layer].x_in
        (g,) = batched_vjp(self.tower.score(tr.features, text), [x])  # [K, B, T, C]
        cam = torch.einsum("kbc,bnc->bkn", g.mean(dim=2), x[:, self.tower.prefix :].detach())
        return cam.relu().unflatten(-1, tr.grid)


class TowerMaskCLIP(TowerExplainer):
    """MaskCLIP-style dense similarity: the final attention of the query (the pool's latent, or EVA02's last-block
    CLS row) is replaced by each patch's own value and the rest of the readout applied, giving one embedding per
    patch; the map is its cosine with the prompt. No gradients. ``templates``: only "none" on towers."""

    name = "maskclip"

    def __init__(self, clip, tower: Tower, templates: str = "none"):
        super().__init__(clip, tower)
        if templates != "none":
            raise ValueError(f"maskclip: templates={templates!r} is not available on towers; use 'none'")

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        text = torch.nn.functional.normalize(self.text_features(prompts), dim=-1)  # [K, E]
        tr = trace(self.tower, images, [] if self.tower.attn_pool else [self.depth - 1], grad=False)
        dense = torch.nn.functional.normalize(self.tower.dense(tr), dim=-1)  # [B, N, E]
        return (dense @ text.T).transpose(1, 2).unflatten(-1, tr.grid)


TOWER_EXPLAINERS: dict[str, type[TowerExplainer]] = {
    c.name: c for c in (TowerGradECLIP, TowerLeGrad, TowerAttention, TowerGradCAM, TowerMaskCLIP)
}
