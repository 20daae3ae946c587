"""The leakage guard: refuse to score an HSRM on images it was trained on, unless told to, and then say so.

``train.py`` records in ``hsrm.pt`` the keys of its training images (``config["train_images"]``,
:mod:`mmel.data.image_keys`). Evaluating that checkpoint on a split sharing images with them — RefCOCO's images are
COCO train2014 images, inside COCO train2017 — is refused naming the counts, unless ``allow_train_overlap=true``;
then ``metrics.json`` records ``train_overlap`` (``images``, ``samples`` on those images) and the tables mark the run
(``experiments/aggregate.py``, the paper runner). A checkpoint written before the record existed is not checked
(a warning says so).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from mmel.data.image_keys import image_keys, namespace
from mmel.hsrm.checkpoint import read_hsrm

log = logging.getLogger(__name__)


class TrainOverlapError(ValueError):
    """The evaluated images include images the HSRM was trained on (and the run did not allow it)."""


def train_overlap(checkpoint: str | None, dataset: Any, records: Sequence[Any], allow: bool) -> dict[str, Any] | None:
    """The overlap between ``checkpoint``'s training images and the images of ``records`` (the samples to score).

    Returns None when there is no checkpoint or it records no training images; else ``{"images", "samples",
    "train_images", "checkpoint"}``. Raises :class:`TrainOverlapError` on a non-empty overlap when not ``allow``.
    """
    if not checkpoint:
        return None
    _, cfg = read_hsrm(checkpoint)
    trained = cfg.get("train_images")
    if trained is None:
        log.warning("%s records no training images (written before the leakage guard): overlap not checked", checkpoint)
        return None
    trained = set(trained)
    keys = image_keys(dataset, records)
    shared = keys & trained
    ns = namespace(dataset)
    n_samples = sum(f"{ns}:{r.image_id}" in shared for r in records)
    out = {"images": len(shared), "samples": n_samples, "train_images": len(trained), "checkpoint": str(checkpoint)}
    if shared and not allow:
        example = ", ".join(sorted(shared)[:3])
        raise TrainOverlapError(
            f"evaluate: the HSRM {checkpoint} was trained on {len(shared)} of the {len(keys)} images to score here "
            f"({n_samples} of {len(records)} samples; e.g. {example}) — {getattr(dataset, 'name', '')} shares images "
            "with its training data (RefCOCO's images are COCO train2014 images, inside COCO train2017). Score it on "
            "other images, or pass allow_train_overlap=true to evaluate anyway (metrics.json then records "
            "train_overlap and every table marks the run)."
        )
    if shared:
        log.warning("evaluating on %d images the HSRM was trained on (allow_train_overlap=true)", len(shared))
    return out
