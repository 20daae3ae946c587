"""Flickr30k Entities: the Sentences / Annotations parsers and the phrase samples, on hand-written files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmel.data import DatasetError, Flickr30kEntities
from mmel.data.fixtures import COLOURS, write_flickr
from mmel.data.flickr30k import parse_annotation, parse_caption

CAPTIONS = [
    "[/EN#1/people A man] in [/EN#2/clothing/other an orange hat] looks at [/EN#3/scene the street] .",
    "[/EN#1/people The man] holds [/EN#4/other two balloons] near [/EN#5/bodyparts his face] .",
    "[/EN#0/notvisual Someone] thinks [/EN#4/other the balloons] are [/EN#6/other pretty] .",
    "[/EN#1/people a man] and [/EN#7/people a woman] .",
    "[/EN#1/people A man] outside .",
]
OBJECTS = [
    {"names": ["1"], "box": (3, 4, 20, 30)},
    {"names": ["2", "7"], "box": (5, 2, 12, 6), "colour": "yellow"},  # one box, two entities
    {"names": ["4"], "box": (30, 10, 38, 18), "colour": "blue"},  # two boxes for entity 4
    {"names": ["4"], "box": (40, 20, 45, 28), "colour": "blue"},
    {"names": ["3"], "scene": True},
    {"names": ["5"], "nobox": True},
]


def _tree(tmp_path, **extra):
    images = {"1001": {"size": (36, 50), "captions": CAPTIONS, "objects": OBJECTS}}
    images.update(extra)
    return write_flickr(tmp_path, {"train": ["1001"], "test": ["1001"]}, images)


def test_parse_caption_markup():
    c = parse_caption(CAPTIONS[0])
    assert c.text == "A man in an orange hat looks at the street ."
    assert [(p.text, p.entity_id, p.types, p.first_word) for p in c.phrases] == [
        ("A man", "1", ["people"], 0),
        ("an orange hat", "2", ["clothing", "other"], 3),
        ("the street", "3", ["scene"], 8),
    ]
    assert parse_caption("[/EN#0/notvisual] x").phrases[0].text == ""  # an empty phrase is parsed, not fatal
    for bad in ("a [/EN#1/people man", "[/EN#1/people a [/EN#2/other b] c]", "[/EN#/people a]"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_parse_annotation_voc_conventions(tmp_path):
    _tree(tmp_path)
    a = parse_annotation(tmp_path / "Annotations" / "1001.xml")
    assert a.size == (36, 50)
    assert a.boxes["1"] == [[2.0, 3.0, 20.0, 30.0]]  # 1-based inclusive corners -> pixel edges
    assert a.boxes["2"] == a.boxes["7"] and len(a.boxes["4"]) == 2
    assert a.scene == {"3"} and a.nobox == {"5"}


def test_samples_one_per_phrase_with_boxes(tmp_path):
    _tree(tmp_path)
    ds = Flickr30kEntities(tmp_path, "test")
    got = [(s["sample_id"], s["prompt"], s["entity_id"], len(s["boxes"])) for s in ds]
    assert got == [
        ("1001:0:0", "A man", "1", 1),
        ("1001:0:1", "an orange hat", "2", 1),
        ("1001:1:0", "The man", "1", 1),
        ("1001:1:1", "two balloons", "4", 2),
        ("1001:2:1", "the balloons", "4", 2),
        ("1001:3:0", "a man", "1", 1),
        ("1001:3:1", "a woman", "7", 1),
        ("1001:4:0", "A man", "1", 1),
    ]
    assert ds.skipped == {"phrase_scene": 1, "phrase_no_box": 2, "phrase_notvisual": 1}
    item = ds[3]
    torch.testing.assert_close(item["boxes"], torch.tensor([[29.0, 9, 38, 18], [39, 19, 45, 28]]))
    assert item["category"] == "other" and item["caption"].startswith("The man holds two balloons")
    assert item["size"] == (36, 50) and item["image"].size == (50, 36) and item["file"].endswith("1001.jpg")
    a = np.asarray(item["image"]).astype(int)
    for x0, y0, x1, y1 in item["boxes"].int().tolist():
        assert np.abs(a[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] - COLOURS["blue"]).mean() < 20  # box on its pixels (JPEG)
        assert np.abs(a[y0 - 2, x0:x1] - COLOURS["blue"]).mean() > 60  # and not above it
    assert ds[1]["phrase_types"] == ["clothing", "other"] and ds[1]["category"] == "clothing/other"


def test_dedupe_template_lowercase(tmp_path):
    _tree(tmp_path)
    ds = Flickr30kEntities(tmp_path, "test", dedupe=True, lowercase=True, prompt_template="a photo of {}.")
    prompts = [s["prompt"] for s in ds]
    assert prompts.count("a photo of a man.") == 1 and ds.stats["phrase_duplicates_merged"] == 2
    assert "a photo of the man." in prompts


def test_malformed_xml_names_the_file(tmp_path):
    _tree(tmp_path)
    (tmp_path / "Annotations" / "1001.xml").write_text("<annotation><size><width>3</width></annotation>")
    with pytest.raises(DatasetError, match=r"1001\.xml: malformed XML"):
        Flickr30kEntities(tmp_path, "test")
    (tmp_path / "Annotations" / "1001.xml").write_text("")
    with pytest.raises(DatasetError, match=r"1001\.xml"):
        Flickr30kEntities(tmp_path, "test")
    (tmp_path / "Annotations" / "1001.xml").write_text("<annotation><size><width>3</width></size></annotation>")
    with pytest.raises(DatasetError, match=r"1001\.xml: <size> has no <height>"):
        Flickr30kEntities(tmp_path, "test")


def test_missing_split_file(tmp_path):
    _tree(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"val\.txt"):
        Flickr30kEntities(tmp_path, "val")
    (tmp_path / "val.txt").write_text("\n")
    with pytest.raises(DatasetError, match=r"val\.txt is empty"):
        Flickr30kEntities(tmp_path, "val")


def test_bad_items_skipped_and_counted(tmp_path):
    _tree(
        tmp_path,
        **{
            "2002": {
                "size": (20, 20),
                "captions": ["[/EN#1/people a kid] ."],
                "objects": [{"names": ["1"], "box": (1, 1, 5, 5)}],
            },
            "3003": {"size": (20, 20), "captions": ["[/EN#1/people a dog"], "objects": []},
        },
    )
    (tmp_path / "test.txt").write_text("1001\n2002\n3003\n4004\n")  # 4004 has no annotation files
    (tmp_path / "flickr30k-images" / "2002.jpg").unlink()
    ds = Flickr30kEntities(tmp_path, "test")
    assert {s["image_id"] for s in ds} == {"1001"}
    assert ds.skipped["missing_image"] == 1 and ds.skipped["caption_malformed"] == 1
    assert ds.skipped["image_no_annotation_files"] == 1
    assert "missing_image=1" in ds.report()
