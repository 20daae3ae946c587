"""Explainers on image towers other than open_clip's native ViT: timm trunks inside open_clip (SigLIP, SigLIP2,
EVA02, PE-Core) and Hugging Face SigLIP (docs/towers.md).

API (what :func:`mmel.explainers.build_explainer` dispatches to):
  * :func:`tower_of(model) <tower_of>` -> a :class:`~mmel.explainers.towers.core.Tower` adapter, or None when the
    model is none of these (then the native explainers apply);
  * :func:`tower_family(model) <tower_family>` -> a short family name, or None;
  * :data:`TOWER_METHODS` -> the explainer names available on towers;
  * :func:`build_tower_explainer(name, clip, **cfg) <build_tower_explainer>` -> the explainer, or a clear
    ValueError for a method the towers do not support.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mmel.explainers.towers.core import Tower, TowerTrace, trace
from mmel.explainers.towers.methods import TOWER_EXPLAINERS
from mmel.families import HF_SIGLIP, TIMM_VIT

TOWER_METHODS: tuple[str, ...] = tuple(sorted(TOWER_EXPLAINERS))
# the model families (mmel.families) whose image towers these explainers read
TOWER_FAMILIES = frozenset({TIMM_VIT, HF_SIGLIP})

__all__ = [
    "TOWER_FAMILIES",
    "TOWER_METHODS",
    "Tower",
    "TowerTrace",
    "build_tower_explainer",
    "tower_family",
    "tower_of",
    "trace",
]


def tower_of(model: nn.Module | None) -> Tower | None:
    """The tower adapter for ``model`` (an open_clip model with a timm ViT / Eva trunk, or an HFSiglipCLIP), else
    None. A timm trunk the tracer cannot follow raises a TypeError saying why."""
    if model is None:
        return None
    from mmel.explainers.towers.hf_tower import HFSiglipTower, is_hf_siglip
    from mmel.explainers.towers.timm_tower import TimmTower, is_timm_tower

    if is_timm_tower(model):
        return TimmTower(model)
    if is_hf_siglip(model):
        return HFSiglipTower(model)
    return None


def tower_family(model: nn.Module | None) -> str | None:
    """'timm-attnpool' (SigLIP / SigLIP2 / PE-Core), 'timm-cls' (EVA02), 'hf-siglip', or None."""
    tower = tower_of(model)
    if tower is None:
        return None
    if type(tower).__name__ == "HFSiglipTower":
        return "hf-siglip"
    return "timm-attnpool" if tower.attn_pool else "timm-cls"


def build_tower_explainer(name: str, clip: Any, **cfg: Any):
    """The tower version of explainer ``name`` for ``clip`` (a ClipBundle whose model :func:`tower_of` accepts)."""
    tower = tower_of(clip.model)
    if tower is None:
        raise TypeError(f"{type(clip.model).__name__} is not a tower model (timm trunk or HF SigLIP)")
    if name not in TOWER_EXPLAINERS:
        raise ValueError(
            f"explainer '{name}' is not available on {tower.family} towers: it is written for open_clip's native "
            f"ViT blocks. Available on this tower: {list(TOWER_METHODS)} (docs/towers.md)."
        )
    return TOWER_EXPLAINERS[name](clip, tower, **cfg)
