"""COCO instances (2017 layout) as grounding samples: one sample per (image, category present), all its boxes.

Layout: ``<root>/annotations/instances_<split>.json`` and images ``<root>/<split>/<file_name>`` (real COCO:
``split="val2017"``; the shapes world: ``split="test"``). The prompt is a template filled with the category name.
Boxes are COCO ``[x, y, w, h]`` turned into xyxy, clipped to the image; ``min_box_area`` is on the box (pixels²),
not on COCO's segmentation ``area``.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from mmel.data.base import BoxDataset, DatasetError, Record, clean_boxes, read_json

DEFAULT_TEMPLATE = "a photo of a {}."


def check_template(template: str) -> str:
    """A prompt template must have exactly one ``{}`` slot."""
    if template.count("{}") != 1:
        raise ValueError(f"prompt_template must contain exactly one '{{}}', got {template!r}")
    return template


def _need(d: dict, key: str, path: Path, where: str, kind: type | tuple[type, ...]):
    if not isinstance(d, dict) or key not in d:
        raise DatasetError(f"{path}: {where} has no field '{key}'")
    if not isinstance(d[key], kind):
        raise DatasetError(f"{path}: {where}['{key}'] should be {kind}, got {type(d[key]).__name__}")
    return d[key]


def load_coco(path: Path):
    """Read and validate an instances file; returns a pycocotools ``COCO`` index over it."""
    from pycocotools.coco import COCO

    data = read_json(path, "COCO annotation file")
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        _need(data, key, path, "the file", list)
    cats = {}
    for c in data["categories"]:
        cats[_need(c, "id", path, "a category", int)] = _need(c, "name", path, f"category {c.get('id')}", str)
    image_ids = set()
    for im in data["images"]:
        iid = _need(im, "id", path, "an image", (int, str))
        for k in ("file_name",):
            _need(im, k, path, f"image {iid}", str)
        for k in ("width", "height"):
            _need(im, k, path, f"image {iid}", int)
        image_ids.add(iid)
    for a in data["annotations"]:
        aid = a.get("id", "?") if isinstance(a, dict) else "?"
        cid = _need(a, "category_id", path, f"annotation {aid}", int)
        if cid not in cats:
            raise DatasetError(
                f"{path}: annotation {aid} has category_id={cid}, which is not in 'categories' "
                f"(known ids: {sorted(cats)[:20]})"
            )
        if _need(a, "image_id", path, f"annotation {aid}", (int, str)) not in image_ids:
            raise DatasetError(f"{path}: annotation {aid} has image_id={a['image_id']}, which is not in 'images'")
        bbox = _need(a, "bbox", path, f"annotation {aid}", list)
        if len(bbox) != 4 or not all(isinstance(v, int | float) for v in bbox):
            raise DatasetError(f"{path}: annotation {aid} 'bbox' should be 4 numbers [x, y, w, h], got {bbox}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


class CocoBoxes(BoxDataset):
    """COCO instances as (image, category) grounding samples.

    Args:
        root: folder holding ``annotations/`` and the image folders.
        split: ``train2017`` / ``val2017`` (real COCO) or ``train`` / ``val`` / ``test`` (shapes world).
        image_dir: image folder (default ``<root>/<split>``).
        prompt_template: filled with the category name, e.g. ``"a photo of a {}."``.
        include_crowd: keep ``iscrowd=1`` boxes (crowd regions) — off by default, they are not single objects.
        min_box_area: drop boxes smaller than this many pixels² (after clipping).
        captions: also read ``captions_<split>.json`` and give each item ``captions`` (list[str]).
        subset: keep a seeded random subset of this many samples (quick runs); None = all.
        seed: seed of the subset.
        check_files: drop samples whose image file is missing (one ``stat`` per image) when indexing.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        image_dir: str | os.PathLike | None = None,
        prompt_template: str = DEFAULT_TEMPLATE,
        include_crowd: bool = False,
        min_box_area: float = 1.0,
        captions: bool = False,
        subset: int | None = None,
        seed: int = 0,
        check_files: bool = True,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.split = split
        self.name = f"coco/{split}"
        self.image_dir = Path(image_dir).expanduser() if image_dir else self.root / split
        self.prompt_template = check_template(prompt_template)
        self.annotation_file = self.root / "annotations" / f"instances_{split}.json"
        self.coco = load_coco(self.annotation_file)
        self.categories = {c["id"]: c["name"] for c in self.coco.dataset["categories"]}
        caps = self._captions() if captions else None
        self._index(include_crowd, min_box_area, caps)
        if check_files:
            self.drop_missing_images()
        self.subsample(subset, seed)

    def _captions(self) -> dict:
        path = self.root / "annotations" / f"captions_{self.split}.json"
        data = read_json(path, "COCO captions file")
        anns = _need(data, "annotations", path, "the file", list)
        out: dict = defaultdict(list)
        for a in anns:
            out[_need(a, "image_id", path, "a caption", (int, str))].append(_need(a, "caption", path, "a caption", str))
        return out

    def _index(self, include_crowd: bool, min_box_area: float, captions: dict | None) -> None:
        coco = self.coco
        for iid in sorted(coco.imgs, key=lambda i: (isinstance(i, str), i)):  # numeric ids numerically
            im = coco.imgs[iid]
            size = (im["height"], im["width"])
            by_cat: dict[int, list] = defaultdict(list)
            for a in coco.imgToAnns.get(iid, []):
                if a.get("iscrowd", 0) and not include_crowd:
                    self.skipped["box_crowd"] += 1
                    continue
                x, y, w, h = a["bbox"]
                by_cat[a["category_id"]].append([x, y, x + w, y + h])
            self.stats["images_annotated"] += 1
            if not by_cat:
                self.stats["images_without_boxes"] += 1
            for cid in sorted(by_cat):
                boxes = clean_boxes(np.array(by_cat[cid]), size, self.skipped, min_box_area)
                if len(boxes) == 0:
                    self.skipped["sample_no_boxes_left"] += 1
                    continue
                name = self.categories[cid]
                extra = {"category_id": cid}
                if captions is not None:
                    extra["captions"] = list(captions.get(iid, []))
                self.records.append(
                    Record(
                        sample_id=f"{iid}:{cid}",
                        image_id=iid,
                        file=str(self.image_dir / im["file_name"]),
                        size=size,
                        prompt=self.prompt_template.format(name),
                        boxes=boxes,
                        category=name,
                        extra=extra,
                    )
                )
