"""Explainers: (images [B,3,H,W], prompts list[str] of K) -> saliency maps [B,K,H,W] in [0,1].

`build_explainer(name, clip, **cfg)` is the one entry point (docs/contracts.md). Each explainer module registers
its class under a name with :func:`register`, which also sets the class's ``name`` (what metrics.json and figures
say). Explainers that live in a higher layer of the package (``mmel``: the HSRM builds on this package) are
registered by dotted path in ``_LAZY`` and imported on first use, so this package never imports them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

_REGISTRY: dict[str, Callable[..., Any]] = {}
# name -> "module:Class", imported by build_explainer (the idiom of backbone.py's weights table and mmel.data)
_LAZY: dict[str, str] = {"mmel": "mmel.hsrm.explainer:MMELExplainer"}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make an explainer buildable as ``build_explainer(name, clip, **cfg)``; sets ``cls.name``."""

    def deco(cls: type) -> type:
        if (name in _REGISTRY and _REGISTRY[name] is not cls) or (name in _LAZY and not _lazy_is(name, cls)):
            raise ValueError(f"explainer name '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _lazy_is(name: str, cls: type) -> bool:
    return _LAZY[name] == f"{cls.__module__}:{cls.__qualname__}"


def available() -> list[str]:
    """Names accepted by :func:`build_explainer`."""
    return sorted({*_REGISTRY, *_LAZY})


def explainer_class(name: str) -> type:
    """The class registered as ``name`` (a lazily registered one is imported now)."""
    if name not in _REGISTRY and name in _LAZY:
        module, cls = _LAZY[name].split(":")
        importlib.import_module(module)  # its @register(name) fills _REGISTRY
        if name not in _REGISTRY:
            raise RuntimeError(f"{module} did not register explainer '{name}' (expected {cls} decorated @register)")
    if name not in _REGISTRY:
        raise ValueError(f"Unknown explainer '{name}'. Available: {available()}")
    return _REGISTRY[name]


def build_explainer(name: str, clip: Any, **cfg: Any) -> Any:
    """Build the explainer registered as ``name`` for a loaded :class:`mmel.backbone.ClipBundle`. On a timm-trunk
    or Hugging Face SigLIP model the methods written for such towers (``TOWER_METHODS``) get their tower version
    (mmel.explainers.towers, docs/towers.md); any other method is the class itself, which runs on the families it
    declares (RISE on every one) and otherwise refuses naming the methods that work."""
    from mmel.explainers.towers import TOWER_METHODS, build_tower_explainer, tower_of

    if name in TOWER_METHODS and tower_of(getattr(clip, "model", None)) is not None:
        return build_tower_explainer(name, clip, **cfg)
    return explainer_class(name)(clip, **cfg)


def capability(name: str, family_name: str) -> str | None:
    """None when explainer ``name`` runs on models of ``family_name`` (mmel.families), else the reason it does not:
    the class's own declaration, or, on the tower families, the tower version of the method."""
    from mmel.explainers.base import refusal
    from mmel.explainers.towers import TOWER_FAMILIES, TOWER_METHODS

    if family_name in TOWER_FAMILIES and name in TOWER_METHODS:
        return None
    return refusal(explainer_class(name), family_name)


# Importing the explainer modules registers them; they import `register` from this (already initialised) module.
from mmel.explainers import (  # noqa: E402, F401
    attention,
    clearclip,
    clip_surgery,
    game,
    grad_eclip,
    gradcam,
    legrad,
    m2ib,
    maskclip,
    rise,
)
