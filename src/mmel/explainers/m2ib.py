"""M2IB (Wang, Rudner & Wilson, NeurIPS 2023, "Visual Explanations of Image-Text Representations via Multi-Modal
Information Bottleneck Attribution"): a per-sample optimised information bottleneck in the vision tower.

Read from the authors' code (github.com/YingWANGG/M2IB, ``scripts/information_bottleneck/IBA.py`` and
``scripts/methods.py``; the loss is ``calc_loss`` in ``scripts/iba.py``) and written here for open_clip's ViT. The
tokens h [T, C] leaving block ``layer`` are replaced by a noisy copy: with a damping λ = sigmoid(α) per token and
channel (α starts at 5, λ ≈ 1),

    t = λ · h + (1 − λ) · ε,  ε ~ N(0, 1)

and the rest of the tower runs on t. The capacity of each element is KL(N(λ·h, (1 − λ)²) ‖ N(0, 1)) =
−½ (1 + log (1 − λ)² − (λ h)² − (1 − λ)²). α is optimised, per (image, prompt), by Adam (lr ``lr``) for
``steps`` steps on the authors' loss

    β · mean capacity − mean_s cos(image embedding of t with noise sample s, text embedding),

over ``samples`` noise samples per step (the authors' batch of 10): β weights the compression, the fit is
unweighted. The map is the capacity of the last step's forward summed over channels, per patch token (CLS
dropped). Defaults are the authors' demo settings (β = 0.1, 10 steps, lr 1, 10 samples, the block 3 below the top:
9 of ViT-B's 12). The authors' ``var`` (the variance of their prior estimator) is never read by their bottleneck's
forward, so the features are used as they are and ``var`` is not an option here. Only the image side is explained
here (the method also explains text tokens).

On a CNN tower (docs/model_families.md) the bottleneck sits on the feature map leaving stage ``layer`` (default
the second-to-last stage, so one stage and the pooling remain above it): its h·w positions play the tokens, the
map is the capacity summed over channels per position.

Cost: per image, ``steps`` forward and backward passes of K · ``samples`` copies through the blocks above
``layer`` (K prompts are optimised together: their parameters and losses are independent, so Adam's
element-wise updates equal K separate runs). Noise comes from a generator seeded with ``seed`` and every
(image, prompt) of a call sees the same draws, so a map does not depend on what else is in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmel.explainers import register
from mmel.explainers.base import Explainer
from mmel.explainers.cnn import split_tower, stages
from mmel.explainers.vit import image_embeds
from mmel.families import CNN_FAMILIES, VIT_FAMILIES


@register("m2ib")
class M2IB(Explainer):
    """Information-bottleneck attribution optimised per (image, prompt); see the module docstring."""

    name = "m2ib"
    needs_grad = True
    families = VIT_FAMILIES | CNN_FAMILIES
    reads = "the tokens leaving a native ViT block, or the feature map of a CNN stage"
    needs = "ViT blocks or CNN stages"

    def __init__(
        self,
        clip,
        layer: int | None = None,
        beta: float = 0.1,
        steps: int = 10,
        lr: float = 1.0,
        samples: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(clip)
        if self.family in CNN_FAMILIES:
            n = len(stages(self.visual, self.family))
            layer = n - 2 if layer is None else int(layer)
            if not 0 <= layer < n - 1:
                raise ValueError(f"m2ib: layer={layer} must leave at least one stage above it ({n} stages)")
        else:
            layer = max(0, self.depth - 3) if layer is None else int(layer)
            if not 0 <= layer < self.depth - 1:
                raise ValueError(f"m2ib: layer={layer} must leave at least one block above it (depth {self.depth})")
        if steps < 1 or samples < 1 or lr <= 0:
            raise ValueError(f"m2ib: need steps >= 1, samples >= 1, lr > 0; got {steps}, {samples}, {lr}")
        self.layer, self.beta = layer, float(beta)
        self.steps, self.lr, self.samples, self.seed = int(steps), float(lr), int(samples), int(seed)

    def __repr__(self) -> str:
        return f"M2IB(layer={self.layer}, beta={self.beta}, steps={self.steps}, samples={self.samples})"

    def _front(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Tokens [B, T, C] leaving the bottleneck's block / stage (a CNN's h·w positions) and the map's grid."""
        if self.family in CNN_FAMILIES:
            a = split_tower(self.visual, self.family, self.layer)[0](images)  # [B, C, h, w]
            return a.flatten(2).transpose(1, 2), tuple(a.shape[-2:])
        x, grid = image_embeds(self.visual, images)
        for blk in self.visual.transformer.resblocks[: self.layer + 1]:
            x = blk(x)
        return x, grid

    def _head(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Blocks (CNN: stages) above the bottleneck, then the embedding: [N, T, C] -> [N, E]."""
        if self.family in CNN_FAMILIES:
            back = split_tower(self.visual, self.family, self.layer)[1]
            return back(x.transpose(1, 2).unflatten(-1, grid))
        for blk in self.visual.transformer.resblocks[self.layer + 1 :]:
            x = blk(x)
        pooled = self.visual.ln_post(x[:, 0])
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        text = F.normalize(self.text_features(prompts), dim=-1)  # [K, E]
        with torch.no_grad():
            x, grid = self._front(images)
        B, T, C = x.shape
        K, S = text.shape[0], self.samples
        h = x.float()[:, None].expand(B, K, T, C)  # the block's output as it is (the authors never rescale it)
        alpha = torch.full((B, K, T, C), 5.0, device=x.device, requires_grad=True)
        opt = torch.optim.Adam([alpha], lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        capacity = None
        for _ in range(self.steps):
            opt.zero_grad()
            lam = torch.sigmoid(alpha)
            mu, var = lam * h, ((1 - lam) ** 2).clamp_min(1e-12)  # sigmoid saturates at alpha > ~17
            capacity = -0.5 * (1 + torch.log(var) - mu**2 - var)  # [B, K, T, C]
            eps = torch.randn((S, T, C), generator=gen).to(x.device)  # the same draws for every (image, prompt)
            z = mu[:, :, None] + (1 - lam)[:, :, None] * eps
            emb = self._head(z.to(x.dtype).reshape(B * K * S, T, C), grid).view(B, K, S, -1)
            fit = (F.normalize(emb.float(), dim=-1) * text[None, :, None]).sum(-1).mean(-1)  # [B, K]
            # per (image, prompt): beta * mean capacity - mean fit (iba.py's calc_loss); summed over (image,
            # prompt), so each alpha sees its own loss only
            loss = (self.beta * capacity.mean(dim=(-1, -2)) - fit).sum()
            loss.backward()
            opt.step()
        sal = capacity.detach().sum(-1)  # [B, K, T]: summed over channels
        if self.family not in CNN_FAMILIES:
            sal = sal[..., 1:]  # CLS dropped
        return sal.unflatten(-1, grid)
