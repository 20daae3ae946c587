"""OpenImages V7 point labels (``data=openimages_points``): one sample per (image, class with labelled points).

OpenImages V7 (storage.googleapis.com/openimages/web/download_v7.html) labels points of an image as showing a class
(``yes``), not showing it (``no``) or ``unsure``. Layout::

    <root>/oidv7-val-annotations-point-labels.csv   columns ImageId, X, Y, Label, EstimatedYesNo (others ignored);
                                                    X, Y normalised to [0, 1] of the image's width / height
    <root>/oidv7-class-descriptions.csv             columns LabelName (the MID, /m/...), DisplayName
    <root>/validation/<ImageId>.jpg

A sample is an (image, Label) with at least one ``yes`` or ``no`` point; its prompt is the template filled with the
class's display name, its item adds ``points`` (float32 [P, 3]: x, y in pixels of the original image, label 1 yes /
0 no). ``unsure`` points are dropped (``point_unsure``). OpenImages points have no boxes: the item's box is its
whole image (``metrics=openimages_points`` scores the points only).

Bad input: a CSV without the expected columns is an error naming the file and the missing columns; a row with a
non-numeric X / Y, an unknown EstimatedYesNo, or a MID absent from the class file is an error naming file, line and
field; a point outside [0, 1] (``point_outside``) and an image file that is missing or unreadable are counted and
left out.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from mmel.data.base import BoxDataset, DatasetError, Record
from mmel.data.imagenet import DEFAULT_TEMPLATE, image_size

POINTS_FILE = "oidv7-{split}-annotations-point-labels.csv"
CLASSES_FILE = "oidv7-class-descriptions.csv"
POINT_COLUMNS = ("ImageId", "X", "Y", "Label", "EstimatedYesNo")
YES_NO = {"yes": 1, "no": 0, "unsure": None}


def read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV with a header holding ``columns`` (clear errors naming the file)."""
    if not path.is_file():
        raise FileNotFoundError(f"OpenImages file not found: {path} (see data/README.md)")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing} (header: {header}; expected {list(columns)})")
        return [(n, row) for n, row in enumerate(reader, 2)]


class OpenImagesPoints(BoxDataset):
    """OpenImages V7 point labels (see the module docstring).

    Args:
        root: folder with the two CSVs and ``<split>/`` images.
        split: ``validation`` (the CSV is ``oidv7-val-...``) or ``test`` / ``train``.
        points_file, classes_file, image_dir: override the default paths.
        prompt_template: filled with the display name.
        subset, seed: a seeded subset of samples.
    """

    name = "openimages_points"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "validation",
        *,
        points_file: str | os.PathLike | None = None,
        classes_file: str | os.PathLike | None = None,
        image_dir: str | os.PathLike | None = None,
        prompt_template: str = DEFAULT_TEMPLATE,
        subset: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(root, split, image_dir=image_dir, default_image_dir=split, prompt_template=prompt_template)
        short = {"validation": "val"}.get(split, split)
        self.points_file = Path(points_file) if points_file else self.root / POINTS_FILE.format(split=short)
        self.classes_file = Path(classes_file) if classes_file else self.root / CLASSES_FILE
        names = {r["LabelName"]: r["DisplayName"] for _, r in read_csv(self.classes_file, ("LabelName", "DisplayName"))}
        self.classes = sorted(set(names.values()))
        by_sample: dict[tuple[str, str], list[tuple[float, float, int]]] = defaultdict(list)
        for n, row in read_csv(self.points_file, POINT_COLUMNS):
            where = f"{self.points_file}: line {n}"
            try:
                x, y = float(row["X"]), float(row["Y"])
            except (TypeError, ValueError):
                got = f"{row['X']!r}, {row['Y']!r}"
                raise DatasetError(f"{where}: X / Y should be numbers in [0, 1], got {got}") from None
            answer = (row["EstimatedYesNo"] or "").strip().lower()
            if answer not in YES_NO:
                got = row["EstimatedYesNo"]
                raise DatasetError(f"{where}: EstimatedYesNo should be yes / no / unsure, got {got!r}")
            if row["Label"] not in names:
                raise DatasetError(f"{where}: Label {row['Label']!r} is not in {self.classes_file}")
            if YES_NO[answer] is None:
                self.skipped["point_unsure"] += 1
                continue
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                self.skipped["point_outside"] += 1
                continue
            by_sample[(row["ImageId"], row["Label"])].append((x, y, YES_NO[answer]))
        sizes: dict[str, tuple[int, int] | None] = {}
        for (iid, mid), pts in sorted(by_sample.items()):
            file = self.image_dir / f"{iid}.jpg"
            if iid not in sizes:
                sizes[iid] = image_size(str(file))
                if sizes[iid] is None:
                    self._count_bad_file("missing_image" if not file.is_file() else "corrupt_image", str(file))
            if sizes[iid] is None:
                continue
            h, w = sizes[iid]
            p = np.asarray(pts, dtype=np.float32) * np.array([w, h, 1], dtype=np.float32)
            self.stats["points_yes"] += int((p[:, 2] == 1).sum())
            self.stats["points_no"] += int((p[:, 2] == 0).sum())
            self.records.append(
                Record(
                    sample_id=f"{iid}:{mid}",
                    image_id=iid,
                    file=str(file),
                    size=(h, w),
                    prompt=self.prompt_template.format(names[mid]),
                    boxes=np.array([[0, 0, w, h]], dtype=np.float32),
                    category=names[mid],
                    extra={"points": p, "mid": mid},
                )
            )
        self.subsample(subset, seed)
