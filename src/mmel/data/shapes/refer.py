"""The shapes world as RefCOCO / RefCOCO+ / RefCOCOg: the refer layout and the parquet tables, from the same refs.

As the real RefCOCO draws its images from COCO train2014 (inside COCO 2017 train), the world's referring
expressions are about its **train** images, under the same image ids and annotation ids as ``coco/``: an HSRM
trained on the world's COCO train split has seen every one of these images (the leakage guard's case). Layout
under ``<world>/refer/`` (what :class:`mmel.data.RefCOCO` reads)::

    images/mscoco/images/train2014/COCO_train2014_<12-digit id>.jpg      the same JPEG bytes as coco/train/
    <dataset>/refs(<unc|umd>).p  <dataset>/instances.json                 dataset: refcoco, refcoco+, refcocog
    parquet/<dataset>/<split>-00000-of-00001.parquet                      one row per ref, image bytes embedded

Splits by the image's position ``i`` in the train split: refcoco / refcoco+ ``i % 20`` = 0 val, 1 testA, 2 testB,
else train; refcocog (umd) 0 val, 1-2 test, else train. Every object of an image is one ref. Sentences (two per
ref): refcoco names the object and its side ("red circle", "red circle on the left"); refcoco+ has no location
words ("the red circle", "red circle shape"); refcocog is longer ("a red circle next to a blue square").
The parquet tables hold the evaluation splits only (val, testA, testB / val, test), as the Hub's evaluation
releases do: each row embeds its image, and a train table would repeat most of the world's images per ref.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmel.data.shapes.world import CATEGORIES, ShapeObject

IMAGE_DIR = "images/mscoco/images/train2014"
SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
PICKLE_PROTOCOL = 4  # fixed: same world, same bytes


@dataclass(frozen=True)
class ReferImage:
    """A train image of the world: its id, JPEG bytes, side, objects and their COCO annotation ids."""

    image_id: int
    jpeg: bytes
    size: int
    objects: tuple[ShapeObject, ...]
    ann_ids: tuple[int, ...]


def split_of(dataset: str, i: int) -> str:
    r = i % 20
    if dataset == "refcocog":
        return "val" if r == 0 else "test" if r in (1, 2) else "train"
    return {0: "val", 1: "testA", 2: "testB"}.get(r, "train")


def sentences(dataset: str, obj: ShapeObject, others: Sequence[ShapeObject], size: int) -> list[str]:
    """The two referring sentences of ``obj`` in ``dataset``'s style."""
    if dataset == "refcoco":
        side = "left" if (obj.box[0] + obj.box[2]) / 2 < size / 2 else "right"
        return [obj.name, f"{obj.name} on the {side}"]
    if dataset == "refcoco+":
        return [f"the {obj.name}", f"{obj.name} shape"]
    near = f"next to a {others[0].name}" if others else "on its own"
    return [f"a {obj.name} {near}", f"the {obj.shape} that is {obj.colour}"]


def file_names(image_id: int, ann_id: int) -> tuple[str, str]:
    """(the image file, the ref's file_name with its annotation-id suffix), as in the refer data."""
    stem = f"COCO_train2014_{image_id:012d}"
    return f"{stem}.jpg", f"{stem}_{ann_id}.jpg"


def write_refer(root: Path, images: Sequence[ReferImage], write: Callable[[Path, bytes | str], None]) -> None:
    """Write ``<root>/refer/`` (layout in the module docstring) through ``write(path, data)``."""
    import datasets

    base = root / "refer"
    (base / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    for im in images:
        write(base / IMAGE_DIR / file_names(im.image_id, 0)[0], im.jpeg)
    cats = [{"id": i + 1, "name": f"{c} {s}", "supercategory": s} for i, (c, s) in enumerate(CATEGORIES)]
    for dataset, split_by in SPLIT_BY.items():
        refs, rows, js_images, js_anns = [], {}, [], []
        sent_id = 0
        for i, im in enumerate(images):
            image_file = file_names(im.image_id, 0)[0]
            js_images.append({"id": im.image_id, "file_name": image_file, "height": im.size, "width": im.size})
            split = split_of(dataset, i)
            for obj, ann_id in zip(im.objects, im.ann_ids, strict=True):
                x0, y0, x1, y1 = obj.box
                bbox = [x0, y0, x1 - x0, y1 - y0]
                js_anns.append({"id": ann_id, "image_id": im.image_id, "category_id": obj.category_id,
                                "bbox": bbox, "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})  # fmt: skip
                others = [o for o in im.objects if o is not obj]
                texts = sentences(dataset, obj, others, im.size)
                sents = [
                    {"sent": t, "raw": t, "tokens": t.split(), "sent_id": sent_id + k} for k, t in enumerate(texts)
                ]
                sent_id += len(texts)
                ref = {"ref_id": len(refs), "ann_id": ann_id, "image_id": im.image_id, "split": split,
                       "sentences": sents, "sent_ids": [s["sent_id"] for s in sents],
                       "category_id": obj.category_id, "file_name": file_names(im.image_id, ann_id)[1]}  # fmt: skip
                refs.append(ref)
                row = {"ref_id": ref["ref_id"], "ann_id": ann_id, "image_id": im.image_id, "split": split,
                       "sentences": texts, "bbox": [float(v) for v in bbox], "file_name": ref["file_name"],
                       "category": obj.name, "category_id": obj.category_id, "width": im.size, "height": im.size,
                       "image": {"bytes": im.jpeg, "path": image_file}}  # fmt: skip
                rows.setdefault(split, []).append(row)
        folder = base / dataset
        folder.mkdir(parents=True, exist_ok=True)
        write(folder / f"refs({split_by}).p", pickle.dumps(refs, protocol=PICKLE_PROTOCOL))
        instances = {"info": {"description": f"mmel shapes world ({dataset})"}, "images": js_images,
                     "annotations": js_anns, "categories": cats}  # fmt: skip
        write(folder / "instances.json", json.dumps(instances, separators=(",", ":")) + "\n")
        (base / "parquet" / dataset).mkdir(parents=True, exist_ok=True)
        for split, split_rows in sorted(rows.items()):
            if split == "train":
                continue  # evaluation splits only (module docstring)
            write(base / "parquet" / dataset / f"{split}-00000-of-00001.parquet", parquet_bytes(split_rows, datasets))


def parquet_bytes(rows: list[dict], datasets) -> bytes:
    """One parquet file (``datasets`` features, so ``image`` reads back as a ``datasets.Image``)."""
    features = datasets.Features(
        {
            "ref_id": datasets.Value("int64"),
            "ann_id": datasets.Value("int64"),
            "image_id": datasets.Value("int64"),
            "split": datasets.Value("string"),
            "sentences": datasets.Sequence(datasets.Value("string")),
            "bbox": datasets.Sequence(datasets.Value("float64"), length=4),
            "file_name": datasets.Value("string"),
            "category": datasets.Value("string"),
            "category_id": datasets.Value("int64"),
            "width": datasets.Value("int64"),
            "height": datasets.Value("int64"),
            "image": datasets.Image(),
        }
    )
    import pyarrow.parquet as pq

    table = datasets.Dataset.from_list(rows, features=features)
    buf = io.BytesIO()
    pq.write_table(table.data.table, buf)  # the arrow table carries the features in its schema metadata
    return buf.getvalue()
