"""Is a map trustworthy? Sanity checks (model and prompt randomisation) and the items to run them on.

* :func:`model_randomisation` / :func:`prompt_randomisation` (:mod:`mmel.metrics.sanity`, Adebayo et al. 2018)
* :func:`similarities` — Spearman, SSIM, HOG similarity of map pairs (:mod:`mmel.metrics.similarity`)
* :func:`load_shapes_items` / :func:`specificity_on_items` — the shapes world's multi-object images
  (:mod:`mmel.trust.shapes`); the prompt-specificity metric itself is :class:`mmel.metrics.PromptSpecificity`.

``python -m mmel.trust`` runs everything on the shapes world and writes ``trust.json`` and a curve figure.
"""

from mmel.metrics.sanity import (
    SanityCurve,
    explain_items,
    model_randomisation,
    prompt_randomisation,
    randomised_copies,
)
from mmel.metrics.similarity import hog_similarity, similarities, spearman, ssim
from mmel.trust.shapes import ShapesItems, load_shapes_items, specificity_on_items

__all__ = [
    "SanityCurve",
    "ShapesItems",
    "explain_items",
    "hog_similarity",
    "load_shapes_items",
    "model_randomisation",
    "prompt_randomisation",
    "randomised_copies",
    "similarities",
    "spearman",
    "specificity_on_items",
    "ssim",
]
