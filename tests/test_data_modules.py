"""Data modules: built from conf/data/*.yaml with the CLIP's settings, batches, skip counts, the check command."""

from __future__ import annotations

import logging

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from mmel.data import CocoDataModule, Flickr30kDataModule
from mmel.data.check import main as check_main
from mmel.data.fixtures import write_coco
from tests.conftest import CONF_DIR
from tests.test_data_flickr import _tree as flickr_tree

CATS = [(1, "red circle"), (2, "blue square")]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _coco(root):
    for split, n in (("train2017", 5), ("val2017", 3)):
        images = [
            {"id": 100 * n + i, "size": (40 + 8 * i, 56), "anns": [(1, [4, 4, 20, 20]), (2, [30, 20, 16, 16])]}
            for i in range(n)
        ]
        write_coco(root, split, images, CATS)
    return root


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_constructor_touches_no_disk(tmp_path):
    dm = CocoDataModule(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists() and dm.splits["test"] == "val2017"
    with pytest.raises(FileNotFoundError, match=r"nowhere/annotations/instances_val2017\.json"):
        dm.setup("test")


@pytest.mark.parametrize("name", ["coco", "flickr30k", "shapes"])
def test_built_from_config_with_clip_settings(name, tmp_path):
    cfg = _compose([f"data={name}", f"data.root={tmp_path / name}"])
    dm = instantiate(cfg.data, image_size=48, patch_size=8, mean=MEAN, std=STD)
    assert dm.transform.image_size == 48 and dm.transform.patch_size == 8 and dm.transform.mean == MEAN
    assert dm.batch_size == cfg.data.batch_size and dm.num_workers == cfg.data.num_workers
    assert not (tmp_path / name).exists()


def test_coco_module_fixed_size_batches(tmp_path):
    cfg = _compose(["data=coco", f"data.root={_coco(tmp_path)}", "data.num_workers=0", "data.batch_size=4"])
    dm = instantiate(cfg.data, image_size=32, patch_size=8, mean=MEAN, std=STD)
    dm.setup("fit")
    assert len(dm.dataset("train")) == 10 and len(dm.dataset("val")) == 6
    batches = list(dm.train_dataloader())
    # training reads whole batches only: the tail of 2 is dropped (a different one each epoch, mmel.data.order)
    assert [b["images"].shape[0] for b in batches] == [4, 4]
    assert sum(b["images"].shape[0] for b in dm.val_dataloader()) == 6  # evaluation reads every sample
    assert batches[0]["images"].shape[1:] == (3, 32, 32) and batches[0]["valid"].all()
    b = next(iter(dm.val_dataloader()))
    assert b["prompt"][:2] == ["a photo of a red circle.", "a photo of a blue square."]
    assert all(bx.shape == (1, 4) for bx in b["boxes"]) and b["size"][0] == (40, 56)
    # the same seed shuffles the same way
    again = [x["sample_id"] for x in dm.train_dataloader()]
    assert again == [x["sample_id"] for x in dm.train_dataloader()]


def test_keep_mode_pads_and_counts_bad_images(tmp_path, caplog):
    _coco(tmp_path)
    (tmp_path / "val2017" / "301.png").write_bytes(b"not an image")
    dm = CocoDataModule(tmp_path, resize="keep", patch_size=16, batch_size=3, mean=MEAN, std=STD)
    dm.setup("validate")
    b = next(iter(dm.val_dataloader()))
    # image 300 (40x56 -> 48x64) gives 2 samples, 301 is corrupt (2 samples dropped), 302 is 56x56 -> 64x64
    assert b["n_dropped"] == 1 and b["images"].shape == (2, 3, 48, 64)
    shapes = [x["images"].shape[-2:] for x in dm.val_dataloader()]
    assert dm.skipped["loading/corrupt_image"] == 2  # both samples (prompts) of the corrupt image, one full pass
    assert (64, 64) in [tuple(s) for s in shapes]
    with caplog.at_level(logging.INFO):
        dm.teardown("validate")
    assert "loading/corrupt_image=2" in caplog.text


def test_verify_images_drops_corrupt_up_front(tmp_path):
    _coco(tmp_path)
    (tmp_path / "val2017" / "301.png").write_bytes(b"")
    dm = CocoDataModule(tmp_path, verify_images=True, splits={"val": "val2017"})
    assert len(dm.dataset("val")) == 4 and dm.skipped["corrupt_image"] == 1
    with pytest.raises(ValueError, match="no 'train' split"):
        dm.dataset("train")


def test_flickr_module(tmp_path):
    flickr_tree(tmp_path)
    dm = Flickr30kDataModule(tmp_path, splits={"test": "test"}, image_size=32, batch_size=8)
    dm.setup("test")
    b = next(iter(dm.test_dataloader()))
    assert b["images"].shape == (8, 3, 32, 32) and b["prompt"][0] == "A man"
    assert dm.skipped["phrase_scene"] == 1


def test_check_command_prints_counts_per_split(tmp_path, capsys):
    _coco(tmp_path)
    (tmp_path / "train2017" / "500.png").unlink()
    (tmp_path / "val2017" / "301.png").write_bytes(b"")
    rc = check_main(["data=coco", f"data.root={tmp_path}", "verify=true"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "train split=train2017: coco/train2017: 4 images, 8 samples" in out and "missing_image=1" in out
    assert "val   split=val2017: coco/val2017: 2 images, 4 samples" in out and "corrupt_image=1" in out
    assert "test  split=val2017: same as val" in out


def test_check_command_fails_on_empty_split(tmp_path, capsys):
    _coco(tmp_path)
    write_coco(tmp_path, "train2017", [], CATS)  # a train split without images
    assert check_main(["data=coco", f"data.root={tmp_path}"]) == 1
    out = capsys.readouterr().out
    assert "coco/train2017: 0 images, 0 samples" in out and "coco/val2017: 3 images, 6 samples" in out


def test_worker_processes_give_the_same_batches(tmp_path):
    _coco(tmp_path)
    (tmp_path / "val2017" / "301.png").write_bytes(b"broken")
    ids = {}
    for workers in (0, 2):
        dm = CocoDataModule(tmp_path, splits={"val": "val2017"}, image_size=32, batch_size=2, num_workers=workers)
        batches = list(dm.val_dataloader())
        ids[workers] = [(b["sample_id"], b["n_dropped"], b["images"].sum().item()) for b in batches]
        # counted in the main process, from the batches, whichever process decoded the image
        assert dm.skipped == {"loading/corrupt_image": 2}, workers
    # samples 300:1 300:2 | 301:1 301:2 (corrupt: the whole batch is skipped) | 302:1 302:2
    assert ids[0] == ids[2] and [s for s, _, _ in ids[2]] == [["300:1", "300:2"], ["302:1", "302:2"]]


def test_counts_survive_a_lightning_loop(tmp_path):
    import pytorch_lightning as pl

    class Count(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def validation_step(self, batch, batch_idx):
            self.seen += batch["sample_id"]

    _coco(tmp_path)
    dm = CocoDataModule(tmp_path, image_size=32, batch_size=2, num_workers=1)
    dm.setup("validate")
    for name in ("300.png", "302.png"):  # disappear after indexing: found only while loading, in the worker
        (tmp_path / "val2017" / name).unlink()
    model = Count()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, datamodule=dm, verbose=False)
    assert model.seen == ["301:1", "301:2"]
    assert dm.skipped == {"loading/missing_image": 4}
