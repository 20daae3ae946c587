"""The shapes world written in the layouts of ImageNet-S, OpenImages V7 points and an ImageNet val folder.

Made from the world's COCO files (its images and the objects' masks, :mod:`mmel.data.shapes.writer`), one split
at a time, so every loader and protocol of these benchmarks runs offline end to end::

    <out>/{,imagenet_s/,imagenet/}LOC_synset_mapping.txt   "n000000<id> <colour> <shape>" per category (36 lines)
    <out>/imagenet_s/ImageNetS_categories_im36.txt     the 36 wnids
    <out>/imagenet_s/ImageNetS36/validation/<wnid>/<file stem>.JPEG
    <out>/imagenet_s/ImageNetS36/validation-segmentation/<wnid>/<file stem>.png
    <out>/openimages/oidv7-val-annotations-point-labels.csv   oidv7-class-descriptions.csv   validation/<id>.jpg
    <out>/imagenet/val/<wnid>/<file stem>.JPEG
    <out>/BENCHMARKS.json                              what was written from which world, and the counts

* ImageNet-S: each image sits in the folder of its largest object's category; its png encodes every object's
  category id (``R + G * 256``, ids = 1 + the sorted wnid's position, i.e. the COCO category id), 0 elsewhere,
  and 1000 ("ignore") on the objects' one-pixel rims, so the ignore rule is exercised.
* OpenImages: per object, ``POINTS_YES`` points inside its mask (``yes``) and ``POINTS_NO`` outside it (``no``),
  plus one ``unsure`` point; X, Y normalised to the image. MIDs are ``/m/shapes<id>``.
* ImageNet: each image in the folder of its largest object's category; the label set is the 36 categories.

Images are the world's JPEG bytes, copied. Deterministic: the points draw from a generator seeded with the
world's seed and the image id. Rewritten when ``BENCHMARKS.json`` does not match the world's MANIFEST.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from mmel.data.imagenet_s import IGNORE, encode_mask

POINTS_YES = 3
POINTS_NO = 3
VARIANT = 36
FORMAT = 1


def wnid(category_id: int) -> str:
    return f"n{category_id:08d}"


def _rim(m: np.ndarray) -> np.ndarray:
    """The mask's pixels that touch a pixel outside it (4-neighbourhood)."""
    p = np.pad(m, 1, constant_values=False)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def _stamp(world: Path, split: str) -> dict:
    manifest = (world / "MANIFEST.json").read_bytes() if (world / "MANIFEST.json").is_file() else b""
    return {"format": FORMAT, "split": split, "world_manifest_sha256": hashlib.sha256(manifest).hexdigest()}


def write_benchmarks(world: str | Path, out: str | Path | None = None, split: str = "test") -> Path:
    """Write the three layouts of ``world``'s ``split`` under ``out`` (default ``<world>/benchmarks``); returns
    ``out``. Returns at once when ``out/BENCHMARKS.json`` matches the world."""
    world = Path(world)
    out = Path(out) if out is not None else world / "benchmarks"
    stamp = _stamp(world, split)
    done = out / "BENCHMARKS.json"
    if done.is_file() and json.loads(done.read_text()).get("stamp") == stamp:
        return out
    inst_path = world / "coco" / "annotations" / f"instances_{split}.json"
    if not inst_path.is_file():
        raise FileNotFoundError(f"shapes benchmarks: {inst_path} not found (generate the world first)")
    data = json.loads(inst_path.read_text())
    for sub in ("imagenet_s", "openimages", "imagenet"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)  # ours (BENCHMARKS.json stale): rewritten whole
    out.mkdir(parents=True, exist_ok=True)
    cats = {c["id"]: c["name"] for c in data["categories"]}
    synsets = "".join(f"{wnid(i)} {n}\n" for i, n in sorted(cats.items()))
    for d in (out, out / "imagenet_s", out / "imagenet"):  # beside each layout, as a real download keeps it
        d.mkdir(parents=True, exist_ok=True)
        (d / "LOC_synset_mapping.txt").write_text(synsets)
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    seg = out / "imagenet_s" / f"ImageNetS{VARIANT}"
    seg.mkdir(parents=True, exist_ok=True)
    (seg.parent / f"ImageNetS_categories_im{VARIANT}.txt").write_text("".join(f"{wnid(i)}\n" for i in sorted(cats)))
    oi = out / "openimages"
    (oi / "validation").mkdir(parents=True)
    rows: list[list] = []
    counts = {"images": 0, "imagenet_s_samples": 0, "points_yes": 0, "points_no": 0, "points_unsure": 0}
    for im in data["images"]:
        anns = by_image.get(im["id"], [])
        if not anns:
            continue
        h, w = im["height"], im["width"]
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
        largest = max(range(len(anns)), key=lambda k: int(masks[k].sum()))
        folder, stem = wnid(anns[largest]["category_id"]), Path(im["file_name"]).stem
        jpeg = (world / "coco" / split / im["file_name"]).read_bytes()
        ids = np.zeros((h, w), dtype=np.int64)
        for a, m in zip(anns, masks, strict=True):
            ids[m] = a["category_id"]
        for m in masks:
            ids[_rim(m)] = IGNORE
        folders = (seg / "validation", seg / "validation-segmentation", out / "imagenet" / "val")
        for d in folders:
            (d / folder).mkdir(parents=True, exist_ok=True)
        (seg / "validation" / folder / f"{stem}.JPEG").write_bytes(jpeg)
        (out / "imagenet" / "val" / folder / f"{stem}.JPEG").write_bytes(jpeg)
        buf = io.BytesIO()
        encode_mask(ids).save(buf, format="PNG")
        (seg / "validation-segmentation" / folder / f"{stem}.png").write_bytes(buf.getvalue())
        counts["images"] += 1
        counts["imagenet_s_samples"] += len({a["category_id"] for a in anns})
        # points: seeded by the image id, pixel centres of the chosen pixels, normalised
        (oi / "validation" / f"{stem}.jpg").write_bytes(jpeg)
        rng = np.random.default_rng([int(data.get("info", {}).get("seed", 0)), int(im["id"])])
        for a, m in zip(anns, masks, strict=True):
            mid = f"/m/shapes{a['category_id']:02d}"
            for label, pool, n in (("yes", m & ~_rim(m), POINTS_YES), ("no", ~m, POINTS_NO), ("unsure", ~m, 1)):
                ys, xs = np.nonzero(pool)
                if not len(ys):
                    continue
                for k in rng.choice(len(ys), size=min(n, len(ys)), replace=False):
                    x, y = (xs[k] + 0.5) / w, (ys[k] + 0.5) / h  # the pixel's centre, normalised
                    rows.append([stem, "mmel-shapes", f"{x:.6f}", f"{y:.6f}", mid, label])
                    counts[f"points_{label}"] += 1
    with (oi / "oidv7-val-annotations-point-labels.csv").open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["ImageId", "Source", "X", "Y", "Label", "EstimatedYesNo"])
        wr.writerows(rows)
    with (oi / "oidv7-class-descriptions.csv").open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["LabelName", "DisplayName"])
        wr.writerows([f"/m/shapes{i:02d}", n] for i, n in sorted(cats.items()))
    done.write_text(json.dumps({"stamp": stamp, "counts": counts}, indent=1) + "\n")
    return out
