"""RISE (Petsiuk et al., BMVC 2018): saliency from randomly masked inputs.

``n_masks`` binary grids of ``cells``×``cells`` cells (each kept with probability ``p``) are upsampled
linearly to (cells+1)·cell size, cell size = ceil(side / cells), and randomly shifted crops of them mask the
(normalised) image. The map is Σ_n S_n,k · mask_n / (n_masks · p) with S the cosine of the masked image with
prompt k. Masked images are encoded in batches of ``batch_size`` (all K prompts scored from one forward).

The upsampling is the authors' (github.com/eclique/RISE, ``explanations.py``, ``generate_masks``: scikit-image
``resize(grid, up_size, order=1, mode='reflect', anti_aliasing=False)``), written here in torch: output pixel o
samples the grid at u = (o + ½)·cells/up − ½ (pixel centres, as ``align_corners=False``), and outside [0, cells − 1]
u is mirrored about the border cell's centre (scikit-image's "reflect" is scipy.ndimage's "mirror": −u, or
2(cells − 1) − u), not clamped: a border pixel blends the border cell with its inner neighbour. Linear
interpolation is separable, so each axis is one [up, cells] matrix and a mask is M_h · grid · M_wᵀ.

Randomness: the grids [n_masks, cells, cells], then the row shifts, then the column shifts, all drawn up front from a
generator seeded with ``seed`` (so the same call gives the same map, and the masks do not depend on
``batch_size``); each batch's masks are materialised when it is scored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmel.explainers import register
from mmel.explainers.base import Explainer
from mmel.explainers.vit import encode_image
from mmel.families import ANY_FAMILY


def reflect_linear_matrix(n_in: int, n_out: int) -> Tensor:
    """[n_out, n_in] matrix of linear interpolation from n_in samples to n_out with scikit-image's ``mode='reflect'``
    border (scipy.ndimage "mirror"): row o holds the weights of the two cells around u = (o + ½)·n_in/n_out − ½,
    with u mirrored into [0, n_in − 1]. Each row sums to 1. float64 so that the weights are exact to ~1e-16."""
    o = torch.arange(n_out, dtype=torch.float64)
    u = (o + 0.5) * (n_in / n_out) - 0.5
    if n_in == 1:  # a single cell: every output pixel is that cell
        return torch.ones(n_out, 1, dtype=torch.float64)
    period = 2 * (n_in - 1)  # mirror without repeating the border sample: ... 1 0 1 2 ... n-1 n-2 ...
    u = torch.remainder(u, period)
    u = torch.where(u > n_in - 1, period - u, u)
    lo = u.floor().clamp(max=n_in - 2).long()
    frac = u - lo
    mat = torch.zeros(n_out, n_in, dtype=torch.float64)
    mat[torch.arange(n_out), lo] = 1 - frac
    mat[torch.arange(n_out), lo + 1] += frac
    return mat


@register("rise")
class RISE(Explainer):
    """Randomised input sampling. Options: n_masks, cells (grid cells per side), p (keep probability),
    batch_size (masked images per forward), seed."""

    name = "rise"
    families = frozenset({ANY_FAMILY})  # only encode_image / encode_text: every tower
    reads = "only encode_image"
    needs = "encode_image"

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

    def draws(self, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """The random part of the masks for an image of ``size`` (H, W): binary grids [n_masks, cells, cells] and
        row / column shifts [n_masks] in [0, cell size), from a generator seeded with ``seed``."""
        H, W = size
        ch, cw = math.ceil(H / self.cells), math.ceil(W / self.cells)
        gen = torch.Generator().manual_seed(self.seed)
        grid = (torch.rand(self.n_masks, self.cells, self.cells, generator=gen) < self.p).float()
        dy = torch.randint(0, ch, (self.n_masks,), generator=gen)
        dx = torch.randint(0, cw, (self.n_masks,), generator=gen)
        return grid, dy, dx

    def masks(self, grid: Tensor, dy: Tensor, dx: Tensor, size: tuple[int, int]) -> Tensor:
        """Soft masks [n, H, W] in [0, 1] from grids [n, cells, cells] and shifts [n] (see :meth:`draws`)."""
        H, W = size
        ch, cw = math.ceil(H / self.cells), math.ceil(W / self.cells)
        mh = reflect_linear_matrix(self.cells, (self.cells + 1) * ch).to(grid)  # [up_h, cells]
        mw = reflect_linear_matrix(self.cells, (self.cells + 1) * cw).to(grid)  # [up_w, cells]
        up = mh @ grid @ mw.T  # [n, up_h, up_w]
        shifts = zip(dy.tolist(), dx.tolist(), strict=True)
        return torch.stack([up[i, y : y + H, x : x + W] for i, (y, x) in enumerate(shifts)])

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        text = F.normalize(self.text_features(prompts), dim=-1)  # [K, E]
        B, _, H, W = images.shape
        grid, dy, dx = self.draws((H, W))
        per_batch = max(1, self.batch_size // B)
        sal = images.new_zeros(B, len(prompts), H, W)
        for start in range(0, self.n_masks, per_batch):
            sl = slice(start, min(start + per_batch, self.n_masks))
            m = self.masks(grid[sl], dy[sl], dx[sl], (H, W)).to(images)  # [m, H, W]
            masked = (images[:, None] * m[None, :, None]).flatten(0, 1)  # [B*m, 3, H, W]
            scores = F.normalize(encode_image(self.model, masked), dim=-1) @ text.T  # [B*m, K]
            sal += torch.einsum("bmk,mhw->bkhw", scores.view(B, -1, len(prompts)), m)
        return sal / (self.n_masks * self.p)
