"""RefCOCO, RefCOCO+ and RefCOCOg as grounding samples: one sample per (referring sentence, referent box).

Two sources give the same items (same ids, prompts, boxes, sizes, categories, pixels):

* ``source="refer"``, the layout of the ``refer`` toolkit's ``data/`` folder (``root``)::

      <root>/<dataset>/refs(<split_by>).p     pickled list of refs: ref_id, ann_id, image_id, split, file_name,
                                              category_id, sentences [{sent, raw, tokens, sent_id}, ...]
      <root>/<dataset>/instances.json         COCO-style images (id, width, height) and annotations (id, bbox xywh)
      <root>/images/mscoco/images/train2014/  the COCO train2014 images (``image_dir`` overrides)

  ``split_by``: ``unc`` for refcoco / refcoco+, ``umd`` for refcocog. A ref's ``file_name`` carries the annotation
  id (``COCO_train2014_000000581857_1234.jpg``); the image file does not (``COCO_train2014_000000581857.jpg``).
  The pickles are read with :mod:`pickle`, which runs whatever a pickle says: load refer files you trust.

* ``source="parquet"``, tables read through Hugging Face ``datasets`` (:mod:`mmel.data.refcoco_parquet`): local
  parquet files, or a Hub dataset from its cache (``HF_DATASETS_OFFLINE=1`` respected). Columns in that module.

Splits: refcoco / refcoco+ ``train``, ``val``, ``testA``, ``testB``; refcocog (umd) ``train``, ``val``, ``test``.
Boxes are COCO ``[x, y, w, h]`` turned into xyxy and clipped to the image (a box entirely outside is a counted
skip, ``box_degenerate`` then ``sample_no_boxes_left``). ``image_id`` is the COCO image id (RefCOCO's images are
COCO train2014 images, which COCO 2017 keeps with the same ids): ``image_namespace = "coco"``, so an HSRM trained on
COCO and evaluated here can be checked for shared images (:mod:`mmel.data.image_keys`).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmel.data.base import BoxDataset, DatasetError, Dropped, Record, as_displayed, clean_boxes, read_json

DATASETS = ("refcoco", "refcoco+", "refcocog")
SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
# the official evaluation protocol's splits (refcocog: the umd partition)
SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}
DEFAULT_IMAGE_DIR = "images/mscoco/images/train2014"
REF_FIELDS = ("ref_id", "ann_id", "image_id", "split", "sentences", "file_name")


def image_file_name(ref_file_name: str) -> str:
    """The image file of a ref: ``COCO_train2014_000000581857_1234.jpg`` -> ``COCO_train2014_000000581857.jpg``
    (a name without the annotation-id suffix is returned as it is)."""
    stem, dot, ext = ref_file_name.rpartition(".")
    if not dot:
        stem, ext = ref_file_name, ""
    parts = stem.split("_")
    if len(parts) == 4 and parts[0] == "COCO" and parts[-1].isdigit():
        stem = "_".join(parts[:3])
    return f"{stem}.{ext}" if dot else stem


def check_split(dataset: str, split_by: str, split: str, where: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"RefCOCO: dataset must be one of {DATASETS}, got {dataset!r}")
    known = SPLITS.get((dataset, split_by))
    if known is None:
        raise ValueError(f"RefCOCO: {dataset} has no '{split_by}' partition (known: {SPLIT_BY[dataset]})")
    if split not in known:
        raise ValueError(f"{where}: unknown split {split!r} for {dataset} ({split_by}); expected one of {list(known)}")


def sentence_texts(sentences: Any, where: str) -> list[str]:
    """The texts of a ref's ``sentences``: a list of ``{sent, ...}`` dicts (refer) or of strings (tables)."""
    if not isinstance(sentences, list | tuple | np.ndarray):
        raise DatasetError(f"{where}: 'sentences' should be a list, got {type(sentences).__name__}")
    out = []
    for k, s in enumerate(sentences):
        text = s.get("sent") if isinstance(s, dict) else s
        if not isinstance(text, str):
            raise DatasetError(f"{where}: sentences[{k}] should be a string or a dict with 'sent', got {s!r:.80}")
        out.append(text)
    return out


def xywh_to_xyxy(bbox: Any, where: str) -> list[float]:
    vals = list(bbox) if isinstance(bbox, list | tuple | np.ndarray) else None
    if vals is None or len(vals) != 4 or not all(isinstance(v, int | float | np.number) for v in vals):
        raise DatasetError(f"{where}: 'bbox' should be 4 numbers [x, y, w, h], got {bbox!r:.80}")
    x, y, w, h = (float(v) for v in vals)
    return [x, y, x + w, y + h]


