"""The shapes world generator: pycocotools reads it, Flickr parses back to the COCO boxes, same seed ⇒ same bytes."""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mmel.data.shapes import CATEGORIES, COLOURS, SHAPES, generate
from mmel.data.shapes.__main__ import main as cli_main
from mmel.data.shapes.world import image_rng, sample_scene

# pycocotools 2.0 + numpy 2 warn inside annToMask; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = {"n_train": 12, "n_val": 6, "n_test": 10}
ENTITY = re.compile(r"\[/EN#(\d+)/(\w+) ([^\]]+)\]")


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(shapes_world) -> Path:
    return shapes_world(seed=3, **SMALL)


def test_vocabulary_size():
    assert len(SHAPES) >= 6 and len(COLOURS) >= 6 and len(CATEGORIES) == len(SHAPES) * len(COLOURS)


def test_same_seed_is_byte_identical_and_other_seed_differs(world, tmp_path):
    again = generate(tmp_path / "again", seed=3, **SMALL)
    assert _tree_hash(again) == _tree_hash(world)
    other = generate(tmp_path / "other", seed=4, **SMALL)
    assert _tree_hash(other) != _tree_hash(world)


def test_split_images_do_not_depend_on_other_split_sizes(world, tmp_path):
    bigger = generate(tmp_path / "big", seed=3, n_train=20, n_val=6, n_test=10)
    a = json.loads((world / "coco/annotations/instances_test.json").read_text())
    b = json.loads((bigger / "coco/annotations/instances_test.json").read_text())
    assert [x["bbox"] for x in a["annotations"]] == [x["bbox"] for x in b["annotations"]]
    fa = [(world / "coco/test" / i["file_name"]).read_bytes() for i in a["images"]]
    fb = [(bigger / "coco/test" / i["file_name"]).read_bytes() for i in b["images"]]
    assert fa == fb


def test_manifest_caches_and_lists_hashes(world):
    manifest = json.loads((world / "MANIFEST.json").read_text())
    assert manifest["params"]["seed"] == 3 and manifest["params"]["n_test"] == 10
    rel, digest = next(iter(manifest["files"].items()))
    assert hashlib.sha256((world / rel).read_bytes()).hexdigest() == digest
    stamp = (world / "MANIFEST.json").stat().st_mtime_ns
    generate(world, seed=3, **SMALL)  # same parameters: nothing rewritten
    assert (world / "MANIFEST.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_coco_loads_with_pycocotools(world, split):
    coco = COCO(str(world / f"coco/annotations/instances_{split}.json"))
    assert len(coco.getImgIds()) == SMALL[f"n_{split}"]
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {f"{c} {s}" for c, s in CATEGORIES}
    for img in coco.loadImgs(coco.getImgIds()):
        pil = Image.open(world / "coco" / split / img["file_name"])
        assert pil.size == (img["width"], img["height"]) and pil.mode == "RGB"
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert 1 <= len(anns) <= 4
        assert len({a["category_id"] for a in anns}) == len(anns)  # a colour-shape pair at most once per image
        for a in anns:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"] and w > 2 and h > 2
            m = coco.annToMask(a)
            ys, xs = np.nonzero(m)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            assert m.sum() == a["area"]
        # objects never overlap
        masks = np.stack([coco.annToMask(a) for a in anns])
        assert masks.sum(0).max() == 1
    caps = COCO(str(world / f"coco/annotations/captions_{split}.json"))
    assert len(caps.getAnnIds()) == 5 * SMALL[f"n_{split}"]


def _parse_flickr(root: Path, image_id: str) -> tuple[list[list[tuple[int, str, str]]], dict[int, list[int]]]:
    sentences = [ENTITY.findall(line) for line in (root / "Sentences" / f"{image_id}.txt").read_text().splitlines()]
    boxes = {}
    for obj in ET.parse(root / "Annotations" / f"{image_id}.xml").getroot().iter("object"):
        bb = obj.find("bndbox")
        x0, y0, x1, y1 = (int(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes[int(obj.findtext("name"))] = [x0 - 1, y0 - 1, x1, y1]  # 1-based inclusive corners, as Flickr's
    return [[(int(e), t, p) for e, t, p in s] for s in sentences], boxes


def test_flickr_parses_back_to_the_coco_boxes(world):
    flickr = world / "flickr30k"
    ids = (flickr / "test.txt").read_text().split()
    assert len(ids) == SMALL["n_test"]
    coco = COCO(str(world / "coco/annotations/instances_test.json"))
    caps = json.loads((world / "coco/annotations/captions_test.json").read_text())["annotations"]
    for image_id in ids:
        sentences, boxes = _parse_flickr(flickr, image_id)
        assert (flickr / "flickr30k-images" / f"{image_id}.jpg").read_bytes() == (
            world / "coco/test" / f"{int(image_id):012d}.jpg"
        ).read_bytes()
        anns = coco.loadAnns(coco.getAnnIds(imgIds=int(image_id)))
        by_name = {coco.loadCats(a["category_id"])[0]["name"]: a for a in anns}
        plain = [c["caption"] for c in caps if c["image_id"] == int(image_id)]
        assert len(sentences) == 5 == len(plain)
        for entities, text in zip(sentences, plain, strict=True):
            assert 1 <= len(entities) <= 3
            for eid, etype, phrase in entities:
                colour, shape = phrase.removeprefix("a ").split()
                assert etype == shape and phrase in text
                ann = by_name[f"{colour} {shape}"]
                x, y, w, h = ann["bbox"]
                assert boxes[eid] == [x, y, x + w, y + h] and eid == ann["id"]  # entity id = annotation id


def test_scene_statistics():
    scenes = [sample_scene(image_rng(0, "train", i)) for i in range(300)]
    counts = np.bincount([len(s.objects) for s in scenes], minlength=5)
    assert counts[0] == 0 and all(c > 30 for c in counts[1:])  # every count 1..4 common
    sides = [o.box[2] - o.box[0] for s in scenes for o in s.objects]
    assert min(sides) >= 10 and max(sides) <= 27  # 0.22..0.40 of 64 px
    used = {(o.colour, o.shape) for s in scenes for o in s.objects}
    assert used == set(CATEGORIES)
    # objects keep their colour: the mean inside the mask is near the palette colour, background is not saturated
    s = scenes[0]
    for o, m in zip(s.objects, s.masks, strict=True):
        mean = s.pixels[m > 0.99].mean(0)
        assert np.abs(mean - np.array(COLOURS[o.colour])).max() < 30
    bg = s.pixels[s.masks.sum(0) == 0].astype(float)
    assert (bg.max(1) - bg.min(1)).mean() < 60


def test_bad_parameters_are_named(tmp_path):
    with pytest.raises(ValueError, match="n_test"):
        generate(tmp_path, n_test=-1)
    with pytest.raises(ValueError, match="max_objects"):
        generate(tmp_path, max_objects=5)


def test_cli_writes_the_same_world(world, tmp_path, capsys):
    cli_main(["--root", str(tmp_path / "cli"), "--seed", "3", "--n-train", "12", "--n-val", "6", "--n-test", "10"])
    assert _tree_hash(tmp_path / "cli") == _tree_hash(world)
