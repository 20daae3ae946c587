"""The ImageNet-S, OpenImages-points and ImageNet-val loaders on the shapes world written in their layouts
(mmel.data.shapes.benchmarks): counts equal what was written, masks / points agree with the world's COCO
annotations, the png encoding round-trips, and bad input is a clear error or a counted skip."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from mmel.data.base import DatasetError
from mmel.data.dense import dense_fields
from mmel.data.imagenet import ImageNetVal
from mmel.data.imagenet_s import IGNORE, ImageNetS, decode_mask, encode_mask
from mmel.data.openimages import OpenImagesPoints
from mmel.data.shapes.benchmarks import VARIANT, write_benchmarks
from mmel.data.transforms import BoxTransform


@pytest.fixture(scope="module")
def bench(shapes_world, tmp_path_factory) -> tuple[Path, Path]:
    world = shapes_world(3, n_train=0, n_val=0, n_test=24)
    out = write_benchmarks(world, tmp_path_factory.mktemp("bench"))
    return world, out


def _written(out: Path) -> dict:
    return json.loads((out / "BENCHMARKS.json").read_text())["counts"]


def _coco(world: Path) -> dict:
    return json.loads((world / "coco" / "annotations" / "instances_test.json").read_text())


def test_png_encoding_round_trips():
    ids = np.array([[0, 1, 255], [256, 919, IGNORE]])
    rgb = np.asarray(encode_mask(ids))
    assert rgb[1, 0].tolist() == [0, 1, 0]  # 256 = R 0 + G 1 * 256
    assert rgb[1, 2].tolist() == [IGNORE % 256, IGNORE // 256, 0]
    assert (decode_mask_from(encode_mask(ids)) == ids).all()


def decode_mask_from(img: Image.Image) -> np.ndarray:
    a = np.asarray(img, dtype=np.int32)
    return a[:, :, 0] + a[:, :, 1] * 256


def test_imagenet_s_counts_and_masks_match_the_world(bench):
    world, out = bench
    ds = ImageNetS(out / "imagenet_s", "validation", variant=VARIANT)
    coco = _coco(world)
    assert len({r.file for r in ds.records}) == _written(out)["images"] == len(coco["images"])
    assert len(ds) == _written(out)["imagenet_s_samples"]
    assert not ds.skipped
    item = ds[0]
    ann = next(a for a in coco["annotations"] if a["category_id"] == item["class_id"]
               and f"{a['image_id']:012d}" in item["file"])  # fmt: skip
    true = mask_utils.decode(ann["segmentation"]).astype(bool)
    m = item["mask"]
    assert m.shape == true.shape == (item["size"][0], item["size"][1])
    assert ((m == 1) <= true).all() and ((m == 1) | (m == -1))[true].all()  # the object minus its ignored rim
    assert (m == -1).any() and not ((m == 1) & ~true).any()
    x0, y0, x1, y1 = item["boxes"][0].tolist()
    ys, xs = np.nonzero(m == 1)
    assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
    assert item["prompt"] == f"a photo of a {item['category']}."


def test_openimages_counts_and_points(bench):
    world, out = bench
    ds = OpenImagesPoints(out / "openimages")
    n = _written(out)
    assert len(ds) == sum(len(im_anns) for im_anns in _by_image(_coco(world)).values())
    assert ds.stats["points_yes"] == n["points_yes"] and ds.stats["points_no"] == n["points_no"]
    assert ds.skipped["point_unsure"] == n["points_unsure"]
    item = ds[0]
    p = item["points"]
    h, w = item["size"]
    assert p.shape[1] == 3 and ((p[:, 0] >= 0) & (p[:, 0] <= w) & (p[:, 1] >= 0) & (p[:, 1] <= h)).all()
    # yes points lie on the object's mask
    coco = _coco(world)
    ann = next(a for a in coco["annotations"] if f"{a['image_id']:012d}" == item["image_id"]
               and coco_name(coco, a["category_id"]) == item["category"])  # fmt: skip
    true = mask_utils.decode(ann["segmentation"]).astype(bool)
    yes = p[p[:, 2] == 1]
    assert true[yes[:, 1].astype(int), yes[:, 0].astype(int)].all()
    no = p[p[:, 2] == 0]
    assert not true[no[:, 1].astype(int), no[:, 0].astype(int)].any()


def coco_name(coco: dict, cid: int) -> str:
    return next(c["name"] for c in coco["categories"] if c["id"] == cid)


def _by_image(coco: dict) -> dict:
    out: dict = {}
    for a in coco["annotations"]:
        out.setdefault(a["image_id"], set()).add(a["category_id"])
    return out


def test_imagenet_counts_labels_and_classes(bench):
    world, out = bench
    ds = ImageNetVal(out / "imagenet", names="synsets")
    assert len(ds) == _written(out)["images"] == len(_coco(world)["images"])
    assert len(ds.classes) == 36 and ds.classes[0] == coco_name(_coco(world), 1)
    item = ds[0]
    assert ds.classes[item["label"]] == item["category"]
    assert item["boxes"].tolist() == [[0.0, 0.0, float(item["size"][1]), float(item["size"][0])]]
    with pytest.raises(DatasetError, match="names='openai' needs the 1000"):
        ImageNetVal(out / "imagenet", names="openai")


def test_dense_targets_follow_the_crop():
    """A 40 x 80 image centre-cropped to 20 x 20: the mask is resized and cropped like the image, points moved and
    the cropped-out ones dropped."""
    t = BoxTransform("fixed", image_size=20, patch_size=4)
    mask = np.zeros((40, 80), dtype=np.int8)
    mask[:, 40:44] = 1  # a column band at x 40..44 -> x 20..22 after the 1/2 resize, 10..12 after the crop
    pts = np.array([[42.0, 10.0, 1], [2.0, 10.0, 0]], dtype=np.float32)
    out = dense_fields(t.geometry((40, 80)), {"mask": mask, "points": pts})
    assert out["mask"].shape == (20, 20)
    assert out["mask"][:, 10:12].eq(1).all() and out["mask"].sum() == 40
    assert out["points"].tolist() == [[11.0, 5.0, 1.0]] and out["n_points_cropped_out"] == 1
    assert out["mask_orig"].shape == (40, 80) and len(out["points_orig"]) == 2


# ------------------------------------------------------------------------------------------------ bad input
def _copy(out: Path, sub: str, tmp_path: Path) -> Path:
    dst = tmp_path / sub
    shutil.copytree(out / sub, dst)
    return dst


def test_imagenet_s_bad_input(bench, tmp_path):
    _, out = bench
    with pytest.raises(FileNotFoundError, match=r"variant 50 not found.*known variants \(50, 300, 919\)"):
        ImageNetS(out / "imagenet_s", variant=50)
    root = _copy(out, "imagenet_s", tmp_path)
    base = root / f"ImageNetS{VARIANT}"
    pngs = sorted((base / "validation-segmentation").rglob("*.png"))
    Image.open(pngs[0]).resize((10, 10)).save(pngs[0])  # a mask of the wrong size
    pngs[1].unlink()  # a missing mask
    ids = decode_mask(pngs[2])
    ids[0, 0] = 500  # a class id the variant does not have
    encode_mask(ids).save(pngs[2])
    ds = ImageNetS(root, variant=VARIANT)
    assert ds.skipped == {"mask_size_mismatch": 1, "mask_missing": 1, "mask_unknown_class": 1}
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*ImageNetS36/train \(split=.train.\)"):
        ImageNetS(root, "train", variant=VARIANT)


def test_openimages_bad_input(bench, tmp_path):
    _, out = bench
    root = _copy(out, "openimages", tmp_path)
    path = root / "oidv7-val-annotations-point-labels.csv"
    rows = list(csv.reader(path.open()))
    header, body = rows[0], rows[1:]
    # a point outside its image is counted and left out
    body[0][header.index("X")] = "1.5"
    _write_csv(path, [header, *body])
    ds = OpenImagesPoints(root)
    assert ds.skipped["point_outside"] == 1
    # a CSV without the expected columns names the file and the missing column
    _write_csv(path, [[h for h in header if h != "EstimatedYesNo"], *[r[:-1] for r in body]])
    missing = r"oidv7-val-annotations-point-labels.csv: missing column\(s\) \['EstimatedYesNo'\]"
    with pytest.raises(DatasetError, match=missing):
        OpenImagesPoints(root)
    # a bad value names the file, the line and the field
    body[3][header.index("Y")] = "north"
    _write_csv(path, [header, *body])
    with pytest.raises(DatasetError, match=r"line 5: X / Y should be numbers"):
        OpenImagesPoints(root)
    with pytest.raises(FileNotFoundError, match="oidv7-test-annotations-point-labels.csv"):
        OpenImagesPoints(root, "test")


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_imagenet_bad_input(bench, tmp_path):
    _, out = bench
    root = _copy(out, "imagenet", tmp_path)
    (root / "val" / "n99999999").mkdir()
    with pytest.raises(DatasetError, match=r"class folder\(s\) \['n99999999'\].*not in the synset file"):
        ImageNetVal(root, names="synsets")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageNetVal(root, "train", names="synsets")


def test_checker_prints_the_counts(bench, capsys, shapes_world):
    """``python -m mmel.data.check data=shapes_imagenet_s ...`` reads a world written by the data module."""
    from mmel.data.check import main
    from mmel.data.dense_modules import ImageNetSDataModule

    world, _ = bench
    kw = {"n_train": 0, "n_val": 0, "n_test": 24}
    dm = ImageNetSDataModule(world / "benchmarks" / "imagenet_s", world={"root": str(world), "seed": 3,
                             "generate_kwargs": kw}, variant=VARIANT)  # fmt: skip
    dm.prepare_data()  # writes <world>/benchmarks (the world is there already)
    rc = main(["data=shapes_imagenet_s", f"data.world.root={world}", "data.world.seed=3",
               *[f"+data.world.generate_kwargs.{k}={v}" for k, v in kw.items()],
               f"data.root={world}/benchmarks/imagenet_s"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0 and "imagenet_s/validation: 24 images" in text


def test_checker_names_missing_data(tmp_path, capsys):
    from mmel.data.check import main

    assert main(["data=imagenet_s", f"data.root={tmp_path}"]) == 2
    assert "variant 50 not found" in capsys.readouterr().err
