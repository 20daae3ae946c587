"""ImageNet-1k validation as a labelled folder (``data=imagenet``): one sample per image, its class as the prompt.

Layout (the usual ``ImageFolder`` arrangement of ILSVRC2012 val, e.g. after ``valprep.sh``)::

    <root>/val/<wnid>/<file>.JPEG          one folder per class (wnid: WordNet id, n01440764 ...)
    <root>/LOC_synset_mapping.txt          "<wnid> <name>[, <other names>]" per line, in class-index order

The label set is every wnid of the synset file, in its order (ImageNet's class index = sorted wnid). Class names:
``names="openai"`` takes CLIP's curated 1000 names (``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``, what
CLIP's and Grad-ECLIP's zero-shot evaluations use; needs a 1000-line synset file), ``names="synsets"`` the first
name of each synset line. A folder whose wnid is not in the synset file is an error naming it; an empty class
folder is counted (``class_no_images``).

Items add ``label`` (class index into ``dataset.classes``) and ``wnid``. ImageNet has no boxes: an item's box is
its whole image (the transform's crop bookkeeping needs one; the box metrics mean nothing here, and
``metrics=imagenet`` turns them off).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from mmel.data.base import DECODE_ERRORS, BoxDataset, DatasetError, Record

DEFAULT_TEMPLATE = "a photo of a {}."
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def read_synsets(path: Path) -> list[tuple[str, str]]:
    """(wnid, first name) per line of a ``LOC_synset_mapping.txt``-style file ("<wnid> <name>, <name> ...")."""
    if not path.is_file():
        raise FileNotFoundError(f"synset file not found: {path} (one '<wnid> <name>' line per class; see "
                                "data/README.md)")  # fmt: skip
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise DatasetError(f"{path}: line {n} should be '<wnid> <name>', got {line!r}")
        out.append((parts[0], parts[1].split(",")[0].strip()))
    if not out:
        raise DatasetError(f"{path}: no synset lines")
    if len({w for w, _ in out}) != len(out):
        raise DatasetError(f"{path}: a wnid is listed twice")
    return out


def class_names(synsets: list[tuple[str, str]], names: str, path: Path) -> list[str]:
    """The label set's names: ``"synsets"`` (the file's) or ``"openai"`` (CLIP's curated ImageNet-1k names)."""
    if names == "synsets":
        return [n for _, n in synsets]
    if names == "openai":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        if len(synsets) != len(IMAGENET_CLASSNAMES):
            raise DatasetError(f"{path}: names='openai' needs the {len(IMAGENET_CLASSNAMES)} ImageNet-1k synsets, "
                               f"the file lists {len(synsets)} (use names=synsets)")  # fmt: skip
        return list(IMAGENET_CLASSNAMES)
    raise ValueError(f"names must be 'openai' or 'synsets', got {names!r}")


def image_size(path: str) -> tuple[int, int] | None:
    """(H, W) from the file's header (no decoding), EXIF rotation applied; None when unreadable."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees when displayed
                w, h = h, w
            return h, w
    except (FileNotFoundError, *DECODE_ERRORS):
        return None


class ImageNetVal(BoxDataset):
    """ImageNet val in class folders: one sample per image (see the module docstring).

    Args:
        root: folder holding ``<split>/`` and the synset file.
        split: the image folder (``val``).
        synsets: the synset file (default ``<root>/LOC_synset_mapping.txt``).
        names: ``"openai"`` or ``"synsets"`` (class names, see the module docstring).
        prompt_template: filled with the class name.
        subset, seed: a seeded subset of samples (quick runs); None = all.
    """

    name = "imagenet"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        *,
        synsets: str | os.PathLike | None = None,
        names: str = "openai",
        prompt_template: str = DEFAULT_TEMPLATE,
        subset: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(root, split, default_image_dir=split, prompt_template=prompt_template)
        self.synset_file = Path(synsets).expanduser() if synsets else self.root / "LOC_synset_mapping.txt"
        syn = read_synsets(self.synset_file)
        self.wnids = [w for w, _ in syn]
        self.classes = class_names(syn, names, self.synset_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"imagenet: image folder not found: {self.image_dir} (split={split!r}; expected "
                                    "<root>/<split>/<wnid>/*.JPEG, see data/README.md)")  # fmt: skip
        index = {w: i for i, w in enumerate(self.wnids)}
        folders = sorted(p for p in self.image_dir.iterdir() if p.is_dir())
        unknown = [p.name for p in folders if p.name not in index]
        if unknown:
            raise DatasetError(f"imagenet: class folder(s) {unknown[:5]} of {self.image_dir} are not in the synset "
                               f"file {self.synset_file}")  # fmt: skip
        for folder in folders:
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                self.skipped["class_no_images"] += 1
            label = index[folder.name]
            for f in files:
                size = image_size(str(f))  # the header only: the record needs the size
                if size is None:
                    self._count_bad_file("corrupt_image", str(f))
                    continue
                self.records.append(self._record(f, size, label))
        self.stats["classes"] = len(self.classes)
        self.subsample(subset, seed)

    def _record(self, f: Path, size: tuple[int, int], label: int) -> Record:
        h, w = size
        return Record(
            sample_id=f"{self.wnids[label]}/{f.stem}",
            image_id=f"{self.wnids[label]}/{f.stem}",
            file=str(f),
            size=size,
            prompt=self.prompt_template.format(self.classes[label]),
            boxes=np.array([[0, 0, w, h]], dtype=np.float32),
            category=self.classes[label],
            extra={"label": label, "wnid": self.wnids[label]},
        )
