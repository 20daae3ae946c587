"""Metrics that score saliency maps against boxes and against the model itself, written as torchmetrics.

Each metric is a plain functional form (the math: ``_x_update`` / ``_x_compute`` / ``x``) plus a thin
``torchmetrics.Metric`` (sum / cat states, so it syncs under DDP). Shared conventions: :mod:`mmel.metrics._common`;
each module documents its own, with sources.

* :class:`PointingGame`        -> {"accuracy", "mean_per_category", "difficult_accuracy"}
* :class:`EnergyPointingGame`  -> scalar tensor
* :class:`SaliencyIoU`         -> {"miou", "maxboxacc", "maxboxacc_<d>", "sweep_miou", "sweep_threshold"}
* :class:`PromptSpecificity`   -> {"specificity", "hard_specificity", "absent_on_object", ...} (multi-object images)
* :class:`DeletionInsertion`   -> {"deletion_auc", "insertion_auc"} (+ ``curves()``), scored by e.g. :class:`ClipScorer`
* :class:`PromptRandomisation` -> {"spearman", "ssim", "hog", "prompt_insensitive"}: map vs an absent prompt's map
* :class:`ModelRandomisation`  -> {"<mode>/<measure>", "<mode>/<measure>@<step>"}: map vs randomised models' maps
  (:mod:`mmel.metrics.sanity`, Adebayo et al. 2018; similarity measures in :mod:`mmel.metrics.similarity`)
* against dense / labelled targets (imported from their modules): :class:`~mmel.metrics.segmentation.MaskSegmentation`
  -> {"pixel_accuracy", "miou", "map"} (masks), :class:`~mmel.metrics.points.PointMIoU` -> p-mIoU (points),
  :class:`~mmel.metrics.zeroshot.ZeroShotDeletionInsertion` -> zero-shot top-k deletion / insertion (labels)
"""

from mmel.metrics.iou import SaliencyIoU, binarise, saliency_iou
from mmel.metrics.perturbation import ClipScorer, DeletionInsertion, PerturbationOptions, deletion_insertion
from mmel.metrics.pointing import (
    EnergyPointingGame,
    PointingGame,
    difficult_flags,
    energy_pointing_game,
    pointing_game,
)
from mmel.metrics.randomisation import ModelRandomisation, PromptRandomisation
from mmel.metrics.specificity import PromptSpecificity, prompt_specificity

__all__ = [
    "ClipScorer",
    "DeletionInsertion",
    "EnergyPointingGame",
    "PerturbationOptions",
    "ModelRandomisation",
    "PointingGame",
    "PromptRandomisation",
    "PromptSpecificity",
    "SaliencyIoU",
    "binarise",
    "deletion_insertion",
    "difficult_flags",
    "energy_pointing_game",
    "pointing_game",
    "prompt_specificity",
    "saliency_iou",
]