def read_refs(path: Path) -> list[dict]:
    """The refs of a ``refs(<split_by>).p`` (the original Python 2 pickles are read as latin-1 strings)."""
    if not path.is_file():
        raise FileNotFoundError(f"RefCOCO refs file not found: {path} (see data/README.md for the refer layout)")
    try:
        with open(path, "rb") as f:
            try:
                refs = pickle.load(f)  # noqa: S301 - the user's own refer files (module docstring)
            except UnicodeDecodeError:
                f.seek(0)
                refs = pickle.load(f, encoding="latin1")  # noqa: S301
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise DatasetError(f"{path}: not a refs pickle ({type(e).__name__}: {e})") from e
    if not isinstance(refs, list):
        raise DatasetError(f"{path}: expected a pickled list of refs, got {type(refs).__name__}")
    for i, r in enumerate(refs):
        if not isinstance(r, dict):
            raise DatasetError(f"{path}: ref #{i} is a {type(r).__name__}, not a dict")
        missing = [k for k in REF_FIELDS if k not in r]
        if missing:
            raise DatasetError(f"{path}: ref #{i} (ref_id={r.get('ref_id')}) has no field {missing} "
                               f"(expected {list(REF_FIELDS)})")  # fmt: skip
    return refs


class RefCOCO(BoxDataset):
    """RefCOCO / RefCOCO+ / RefCOCOg referring expressions (module docstring for layouts and sources).

    Args:
        root: the refer ``data/`` folder (``source="refer"``; also where ``parquet`` defaults to
            ``<root>/parquet/<dataset>``).
        split: ``train`` / ``val`` / ``testA`` / ``testB`` (refcoco, refcoco+) or ``train`` / ``val`` / ``test``
            (refcocog umd).
        dataset: ``refcoco``, ``refcoco+`` or ``refcocog``.
        source: ``refer`` or ``parquet``.
        split_by: the partition (default: ``unc``, refcocog ``umd``).
        image_dir: image folder (default ``<root>/images/mscoco/images/train2014``); parquet rows with image bytes
            need none.
        parquet: ``source="parquet"``: a parquet file, a folder of ``<split>-*.parquet`` / ``<split>.parquet``, or
            ``hub:<repo id>`` (read by ``datasets.load_dataset``); default ``<root>/parquet/<dataset>``.
        hf_cache_dir: the ``datasets`` cache (default: its own, ``HF_DATASETS_CACHE``).
        prompt_template: filled with the sentence (default ``"{}"``: the sentence itself).
        min_box_area, subset, seed, check_files: as in :class:`mmel.data.CocoBoxes`.

    Sample ids are ``<ref_id>:<k>`` (the ref's k-th sentence); items carry ``ref_id``, ``ann_id`` and
    ``sentence``. Records are in (ref_id, k) order whatever the source's order.
    """

    name = "refcoco"
    image_namespace = "coco"  # image ids are COCO image ids

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        dataset: str = "refcoco",
        source: str = "refer",
        split_by: str | None = None,
        image_dir: str | os.PathLike | None = None,
        parquet: str | os.PathLike | None = None,
        hf_cache_dir: str | os.PathLike | None = None,
        prompt_template: str = "{}",
        min_box_area: float = 1.0,
        subset: int | None = None,
        seed: int = 0,
        check_files: bool = True,
    ) -> None:
        super().__init__(
            root, split, image_dir=image_dir, default_image_dir=DEFAULT_IMAGE_DIR, prompt_template=prompt_template
        )
        self.dataset, self.source = dataset, source
        self.split_by = split_by or SPLIT_BY.get(dataset, "unc")
        self.name = f"{dataset}/{split}"
        self._table = None  # parquet: the datasets.Dataset whose rows hold image bytes (None: files on disk)
        self._image_rows: dict[str, int] = {}
        if source == "refer":
            check_split(dataset, self.split_by, split, f"{self.root / dataset}")
            self._index_refer(min_box_area)
        elif source == "parquet":
            from mmel.data.refcoco_parquet import index_parquet

            where = parquet if parquet is not None else self.root / "parquet" / dataset
            check_split(dataset, self.split_by, split, str(where))
            index_parquet(self, str(where), min_box_area, hf_cache_dir)
        else:
            raise ValueError(f"RefCOCO: source must be 'refer' or 'parquet', got {source!r}")
        self.records.sort(key=lambda r: (r.extra["ref_id"], r.extra["k"]))
        for r in self.records:
            r.extra.pop("k")
        self.finish_index(check_files and self._table is None, subset, seed)

    # -------------------------------------------------------------------------------------------- refer
    def _index_refer(self, min_box_area: float) -> None:
        folder = self.root / self.dataset
        refs_path = folder / f"refs({self.split_by}).p"
        inst_path = folder / "instances.json"
        refs = read_refs(refs_path)
        inst = read_json(inst_path, "RefCOCO instances file")
        if not isinstance(inst, dict) or not all(isinstance(inst.get(k), list) for k in ("images", "annotations")):
            raise DatasetError(f"{inst_path}: expected a JSON object with lists 'images' and 'annotations'")
        images, anns = {}, {}
        for im in inst["images"]:
            missing = [k for k in ("id", "width", "height") if k not in im]
            if missing:
                raise DatasetError(f"{inst_path}: image {im.get('id', '?')} has no field {missing}")
            images[im["id"]] = (int(im["height"]), int(im["width"]))
        for a in inst["annotations"]:
            missing = [k for k in ("id", "bbox") if k not in a]
            if missing:
                raise DatasetError(f"{inst_path}: annotation {a.get('id', '?')} has no field {missing}")
            anns[a["id"]] = a["bbox"]
        cats = {c["id"]: c["name"] for c in inst.get("categories", []) if "id" in c and "name" in c}
        for r in refs:
            if r["split"] != self.split:
                continue
            where = f"{refs_path}: ref {r['ref_id']}"
            if r["ann_id"] not in anns:
                raise DatasetError(f"{where}: ann_id={r['ann_id']} is not among the annotations of {inst_path}")
            if r["image_id"] not in images:
                raise DatasetError(f"{where}: image_id={r['image_id']} is not among the images of {inst_path}")
            box = xywh_to_xyxy(anns[r["ann_id"]], f"{inst_path}: annotation {r['ann_id']}")
            cat = cats.get(r.get("category_id"), str(r.get("category_id", "")))
            records = self.add_ref(
                r["ref_id"], r["ann_id"], r["image_id"], str(self.image_dir / image_file_name(r["file_name"])),
                images[r["image_id"]], box, sentence_texts(r["sentences"], where), cat, min_box_area,
            )  # fmt: skip
            extra = self.ref_extras(r, anns, where, inst_path)
            for rec in records:
                rec.extra.update(extra)

    def ref_extras(self, ref: dict, anns: dict, where: str, inst_path: Path) -> dict[str, Any]:
        """Fields a subclass reads from a refer ref beyond RefCOCO's (``anns``: annotation id -> COCO bbox);
        added to each of the ref's records. RefCOCO's own refs have none."""
        return {}

    # --------------------------------------------------------------------------------------- both sources
    def add_ref(
        self,
        ref_id: int,
        ann_id: Any,
        image_id: Any,
        file: str,
        size: tuple[int, int],
        box: list[float],
        sentences: list[str],
        category: str,
        min_box_area: float,
    ) -> list[Record]:
        """One record per sentence of a ref (none when its box does not survive clipping, counted)."""
        self.stats["refs"] += 1
        boxes = clean_boxes(np.array([box]), size, self.skipped, min_box_area)
        if len(boxes) == 0:
            self.skipped["sample_no_boxes_left"] += len(sentences)
            return []
        if not sentences:
            self.skipped["ref_without_sentences"] += 1
        out = []
        for k, text in enumerate(sentences):
            extra = {"ref_id": int(ref_id), "ann_id": ann_id, "sentence": text, "k": k}
            out.append(Record(f"{ref_id}:{k}", image_id, file, size, self.prompt_template.format(text), boxes,
                              category, extra))  # fmt: skip
        self.records += out
        return out

    def load(self, index: int) -> dict[str, Any] | Dropped:
        """As :meth:`BoxDataset.load`; rows of a parquet table with image bytes decode those bytes."""
        if self._table is None:
            return super().load(index)
        from mmel.data.refcoco_parquet import image_from_row

        r = self.records[index]
        try:
            image = as_displayed(image_from_row(self._table, self._image_rows[r.sample_id]))
        except Exception as e:  # noqa: BLE001 - PIL's decode errors and a missing/odd image cell alike
            return self._dropped("corrupt_image", r, f"{type(e).__name__}: {e}")
        if (image.height, image.width) != tuple(r.size):
            return self._dropped("size_mismatch", r, f"decoded {(image.height, image.width)}, annotated {r.size}")
        return {"sample_id": r.sample_id, "image_id": r.image_id, "image": image, "prompt": r.prompt,
                "boxes": torch.from_numpy(r.boxes.copy()), "category": r.category, "file": r.file,
                "size": tuple(r.size), **r.extra}  # fmt: skip
