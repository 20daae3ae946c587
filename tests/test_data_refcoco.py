"""RefCOCO / RefCOCO+ / RefCOCOg from the refer layout and from parquet: the shapes world's refs read back exactly,
both sources giving the same items, and bad input named (file and field) or counted."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmel.data import DatasetError, RefCOCO
from mmel.data.refcoco import SPLITS, image_file_name

WORLD = {"n_train": 48, "n_val": 16, "n_test": 24}  # the programs tests' world: one generation per session
CASES = [(ds, sp) for (ds, by), sps in SPLITS.items() if by != "google" for sp in sps]


@pytest.fixture(scope="module")
def refer(shapes_world) -> Path:
    return shapes_world(seed=3, **WORLD) / "refer"


def _load(refer: Path, dataset: str, split: str, source: str, tmp: Path | None = None, **kw) -> RefCOCO:
    return RefCOCO(refer, split, dataset=dataset, source=source, hf_cache_dir=tmp, **kw)


def _written(refer: Path, dataset: str, split: str):
    """What the generator wrote: the refs of ``split`` (pickle) and the COCO boxes of the world's train images."""
    by = "umd" if dataset == "refcocog" else "unc"
    refs = [r for r in pickle.loads((refer / dataset / f"refs({by}).p").read_bytes()) if r["split"] == split]
    coco = json.loads((refer.parent / "coco" / "annotations" / "instances_train.json").read_text())
    boxes = {a["id"]: a["bbox"] for a in coco["annotations"]}
    return refs, boxes


@pytest.mark.parametrize(("dataset", "split"), CASES)
def test_each_format_reads_back_what_was_written(refer, tmp_path, dataset, split):
    refs, coco_boxes = _written(refer, dataset, split)
    n_sentences = sum(len(r["sentences"]) for r in refs)
    a = _load(refer, dataset, split, "refer")
    assert refs and len(a) == n_sentences and not a.skipped
    if split == "train":  # the world's tables hold the evaluation splits only
        assert not list((refer / "parquet" / dataset).glob("train*"))
    else:
        table = pq.read_table(refer / "parquet" / dataset / f"{split}-00000-of-00001.parquet")
        b = _load(refer, dataset, split, "parquet", tmp_path)
        assert table.num_rows == len(refs) and len(b) == n_sentences and not b.skipped
    by_ref = {r["ref_id"]: r for r in refs}
    for rec in a.records:
        ref = by_ref[rec.extra["ref_id"]]
        k = int(rec.sample_id.split(":")[1])
        x, y, w, h = coco_boxes[ref["ann_id"]]  # the same object's box in the world's COCO form
        np.testing.assert_array_equal(rec.boxes, np.array([[x, y, x + w, y + h]], np.float32))
        assert rec.prompt == ref["sentences"][k]["sent"] and rec.image_id == ref["image_id"]
        assert Path(rec.file).name == image_file_name(ref["file_name"]) and Path(rec.file).is_file()


def test_refer_and_parquet_give_identical_items(refer, tmp_path):
    a = _load(refer, "refcoco", "testA", "refer")
    b = _load(refer, "refcoco", "testA", "parquet", tmp_path)
    assert a.sample_ids == b.sample_ids
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["file"] != y["file"]  # where the pixels come from: the image folder, or the table's bytes
        for key in ("sample_id", "image_id", "prompt", "category", "size", "ref_id", "ann_id", "sentence"):
            assert x[key] == y[key], key
        assert (x["boxes"] == y["boxes"]).all()
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))  # the same JPEG, decoded the same


def test_file_name_suffix_and_splits():
    assert image_file_name("COCO_train2014_000000581857_1234.jpg") == "COCO_train2014_000000581857.jpg"
    assert image_file_name("COCO_train2014_000000581857.jpg") == "COCO_train2014_000000581857.jpg"
    assert image_file_name("other_name_1.png") == "other_name_1.png"


@pytest.mark.parametrize("source", ["refer", "parquet"])
def test_unknown_split_and_dataset_are_refused(refer, tmp_path, source):
    with pytest.raises(ValueError, match=r"unknown split 'testA' for refcocog.*\['train', 'val', 'test'\]"):
        _load(refer, "refcocog", "testA", source, tmp_path)
    with pytest.raises(ValueError, match="unknown split 'test' for refcoco "):
        _load(refer, "refcoco", "test", source, tmp_path)
    with pytest.raises(ValueError, match="dataset must be one of"):
        _load(refer, "refclef", "val", source, tmp_path)


def test_parquet_without_an_expected_column_names_file_and_column(refer, tmp_path):
    src = refer / "parquet" / "refcoco" / "val-00000-of-00001.parquet"
    bad = tmp_path / "val.parquet"
    pq.write_table(pq.read_table(src).drop_columns(["bbox"]), bad)
    with pytest.raises(DatasetError, match=r"val\.parquet: no column \['bbox'\]"):
        RefCOCO(refer, "val", source="parquet", parquet=bad, hf_cache_dir=tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="no val-\\*.parquet or val.parquet"):
        RefCOCO(refer, "val", source="parquet", parquet=tmp_path / "hf", hf_cache_dir=tmp_path / "hf2")


