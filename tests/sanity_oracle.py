"""The sanity checks run directly on a few items: an oracle for the evaluate metrics, kept in the tests.

The evaluate metrics (:mod:`mmel.metrics.randomisation`, :class:`mmel.metrics.PromptSpecificity`) are the one path
the project uses. These plain functions compute the same checks the obvious way — one explainer call per chunk of
items, the randomised copies of :func:`mmel.metrics.sanity.randomised_copies`, the measures of
:mod:`mmel.metrics.similarity` — so that the tests can hold the metrics to an independent computation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmel.backbone import ClipBundle
from mmel.metrics.sanity import randomised_copies
from mmel.metrics.similarity import MEASURES, nanmean, similarities

Builder = Callable[[ClipBundle], Callable[[Tensor, list[str]], Tensor]]


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
