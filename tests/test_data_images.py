"""Bad and unusual image files: each is decoded to displayed 8-bit RGB, or skipped and counted."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmel.data import CocoBoxes, load_image
from mmel.data.fixtures import COLOURS, canvas, write_coco

CATS = [(1, "thing")]


def _dataset(tmp_path, image: Image.Image | bytes, name: str, size, box=(2, 3, 6, 5), **save):
    write_coco(
        tmp_path, "val", [{"id": 1, "size": size, "anns": [(1, list(box))], "file_name": name}], CATS, draw=False
    )
    path = tmp_path / "val" / name
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        image.save(path, **save)
    return CocoBoxes(tmp_path, "val")


def _jpeg_bytes(size=(20, 30)) -> bytes:
    import io

    buf = io.BytesIO()
    canvas(size, [((2, 2, 10, 10), "red")]).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_corrupt_image_is_skipped_and_counted(tmp_path, kind, caplog):
    data = {"truncated": _jpeg_bytes()[:300], "garbage": b"\x89PNG not really" * 20, "empty": b""}[kind]
    ds = _dataset(tmp_path, data, "1.jpg", (20, 30))
    assert len(ds) == 1  # the file exists: found bad only when decoded
    with caplog.at_level("WARNING"):
        assert ds[0] is None
    assert ds.skipped["corrupt_image"] == 1 and "1.jpg" in caplog.text
    ds.verify()  # decoding up front drops it from the index
    assert len(ds) == 0 and ds.skipped["corrupt_image"] == 1


def test_intact_jpeg_loads(tmp_path):
    ds = _dataset(tmp_path, _jpeg_bytes(), "1.jpg", (20, 30))
    img = ds[0]["image"]
    assert img.mode == "RGB" and img.size == (30, 20) and not ds.skipped


def test_grayscale_png(tmp_path):
    img = Image.fromarray(np.full((10, 12), 77, np.uint8), mode="L")
    out = _dataset(tmp_path, img, "g.png", (10, 12))[0]["image"]
    assert out.mode == "RGB" and (np.asarray(out) == 77).all()


def test_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (12, 10), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(_dataset(tmp_path, img, "c.jpg", (10, 12), quality=95)[0]["image"]).astype(int)
    assert out.shape == (10, 12, 3)
    assert (out[..., 0] > 200).all() and (out[..., 1] < 60).all() and (out[..., 2] < 60).all()


def test_rgba_png_composited_on_white(tmp_path):
    a = np.zeros((10, 12, 4), np.uint8)
    a[..., :3] = (10, 20, 30)  # colour hidden under alpha 0 on the left, visible on the right
    a[:, 6:, 3] = 255
    out = np.asarray(_dataset(tmp_path, Image.fromarray(a, mode="RGBA"), "a.png", (10, 12))[0]["image"])
    assert (out[:, :6] == 255).all() and (out[:, 6:] == (10, 20, 30)).all()


def test_palette_png_with_transparency(tmp_path):
    img = Image.new("P", (12, 10), 1)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img.info["transparency"] = 0
    img.paste(0, (0, 0, 4, 10))
    out = np.asarray(_dataset(tmp_path, img, "p.png", (10, 12), transparency=0)[0]["image"])
    assert (out[:, :4] == 255).all() and (out[:, 4:] == (200, 10, 10)).all()


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    a = np.zeros((10, 12), np.uint16)
    a[:, :6] = 65535
    a[:, 6:] = 257 * 100
    img = Image.fromarray(a)
    img.save(tmp_path / "probe.png")
    assert Image.open(tmp_path / "probe.png").mode.startswith("I")  # really a 16-bit file
    out = np.asarray(_dataset(tmp_path, img, "h.png", (10, 12))[0]["image"])
    assert (out[:, :6] == 255).all() and (out[:, 6:] == 100).all()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_rotated_image_boxes_refer_to_displayed_image(tmp_path, fmt):
    # displayed image: H=40, W=20 with a red box; stored rotated with EXIF orientation 6 ("rotate 90° CW to show")
    box = (2, 25, 12, 35)
    displayed = canvas((40, 20), [(box, "red")])
    stored = displayed.transpose(Image.Transpose.ROTATE_90)  # what a camera writes; 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6
    ds = _dataset(tmp_path, stored, f"r.{fmt.lower()}", (40, 20), box=(2, 25, 10, 10), exif=exif, quality=95)
    item = ds[0]
    assert item["image"].size == (20, 40) and not ds.skipped
    a = np.asarray(item["image"]).astype(int)
    x0, y0, x1, y1 = item["boxes"][0].int().tolist()
    assert (x0, y0, x1, y1) == box
    inside = np.abs(a[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] - COLOURS["red"]).max()
    assert inside < 40, "the annotated box should cover the red square of the displayed image"
    assert np.abs(a[:20] - 128).max() < 40  # the top half (no box) is background


def test_size_disagreeing_with_annotation_is_skipped(tmp_path):
    ds = _dataset(tmp_path, canvas((20, 30)), "s.png", (30, 20))  # annotated (H, W) swapped
    assert ds[0] is None and ds.skipped["size_mismatch"] == 1


def test_load_image_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.jpg")
