"""Tiny hand-written datasets on disk (COCO and Flickr30k Entities formats) for tests and examples.

Each image is a grey canvas with filled rectangles; a rectangle's pixels are exactly its box, so a test can check
that boxes and pixels stay aligned through decoding, EXIF rotation and transforms.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

BACKGROUND = (128, 128, 128)
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (20, 40, 230), "yellow": (240, 230, 20)}


def canvas(size: tuple[int, int], rects: Sequence[tuple[Sequence[int], str]] = ()) -> Image.Image:
    """RGB image (H, W) with each ``(xyxy integer pixel-edge box, colour name)`` filled."""
    h, w = size
    a = np.empty((h, w, 3), dtype=np.uint8)
    a[:] = BACKGROUND
    for (x0, y0, x1, y1), colour in rects:
        a[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = COLOURS[colour]
    return Image.fromarray(a)


def write_coco(
    root: Path,
    split: str,
    images: Sequence[dict[str, Any]],
    categories: Sequence[tuple[int, str]],
    *,
    captions: dict[Any, list[str]] | None = None,
    draw: bool = True,
) -> Path:
    """Write ``<root>/annotations/instances_<split>.json`` (+ captions) and the images under ``<root>/<split>/``.

    ``images``: dicts with ``id``, ``size`` (H, W), ``anns`` = list of ``(category_id, [x, y, w, h])`` or
    ``(category_id, [x, y, w, h], iscrowd)``; optional ``file_name`` (default ``<id>.png``) and ``colour`` per
    category id used to draw the boxes (``colours``: dict category_id -> colour name). Returns the JSON path.
    """
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    js_images, js_anns = [], []
    for im in images:
        h, w = im["size"]
        name = im.get("file_name", f"{im['id']}.png")
        js_images.append({"id": im["id"], "file_name": name, "height": h, "width": w})
        rects = []
        for a in im["anns"]:
            cid, (x, y, bw, bh), *crowd = a
            js_anns.append(
                {
                    "id": len(js_anns) + 1,
                    "image_id": im["id"],
                    "category_id": cid,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": crowd[0] if crowd else 0,
                }
            )
            rects.append(((int(x), int(y), int(x + bw), int(y + bh)), im.get("colours", {}).get(cid, "red")))
        if draw:
            canvas((h, w), rects).save(root / split / name)
    cats = [{"id": c, "name": n, "supercategory": n.split()[-1]} for c, n in categories]
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": js_images, "annotations": js_anns, "categories": cats}))
    if captions is not None:
        caps = [{"id": i, "image_id": k, "caption": c} for i, (k, c) in enumerate(_pairs(captions))]
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"annotations": caps}))
    return path


def _pairs(d: dict[Any, list[str]]):
    for k, caps in d.items():
        for c in caps:
            yield k, c


def voc_xml(size: tuple[int, int], objects: Sequence[dict[str, Any]], filename: str = "x.jpg") -> str:
    """A Flickr30k-Entities-style annotation. objects: ``{"names": [...], "box": (xmin, ymin, xmax, ymax) 1-based
    inclusive}`` or ``{"names": [...], "scene": True}`` or ``{"names": [...], "nobox": True}``."""
    h, w = size
    parts = [f"<annotation><filename>{filename}</filename>"]
    parts.append(f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>")
    for o in objects:
        names = "".join(f"<name>{n}</name>" for n in o["names"])
        if "box" in o:
            x0, y0, x1, y1 = o["box"]
            body = f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>"
        elif o.get("scene"):
            body = "<nobndbox>0</nobndbox><scene>1</scene>"
        else:
            body = "<nobndbox>1</nobndbox>"
        parts.append(f"<object>{names}<difficult>0</difficult>{body}</object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def write_flickr(root: Path, splits: dict[str, list[str]], images: dict[str, dict[str, Any]]) -> Path:
    """Write a Flickr30k Entities tree. ``images[id]``: ``size`` (H, W), ``captions`` (marked lines), ``objects``
    (see :func:`voc_xml`; boxes are drawn in ``colour`` of the object, default red). Returns ``root``."""
    for d in ("Sentences", "Annotations", "flickr30k-images"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    for iid, spec in images.items():
        (root / "Sentences" / f"{iid}.txt").write_text("\n".join(spec["captions"]) + "\n")
        (root / "Annotations" / f"{iid}.xml").write_text(voc_xml(spec["size"], spec["objects"], f"{iid}.jpg"))
        rects = [
            ((o["box"][0] - 1, o["box"][1] - 1, o["box"][2], o["box"][3]), o.get("colour", "red"))
            for o in spec["objects"]
            if "box" in o
        ]
        canvas(spec["size"], rects).save(root / "flickr30k-images" / f"{iid}.jpg", quality=95)
    return root
