"""Box objectives for training the HSRM (configurable and combinable).

    energy   -log( sum_in E / sum E )            in-box energy of the unnormalised map E (scale-free)
    dice     1 - 2|M m| / (|M| + |m|)           soft Dice of the normalised map M against the box mask m
    bce      binary cross-entropy of M against m
    pointing relu(margin - (max_in M - max_out M)) hinge: the peak must lie inside a box

All take maps at one resolution and box masks at the same resolution; masks are the union of the target's boxes.
Pairs whose mask covers the whole map (nothing outside) contribute 0 to the pointing hinge.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6
LOSSES = ("energy", "dice", "bce", "pointing")


def energy_loss(energy: Tensor, mask: Tensor) -> Tensor:
    """[P, h, w] x [P, H, W] -> [P]; -log of the share of the map's mass inside the boxes.

    An energy map coarser than the mask (the patch grid against input-pixel boxes) stands for its bilinear
    upsampling to the mask's size (``align_corners=False``, as the maps are resized). That upsampling U is linear,
    so sum(U(E) * m) = sum(E * U^T(m)): the loss is computed on the grid against the mask's adjoint image, exactly
    (up to float rounding) what upsampling E first would give, without upsampling E or back-propagating through it.
    """
    if energy.shape[-2:] != mask.shape[-2:]:
        every = bilinear_adjoint(torch.ones_like(mask[:1]), tuple(energy.shape[-2:]))  # U^T 1: each cell's share
        mask = bilinear_adjoint(mask, tuple(energy.shape[-2:]))
        total = (energy * every).flatten(1).sum(1)
    else:
        total = energy.flatten(1).sum(1)
    inside = (energy * mask).flatten(1).sum(1)
    return -torch.log((inside + EPS) / (total + EPS))


@functools.lru_cache(maxsize=32)
def _interpolation_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[n_out, n_in]: 1-D linear interpolation (``align_corners=False``) as a matrix, column i the image of e_i."""
    eye = torch.eye(n_in, dtype=dtype, device=device)[:, None, :]  # [n_in, 1, n_in]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0].T.contiguous()


def bilinear_adjoint(x: Tensor, size: tuple[int, int]) -> Tensor:
    """U^T x for U the bilinear upsampling [.., h, w] -> [.., H, W] (``align_corners=False``): x [P, H, W] ->
    [P, h, w] with sum(U(e) * x) = sum(e * U^T(x)) for every e. Bilinear is separable: U(e) = A e B^T."""
    a = _interpolation_matrix(size[0], x.shape[-2], x.dtype, x.device)  # [H, h]
    b = _interpolation_matrix(size[1], x.shape[-1], x.dtype, x.device)  # [W, w]
    return a.T @ (x @ b)


def dice_loss(m: Tensor, mask: Tensor) -> Tensor:
    inter = (m * mask).flatten(1).sum(1)
    return 1 - (2 * inter + EPS) / (m.flatten(1).sum(1) + mask.flatten(1).sum(1) + EPS)


def bce_loss(m: Tensor, mask: Tensor) -> Tensor:
    return F.binary_cross_entropy(m.clamp(EPS, 1 - EPS), mask, reduction="none").flatten(1).mean(1)


def pointing_loss(m: Tensor, mask: Tensor, margin: float = 0.1) -> Tensor:
    flat, mk = m.flatten(1), mask.flatten(1) > 0.5
    max_in = torch.where(mk, flat, torch.full_like(flat, -1.0)).amax(1)
    max_out = torch.where(~mk, flat, torch.full_like(flat, -1.0)).amax(1)
    hinge = F.relu(margin - (max_in - max_out))
    return torch.where(mk.all(1), torch.zeros_like(hinge), hinge)


MAP_LOSSES = ("dice", "bce", "pointing")  # those that read the normalised map M (energy reads E only)


def needs_map(weights: Mapping[str, float]) -> bool:
    """Whether a loss selection reads the normalised map M (else the energy map alone is computed in training)."""
    return any(weights.get(name) for name in MAP_LOSSES)


def box_losses(m: Tensor | None, energy: Tensor, mask: Tensor, weights: Mapping[str, float]) -> dict[str, Tensor]:
    """Weighted sum of the selected objectives (``total``) and each term's batch mean.

    m: normalised map [P, H, W] (may be None when no selected loss reads it, :func:`needs_map`); energy:
    unnormalised map [P, h, w], at the mask's resolution or coarser (:func:`energy_loss`); mask: box-union mask
    [P, H, W] in {0, 1}.
    """
    unknown = set(weights) - set(LOSSES)
    if unknown:
        raise ValueError(f"Unknown HSRM loss(es) {sorted(unknown)}; choose from {LOSSES}")
    if m is None and needs_map(weights):
        raise ValueError(f"HSRM losses {dict(weights)} read the normalised map, but none was given")
    if (m is not None and m.shape != mask.shape) or energy.shape[0] != mask.shape[0]:
        shape = None if m is None else tuple(m.shape)
        raise ValueError(f"map {shape}, energy {tuple(energy.shape)} and mask {tuple(mask.shape)} differ")
    fns = {
        "energy": lambda: energy_loss(energy, mask),
        "dice": lambda: dice_loss(m, mask),
        "bce": lambda: bce_loss(m, mask),
        "pointing": lambda: pointing_loss(m, mask),
    }
    out: dict[str, Tensor] = {}
    total = energy.new_zeros(())
    for name, wgt in weights.items():
        if wgt:
            out[name] = fns[name]().mean()
            total = total + float(wgt) * out[name]
    if not out:
        raise ValueError("All HSRM loss weights are zero: nothing to train")
    out["total"] = total
    return out
