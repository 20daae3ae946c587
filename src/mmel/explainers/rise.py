"""RISE (Petsiuk et al., BMVC 2018): saliency from randomly masked inputs.

``n_masks`` binary grids of ``cells``×``cells`` cells (each kept with probability ``p``) are upsampled
bilinearly to (cells+1)·cell size, cell size = ceil(side / cells), and randomly shifted crops of them mask the
(normalised) image. The map is Σ_n S_n,k · mask_n / (n_masks · p) with S the cosine of the masked image with
prompt k. Masked images are encoded in batches of ``batch_size`` (all K prompts scored from one forward);
masks come from a generator seeded with ``seed``, so the same call gives the same map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmel.explainers import register
from mmel.explainers.base import Explainer
from mmel.explainers.vit import encode_image


@register("rise")
class RISE(Explainer):
    """Randomised input sampling. Options: n_masks, cells (grid cells per side), p (keep probability),
    batch_size (masked images per forward), seed."""

    name = "rise"

    def __init__(
        self, clip, n_masks: int = 2000, cells: int = 8, p: float = 0.5, batch_size: int = 64, seed: int = 0
    ) -> None:
        super().__init__(clip)
        if n_masks < 1 or cells < 1 or not 0.0 < p <= 1.0 or batch_size < 1:
            raise ValueError(
                f"rise: need n_masks >= 1, cells >= 1, 0 < p <= 1, batch_size >= 1; got n_masks={n_masks}, "
                f"cells={cells}, p={p}, batch_size={batch_size}"
            )
        self.n_masks, self.cells, self.p, self.batch_size, self.seed = n_masks, cells, p, batch_size, seed

    def masks(self, n: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
        """n soft masks [n, H, W] in [0, 1] (on the CPU, from ``generator``)."""
        H, W = size
        ch, cw = math.ceil(H / self.cells), math.ceil(W / self.cells)
        grid = (torch.rand(n, 1, self.cells, self.cells, generator=generator) < self.p).float()
        up = F.interpolate(grid, size=((self.cells + 1) * ch, (self.cells + 1) * cw), mode="bilinear")
        dy = torch.randint(0, ch, (n,), generator=generator).tolist()
        dx = torch.randint(0, cw, (n,), generator=generator).tolist()
        return torch.stack([up[i, 0, y : y + H, x : x + W] for i, (y, x) in enumerate(zip(dy, dx, strict=True))])

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        text = F.normalize(self.text_features(prompts), dim=-1)  # [K, E]
        B, _, H, W = images.shape
        gen = torch.Generator().manual_seed(self.seed)
        per_batch = max(1, self.batch_size // B)
        sal = images.new_zeros(B, len(prompts), H, W)
        for start in range(0, self.n_masks, per_batch):
            m = self.masks(min(per_batch, self.n_masks - start), (H, W), gen).to(images)  # [m, H, W]
            masked = (images[:, None] * m[None, :, None]).flatten(0, 1)  # [B*m, 3, H, W]
            scores = F.normalize(encode_image(self.model, masked), dim=-1) @ text.T  # [B*m, K]
            sal += torch.einsum("bmk,mhw->bkhw", scores.view(B, -1, len(prompts)), m)
        return sal / (self.n_masks * self.p)
