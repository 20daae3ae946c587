"""Write the shapes world to disk, as COCO and as Flickr30k Entities, in the layout the real datasets use.

Layout under ``root`` (see the module docstring of :mod:`mmel.data.shapes`)::

    coco/annotations/instances_<split>.json   coco/annotations/captions_<split>.json   coco/<split>/<file>.jpg
    flickr30k/flickr30k-images/<id>.jpg   flickr30k/Sentences/<id>.txt   flickr30k/Annotations/<id>.xml
    flickr30k/{train,val,test}.txt        MANIFEST.json

Both formats hold the same images (identical JPEG bytes), the same boxes and the same captions. Image ids are
unique over all splits (train first, then val, then test); Flickr entity ids are unique over the whole world and
equal the COCO annotation id of the same object.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from mmel.data.shapes.refer import ReferImage, write_refer
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
FORMAT_VERSION = 3  # bump when the files written for the same parameters change
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
    """PASCAL-VOC-like XML as Flickr30k Entities writes it: 1-based inclusive pixel corners.

    Pixels x0..x1-1 (0-based) are written xmin = x0 + 1, xmax = x1; Flickr's own reader subtracts 1 from
    xmin/ymin, which gives back the continuous box [x0, y0, x1, y1] that COCO's bbox holds.
    """
    objs = "".join(
        f"  <object>\n    <name>{eid}</name>\n    <bndbox>\n      <xmin>{o.box[0] + 1}</xmin>\n"
        f"      <ymin>{o.box[1] + 1}</ymin>\n      <xmax>{o.box[2]}</xmax>\n      <ymax>{o.box[3]}</ymax>\n"
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
    refer: list[ReferImage] = []  # the train images, for the RefCOCO layouts (as RefCOCO's are COCO train images)
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
            if split == "train":
                refer.append(
                    ReferImage(
                        image_id, jpeg, size, scene.objects, tuple(range(ann_id - len(entity_ids) + 1, ann_id + 1))
                    )
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
    write_refer(root, refer, lambda path, data: _write(path, data, files, root))
    return files


GENERATOR = "mmel.data.shapes"  # what a MANIFEST.json of ours says it was written by
STAGING = ".mmel-shapes-staging"  # where a world is written before it is moved into place


def read_manifest(root: Path) -> dict | None:
    """``root``'s MANIFEST.json when it is one of ours (a shapes world, complete or not), else None."""
    path = root / "MANIFEST.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(manifest, dict) and manifest.get("generator") == GENERATOR
    return manifest if ok and isinstance(manifest.get("files", {}), dict) else None


def manifest_matches(root: Path, params: dict) -> bool:
    """True when ``root`` already holds a complete world made with exactly these parameters."""
    manifest = read_manifest(root)
    if manifest is None or manifest.get("params") != params or not manifest.get("complete", True):
        return False
    return all((root / rel).is_file() for rel in manifest.get("files", {}))


def write_manifest(root: Path, params: dict, files: dict[str, str], complete: bool = True) -> None:
    """Write MANIFEST.json atomically: ``files`` is every file of ours under ``root`` ({relative path: sha256})."""
    manifest = {"generator": GENERATOR, "params": params, "complete": complete, "files": dict(sorted(files.items()))}
    tmp = root / "MANIFEST.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(root / "MANIFEST.json")


def claim_folder(root: Path) -> dict[str, str]:
    """The files of ours under ``root`` (those a previous world's MANIFEST lists), or refuse to write there.

    A folder is ours to write into when it is missing, empty, or holds a shapes-world MANIFEST.json; anything else
    may be a user's data (a real COCO, say) and raises ``FileExistsError`` naming the folder.
    """
    manifest = read_manifest(root)
    if manifest is not None:
        return dict(manifest.get("files", {}))
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"shapes world: {root} is a file, not a folder")
    others = sorted(p.name for p in root.iterdir() if p.name != STAGING) if root.is_dir() else []
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise FileExistsError(
            f"shapes world: refusing to write into {root}: it is not empty ({shown}) and has no shapes-world "
            "MANIFEST.json, so its files may not be ours. Point data.root (or --root) at an empty or missing "
            "folder, or at a folder the shapes generator made."
        )
    return {}


def install_world(root: Path, params: dict, writer=None) -> dict[str, str]:
    """Write the world for ``params`` under ``root``, replacing only files of ours; returns {relative path: sha256}.
    ``writer(folder, params) -> files``: what renders it (default :func:`write_world`; the relational world has its
    own, :mod:`mmel.data.shapes.relations_writer`).

    The world is rendered into ``root/.mmel-shapes-staging`` first and then moved into place, so a killed run
    leaves either the old world or the new one plus a MANIFEST that lists every file of ours (never a user's file
    deleted, never a file of ours unlisted). A user's file at a path the new world needs stops the run before
    anything is deleted.
    """
    old = claim_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / STAGING
    if staging.exists():
        shutil.rmtree(staging)  # a killed run's leftovers (the name is ours)
    staging.mkdir()
    files = (writer or write_world)(staging, params)
    clash = sorted(rel for rel in files if rel not in old and (root / rel).exists())
    if clash:
        shutil.rmtree(staging)
        raise FileExistsError(
            f"shapes world: {root} holds {len(clash)} file(s) that are not ours where the world writes "
            f"(e.g. {root / clash[0]}); move them away or choose another folder"
        )
    # from here on MANIFEST lists old and new files: whatever state a kill leaves, every file of ours is listed
    write_manifest(root, params, {**old, **files}, complete=False)
    for rel in old:
        if rel not in files:
            (root / rel).unlink(missing_ok=True)
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, root / rel)
    write_manifest(root, params, files)
    shutil.rmtree(staging)
    _prune_empty_dirs(root, {str(Path(rel).parent) for rel in old})
    return files


def _prune_empty_dirs(root: Path, rels: set[str]) -> None:
    """Remove the given folders (and their parents below ``root``) when a deletion left them empty."""
    todo = set()
    for rel in rels:
        parts = Path(rel).parts
        todo.update(Path(*parts[:i]) for i in range(1, len(parts) + 1))
    for rel in sorted(todo, key=lambda p: len(p.parts), reverse=True):
        d = root / rel
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
