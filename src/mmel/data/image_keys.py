"""Image identities comparable across datasets: what an HSRM trained on, against what an evaluation scores.

A key is ``<namespace>:<image id>``. The namespace is the dataset's ``image_namespace`` (else its loader's name):
COCO, RefCOCO/+/g and the shapes world's COCO and refer forms all say ``coco`` with the COCO image id, so RefCOCO's
images (COCO train2014, inside COCO train2017) are found among a COCO-trained HSRM's training images; Flickr30k
Entities says ``flickr30k``. Keys compare ids, not pixels: the shapes world's ids and a real COCO's overlap as
numbers, but an HSRM never loads across them (the tiny CLIP and a real backbone are different architectures).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any


def namespace(dataset: Any) -> str:
    """The image-id namespace of a :class:`mmel.data.BoxDataset` (``coco``, ``flickr30k``, ...)."""
    return str(getattr(dataset, "image_namespace", None) or type(dataset).name)


def image_keys(dataset: Any, records: Iterable[Any] | None = None) -> set[str]:
    """The keys of the images of ``records`` (default: all of ``dataset.records``)."""
    ns = namespace(dataset)
    return {f"{ns}:{r.image_id}" for r in (dataset.records if records is None else records)}


def keys_digest(keys: Iterable[str]) -> str:
    """SHA-256 of the sorted keys (one line each): names a set of images in a line of a log."""
    return hashlib.sha256("".join(f"{k}\n" for k in sorted(keys)).encode()).hexdigest()
