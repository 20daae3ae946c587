"""The relational shapes world on disk: the refer layout (RefCOCOg's, umd splits) with COCO-format instances,
relation annotations on every ref, and the counterfactual images the "model knows" test scores.

``generate_relations(root, seed=1)`` writes (same parameters ⇒ the same bytes; a second call finds the MANIFEST and
returns; only a missing, empty or own folder is written into — :func:`mmel.data.shapes.writer.install_world`)::

    <root>/images/mscoco/images/train2014/COCO_train2014_<12-digit id>.jpg   every split's scenes (64 px)
    <root>/counterfactual/<12-digit id>_<k>.jpg     val / test: the scene without referral k's look-alike
    <root>/refcocog/refs(umd).p                     one ref per referral (two per scene), splits train / val / test
    <root>/refcocog/instances.json                  COCO: every object (referents, look-alikes, anchors, clutter) and,
                                                    for a row, one group annotation (its union box, ``group_of``)
    <root>/MANIFEST.json

Each ref is a RefCOCO ref (``ref_id, ann_id, image_id, split, sentences, file_name, category_id``: what
:class:`mmel.data.RefCOCO` reads, so every RefCOCO program runs on it) plus the relation's annotations, read by
:class:`mmel.data.relations.ShapesRelations`:

* ``lookalike_ann_ids`` — the same-looking object(s) the swapped words name (a row's look-alike is its group);
* ``context_ann_ids`` — the objects the expression mentions besides its referent (the anchor);
* ``swapped`` — the expression with the relation swapped (the other referral's expression);
* ``kind`` / ``relation`` — the scene's kind and this referral's relation words;
* ``counterfactual`` — the counterfactual image's path under ``<root>`` (val / test).

Image ids are counted from 1 over train, val, test; annotation ids likewise. The default seed is 1: the relational
CLIP was pretrained on seed 0's ``pretrain`` stream, so the evaluation world is a fresh one.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

from mmel.data.shapes.relations import KINDS, RelationalScene, look_alikes, relational_scene
from mmel.data.shapes.world import CATEGORIES, encode_jpeg
from mmel.data.shapes.writer import _write, install_world, manifest_matches

log = logging.getLogger(__name__)

FORMAT = "relations/1"
SPLITS = ("train", "val", "test")
DATASET = "refcocog"  # the refer layout whose splits (umd: train / val / test) the world's splits are
IMAGE_DIR = "images/mscoco/images/train2014"
PICKLE_PROTOCOL = 4


def relations_params(seed: int = 1, *, n_train: int = 2000, n_val: int = 240, n_test: int = 480,
                     image_size: int = 64, size_range: tuple[float, float] = (0.16, 0.30),
                     clutter: int = 2) -> dict:  # fmt: skip
    """The parameter record of a relational world (MANIFEST.json), validated. Counts are scenes (two refs each);
    with 6 kinds cycling by index, a count that is a multiple of 6 holds every kind equally often."""
    for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("clutter", clutter)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"relational world: {key} must be a non-negative int, got {n!r}")
    if not isinstance(image_size, int) or image_size < 48:
        raise ValueError(f"relational world: image_size must be an int ≥ 48 pixels, got {image_size!r}")
    lo, hi = (float(v) for v in size_range)
    if not 0.1 <= lo <= hi <= 0.35:
        raise ValueError(f"relational world: size_range must satisfy 0.1 ≤ lo ≤ hi ≤ 0.35, got {size_range!r}")
    return {"format_version": FORMAT, "world": "relations", "seed": int(seed), "n_train": n_train, "n_val": n_val,
            "n_test": n_test, "image_size": image_size, "size_range": [lo, hi], "clutter": clutter}  # fmt: skip


def generate_relations(root: str | Path, seed: int = 1, *, overwrite: bool = False, **kwargs) -> Path:
    """Write the relational world under ``root`` (layout in the module docstring) and return ``root``."""
    root = Path(root).expanduser()
    params = relations_params(seed, **kwargs)
    if not overwrite and manifest_matches(root, params):
        return root
    files = install_world(root, params, writer=write_relations_world)
    log.info("relational shapes world: wrote %d files under %s", len(files) + 1, root)
    return root


def _scene(params: dict, split: str, index: int, hide_for: int | None = None) -> RelationalScene:
    return relational_scene(params["seed"], split, index, size=params["image_size"],
                            size_range=tuple(params["size_range"]), clutter=params["clutter"],
                            hide_for=hide_for)  # fmt: skip


def write_relations_world(root: Path, params: dict) -> dict[str, str]:
    """Render every split and write the layout under ``root``; returns {relative path: sha256}."""
    files: dict[str, str] = {}
    put = lambda path, data: _write(path, data, files, root)  # noqa: E731
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    (root / "counterfactual").mkdir(exist_ok=True)
    (root / DATASET).mkdir(exist_ok=True)
    category_id = {c: i + 1 for i, c in enumerate(CATEGORIES)}
    images, anns, refs = [], [], []
    image_id = ann_id = sent_id = 0
    for split in SPLITS:
        for index in range(params[f"n_{split}"]):
            rs = _scene(params, split, index)
            image_id += 1
            stem = f"COCO_train2014_{image_id:012d}"
            put(root / IMAGE_DIR / f"{stem}.jpg", encode_jpeg(rs.scene.pixels))
            size = params["image_size"]
            images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": size, "height": size})
            ids = []
            for o in rs.scene.objects:
                ann_id += 1
                ids.append(ann_id)
                anns.append(_ann(ann_id, image_id, category_id[(o.colour, o.shape)], o.box))
            group_ids: dict[int, int] = {}  # a row referral's index -> its group annotation id
            for k, r in enumerate(rs.referrals):
                if r.members:
                    ann_id += 1
                    group_ids[k] = ann_id
                    anns.append({**_ann(ann_id, image_id, category_id[r.target], r.box),
                                 "group_of": [ids[m] for m in r.members]})  # fmt: skip
            for k, r in enumerate(rs.referrals):
                other = next(j for j, x in enumerate(rs.referrals) if x is not r)
                lookalike = [group_ids[other]] if other in group_ids else [ids[m] for m in look_alikes(rs.referrals, r)]
                ref = {
                    "ref_id": len(refs), "ann_id": group_ids.get(k, ids[r.referent]), "image_id": image_id,
                    "split": split, "category_id": category_id[r.target], "file_name": f"{stem}_{ids[r.referent]}.jpg",
                    "sentences": [{"sent": r.expression, "raw": r.expression, "tokens": r.expression.split(),
                                   "sent_id": sent_id}],
                    "sent_ids": [sent_id], "lookalike_ann_ids": lookalike,
                    "context_ann_ids": [ids[c] for c in r.context], "swapped": r.swapped, "kind": rs.kind,
                    "relation": r.relation,
                }  # fmt: skip
                sent_id += 1
                if split != "train":
                    cf = f"counterfactual/{image_id:012d}_{k}.jpg"
                    put(root / cf, encode_jpeg(_scene(params, split, index, hide_for=k).scene.pixels))
                    ref["counterfactual"] = cf
                refs.append(ref)
    cats = [{"id": i + 1, "name": f"{c} {s}", "supercategory": s} for i, (c, s) in enumerate(CATEGORIES)]
    info = {"description": "mmel relational shapes world", "kinds": list(KINDS), "params": params}
    put(root / DATASET / "instances.json",
        json.dumps({"info": info, "images": images, "annotations": anns, "categories": cats},
                   separators=(",", ":")) + "\n")  # fmt: skip
    put(root / DATASET / "refs(umd).p", pickle.dumps(refs, protocol=PICKLE_PROTOCOL))
    return files


def _ann(ann_id: int, image_id: int, category_id: int, box: tuple[int, ...]) -> dict:
    x0, y0, x1, y1 = (int(v) for v in box)
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}  # fmt: skip
