"""Randomised copies of CLIP's vision tower for the sanity checks of Adebayo et al. (NeurIPS 2018).

**Model-parameter randomisation.** A map that explains the model must change when the model's learnt weights are
destroyed. The vision tower's layers, from the top down, are

    "head" (ln_post, proj), "block L-1", ..., "block 0", "embed" (conv1, class / positional embedding, ln_pre)

* ``cascading``: step s re-initialises the top s layers together (the paper's cascading randomisation), so the
  last step has no learnt weight left in the vision tower;
* ``independent``: step s re-initialises layer s alone (every other layer as trained).

The metric :class:`mmel.metrics.ModelRandomisation` (:mod:`mmel.metrics.randomisation`) explains the SAME items
again on each step's copy and compares with the original maps by Spearman rank correlation, SSIM and HOG similarity
(:mod:`mmel.metrics.similarity`). The text tower is left as trained (the check is about the
image side the maps live on). Every step works on a deep copy of the model: the user's loaded model is never
modified (a test pins it). The explainer is rebuilt for each copy by the caller's factory, so for MMEL the trained
HSRM (``build_explainer("mmel", clip, checkpoint=...)``) is applied to the randomised CLIP's evidence exactly as
it would be in use.

Re-initialisation: each parameter tensor is redrawn from a Gaussian with the tensor's own mean and standard
deviation (seeded). This destroys the learnt structure while keeping every activation's scale, so a map that
survives does so because the explainer ignores the weights, not because the forward pass collapsed to zeros.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from mmel.backbone import ClipBundle

MODES = ("cascading", "independent")


def vision_layers(visual: nn.Module) -> list[tuple[str, list[nn.Parameter | nn.Module]]]:
    """The vision tower's layer groups from the top down: [(name, [modules or parameters]), ...].

    A native ViT: head (ln_post, proj), its blocks, the embedding. A CNN tower (docs/model_families.md): head (the
    pooling / projection), its stages, the stem."""
    if all(hasattr(visual, n) for n in ("layer1", "layer4", "attnpool")):  # ModifiedResNet
        stem = [m for n, m in visual.named_children() if n.startswith(("conv", "bn"))]
        stages = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
        return [("head", [visual.attnpool])] + [(f"stage {i}", [stages[i]]) for i in (3, 2, 1, 0)] + [("embed", stem)]
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "stages") and hasattr(trunk, "stem"):  # timm CNN
        head = [visual.head, *(m for m in (getattr(trunk, "norm_pre", None), getattr(trunk, "head", None)) if m)]
        stages = list(trunk.stages)
        groups = [("head", head)] + [(f"stage {i}", [stages[i]]) for i in reversed(range(len(stages)))]
        return groups + [("embed", [trunk.stem])]
    if getattr(visual, "transformer", None) is None:
        raise TypeError(
            f"sanity: no layer groups known for a {type(visual).__name__} image tower (native ViTs, ModifiedResNet "
            "and timm CNNs have them; docs/model_families.md)"
        )
    blocks = visual.transformer.resblocks
    head: list = [visual.ln_post]
    if isinstance(visual.proj, nn.Parameter):
        head.append(visual.proj)
    groups = [("head", head)]
    groups += [(f"block {i}", [blocks[i]]) for i in reversed(range(len(blocks)))]
    groups.append(("embed", [visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre]))
    return groups


def _params(items: Sequence[nn.Parameter | nn.Module]) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for it in items:
        out.extend(it.parameters() if isinstance(it, nn.Module) else [it])
    return out


@torch.no_grad()
def reinitialise_(params: Sequence[nn.Parameter], generator: torch.Generator) -> None:
    """Redraw each tensor from N(its mean, its std) in place (std 0: a constant tensor stays constant)."""
    for p in params:
        mean, std = p.float().mean(), p.float().std() if p.numel() > 1 else p.new_zeros(())
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device)
        p.copy_((mean + std * noise).to(p.dtype))


def randomised_copies(clip: ClipBundle, mode: str = "cascading", seed: int = 0):
    """Yield (step name, ClipBundle on a randomised deep copy of the model), top layer first (see module doc)."""
    if mode not in MODES:
        raise ValueError(f"sanity: mode={mode!r}; expected one of {MODES}")
    names = [name for name, _ in vision_layers(clip.model.visual)]
    cascade = None
    for s, name in enumerate(names):
        if mode == "cascading":
            cascade = copy.deepcopy(clip.model) if cascade is None else cascade
            model = cascade
        else:
            model = copy.deepcopy(clip.model)
        group = dict(vision_layers(model.visual))[name]
        reinitialise_(_params(group), torch.Generator().manual_seed(seed * 1000 + s))
        # a cascade step must not share its tensors with the next one's edits: hand out a copy
        out = copy.deepcopy(model) if mode == "cascading" else model
        yield name, dataclasses.replace(clip, model=out)
