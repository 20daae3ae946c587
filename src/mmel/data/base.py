"""What every box dataset shares: reading images safely, sanitising boxes, and the skip-and-count policy.

Policy for bad input (both loaders follow it):
  * the dataset is unusable (missing/empty/malformed annotation file, missing split file, an annotation naming an
    unknown category or image) -> :class:`DatasetError` (or ``FileNotFoundError``) naming the file and the field;
  * one item is bad (missing or corrupt image, degenerate box, image size disagreeing with its annotation) -> the
    item or box is skipped and counted in ``dataset.skipped`` (a ``Counter``), and a summary is logged.

Image decoding happens on access (in DataLoader workers), so a corrupt image is only found there. ``dataset[i]``
gives ``None`` and counts the file in ``dataset.skipped``; ``dataset.load(i)`` gives a :class:`Dropped` marker
instead, which the data modules' loaders carry to :func:`mmel.data.transforms.collate_boxes` so that the counts
reach the main process whatever the number of workers. :meth:`BoxDataset.verify` decodes every image up front.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# What PIL raises on unreadable / truncated / hostile image files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """The dataset on disk cannot be used as it is (the message names the file and the field)."""


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON annotation file with errors that name it (missing / empty / malformed)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (see data/README.md for the expected layout)")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DatasetError(f"{what} {path} is empty (expected a JSON object)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    16-bit greyscale (``I;16*``) is scaled by 1/257 rather than clipped (``convert`` would saturate it to white);
    32-bit ``I`` is treated as 16-bit when it exceeds 255 (how PIL opens some 16-bit PNGs); float ``F`` as [0, 1]
    when its maximum is <= 1. Transparent images are composited over white, so transparent areas do not show
    whatever colour happens to be stored under alpha 0.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif img.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image as displayed: EXIF orientation applied (annotations refer to it), 8-bit RGB.

    Raises ``FileNotFoundError`` when missing and ``OSError`` / ``ValueError`` (PIL's) when corrupt or truncated.
    """
    with Image.open(path) as img:
        img.load()  # decode now: a truncated file fails here, inside the caller's try
        return as_displayed(img)


def as_displayed(img: Image.Image) -> Image.Image:
    """A decoded PIL image as it is displayed (and annotated): EXIF orientation applied, 8-bit RGB."""
    return to_rgb(ImageOps.exif_transpose(img))


