"""ImageNet-S validation masks (``data=imagenet_s``): one sample per (image, class in its mask), with the mask.

ImageNet-S (Gao et al., TPAMI 2022; github.com/LUSSeg/ImageNet-S) annotates ImageNet images with semantic masks in
three variants of 50, 300 and 919 classes. Layout (what the repository's ``datapreparation`` scripts make)::

    <root>/ImageNetS<V>/validation/<wnid>/<name>.JPEG
    <root>/ImageNetS<V>/validation-segmentation/<wnid>/<name>.png
    <root>/LOC_synset_mapping.txt            "<wnid> <name>, ..." per line (class names, see mmel.data.imagenet)
    <root>/ImageNetS_categories_im<V>.txt    optional: the variant's wnids (the repository's data/categories/)

**Mask encoding** (the repository's README, "How to get the class id from the segmentation mask images?"): an
RGB png whose class id per pixel is ``R + G * 256``; 0 is "other category" (background), 1000 is the ignored
part; class id ``k >= 1`` is the ``k``-th wnid of the variant's categories **sorted** (their
``ImageNetS_categories_im<V>.txt`` sorted; here: the sorted class folders of ``validation-segmentation``).

A sample is an (image, class id present in its mask); its item adds ``mask`` (int8 [H, W]: 1 = that class, 0 =
background or another class, -1 = ignored), ``class_id``, ``wnid``; its box is the class's pixels' bounding box.
Bad input: a missing variant folder or synset entry is an error naming it; per image (counted in ``skipped``, the
item left out) a missing or unreadable png (``mask_missing`` / ``mask_corrupt``), a mask whose size differs from
its image (``mask_size_mismatch``), a class id above the variant's (``mask_unknown_class``), or a mask with no
class pixel (``mask_empty``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmel.data.base import DECODE_ERRORS, BoxDataset, DatasetError, Dropped, Record
from mmel.data.imagenet import DEFAULT_TEMPLATE, IMAGE_EXTENSIONS, image_size, read_synsets

VARIANTS = (50, 300, 919)
IGNORE = 1000  # ImageNet-S's "ignored part"
OTHER = 0  # "other category": background


def decode_mask(path: str | os.PathLike) -> np.ndarray:
    """Class ids [H, W] int32 of an ImageNet-S png (``R + G * 256``)."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.int32)
    return a[:, :, 0] + a[:, :, 1] * 256


def encode_mask(ids: np.ndarray) -> Image.Image:
    """The png of class ids [H, W] (``R = id % 256, G = id // 256, B = 0``): the inverse of :func:`decode_mask`."""
    ids = np.asarray(ids, dtype=np.int64)
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


