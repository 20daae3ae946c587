"""Folder mode's inputs: the files of ``images=`` (a folder, a .txt list, a Hugging Face imagefolder), their prompts
(shared, or per image from a JSON-lines file) and the decoding of one file into an image or a reason to skip it.

A file's *key* names it in the results table and in ``prompts_file``: its path relative to the folder (folders,
imagefolder) or its line in the list. Decoding is mmel's (:func:`mmel.data.base.load_image`: EXIF orientation,
any PIL mode -> 8-bit RGB), so an image gets the same pixels here as in the one-image path and the datasets.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

from mmel.data.base import DECODE_ERRORS, load_image
from mmel.explainers.base import check_prompts

log = logging.getLogger(__name__)
IMAGEFOLDER = "imagefolder:"


@dataclass(frozen=True)
class Entry:
    """One file to explain: ``key`` names it in the table and in prompts_file; ``path`` is where it is read from,
    unless ``data`` holds its bytes (an imagefolder row stored in the dataset)."""

    key: str
    path: str
    data: bytes | None = None


# ------------------------------------------------------------------------------------------------ inputs
def list_images(spec: str, exclude: Path | None = None, cache_dir: str | None = None) -> list[Entry]:
    """The files of ``images=``: a folder (every file below it, sorted, hidden ones and ``exclude`` left out), a
    ``.txt`` list (one path a line, ``#`` comments; relative paths against the list's folder) or ``imagefolder:DIR``
    (loaded with ``datasets.load_dataset("imagefolder", data_dir=DIR)``)."""
    if spec.startswith(IMAGEFOLDER):
        return _imagefolder(Path(spec[len(IMAGEFOLDER) :]).expanduser(), cache_dir)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"images: {path} not found (expected a folder, a .txt list or imagefolder:DIR)")
    if path.is_file() and path.suffix.lower() != ".txt":
        raise ValueError(f"images: {path} is a file, not a folder or a .txt list; for one image use image={path}")
    if path.is_file():
        entries, seen = [], set()
        for line in path.read_text(encoding="utf-8").splitlines():
            key = PurePosixPath(line.strip()).as_posix() if line.strip() else ""  # "./a.png" is "a.png"
            if key and not key.startswith("#") and key not in seen:
                seen.add(key)
                p = Path(key).expanduser()
                entries.append(Entry(key, str(p if p.is_absolute() else path.parent / p)))
        if not entries:
            raise ValueError(f"images: the list {path} names no image (one path a line expected)")
        return entries
    skip = exclude.resolve() if exclude is not None else None
    files = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue  # .DS_Store, .git/, .ipynb_checkpoints/: not the researcher's images
        if skip is not None and (p.resolve() == skip or skip in p.resolve().parents):
            continue  # this run's own output dir inside the folder: never explain our overlays
        files.append(Entry(rel.as_posix(), str(p)))
    if not files:
        raise ValueError(f"images: the folder {path} holds no files")
    return files


def _imagefolder(root: Path, cache_dir: str | None) -> list[Entry]:
    if not root.is_dir():
        raise FileNotFoundError(f"images: imagefolder:{root}: no such folder")
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir)
    entries = []
    for split in ds:  # every split (train/, test/ subfolders) in order; decode=False: mmel decodes, not datasets
        for row in ds[split].cast_column("image", datasets.Image(decode=False))["image"]:
            p = row.get("path") or ""
            key = Path(p).resolve().relative_to(root.resolve()).as_posix() if p else f"{split}/{len(entries)}"
            entries.append(Entry(key, p, row.get("bytes")))
    if not entries:
        raise ValueError(f"images: imagefolder:{root} holds no images")
    return entries


def read_prompts_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{"image": key, "prompts": [...]}`` per line -> {key: prompts}; errors name the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompts_file: {path} not found (JSON lines {{'image': ..., 'prompts': [...]}})")
    out: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"prompts_file {path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or "image" not in row or "prompts" not in row:
            raise ValueError(f'{where}: expected {{"image": "rel/path.png", "prompts": [...]}}, got {line[:80]!r}')
        try:
            out[PurePosixPath(str(row["image"])).as_posix()] = check_prompts(row["prompts"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return out


def prompts_of(entries: list[Entry], shared: list[str] | None, per_image: dict[str, list[str]]) -> dict[str, Any]:
    """Each entry's prompt list (per_image first, else ``shared``; None: no prompts for it)."""
    keys = {e.key for e in entries}
    unknown = sorted(set(per_image) - keys)
    if unknown:
        log.warning("prompts_file: %d line(s) name no listed image, e.g. %s", len(unknown), unknown[:3])
    return {e.key: per_image.get(e.key, shared) for e in entries}


def decode(entry: Entry) -> tuple[Image.Image | None, str, str]:
    """(image, "", "") or (None, reason, message): mmel's decoding (EXIF orientation, any mode -> RGB)."""
    try:
        return load_image(io.BytesIO(entry.data) if entry.data is not None else entry.path), "", ""
    except FileNotFoundError as e:
        return None, "missing", str(e)
    except (PermissionError, IsADirectoryError) as e:
        return None, "unreadable", str(e)
    except UnidentifiedImageError as e:  # empty files, text named .jpg
        return None, "not_an_image", str(e)
    except DECODE_ERRORS as e:  # truncated or corrupt data
        return None, "corrupt_image", f"{type(e).__name__}: {e}"
