"""Write the shapes world to disk, as COCO and as Flickr30k Entities, in the layout the real datasets use.

Layout under ``root`` (see the module docstring of :mod:`mmel.data.shapes`)::

    coco/annotations/instances_<split>.json   coco/annotations/captions_<split>.json   coco/<split>/<file>.jpg
    flickr30k/flickr30k-images/<id>.jpg   flickr30k/Sentences/<id>.txt   flickr30k/Annotations/<id>.xml
    flickr30k/{train,val,test}.txt        MANIFEST.json

Both formats hold the same images (identical JPEG bytes), the same boxes and the same captions. Image ids are
unique over all splits (train first, then val, then test); Flickr entity ids are unique over the whole world.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from mmel.data.shapes.world import (
    CATEGORIES,
    Scene,
    caption_text,
    encode_jpeg,
    flickr_markup,
    image_rng,
    sample_caption,
    sample_scene,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1  # bump when the files written for the same parameters change
CAPTIONS_PER_IMAGE = 5  # like COCO and Flickr30k


def _coco_categories() -> list[dict]:
    return [{"id": i + 1, "name": f"{c} {s}", "supercategory": s} for i, (c, s) in enumerate(CATEGORIES)]


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask >= 0.5))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _distinct_captions(rng: np.random.Generator, scene: Scene) -> list[list[int]]:
    """CAPTIONS_PER_IMAGE captions; each names a set of objects not named before while such sets remain."""
    out: list[list[int]] = []
    seen: set[frozenset[int]] = set()
    for _ in range(CAPTIONS_PER_IMAGE):
        for _try in range(20):
            named = sample_caption(rng, scene.objects)
            if frozenset(named) not in seen:
                break
        seen.add(frozenset(named))
        out.append(named)
    return out


def _voc_xml(image_id: int, size: int, scene: Scene, entity_ids: list[int]) -> str:
    objs = "".join(
        f"  <object>\n    <name>{eid}</name>\n    <bndbox>\n      <xmin>{o.box[0]}</xmin>\n"
        f"      <ymin>{o.box[1]}</ymin>\n      <xmax>{o.box[2]}</xmax>\n      <ymax>{o.box[3]}</ymax>\n"
        "    </bndbox>\n  </object>\n"
        for o, eid in zip(scene.objects, entity_ids, strict=True)
    )
    return (
        f"<annotation>\n  <filename>{image_id}.jpg</filename>\n"
        f"  <size>\n    <width>{size}</width>\n    <height>{size}</height>\n    <depth>3</depth>\n  </size>\n"
        f"{objs}</annotation>\n"
    )


def _write(path: Path, data: bytes | str, files: dict[str, str], root: Path) -> None:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path.write_bytes(raw)
    files[path.relative_to(root).as_posix()] = hashlib.sha256(raw).hexdigest()


def _dump_json(obj: dict) -> str:
    return json.dumps(obj, indent=None, separators=(",", ":"), sort_keys=False) + "\n"


def write_world(root: Path, params: dict) -> dict[str, str]:
    """Render every split and write both formats under ``root``; returns {relative path: sha256}."""
    seed, size = params["seed"], params["image_size"]
    scene_kw = {"size": size, "max_objects": params["max_objects"], "size_range": tuple(params["size_range"])}
    coco, flickr = root / "coco", root / "flickr30k"
    for d in (coco / "annotations", flickr / "flickr30k-images", flickr / "Sentences", flickr / "Annotations"):
        d.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    image_id, ann_id, cap_id, entity_id = 0, 0, 0, 0
    for split in SPLITS:
        (coco / split).mkdir(exist_ok=True)
        images, instances, captions, ids = [], [], [], []
        for index in range(params[f"n_{split}"]):
            rng = image_rng(seed, split, index)
            scene = sample_scene(rng, **scene_kw)
            image_id += 1
            ids.append(image_id)
            jpeg = encode_jpeg(scene.pixels)
            file_name = f"{image_id:012d}.jpg"
            _write(coco / split / file_name, jpeg, files, root)
            _write(flickr / "flickr30k-images" / f"{image_id}.jpg", jpeg, files, root)
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            entity_ids = []
            for obj, mask in zip(scene.objects, scene.masks, strict=True):
                ann_id += 1
                entity_id += 1
                entity_ids.append(entity_id)
                x0, y0, x1, y1 = obj.box
                instances.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": obj.category_id,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": int((mask >= 0.5).sum()),
                        "segmentation": _rle(mask),
                        "iscrowd": 0,
                    }
                )
            lines = []
            for named in _distinct_captions(rng, scene):
                cap_id += 1
                captions.append({"id": cap_id, "image_id": image_id, "caption": caption_text(scene.objects, named)})
                lines.append(flickr_markup(scene.objects, named, entity_ids))
            _write(flickr / "Sentences" / f"{image_id}.txt", "\n".join(lines) + "\n", files, root)
            _write(flickr / "Annotations" / f"{image_id}.xml", _voc_xml(image_id, size, scene, entity_ids), files, root)
        info = {"description": f"mmel shapes world ({split})", "version": str(FORMAT_VERSION), "seed": seed}
        inst = {"info": info, "licenses": [], "images": images, "annotations": instances}
        inst["categories"] = _coco_categories()
        caps = {"info": info, "licenses": [], "images": images, "annotations": captions}
        _write(coco / "annotations" / f"instances_{split}.json", _dump_json(inst), files, root)
        _write(coco / "annotations" / f"captions_{split}.json", _dump_json(caps), files, root)
        _write(flickr / f"{split}.txt", "".join(f"{i}\n" for i in ids), files, root)
        log.info("shapes world: wrote %d %s images", len(ids), split)
    return files


def manifest_matches(root: Path, params: dict) -> bool:
    """True when ``root`` already holds a complete world made with exactly these parameters."""
    path = root / "MANIFEST.json"
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("params") != params:
        return False
    return all((root / rel).is_file() for rel in manifest.get("files", {}))


def write_manifest(root: Path, params: dict, files: dict[str, str]) -> None:
    manifest = {"generator": "mmel.data.shapes", "params": params, "files": dict(sorted(files.items()))}
    (root / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")


def clear_world(root: Path) -> None:
    """Remove what a previous generation wrote (only the world's own folders and manifest)."""
    for name in ("coco", "flickr30k"):
        if (root / name).exists():
            shutil.rmtree(root / name)
    (root / "MANIFEST.json").unlink(missing_ok=True)