class ImageNetS(BoxDataset):
    """ImageNet-S validation (see the module docstring).

    Args:
        root: folder holding ``ImageNetS<variant>/`` and the synset file.
        split: ``validation`` (the masks' folder is ``<split>-segmentation``).
        variant: 50, 300 or 919 (any V whose ``ImageNetS<V>`` folder exists, e.g. the shapes world's).
        synsets: the synset file (default ``<root>/LOC_synset_mapping.txt``); names are its first names.
        prompt_template: filled with the class name.
        subset, seed: a seeded subset of samples.
    """

    name = "imagenet_s"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "validation",
        *,
        variant: int = 50,
        synsets: str | os.PathLike | None = None,
        prompt_template: str = DEFAULT_TEMPLATE,
        subset: int | None = None,
        seed: int = 0,
    ) -> None:
        base = Path(root).expanduser() / f"ImageNetS{variant}"
        if not base.is_dir():
            found = sorted(p.name for p in Path(root).expanduser().glob("ImageNetS*"))
            raise FileNotFoundError(f"imagenet_s: variant {variant!r} not found: {base} (known variants {VARIANTS}; "
                                    f"found {found or 'none'}; see data/README.md)")  # fmt: skip
        super().__init__(base, split, default_image_dir=split, prompt_template=prompt_template)
        self.variant = int(variant)
        self.mask_dir = base / f"{split}-segmentation"
        for d, what in ((self.image_dir, "image"), (self.mask_dir, "mask")):
            if not d.is_dir():
                raise FileNotFoundError(f"imagenet_s: {what} folder not found: {d} (split={split!r})")
        self.synset_file = Path(synsets).expanduser() if synsets else Path(root).expanduser() / "LOC_synset_mapping.txt"
        names = dict(read_synsets(self.synset_file))
        # class id k = wnids[k - 1]: the variant's categories sorted (the repository's categories file when it is
        # there, else the class folders of the masks, which on the real data are the same list)
        cat_file = Path(root).expanduser() / f"ImageNetS_categories_im{variant}.txt"
        if cat_file.is_file():
            self.wnids = sorted(line.strip() for line in cat_file.read_text().splitlines() if line.strip())
        else:
            self.wnids = sorted(p.name for p in self.mask_dir.iterdir() if p.is_dir())
        missing = [w for w in self.wnids if w not in names]
        if missing:
            raise DatasetError(f"imagenet_s: wnid(s) {missing[:5]} of {self.mask_dir} are not in {self.synset_file}")
        self.classes = [names[w] for w in self.wnids]
        self._index()
        self.subsample(subset, seed)

    def _index(self) -> None:
        for wnid in sorted(p.name for p in self.image_dir.iterdir() if p.is_dir()):
            for f in sorted((self.image_dir / wnid).glob("*")):
                if f.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                mask_file = self.mask_dir / wnid / f"{f.stem}.png"
                ids = self._mask_ids(mask_file, str(f))
                if ids is None:
                    continue
                present = sorted(int(k) for k in np.unique(ids) if k not in (OTHER, IGNORE))
                if not present:
                    self.skipped["mask_empty"] += 1
                    continue
                self.stats["images_annotated"] += 1
                for k in present:
                    ys, xs = np.nonzero(ids == k)
                    box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float32)
                    name = self.classes[k - 1]
                    self.records.append(
                        Record(
                            sample_id=f"{wnid}/{f.stem}:{k}",
                            image_id=f"{wnid}/{f.stem}",
                            file=str(f),
                            size=ids.shape,
                            prompt=self.prompt_template.format(name),
                            boxes=box,
                            category=name,
                            extra={"class_id": k, "wnid": self.wnids[k - 1], "label": k - 1,
                                   "mask_file": str(mask_file)},
                        )
                    )  # fmt: skip

    def _mask_ids(self, mask_file: Path, image_file: str) -> np.ndarray | None:
        """The mask's class ids, or None (counted) when it cannot serve its image."""
        if not mask_file.is_file():
            self.skipped["mask_missing"] += 1
            return None
        try:
            ids = decode_mask(mask_file)
        except DECODE_ERRORS:
            self.skipped["mask_corrupt"] += 1
            return None
        size = image_size(image_file)
        if size is None:
            self._count_bad_file("corrupt_image", image_file)
            return None
        if tuple(ids.shape) != tuple(size):
            self.skipped["mask_size_mismatch"] += 1
            return None
        bad = (ids > len(self.wnids)) & (ids != IGNORE)
        if bad.any():
            self.skipped["mask_unknown_class"] += 1
            return None
        return ids

    def load(self, index: int) -> dict[str, Any] | Dropped:
        item = super().load(index)
        if isinstance(item, Dropped):
            return item
        try:
            ids = decode_mask(item["mask_file"])
        except (FileNotFoundError, *DECODE_ERRORS) as e:
            return self._dropped("mask_corrupt", self.records[index], f"{item['mask_file']}: {e}")
        mask = (ids == item["class_id"]).astype(np.int8)
        mask[ids == IGNORE] = -1
        item["mask"] = mask
        return item