def clean_boxes(boxes: np.ndarray, size: tuple[int, int], counts: Counter, min_area: float = 0.0) -> np.ndarray:
    """Clip xyxy boxes [M, 4] to an image of ``size`` (H, W); drop degenerate ones. Returns [M', 4] float32.

    Counted in ``counts``: ``box_clipped`` (partly outside, kept clipped), ``box_degenerate`` (non-finite, zero or
    negative width/height, or nothing left inside the image), ``box_small`` (area below ``min_area`` pixels²).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    h, w = size
    finite = np.isfinite(boxes).all(axis=1)
    clipped = boxes.copy()
    clipped[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
    clipped[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
    bw = clipped[:, 2] - clipped[:, 0]
    bh = clipped[:, 3] - clipped[:, 1]
    ok = finite & (bw > 0) & (bh > 0)
    small = ok & (bw * bh < min_area)
    changed = ok & ~small & (np.abs(clipped - boxes) > 1e-6).any(axis=1)
    n = {"box_degenerate": int((~ok).sum()), "box_small": int(small.sum()), "box_clipped": int(changed.sum())}
    counts.update({k: v for k, v in n.items() if v})  # no zero entries: an empty Counter means "nothing happened"
    return clipped[ok & ~small].astype(np.float32)


@dataclass(frozen=True)
class Dropped:
    """Why an item could not be produced (travels from DataLoader workers to the collate, which counts it)."""

    reason: str
    sample_id: str
    file: str


@dataclass
class Record:
    """One sample before its image is read: everything but the pixels."""

    sample_id: str
    image_id: int | str
    file: str
    size: tuple[int, int]  # (H, W) as annotated, i.e. of the displayed (EXIF-applied) image
    prompt: str
    boxes: np.ndarray  # [M, 4] xyxy, original pixels, already clipped and filtered
    category: str
    extra: dict[str, Any] = field(default_factory=dict)


def check_template(template: str) -> str:
    """A prompt template must have exactly one ``{}`` slot."""
    if template.count("{}") != 1:
        raise ValueError(f"prompt_template must contain exactly one '{{}}', got {template!r}")
    return template


class BoxDataset(torch.utils.data.Dataset):
    """A list of :class:`Record` s whose images are decoded on access.

    Items are dicts: ``sample_id`` (str), ``image_id``, ``image`` (PIL RGB), ``prompt`` (str), ``boxes``
    (FloatTensor [M, 4] xyxy, pixels of the original image), ``category`` (str), ``file`` (str), ``size`` ((H, W)),
    plus loader-specific extras. A bad image gives ``None`` (counted in ``skipped``).

    Subclasses index their annotations into ``records`` in ``__init__`` and then call :meth:`finish_index`.
    """

    name = "boxes"

    def __init__(
        self,
        root: str | os.PathLike = ".",
        split: str = "",
        *,
        image_dir: str | os.PathLike | None = None,
        default_image_dir: str = "",
        prompt_template: str = "{}",
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.name = f"{type(self).name}/{split}"
        self.image_dir = Path(image_dir).expanduser() if image_dir else self.root / default_image_dir
        self.prompt_template = check_template(prompt_template)
        self.records: list[Record] = []
        self.skipped: Counter = Counter()
        self.stats: Counter = Counter()  # informational counts (images, samples, ...)
        self._bad_files: set[str] = set()
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def sample_ids(self) -> list[str]:
        """Stable id of each sample, in order (feature-cache keys); reading them decodes no image."""
        return [r.sample_id for r in self.records]

    def load(self, index: int) -> dict[str, Any] | Dropped:
        """The item, or a :class:`Dropped` marker saying why it cannot be made (nothing is counted here)."""
        r = self.records[index]
        try:
            image = load_image(r.file)
        except FileNotFoundError:
            return self._dropped("missing_image", r, "file not found")
        except DECODE_ERRORS as e:
            return self._dropped("corrupt_image", r, f"{type(e).__name__}: {e}")
        if (image.height, image.width) != tuple(r.size):
            why = f"decoded (H, W)={(image.height, image.width)} but annotated {tuple(r.size)}"
            return self._dropped("size_mismatch", r, why)
        return {
            "sample_id": r.sample_id,
            "image_id": r.image_id,
            "image": image,
            "prompt": r.prompt,
            "boxes": torch.from_numpy(r.boxes.copy()),
            "category": r.category,
            "file": r.file,
            "size": tuple(r.size),
            **r.extra,
        }

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.load(index)
        if isinstance(item, Dropped):
            self._count_bad_file(item.reason, item.file)
            return None
        return item

    def _dropped(self, reason: str, r: Record, why: str) -> Dropped:
        if r.file not in self._warned:  # one log line per bad file and process, however many prompts share it
            self._warned.add(r.file)
            log.warning("%s: skipping %s (%s): %s", self.name, r.file, reason, why)
        return Dropped(reason, r.sample_id, r.file)

    def _count_bad_file(self, reason: str, file: str) -> None:
        if file not in self._bad_files:  # counted per file, not per sample
            self._bad_files.add(file)
            self.skipped[reason] += 1

    def content_digest(self) -> str:
        """SHA-256 of what the samples are made of: every record's id, file, size, prompt, category and boxes, and
        each image file's byte size and modification time (``os.stat``; a missing file counts as such).

        Feature caches put it in their key, so editing annotations or replacing images in place rebuilds them. File
        stats rather than image bytes: hashing a COCO-sized image folder would take minutes on every run, while an
        edit that keeps both a file's size and its mtime needs deliberate effort.
        """
        h = hashlib.sha256()
        seen: set[str] = set()
        for r in self.records:
            h.update(json.dumps([r.sample_id, str(r.image_id), r.file, list(r.size), r.prompt, r.category]).encode())
            h.update(np.ascontiguousarray(r.boxes, dtype=np.float64).tobytes())
            if r.file not in seen:
                seen.add(r.file)
                try:
                    st = os.stat(r.file)
                    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
                except OSError:
                    h.update(b"missing")
        return h.hexdigest()

    def groups_by_image(self) -> list[list[int]]:
        """Sample indices grouped by image file, in first-seen order: explain K prompts of one image at once."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(self.records):
            groups.setdefault(r.file, []).append(i)
        return list(groups.values())

    def drop_missing_images(self) -> None:
        """Drop records whose image file does not exist (one ``stat`` per image), counting ``missing_image``."""
        exists: dict[str, bool] = {}
        kept = []
        for r in self.records:
            if r.file not in exists:
                exists[r.file] = os.path.isfile(r.file)
                if not exists[r.file]:
                    self._count_bad_file("missing_image", r.file)
            if exists[r.file]:
                kept.append(r)
        missing = [f for f, ok in exists.items() if not ok]
        if missing:
            log.warning("%s: %d image files missing, e.g. %s", self.name, len(missing), missing[:3])
        self.records = kept

    def verify(self) -> None:
        """Decode every image once (in this process) and drop the records of unreadable ones, counting them."""
        good: dict[str, bool] = {}
        kept = []
        for i, r in enumerate(self.records):
            if r.file not in good:
                good[r.file] = self[i] is not None
            if good[r.file]:
                kept.append(r)
        self.records = kept

    def finish_index(self, check_files: bool, subset: int | None, seed: int) -> None:
        """After indexing: drop samples of missing image files (if asked), then keep the seeded subset."""
        if check_files:
            self.drop_missing_images()
        self.subsample(subset, seed)

    def subsample(self, n: int | None, seed: int) -> None:
        """Keep a seeded random subset of ``n`` samples (in their original order); ``None`` keeps all."""
        if n is None or n >= len(self.records):
            return
        if n < 0:
            raise ValueError(f"subset must be >= 0 or None, got {n}")
        keep = np.sort(np.random.default_rng(seed).choice(len(self.records), size=n, replace=False))
        self.records = [self.records[i] for i in keep]

    def report(self) -> str:
        """One line: images, samples, and every skip reason with its count."""
        n_images = len({r.file for r in self.records})
        parts = [f"{n_images} images", f"{len(self.records)} samples"]
        parts += [f"{k}={v}" for k, v in sorted(self.stats.items())]
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()) if v) or "none"
        return f"{self.name}: " + ", ".join(parts) + f"; skipped/adjusted: {skipped}"
