"""Pretraining on the relational world: every caption is true of its image, a hard negative is false exactly where
its relation fails, the batch's match matrix is exact, and what the model knows of the relations is measured on
counterfactual images and recorded in a file that can never be taken for the plain world's weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mmel.data.shapes.relations import relational_scene
from mmel.pretrain import tiny
from mmel.pretrain.relational import (
    RelationalCaptionStream,
    captions,
    collate,
    item_scene,
    relational_knowledge,
    visible_objects,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_captions_are_true_of_their_image_and_swapped_negatives_false_where_the_relation_fails():
    seen = {"relational_cf": 0, "relational_full": 0, "plain": 0}
    for i in range(240):
        rs, rng = item_scene(0, "pretrain", i, 64)
        cap, neg = captions(rs, rng)
        visible = visible_objects(rs)
        assert cap.true_of(visible), (i, cap.text)
        if cap.relation is None:
            seen["plain"] += 1
            assert not neg.true_of(visible)  # names an absent category
        elif rs.hidden:
            seen["relational_cf"] += 1
            assert not neg.true_of(visible), (i, neg.text)  # the look-alike is hidden: the swapped words are false
        else:
            seen["relational_full"] += 1
            assert neg.true_of(visible)  # both look-alikes present: both expressions are true (a match, not a negative)
    assert min(seen.values()) >= 30, seen


def test_the_batch_match_matrix_is_exact_across_images():
    import open_clip

    from mmel.backbone import register_model_configs

    register_model_configs()
    tok = open_clip.get_tokenizer("mmel-tiny")
    ds = RelationalCaptionStream(0, 48, MEAN, STD, image_size=64)
    items = [ds[i] for i in range(48)]
    batch = collate(tok)(items)
    texts = [it["caption"] for it in items] + [it["negative"] for it in items]
    assert batch["tokens"].shape[0] == 96 and batch["images"].shape == (48, 3, 64, 64)
    expected = torch.tensor([[t.true_of(it["visible"]) for t in texts] for it in items])
    assert torch.equal(batch["matches"], expected) and batch["matches"][:, :48].diagonal().all()
    assert batch["matches"][:, :48].sum() > 48  # plain captions also match other images that hold their objects
    assert ds[5]["caption"] == RelationalCaptionStream(0, 48, MEAN, STD, image_size=64)[5]["caption"]  # seeded


def test_relational_knowledge_scores_true_against_swapped_on_counterfactuals(micro_clip):
    clip = micro_clip
    know = relational_knowledge(clip.model, clip.tokenize, clip.mean, clip.std, seed=0, n=12, image_size=32)
    assert len(know["items"]) == 24 and know["accuracy"] == pytest.approx(sum(k for *_, k in know["items"]) / 24)
    index, k, known = know["items"][7]  # recompute one item by hand
    rs = relational_scene(0, "val", index, size=32, hide_for=k)
    import numpy as np

    from mmel.data.shapes.world import decode_jpeg, encode_jpeg
    from mmel.pretrain.data import to_tensor

    img = to_tensor(np.asarray(decode_jpeg(encode_jpeg(rs.scene.pixels))), clip.mean, clip.std)[None]
    with torch.no_grad():
        f = torch.nn.functional.normalize(clip.model.encode_image(img), dim=-1)
        t = torch.nn.functional.normalize(
            clip.model.encode_text(clip.tokenize([rs.referrals[k].expression, rs.referrals[k].swapped])), dim=-1
        )
    s = (f @ t.T)[0]
    assert known == bool(s[0] > s[1])


def test_a_relations_run_records_its_knowledge_and_is_never_the_plain_weights(tmp_path):
    cfg = tiny.RelationsPretrainConfig(steps=2, batch_size=8, warmup_steps=1, val_images=8, val_every=2,
                                       num_workers=0)  # fmt: skip
    out = tmp_path / "rel.safetensors"
    meta = tiny.pretrain(out, cfg)
    assert meta["format"] == tiny.RELATIONS_FORMAT and "--world relations" in meta["command"]
    know = json.loads(meta["val_relations"])
    assert 0 <= know["accuracy"] <= 1 and set(know["by_kind"]) == {"left", "above", "size", "inside", "next to", "row"}
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["val_relations"] == meta["val_relations"]
    assert "format" in tiny.check_weights(out)  # refused as mmel-tiny/shapes weights
    assert "world" not in json.loads(meta["config"])  # the plain world's recorded settings keep their keys
    assert tiny.PretrainConfig().world == "plain" and cfg.world == "relations"


def test_pairs_are_the_items_whose_swapped_words_are_false_of_their_own_image():
    from mmel.pretrain.relational import collate

    ds = RelationalCaptionStream(0, 64, MEAN, STD, image_size=64, counterfactual=1.0, relational=1.0)
    items = [ds[i] for i in range(64)]
    batch = collate(lambda texts: torch.zeros(len(texts), 4, dtype=torch.long))(items)
    # every image is a counterfactual with an expression: its swap is false of it, so every item is a pair
    assert batch["pairs"].all()
    assert not batch["matches"][torch.arange(64), 64 + torch.arange(64)].any()
    plain = RelationalCaptionStream(0, 32, MEAN, STD, image_size=64, counterfactual=0.0, relational=1.0)
    full = collate(lambda texts: torch.zeros(len(texts), 4, dtype=torch.long))([plain[i] for i in range(32)])
    assert not full["pairs"].any()  # on full images both expressions are true: nothing to contrast


def test_the_pair_term_is_a_two_way_cross_entropy_on_the_pairs_only():
    from mmel.pretrain.module import TinyClipPretrainer

    m = TinyClipPretrainer(pair_weight=1.0)
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    pairs = torch.tensor([True, False, True])
    got = m._pair_loss(img, txt, torch.tensor(10.0), pairs)
    want = []
    for i in (0, 2):
        logits = 10.0 * torch.stack([img[i] @ txt[i], img[i] @ txt[3 + i]])
        want.append(-torch.log_softmax(logits, 0)[0])
    assert got.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-6)


def test_relational_only_settings_are_refused_for_the_plain_world_and_the_make_target_is_the_config(capsys):
    import re
    from pathlib import Path

    with pytest.raises(SystemExit):
        tiny.main(["--out", "/nonexistent/x.safetensors", "--pair-weight", "2"])
    assert "--pair-weight is a setting of --world relations only" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--init /nonexistent"):
        tiny.pretrain("/tmp/never-written.safetensors", tiny.RelationsPretrainConfig(init="/nonexistent", steps=1))
    make = (Path(__file__).parents[1] / "Makefile").read_text()
    line = re.search(r"-m mmel\.pretrain --world relations (.*)", make).group(1).split()
    cfg = tiny.relations_config()
    want = tiny._cli_args(tiny.RELATIONS_FILE, cfg)  # --out PATH --world relations --seed 0 ...
    got = ["--world", "relations", *line]
    assert dict(zip(want[::2], want[1::2], strict=True)) == {
        **dict(zip(got[::2], got[1::2], strict=True)),
        "--out": str(tiny.RELATIONS_FILE),
    }


def test_the_relations_tag_loads_the_committed_file_or_trains_one_into_the_cache(tmp_path, monkeypatch, caplog):
    import logging

    from safetensors.torch import load_file

    from mmel.backbone import load_clip

    assert tiny.check_weights(tiny.RELATIONS_FILE, tiny.RELATIONS_FORMAT) is None  # the committed asset is valid
    meta = json.loads(_metadata(tiny.RELATIONS_FILE)["val_relations"])
    assert meta["accuracy"] > 0.5  # what the committed model knows is recorded (docs/shapes_world.md)
    monkeypatch.setattr(tiny, "RELATIONS_FILE", tmp_path / "absent.safetensors")
    small = tiny.RelationsPretrainConfig(steps=2, batch_size=8, warmup_steps=1, val_images=8, val_every=2,
                                         num_workers=0)  # fmt: skip
    monkeypatch.setattr(tiny, "relations_config", lambda: small)
    with caplog.at_level(logging.WARNING, logger="mmel.pretrain.tiny"):
        clip = load_clip("mmel-tiny", pretrained="shapes-relations", cache_dir=tmp_path / "cache")
    assert "shapes-relations weights not found: training them now" in caplog.text and "--world relations" in caplog.text
    path = tmp_path / "cache" / tiny.RELATIONS_NAME
    assert tiny.check_weights(path, tiny.RELATIONS_FORMAT) is None and "format" in tiny.check_weights(path)
    assert torch.equal(clip.model.visual.conv1.weight, load_file(str(path))["visual.conv1.weight"].float())


def _metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()
