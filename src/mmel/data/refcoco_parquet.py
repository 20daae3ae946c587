"""RefCOCO tables through Hugging Face ``datasets``: the parquet source of :class:`mmel.data.refcoco.RefCOCO`.

One row per ref (a referent box and its sentences), the refer fields as columns:

==============  ========  ======================================================================================
column          needed    meaning
==============  ========  ======================================================================================
``image_id``    yes       COCO image id
``bbox``        yes       the referent box ``[x, y, w, h]`` in pixels (converted to xyxy)
``sentences``   yes       list of strings, or of ``{sent, ...}`` structs as in the refs pickle
``file_name``   yes       the ref's file name (an annotation-id suffix is dropped to find the image file)
``ref_id``      no        stable ref id (default: the row's position); sample ids are ``<ref_id>:<k>``
``ann_id``      no        COCO annotation id
``split``       no        rows of other splits are left out (a file may hold every split)
``category``    no        category name (else ``category_id`` as a string, else "")
``width``,      no        image size in pixels; without them the image's header is read
``height``
``image``       no        the image (``datasets.Image``: ``{bytes, path}``; or raw bytes); without it the file
                          ``<image_dir>/<file_name>`` is read
==============  ========  ======================================================================================

Where: a ``.parquet`` file, a folder holding ``<split>-*.parquet`` or ``<split>.parquet`` (also under ``data/``, the
Hub's convention), or ``hub:<repo id>`` for ``datasets.load_dataset(repo_id, split=split)`` — from the local cache
when ``HF_DATASETS_OFFLINE=1``. A table without a needed column is an error naming it and the file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from mmel.data.base import DatasetError
from mmel.data.refcoco import image_file_name, sentence_texts, xywh_to_xyxy

if TYPE_CHECKING:
    from mmel.data.refcoco import RefCOCO

REQUIRED = ("image_id", "bbox", "sentences", "file_name")
OPTIONAL = ("ref_id", "ann_id", "split", "category", "category_id", "width", "height", "image")


def parquet_files(where: Path, split: str) -> list[Path]:
    """The parquet files of ``split`` at ``where`` (a file, or a folder in the Hub's naming)."""
    if where.is_file():
        return [where]
    if not where.is_dir():
        raise FileNotFoundError(f"RefCOCO parquet not found: {where} (a .parquet file or a folder of them)")
    for folder in (where, where / "data"):
        files = sorted(folder.glob(f"{split}-*.parquet")) or sorted(folder.glob(f"{split}.parquet"))
        if files:
            return files
    raise FileNotFoundError(
        f"RefCOCO parquet: no {split}-*.parquet or {split}.parquet in {where} (nor in {where / 'data'})"
    )


def open_table(where: str, split: str, cache_dir: str | None = None):
    """(``datasets.Dataset``, a label naming its files) for ``split`` of ``where``."""
    import datasets

    if where.startswith("hub:"):
        repo = where[len("hub:") :]
        try:
            table = datasets.load_dataset(repo, split=split, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - network, cache and unknown-split failures alike get the hint
            raise FileNotFoundError(
                f"RefCOCO: could not load Hub dataset {repo!r}, split {split!r} ({type(e).__name__}: {e}). Offline "
                "(HF_DATASETS_OFFLINE=1) it must already be in the datasets cache; or download its parquet files "
                "and pass data.parquet=<folder>"
            ) from e
        return table, f"hub:{repo}[{split}]"
    files = parquet_files(Path(where).expanduser(), split)
    table = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", cache_dir=cache_dir)
    return table, ", ".join(str(f) for f in files)


def _header_size(data: bytes | None, path: str | None) -> tuple[int, int]:
    """(H, W) of an image as displayed, from its header (EXIF orientations 5-8 swap the sides)."""
    with Image.open(io.BytesIO(data) if data is not None else path) as im:
        w, h = im.size
        turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (w, h) if turned else (h, w)


def image_cell(table, row: int) -> tuple[bytes | None, str | None]:
    """(bytes, path) of a row's ``image`` cell (a ``datasets.Image`` struct or raw bytes)."""
    cell = table[row]["image"]
    if isinstance(cell, dict):
        return cell.get("bytes"), cell.get("path")
    if isinstance(cell, bytes | bytearray):
        return bytes(cell), None
    raise DatasetError(f"RefCOCO parquet row {row}: 'image' should be bytes or {{bytes, path}}, got {type(cell)}")


def image_from_row(table, row: int) -> Image.Image:
    """The decoded image of a row (the caller applies EXIF orientation and RGB)."""
    data, path = image_cell(table, row)
    if data is None and not path:
        raise FileNotFoundError(f"row {row} has an empty 'image' cell")
    with Image.open(io.BytesIO(data) if data is not None else path) as im:
        im.load()
        return im.copy()


def index_parquet(ds: RefCOCO, where: str, min_box_area: float, cache_dir: Any = None) -> None:
    """Fill ``ds.records`` from the table(s) at ``where`` (module docstring for the columns)."""
    import datasets

    table, label = open_table(where, ds.split, None if cache_dir is None else str(cache_dir))
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise DatasetError(
            f"{label}: no column {missing} (has {table.column_names}); a RefCOCO table needs {list(REQUIRED)} "
            f"and may have {list(OPTIONAL)} (see mmel/data/refcoco_parquet.py)"
        )
    has_image = "image" in table.column_names
    if has_image and isinstance(table.features["image"], datasets.Image):
        table = table.cast_column("image", datasets.Image(decode=False))  # bytes now, decoded per item
    cols = table.remove_columns(["image"]).to_dict() if has_image else table.to_dict()
    n = len(table)
    for i in range(n):
        if "split" in cols and cols["split"][i] != ds.split:
            continue
        ref_id = cols["ref_id"][i] if "ref_id" in cols else i
        where_row = f"{label}: row {i} (ref_id={ref_id})"
        name = image_file_name(str(cols["file_name"][i]))
        file = f"{label}::{name}" if has_image else str(ds.image_dir / name)
        if "width" in cols and "height" in cols:
            size = (int(cols["height"][i]), int(cols["width"][i]))
        else:
            try:
                size = _header_size(*(image_cell(table, i) if has_image else (None, file)))
            except FileNotFoundError:
                ds.skipped["missing_image"] += 1
                continue
            except (OSError, ValueError) as e:
                raise DatasetError(f"{where_row}: cannot read the image header ({e}); give width/height") from e
        if "category" in cols:
            cat = str(cols["category"][i])
        else:
            cat = str(cols["category_id"][i]) if "category_id" in cols else ""
        box = xywh_to_xyxy(cols["bbox"][i], where_row)
        made = ds.add_ref(int(ref_id), cols["ann_id"][i] if "ann_id" in cols else None, cols["image_id"][i], file,
                          size, box, sentence_texts(cols["sentences"][i], where_row), cat, min_box_area)  # fmt: skip
        if has_image:
            ds._image_rows.update({r.sample_id: i for r in made})
    if has_image:
        ds._table = table.select_columns(["image"])
