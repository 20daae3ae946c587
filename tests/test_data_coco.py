"""CocoBoxes on hand-written COCO files: samples, boxes, filters, subsets and the errors for unusable files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmel.data import CocoBoxes, DatasetError
from mmel.data.fixtures import COLOURS, write_coco

CATS = [(1, "red circle"), (2, "blue square"), (7, "cat")]


def _world(root, **kw):
    images = [
        {"id": 10, "size": (40, 60), "anns": [(1, [5, 6, 10, 8]), (1, [30, 20, 12, 10]), (2, [40, 2, 10, 10])]},
        {"id": 11, "size": (50, 30), "anns": [(7, [1, 1, 20, 30])], "colours": {7: "green"}},
        {"id": 12, "size": (20, 20), "anns": []},
    ]
    return write_coco(root, "val", images, CATS, **kw)


def test_one_sample_per_image_category_with_all_boxes(tmp_path):
    _world(tmp_path)
    ds = CocoBoxes(tmp_path, "val")
    assert [(s["image_id"], s["category"]) for s in ds] == [(10, "red circle"), (10, "blue square"), (11, "cat")]
    s0 = ds[0]
    torch.testing.assert_close(s0["boxes"], torch.tensor([[5.0, 6, 15, 14], [30, 20, 42, 30]]))
    assert s0["boxes"].dtype == torch.float32
    assert s0["prompt"] == "a photo of a red circle."
    assert s0["size"] == (40, 60) and s0["image"].size == (60, 40) and s0["image"].mode == "RGB"
    assert s0["file"].endswith("val/10.png") and s0["sample_id"] == "10:1" and s0["category_id"] == 1
    # the pixels under the boxes are the drawn colour: boxes and image agree
    a = np.asarray(ds[2]["image"])
    x0, y0, x1, y1 = ds[2]["boxes"][0].int().tolist()
    assert (a[y0:y1, x0:x1] == COLOURS["green"]).all() and not (a[y1:, :] == COLOURS["green"]).all(-1).any()
    assert ds.stats["images_without_boxes"] == 1 and ds.sample_ids == ["10:1", "10:2", "11:7"]
    assert ds.groups_by_image() == [[0, 1], [2]]


def test_prompt_template_and_image_dir(tmp_path):
    _world(tmp_path)
    (tmp_path / "val").rename(tmp_path / "pics")
    ds = CocoBoxes(tmp_path, "val", image_dir=tmp_path / "pics", prompt_template="there is a {} here")
    assert ds[1]["prompt"] == "there is a blue square here" and len(ds) == 3 and not ds.skipped["missing_image"]
    with pytest.raises(ValueError, match="exactly one"):
        CocoBoxes(tmp_path, "val", prompt_template="no slot")


def test_crowd_and_min_area_by_config(tmp_path):
    images = [{"id": 1, "size": (40, 40), "anns": [(1, [0, 0, 10, 10], 1), (1, [20, 20, 2, 2]), (2, [5, 5, 20, 20])]}]
    write_coco(tmp_path, "val", images, CATS)
    ds = CocoBoxes(tmp_path, "val")
    assert [s["category"] for s in ds] == ["red circle", "blue square"] and len(ds[0]["boxes"]) == 1
    assert ds.skipped["box_crowd"] == 1
    ds = CocoBoxes(tmp_path, "val", include_crowd=True)
    assert len(ds[0]["boxes"]) == 2
    ds = CocoBoxes(tmp_path, "val", min_box_area=5.0)  # the 2x2 box goes, and with it the red sample
    assert [s["category"] for s in ds] == ["blue square"]
    assert ds.skipped["box_small"] == 1 and ds.skipped["sample_no_boxes_left"] == 1


def test_box_partly_outside_is_clipped_and_zero_area_box_dropped(tmp_path):
    images = [{"id": 1, "size": (30, 40), "anns": [(1, [-5, 20, 15, 20]), (1, [10, 10, 0, 5]), (2, [3, 3, 0, 0])]}]
    write_coco(tmp_path, "val", images, CATS, draw=False)
    ds = CocoBoxes(tmp_path, "val", check_files=False)
    assert len(ds) == 1  # blue's only box had zero area: no sample
    torch.testing.assert_close(ds.records[0].boxes, np.array([[0.0, 20, 10, 30]], dtype=np.float32))
    assert ds.skipped["box_clipped"] == 1
    assert ds.skipped["box_degenerate"] == 2 and ds.skipped["sample_no_boxes_left"] == 1
    assert "box_degenerate=2" in ds.report()


def test_missing_image_file_is_skipped_and_counted(tmp_path):
    _world(tmp_path)
    (tmp_path / "val" / "10.png").unlink()
    ds = CocoBoxes(tmp_path, "val")
    assert [s["image_id"] for s in ds] == [11] and ds.skipped["missing_image"] == 1
    # without the up-front check the item comes back as None, counted once per file
    ds = CocoBoxes(tmp_path, "val", check_files=False)
    assert len(ds) == 3 and ds[0] is None and ds[1] is None and ds[2] is not None
    assert ds.skipped["missing_image"] == 1


def test_subset_is_seeded(tmp_path):
    images = [{"id": i, "size": (8, 8), "anns": [(1, [1, 1, 3, 3])]} for i in range(20)]
    write_coco(tmp_path, "val", images, CATS, draw=False)
    ids = lambda seed: CocoBoxes(tmp_path, "val", subset=5, seed=seed, check_files=False).sample_ids  # noqa: E731
    assert ids(0) == ids(0) and len(ids(0)) == 5 and ids(0) != ids(1)
    assert ids(0) == sorted(ids(0), key=lambda s: int(s.split(":")[0]))  # original order kept


def test_captions(tmp_path):
    _world(tmp_path, captions={10: ["two red circles", "a blue square"], 11: ["a green cat"]})
    ds = CocoBoxes(tmp_path, "val", captions=True)
    assert ds[0]["captions"] == ["two red circles", "a blue square"] and ds[2]["captions"] == ["a green cat"]


def test_unknown_category_id_names_file_and_field(tmp_path):
    images = [{"id": 1, "size": (30, 40), "anns": [(1, [1, 1, 5, 5]), (99, [2, 2, 5, 5])]}]
    path = write_coco(tmp_path, "val", images, CATS, draw=False)
    with pytest.raises(DatasetError, match=r"instances_val\.json.*annotation 2 has category_id=99"):
        CocoBoxes(tmp_path, "val")
    assert path.is_file()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", r"instances_val\.json is empty"),
        ("  \n", r"is empty"),
        ('{"images": [], "annotations": [', r"not valid JSON.*line 1"),
        ('{"images": [], "annotations": []}', r"has no field 'categories'"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"image 1 has no field 'file_name'"),
        (
            '{"images": [{"id": 1, "file_name": "a", "width": 2, "height": 2}], "categories": [{"id": 1, "name": "a"}],'
            ' "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}]}',
            r"annotation 5 'bbox' should be 4 numbers",
        ),
        (
            '{"images": [], "categories": [], "annotations": [{"id": 5, "image_id": 3, "category_id": 1, '
            '"bbox": [1, 2, 3, 4]}]}',
            r"category_id=1",
        ),
    ],
)
def test_unusable_annotation_file_errors(tmp_path, content, match):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(content)
    with pytest.raises(DatasetError, match=match):
        CocoBoxes(tmp_path, "val")


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"annotations/instances_train2017\.json"):
        CocoBoxes(tmp_path, "train2017")


def test_unknown_image_id(tmp_path):
    path = write_coco(tmp_path, "val", [{"id": 1, "size": (9, 9), "anns": [(1, [1, 1, 2, 2])]}], CATS, draw=False)
    d = json.loads(path.read_text())
    d["annotations"][0]["image_id"] = 42
    path.write_text(json.dumps(d))
    with pytest.raises(DatasetError, match="image_id=42"):
        CocoBoxes(tmp_path, "val")
