"""Box objectives for training the HSRM (configurable and combinable).

    energy   -log( sum_in E / sum E )            in-box energy of the unnormalised map E (scale-free)
    dice     1 - 2|M m| / (|M| + |m|)           soft Dice of the normalised map M against the box mask m
    bce      binary cross-entropy of M against m
    pointing relu(margin - (max_in M - max_out M)) hinge: the peak must lie inside a box

All take maps at one resolution and box masks at the same resolution; masks are the union of the target's boxes.
Pairs whose mask covers the whole map (nothing outside) contribute 0 to the pointing hinge.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6
LOSSES = ("energy", "dice", "bce", "pointing")


def energy_loss(energy: Tensor, mask: Tensor) -> Tensor:
    """[P, h, w] x [P, h, w] -> [P]; -log of the share of the map's mass inside the boxes."""
    inside = (energy * mask).flatten(1).sum(1)
    total = energy.flatten(1).sum(1)
    return -torch.log((inside + EPS) / (total + EPS))


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


def box_losses(m: Tensor, energy: Tensor, mask: Tensor, weights: Mapping[str, float]) -> dict[str, Tensor]:
    """Weighted sum of the selected objectives (``total``) and each term's batch mean.

    m: normalised map [P, h, w]; energy: unnormalised map [P, h, w]; mask: box-union mask [P, h, w] in {0, 1}.
    """
    unknown = set(weights) - set(LOSSES)
    if unknown:
        raise ValueError(f"Unknown HSRM loss(es) {sorted(unknown)}; choose from {LOSSES}")
    if m.shape != mask.shape or energy.shape != mask.shape:
        raise ValueError(f"map {tuple(m.shape)}, energy {tuple(energy.shape)} and mask {tuple(mask.shape)} differ")
    fns = {
        "energy": lambda: energy_loss(energy, mask),
        "dice": lambda: dice_loss(m, mask),
        "bce": lambda: bce_loss(m, mask),
        "pointing": lambda: pointing_loss(m, mask),
    }
    out: dict[str, Tensor] = {}
    total = m.new_zeros(())
    for name, wgt in weights.items():
        if wgt:
            out[name] = fns[name]().mean()
            total = total + float(wgt) * out[name]
    if not out:
        raise ValueError("All HSRM loss weights are zero: nothing to train")
    out["total"] = total
    return out
