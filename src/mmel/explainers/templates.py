"""Prompt templates that some methods' authors ship, as an option of those explainers (``templates=none|authors``).

With ``templates="authors"`` a prompt p is embedded as the authors' code embeds a class name: every template is
filled with p, each filled prompt is encoded and L2-normalised, the mean is taken and normalised again (the prompt
ensemble of CLIP's zero-shot notebook). ``"none"`` (default) encodes the prompt as it is, like every other
explainer here. The lists, per method:

  * ClearCLIP (github.com/mc-lan/ClearCLIP, ``clearclip_segmentor.py`` with ``prompts/imagenet_template.py``
    ``openai_imagenet_template``): OpenAI's 80 ImageNet templates;
  * CLIP Surgery (github.com/xmed-lab/CLIP_Surgery, ``clip/clip.py`` ``encode_text_with_prompt_ensemble``) and
    MaskCLIP (github.com/chongzhou96/MaskCLIP, ``tools/maskclip_utils/prompt_engineering.py``): the same 80 plus
    five "scene" templates (``SCENE``) — 85.

The 80 are taken from open_clip (``open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES``, the same list); the
order of a list does not matter (a mean).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor

from mmel.explainers.base import tokenize
from mmel.explainers.vit import encode_text

TEMPLATE_CHOICES = ("none", "authors")
IMAGENET_80: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
# the five scene templates CLIP Surgery and MaskCLIP add to the 80
SCENE: tuple[str, ...] = tuple(
    f"{a} {{}} in the scene." for a in ("there is a", "there is the", "this is a", "this is the", "this is one")
)
AUTHORS: dict[str, tuple[str, ...]] = {
    "clearclip": IMAGENET_80,
    "clip_surgery": IMAGENET_80 + SCENE,
    "maskclip": IMAGENET_80 + SCENE,
}


def resolve_templates(choice: str, method: str) -> tuple[str, ...] | None:
    """The template list of ``method`` for ``choice`` ("none" -> None), else a clear error."""
    if choice not in TEMPLATE_CHOICES:
        raise ValueError(f"{method}: templates={choice!r}; expected one of {TEMPLATE_CHOICES}")
    return AUTHORS[method] if choice == "authors" else None


def ensemble_text_features(clip, prompts: Sequence[str], templates: Sequence[str]) -> Tensor:
    """[K, E] unit-norm embeddings: per prompt, the normalised mean of its normalised templated embeddings.

    All K·T filled prompts are encoded in one pass; one longer than the model's context is truncated and logged
    by the tokenizer, like any prompt (:func:`mmel.explainers.base.tokenize`)."""
    filled = [t.format(p) for p in prompts for t in templates]
    feats = F.normalize(encode_text(clip.model, tokenize(clip, filled)), dim=-1)  # [K*T, E]
    return F.normalize(feats.view(len(prompts), len(templates), -1).mean(dim=1), dim=-1)


class TemplatedText:
    """Mixin for an :class:`~mmel.explainers.base.Explainer` whose authors ship templates: ``text_features`` uses
    them when chosen; ``label`` records the choice. Call :meth:`_init_templates` in ``__init__``."""

    templates: str = "none"
    template_list: tuple[str, ...] | None = None

    def _init_templates(self, templates: str) -> None:
        self.template_list = resolve_templates(templates, self.name)
        self.templates = templates

    def label_options(self) -> dict[str, object]:
        return {"templates": self.templates} if self.templates != "none" else {}

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """[K, E]: the authors' template ensemble (unit norm) or the plain prompts' embeddings (unnormalised)."""
        if self.template_list is None:
            return super().text_features(prompts)
        return ensemble_text_features(self.clip, prompts, self.template_list)
