"""Map-to-map similarity measures of Adebayo et al. ("Sanity Checks for Saliency Maps", NeurIPS 2018).

All take two batches of maps [N, H, W] (values in [0, 1], as the explainers return) and give one number per pair
[N]:

* :func:`spearman` — Spearman rank correlation over pixels (ties get their average rank, as scipy's rankdata:
  ReLU'd maps have many tied zeros). A constant map has no ranking: its correlation is NaN.
* :func:`ssim` — structural similarity (Wang et al. 2004) with the defaults of scikit-image's
  ``structural_similarity`` that the paper used: a 7x7 uniform window, K1 = 0.01, K2 = 0.03, data range 1,
  sample (N-1) covariances, averaged over the window positions that fit inside the map. Written here in torch
  (scikit-image is not a dependency).
* :func:`hog_similarity` — Pearson correlation of the two maps' histograms of oriented gradients (Dalal & Triggs
  2005) with scikit-image ``hog``'s defaults: 9 unsigned orientations, 8x8-pixel cells, 3x3-cell blocks,
  L2-Hys block normalisation, central-difference gradients. Maps too small for one block are an error.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import Tensor


def _check_pair(a: Tensor, b: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.ndim != 3 or a.shape != b.shape:
        sa = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
        sb = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise ValueError(f"{name}: expected two map batches of equal shape [N, H, W]; got {sa} and {sb}")
    return a.detach().double().cpu(), b.detach().double().cpu()


def _pearson_rows(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of each row pair of x, y [N, D] -> [N]; NaN where a row is constant."""
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    den = x.norm(dim=-1) * y.norm(dim=-1)
    return torch.where(den > 0, (x * y).sum(-1) / den.clamp(min=1e-300), torch.full_like(den, math.nan))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per map pair: a, b [N, H, W] -> [N] (float32; NaN for a constant map)."""
    a, b = _check_pair(a, b, "spearman")
    ra = torch.from_numpy(rankdata(a.flatten(1).numpy(), axis=-1))
    rb = torch.from_numpy(rankdata(b.flatten(1).numpy(), axis=-1))
    return _pearson_rows(ra, rb).float()


def ssim(a: Tensor, b: Tensor, win: int = 7, data_range: float = 1.0) -> Tensor:
    """Mean SSIM per map pair: a, b [N, H, W] -> [N] (float32). Needs H, W >= ``win``."""
    a, b = _check_pair(a, b, "ssim")
    if min(a.shape[-2:]) < win:
        raise ValueError(f"ssim: maps of size {tuple(a.shape[-2:])} are smaller than the {win}x{win} window")
    x, y = a[:, None], b[:, None]
    pool = lambda t: F.avg_pool2d(t, win, stride=1)  # noqa: E731 - valid windows only (skimage crops the border)
    n = win * win
    cov_norm = n / (n - 1)  # sample covariance, as skimage's default
    mx, my = pool(x), pool(y)
    vx = cov_norm * (pool(x * x) - mx * mx)
    vy = cov_norm * (pool(y * y) - my * my)
    vxy = cov_norm * (pool(x * y) - mx * my)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).float()


def hog(maps: Tensor, orientations: int = 9, cell: int = 8, block: int = 3) -> Tensor:
    """HOG descriptors of maps [N, H, W] -> [N, D] (float64), scikit-image's default layout (see module doc)."""
    m = maps.detach().double().cpu()
    N, H, W = m.shape
    ch, cw = H // cell, W // cell
    if ch < block or cw < block:
        raise ValueError(f"hog: maps of size {(H, W)} have fewer than {block}x{block} cells of {cell} px")
    gr = torch.zeros_like(m)
    gc = torch.zeros_like(m)
    gr[:, 1:-1] = m[:, 2:] - m[:, :-2]  # central differences, zero on the border
    gc[:, :, 1:-1] = m[:, :, 2:] - m[:, :, :-2]
    mag = torch.sqrt(gr * gr + gc * gc)
    ang = torch.rad2deg(torch.atan2(gr, gc)) % 180  # unsigned orientation in [0, 180)
    bins = (ang / (180 / orientations)).long().clamp(max=orientations - 1)
    mag, bins = mag[:, : ch * cell, : cw * cell], bins[:, : ch * cell, : cw * cell]
    one_hot = F.one_hot(bins, orientations).double() * mag[..., None]  # [N, H', W', O]
    cells = one_hot.view(N, ch, cell, cw, cell, orientations).sum(dim=(2, 4)) / (cell * cell)  # [N, ch, cw, O]
    blocks = cells.unfold(1, block, 1).unfold(2, block, 1)  # [N, bh, bw, O, block, block]
    blocks = blocks.flatten(3)  # [N, bh, bw, O*block*block]
    eps = 1e-5
    v = blocks / torch.sqrt((blocks * blocks).sum(-1, keepdim=True) + eps * eps)
    v = v.clamp(max=0.2)  # L2-Hys: clip, then renormalise
    v = v / torch.sqrt((v * v).sum(-1, keepdim=True) + eps * eps)
    return v.flatten(1)


def hog_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of the HOG descriptors per map pair: a, b [N, H, W] -> [N] (float32)."""
    a, b = _check_pair(a, b, "hog_similarity")
    return _pearson_rows(hog(a), hog(b)).float()


MEASURES = {"spearman": spearman, "ssim": ssim, "hog": hog_similarity}


def similarities(a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Every measure of :data:`MEASURES` for map pairs a, b [N, H, W] -> {name: [N]}."""
    return {name: fn(a, b) for name, fn in MEASURES.items()}


def nanmean(x: Tensor | np.ndarray) -> float:
    """Mean ignoring NaN (NaN when every entry is NaN)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if bool(ok.any()) else math.nan
