"""Explainers: (images [B,3,H,W], prompts list[str] of K) -> saliency maps [B,K,H,W] in [0,1].

`build_explainer(name, clip, **cfg)` is the one entry point (DESIGN.md §6); each explainer module registers its
class under a name with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class decorator: make an explainer buildable as ``build_explainer(name, clip, **cfg)``."""

    def deco(cls: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"explainer name '{name}' registered twice")
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Names accepted by :func:`build_explainer`."""
    return sorted(_REGISTRY)


def build_explainer(name: str, clip: Any, **cfg: Any) -> Any:
    """Build the explainer registered as ``name`` for a loaded :class:`mmel.backbone.ClipBundle`."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown explainer '{name}'. Available: {available()}")
    return _REGISTRY[name](clip, **cfg)


# Importing the explainer modules registers them; they import `register` from this (already initialised) module.
from mmel.explainers import attention, clearclip, clip_surgery, game, grad_eclip, gradcam, legrad, maskclip, rise  # noqa: E402, F401


@register("mmel")
def _mmel(clip: Any, **cfg: Any) -> Any:
    """MMEL (ours, reconstructed): the HSRM over Grad-ECLIP; imported on use (mmel.hsrm builds on this package)."""
    from mmel.hsrm.explainer import MMELExplainer

    return MMELExplainer(clip, **cfg)