def test_parquet_with_paths_instead_of_bytes_and_without_sizes(refer, tmp_path):
    """A table without ``image`` / ``width`` / ``height`` reads the image files (their headers for the sizes)."""
    src = pq.read_table(refer / "parquet" / "refcoco" / "val-00000-of-00001.parquet")
    pq.write_table(src.drop_columns(["image", "width", "height"]), tmp_path / "val.parquet")
    a = _load(refer, "refcoco", "val", "refer")
    b = RefCOCO(refer, "val", source="parquet", parquet=tmp_path, hf_cache_dir=tmp_path / "hf")

    def plain(ds):
        return [{**r.__dict__, "boxes": r.boxes.tolist()} for r in ds.records]

    assert plain(a) == plain(b) and a[0]["image"].size == (64, 64)  # file paths too, now


def _copy(refer: Path, tmp: Path) -> Path:
    out = tmp / "refer"
    shutil.copytree(refer / "refcoco", out / "refcoco")
    shutil.copytree(refer / "images", out / "images")
    return out


def test_box_outside_its_image_and_missing_image_are_counted(refer, tmp_path):
    root = _copy(refer, tmp_path)
    before = _load(root, "refcoco", "val", "refer")
    first, second = before.records[0], before.records[-1]
    inst = json.loads((root / "refcoco" / "instances.json").read_text())
    for a in inst["annotations"]:
        if a["id"] == first.extra["ann_id"]:
            a["bbox"] = [500.0, 500.0, 10.0, 10.0]  # wholly outside the 64-px image
    (root / "refcoco" / "instances.json").write_text(json.dumps(inst))
    Path(second.file).unlink()
    after = _load(root, "refcoco", "val", "refer")
    n_first = sum(r.extra["ref_id"] == first.extra["ref_id"] for r in before.records)
    n_second = sum(r.file == second.file for r in before.records if r.extra["ref_id"] != first.extra["ref_id"])
    assert after.skipped["box_degenerate"] == 1 and after.skipped["sample_no_boxes_left"] == n_first
    assert after.skipped["missing_image"] == 1
    assert len(after) == len(before) - n_first - n_second
    assert "box_degenerate=1" in after.report() and "missing_image=1" in after.report()


def test_unusable_refer_files_name_file_and_field(refer, tmp_path):
    root = _copy(refer, tmp_path)
    refs_path = root / "refcoco" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    del refs[2]["ann_id"]
    refs_path.write_bytes(pickle.dumps(refs))
    with pytest.raises(DatasetError, match=r"refs\(unc\)\.p: ref #2 .* has no field \['ann_id'\]"):
        _load(root, "refcoco", "val", "refer")
    refs_path.write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"refs\(unc\)\.p: not a refs pickle"):
        _load(root, "refcoco", "val", "refer")
    refs_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"refs file not found: .*refs\(unc\)\.p"):
        _load(root, "refcoco", "val", "refer")
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p"):
        _load(root, "refcocog", "val", "refer")


def test_hub_source_failure_says_how_to_work_offline(monkeypatch, refer):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"'someone/refcoco', split 'val'.*HF_DATASETS_OFFLINE=1"):
        RefCOCO(refer, "val", source="parquet", parquet="hub:someone/refcoco")


def test_a_table_may_hold_every_split(refer, tmp_path):
    """One file with a ``split`` column: only the asked split's rows are read."""
    parts = [pq.read_table(p) for p in sorted((refer / "parquet" / "refcoco").glob("*.parquet"))]
    pq.write_table(pa.concat_tables(parts), tmp_path / "all.parquet")
    a = _load(refer, "refcoco", "testB", "parquet", tmp_path)
    b = RefCOCO(refer, "testB", source="parquet", parquet=tmp_path / "all.parquet", hf_cache_dir=tmp_path / "hf")
    assert a.sample_ids == b.sample_ids and len(b) > 0


def test_data_module_and_checker(refer, capsys):
    from mmel.data.check import main

    assert main(["data=refcoco", f"data.root={refer}", "data.splits.test=testA"]) == 0
    out = capsys.readouterr().out
    n = {sp: len(_load(refer, "refcoco", sp, "refer")) for sp in ("train", "val", "testA")}
    assert "train split=train: refcoco/train: " in out and f"{n['train']} samples" in out
    assert "test  split=testA: refcoco/testA: " in out and f"{n['testA']} samples" in out
    assert main(["data=refcoco", f"data.root={refer}", "data.source=parquet", f"data.parquet={refer}/nowhere"]) == 2
    assert "nowhere" in capsys.readouterr().err  # the checker names the missing file, no traceback
    from mmel.data import RefCOCODataModule

    assert RefCOCODataModule(refer).splits == {"train": "train", "val": "val", "test": "val"}
    with pytest.raises(ValueError, match="data.dataset must be one of"):
        RefCOCODataModule(refer, dataset="refcocoplus")
