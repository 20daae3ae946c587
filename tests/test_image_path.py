"""One image path: explain.py reads and transforms images exactly as the datasets do (EXIF, modes, keep size),
caps huge images, estimates memory first, and says what is wrong with a folder or an empty prompt."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from mmel.data import CocoBoxes, load_image
from mmel.data.fixtures import canvas, write_coco
from mmel.data.transforms import BoxTransform
from mmel.explain import estimate_bytes, explain_image, explain_maps, input_size, preprocess
from mmel.explain import load_image as explain_load_image
from mmel.explainers import build_explainer

BOX = (2, 25, 12, 35)  # xyxy in the displayed image (H=40, W=24)


@pytest.fixture
def rotated_pair(tmp_path):
    """The same photo twice: a JPEG stored sideways with EXIF orientation 6, and its decoded pixels physically
    rotated into a lossless PNG (so both decode to exactly the same displayed image)."""
    displayed = canvas((40, 24), [(BOX, "red"), ((14, 4, 22, 12), "blue")])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    (tmp_path / "val").mkdir()
    jpg, png = tmp_path / "val" / "exif.jpg", tmp_path / "val" / "upright.png"
    displayed.transpose(Image.Transpose.ROTATE_90).save(jpg, exif=exif, quality=95)
    load_image(jpg).save(png)
    return jpg, png


def test_exif_rotated_jpeg_and_rotated_pixels_give_identical_maps_in_explain_and_coco(rotated_pair, micro_clip):
    jpg, png = rotated_pair
    e = build_explainer("grad_eclip", micro_clip)
    prompts = ["a red square"]
    ex = {
        p.name: explain_maps(explain_load_image(p), prompts, micro_clip, e, resize="keep")["maps"] for p in (jpg, png)
    }
    assert ex["exif.jpg"].shape == (1, 40, 24)  # the displayed orientation, not the stored one
    assert torch.equal(ex["exif.jpg"], ex["upright.png"])
    assert ex["exif.jpg"].amax() > 0  # a real map, not two blank ones

    root = jpg.parents[1]
    images = [
        {"id": i, "size": (40, 24), "anns": [(1, [BOX[0], BOX[1], BOX[2] - BOX[0], BOX[3] - BOX[1]])], "file_name": f}
        for i, f in ((1, jpg.name), (2, png.name))
    ]
    write_coco(root, "val", images, [(1, "red square")], draw=False)
    ds = CocoBoxes(root, "val", prompt_template="a {}")
    t = BoxTransform("keep", patch_size=micro_clip.patch_size, mean=micro_clip.mean, std=micro_clip.std)
    coco = {}
    for i in range(len(ds)):
        item = t(ds[i])
        assert item["prompt"] == prompts[0]
        coco[item["file"].rsplit("/", 1)[-1]] = e(item["image"][None], [item["prompt"]])
    assert torch.equal(coco["exif.jpg"], coco["upright.png"])
    torch.testing.assert_close(coco["exif.jpg"][0], ex["exif.jpg"], atol=1e-6, rtol=0)  # explain.py == the dataset path


def test_explain_preprocessing_is_the_dataset_transform(micro_clip):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 61, 3), dtype=np.uint8))
    t = BoxTransform("keep", patch_size=micro_clip.patch_size, max_side=32, mean=micro_clip.mean, std=micro_clip.std)
    assert torch.equal(preprocess(img, micro_clip, "keep", max_side=32), t.image(img))


def test_huge_image_is_capped_with_a_note_and_memory_is_estimated_first(micro_clip, tmp_path, caplog):
    img = Image.new("RGB", (5000, 3000), (90, 120, 200))
    e = build_explainer("grad_eclip", micro_clip)
    assert input_size(img.size, micro_clip, "keep", max_side=None) == (3000, 5000)
    # uncapped, the attention of that input alone is far beyond any machine: the estimate says so up front
    assert estimate_bytes(micro_clip, e, (3000, 5000), k=2) > 1e12
    with caplog.at_level(logging.INFO, logger="mmel.explain"):
        m = explain_image(img, ["a"], micro_clip, e, out_dir=tmp_path, resize="keep", max_side=64)
    assert m["input_size"] == [40, 64] and m["image_size"] == [3000, 5000] and m["max_side"] == 64
    assert "scaled to 64 px" in caplog.text
    with pytest.raises(MemoryError, match=r"needs about .* GiB.*lower max_side"):
        explain_image(img, ["a"], micro_clip, e, out_dir=tmp_path, resize="keep", max_side=None)


def test_a_folder_and_an_empty_prompt_are_refused_clearly(micro_clip, tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        explain_load_image(tmp_path)
    e = build_explainer("grad_eclip", micro_clip)
    img = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match=r"position \[1\] are empty"):
        explain_image(img, ["a cat", "  "], micro_clip, e, out_dir=tmp_path)
