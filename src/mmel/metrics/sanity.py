"""Sanity checks for saliency maps (Adebayo et al., NeurIPS 2018) on CLIP's vision tower.

**Model-parameter randomisation.** A map that explains the model must change when the model's learnt weights are
destroyed. The vision tower's layers, from the top down, are

    "head" (ln_post, proj), "block L-1", ..., "block 0", "embed" (conv1, class / positional embedding, ln_pre)

* ``cascading``: step s re-initialises the top s layers together (the paper's cascading randomisation), so the
  last step has no learnt weight left in the vision tower;
* ``independent``: step s re-initialises layer s alone (every other layer as trained).

Each step explains the SAME items again and compares with the original maps by Spearman rank correlation, SSIM
and HOG similarity (:mod:`mmel.metrics.similarity`). The text tower is left as trained (the check is about the
image side the maps live on). Every step works on a deep copy of the model: the user's loaded model is never
modified (a test pins it). The explainer is rebuilt for each copy by the caller's factory, so for MMEL the trained
HSRM (``build_explainer("mmel", clip, checkpoint=...)``) is applied to the randomised CLIP's evidence exactly as
it would be in use.

Re-initialisation: each parameter tensor is redrawn from a Gaussian with the tensor's own mean and standard
deviation (seeded). This destroys the learnt structure while keeping every activation's scale, so a map that
survives does so because the explainer ignores the weights, not because the forward pass collapsed to zeros.

**Prompt randomisation.** The map for the true prompt vs the map for a different category's prompt on the same
image, with the same measures; an explainer whose maps barely change (mean Spearman above a threshold) is flagged
as prompt-insensitive.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mmel.backbone import ClipBundle
from mmel.metrics.similarity import MEASURES, nanmean, similarities

MODES = ("cascading", "independent")
Builder = Callable[[ClipBundle], Callable[[Tensor, list[str]], Tensor]]


def vision_layers(visual: nn.Module) -> list[tuple[str, list[nn.Parameter | nn.Module]]]:
    """The vision tower's layer groups from the top down: [(name, [modules or parameters]), ...]."""
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


def explain_items(
    explainer: Callable[[Tensor, list[str]], Tensor],
    images: Tensor,
    prompts: Sequence[str],
    prompt_set: Sequence[str] | None = None,
    batch_size: int = 16,
) -> Tensor:
    """Each item's map for its own prompt: images [N, 3, H, W], prompts N strings -> maps [N, H, W].

    With ``prompt_set`` every batch is explained against the whole set and each item's column is taken (for
    explainers whose map depends on the prompt set, e.g. CLIP Surgery); else a batch uses its distinct prompts.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"explain_items: {len(prompts)} prompts for {images.shape[0]} images; expected one each")
    out = []
    for lo in range(0, images.shape[0], batch_size):
        chunk = list(prompts[lo : lo + batch_size])
        cols = list(prompt_set) if prompt_set is not None else sorted(set(chunk))
        missing = [p for p in chunk if p not in cols]
        if missing:
            raise ValueError(f"explain_items: prompts {missing[:3]} are not in prompt_set")
        maps = explainer(images[lo : lo + batch_size], cols)  # [b, K, H, W]
        idx = torch.tensor([cols.index(p) for p in chunk], device=maps.device)
        out.append(maps[torch.arange(len(chunk), device=maps.device), idx].detach().float().cpu())
    return torch.cat(out)


@dataclass
class SanityCurve:
    """Similarity to the original maps after each randomisation step.

    steps: step names (top layer first); per measure a tensor [S, N] (steps x items) in ``values``.
    """

    mode: str
    steps: list[str]
    values: dict[str, Tensor] = field(default_factory=dict)

    def mean(self) -> dict[str, list[float]]:
        """Per measure, the mean over items at each step (NaN-aware)."""
        return {m: [nanmean(v[s]) for s in range(len(self.steps))] for m, v in self.values.items()}

    def end_point(self) -> dict[str, float]:
        """Per measure, the mean over items after the last step (full randomisation when cascading)."""
        return {m: curve[-1] for m, curve in self.mean().items()}

    def to_dict(self) -> dict:
        return {"mode": self.mode, "steps": self.steps, "mean": self.mean(), "end_point": self.end_point()}


def model_randomisation(
    clip: ClipBundle,
    build: Builder,
    images: Tensor,
    prompts: Sequence[str],
    *,
    mode: str = "cascading",
    prompt_set: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    original: Tensor | None = None,
) -> tuple[SanityCurve, Tensor]:
    """Adebayo et al.'s model-parameter randomisation. images [N, 3, H, W], prompts N strings.

    ``build(clip) -> explainer`` is called for the user's model and for every randomised copy. Returns the curve
    and the original maps [N, H, W] (pass them back as ``original`` to skip recomputing for a second mode).
    """
    if original is None:
        original = explain_items(build(clip), images, prompts, prompt_set, batch_size)
    curve = SanityCurve(mode=mode, steps=[], values={m: [] for m in MEASURES})
    for name, rclip in randomised_copies(clip, mode, seed):
        maps = explain_items(build(rclip), images, prompts, prompt_set, batch_size)
        curve.steps.append(name)
        for m, v in similarities(original, maps).items():
            curve.values[m].append(v)
    curve.values = {m: torch.stack(v) for m, v in curve.values.items()}
    return curve, original


def prompt_randomisation(
    explainer: Callable[[Tensor, list[str]], Tensor],
    images: Tensor,
    prompts: Sequence[str],
    other_prompts: Sequence[str],
    *,
    prompt_set: Sequence[str] | None = None,
    batch_size: int = 16,
    flag_above: float = 0.9,
    original: Tensor | None = None,
) -> dict:
    """True-prompt maps vs different-category-prompt maps on the same images (N items each).

    Returns {"mean": {measure: float}, "values": {measure: [N]}, "prompt_insensitive": bool} — flagged when the
    mean Spearman correlation exceeds ``flag_above`` (the map barely depends on what the prompt says).
    """
    if len(other_prompts) != len(prompts) or any(a == b for a, b in zip(prompts, other_prompts, strict=True)):
        raise ValueError("prompt_randomisation: other_prompts must be N prompts, each different from the true one")
    if original is None:
        original = explain_items(explainer, images, prompts, prompt_set, batch_size)
    other = explain_items(explainer, images, other_prompts, prompt_set, batch_size)
    values = similarities(original, other)
    mean = {m: nanmean(v) for m, v in values.items()}
    return {"mean": mean, "values": values, "prompt_insensitive": bool(mean["spearman"] > flag_above)}
