"""Referring expressions that only a relation disambiguates (``data=shapes_relations``): RefCOCO refs plus the
relation's annotations, and the counterfactual image of each referral.

:class:`ShapesRelations` reads the refer layout of :mod:`mmel.data.shapes.relations_writer` through
:class:`mmel.data.RefCOCO` (so its ids, prompts, referent boxes and splits are RefCOCO's) and adds to every item:

* ``lookalikes`` float [M, 4] — the same-looking object(s) the swapped words name (xyxy, original pixels);
* ``mentioned`` float [K, 4] — the context objects the expression mentions (K = 0 for "the single ...");
* ``swapped`` — the expression with its relation swapped; ``kind`` / ``relation`` — what kind of relation;
* ``counterfactual`` — the path of the image without the look-alike (val / test; "" where there is none).

A ref without these fields, or naming an annotation the instances file lacks, is a :class:`DatasetError` naming
the file, the ref and the field. :func:`relation_fields` is the transform's part: the extra boxes follow the image
into the model's frame (``lookalikes`` / ``mentioned``, with the originals as ``*_orig`` for keep-size
evaluation) and the counterfactual image is loaded and transformed like the image (``counterfactual_image``).
That part is :func:`mmel.data.dense.relation_fields` (beside the other targets that follow the image).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mmel.data.base import DatasetError
from mmel.data.datamodules import BoxDataModule, _plain
from mmel.data.refcoco import RefCOCO, xywh_to_xyxy

RELATION_FIELDS = ("lookalike_ann_ids", "context_ann_ids", "swapped", "kind", "relation")


class ShapesRelations(RefCOCO):
    """The relational world's refs (``root``: the world's folder; splits ``train`` / ``val`` / ``test``)."""

    name = "shapes_relations"
    image_namespace = "shapes_relations"  # its own images: never the plain world's or COCO's

    def __init__(self, root: str | os.PathLike, split: str, **kwargs: Any) -> None:
        kwargs.setdefault("dataset", "refcocog")
        kwargs.setdefault("split_by", "umd")
        super().__init__(root, split, **kwargs)
        self.name = f"shapes_relations/{split}"

    def ref_extras(self, ref: dict, anns: dict, where: str, inst_path: Path) -> dict[str, Any]:
        """The relation fields of one ref (the annotations it names as xyxy boxes), or a clear error."""
        missing = [k for k in RELATION_FIELDS if k not in ref]
        if missing:
            raise DatasetError(f"{where} has no {missing}: not a relational world's ref (see data/README.md)")

        def box_array(ids: list, field: str) -> np.ndarray:
            unknown = [i for i in ids if i not in anns]
            if unknown:
                raise DatasetError(f"{where}: {field} {unknown} are not annotations of {inst_path}")
            boxes = [xywh_to_xyxy(anns[i], f"{inst_path}: annotation {i}") for i in ids]
            return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)

        cf = ref.get("counterfactual", "")
        return {
            "lookalikes": box_array(ref["lookalike_ann_ids"], "lookalike_ann_ids"),
            "mentioned": box_array(ref["context_ann_ids"], "context_ann_ids"),
            "swapped": str(ref["swapped"]),
            "kind": str(ref["kind"]),
            "relation": str(ref["relation"]),
            "counterfactual": str(self.root / cf) if cf else "",
        }


class ShapesRelationsDataModule(BoxDataModule):
    """``data=shapes_relations``: the relational world, generated under ``root`` on first use
    (:func:`mmel.data.shapes.relations_writer.generate_relations` with ``seed`` and ``generate_kwargs``)."""

    dataset_cls = ShapesRelations

    def __init__(self, root: str | os.PathLike, seed: int = 1, generate_kwargs: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(root, seed=seed, **kwargs)
        self.generate_kwargs = dict(_plain(generate_kwargs) or {})
        self.read_only = False
        self._prepared = False

    def prepare_data(self) -> None:
        from mmel.data.shapes.relations_writer import generate_relations, relations_params
        from mmel.data.shapes.writer import manifest_matches

        if self.read_only:
            if not manifest_matches(self.root, relations_params(self.seed, **self.generate_kwargs)):
                raise FileNotFoundError(f"{self.root} holds no relational world with seed={self.seed} and "
                                        f"generate_kwargs={self.generate_kwargs}; nothing was written")  # fmt: skip
        else:
            generate_relations(Path(self.root), seed=self.seed, **self.generate_kwargs)
        self._prepared = True

    def make_dataset(self, split: str):
        if not self._prepared:
            self.prepare_data()
        return super().make_dataset(split)
