"""Tiny-CLIP pretraining: the multi-positive loss, the caption stream, weight files and their lazy resolution."""

from __future__ import annotations

import dataclasses
import logging

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mmel.backbone import load_clip, register_model_configs
from mmel.data.shapes.world import CATEGORIES
from mmel.pretrain import tiny
from mmel.pretrain.data import ShapesCaptionStream
from mmel.pretrain.loss import caption_matches, category_spread_loss, multi_positive_contrastive_loss

_CONFIG = tiny.PretrainConfig  # the real class (one test swaps the module attribute)


def _hot(*cats: int) -> torch.Tensor:
    h = torch.zeros(len(CATEGORIES))
    h[list(cats)] = 1
    return h


def test_caption_matches_by_hand():
    images = torch.stack([_hot(0, 1), _hot(1), _hot(2, 3)])
    captions = torch.stack([_hot(0), _hot(1), _hot(3, 2)])
    want = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert torch.equal(caption_matches(images, captions), want)


def test_loss_is_clip_loss_when_only_the_pairs_match():
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1), F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    clip = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    got = multi_positive_contrastive_loss(img, txt, scale, torch.eye(5, dtype=torch.bool))
    torch.testing.assert_close(got, clip)


def test_loss_targets_are_uniform_over_matches():
    # two images that both hold what both captions name: the loss is minimal (log 2 per direction, entropy of a
    # uniform target) when each image scores both captions equally, and lower than when it prefers its own pair
    matches = torch.ones(2, 2, dtype=torch.bool)
    same = F.normalize(torch.ones(2, 4), dim=-1)
    tied = multi_positive_contrastive_loss(same, same, torch.tensor(5.0), matches)
    torch.testing.assert_close(tied, torch.log(torch.tensor(2.0)))
    eye = torch.eye(2, 4)
    assert multi_positive_contrastive_loss(eye, eye, torch.tensor(5.0), matches) > tied
    with pytest.raises(ValueError, match="at least one caption"):
        multi_positive_contrastive_loss(eye, eye, torch.tensor(5.0), torch.tensor([[True, False], [False, False]]))


def test_captions_without_a_matching_image_only_act_as_negatives():
    g = torch.Generator().manual_seed(1)
    img, txt = F.normalize(torch.randn(3, 8, generator=g), dim=-1), F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    matches = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)  # caption 3 matches nothing
    scale = torch.tensor(3.0)
    logits = scale * img @ txt.T
    want = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits[:, :3].T, torch.arange(3))) / 2
    torch.testing.assert_close(multi_positive_contrastive_loss(img, txt, scale, matches), want)


def test_category_spread_loss_penalises_merged_captions():
    merged = F.normalize(torch.ones(3, 4), dim=-1)  # three captions with one embedding: log 3, its maximum
    torch.testing.assert_close(category_spread_loss(merged), torch.log(torch.tensor(3.0)))
    apart = torch.eye(3, 4)
    torch.testing.assert_close(category_spread_loss(apart), -F.log_softmax(torch.tensor([10.0, 0, 0]), 0)[0])
    near = F.normalize(torch.ones(3, 4) + 0.01 * torch.eye(3, 4), dim=-1).requires_grad_()
    category_spread_loss(near).backward()
    moved = F.normalize(near - 0.1 * near.grad, dim=-1)
    assert (moved @ moved.T).fill_diagonal_(0).max() < (near @ near.T).fill_diagonal_(0).max()  # pushed apart


def test_caption_stream_is_deterministic_and_truthful():
    register_model_configs()
    tok = open_clip.get_tokenizer(tiny.ARCH)
    ds = ShapesCaptionStream(0, 10, tok, mean=(0.5,) * 3, std=(0.5,) * 3, image_size=64)
    a, b = ds[7], ds[7]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(ds[7][0], ds[8][0])
    for i in range(10):
        image, tokens, image_objects, caption_objects = ds[i]
        assert image.shape == (3, 64, 64) and 1 <= image_objects.sum() <= 4 and 1 <= caption_objects.sum() <= 3
        assert bool((caption_objects <= image_objects).all())  # a caption names only objects in its image
        assert tokens.shape == (32,) and tokens[0] == tok.sot_token_id


def _random_tiny(seed: int = 0):
    register_model_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(tiny.ARCH)


def test_check_weights_accepts_exports_and_names_what_is_wrong(tmp_path):
    good = tmp_path / "good.safetensors"
    meta = {"format": tiny.FORMAT, "arch": __import__("json").dumps(tiny.arch_config())}
    tiny.export_weights(_random_tiny(), good, meta)
    assert tiny.check_weights(good) is None
    assert load_file(str(good))["logit_scale"].dtype == torch.float16  # stored in fp16 (size), loaded as fp32
    assert "no such file" in tiny.check_weights(tmp_path / "missing.safetensors")
    lfs = tmp_path / "lfs.safetensors"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 8000000\n")
    assert "unreadable" in tiny.check_weights(lfs)
    other = tmp_path / "other.safetensors"
    tiny.export_weights(_random_tiny(), other, {**meta, "arch": '{"embed_dim": 7}'})
    assert "another" in tiny.check_weights(other)


def _small_config(**kw) -> tiny.PretrainConfig:
    return _CONFIG(
        **{"steps": 2, "batch_size": 8, "warmup_steps": 1, "val_images": 8, "val_every": 2, "num_workers": 0, **kw}
    )


def test_resolve_weights_trains_into_the_cache_once_and_load_clip_uses_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tiny, "COMMITTED", tmp_path / "absent.safetensors")
    monkeypatch.setattr(tiny, "PretrainConfig", _small_config)
    with caplog.at_level(logging.WARNING, logger="mmel.pretrain.tiny"):
        clip = load_clip("mmel-tiny", pretrained="shapes", cache_dir=tmp_path / "cache")
    assert "training them now" in caplog.text and "minutes" in caplog.text
    path = tmp_path / "cache" / tiny.WEIGHTS_NAME
    assert tiny.check_weights(path) is None
    stamp = path.stat().st_mtime_ns
    assert tiny.resolve_weights(tmp_path / "cache") == path and path.stat().st_mtime_ns == stamp  # not retrained
    # the loaded model is the file's (fp16-rounded) weights
    sd = load_file(str(path))
    assert torch.equal(clip.model.visual.conv1.weight, sd["visual.conv1.weight"].float())
    # the same seed gives the same weights; another seed does not
    again = tmp_path / "again.safetensors"
    tiny.pretrain(again, _small_config())
    assert all(torch.equal(v, load_file(str(again))[k]) for k, v in sd.items())
    other = tmp_path / "other.safetensors"
    tiny.pretrain(other, _small_config(seed=1))
    assert not torch.equal(sd["visual.conv1.weight"], load_file(str(other))["visual.conv1.weight"])


def test_cli_records_the_command(tmp_path, monkeypatch):
    out = tmp_path / "w.safetensors"
    cfg = dataclasses.replace(_small_config(), seed=3)
    assert tiny._cli_args(out, cfg)[:4] == ["--out", str(out), "--seed", "3"]
    assert "--steps" in tiny._cli_args(out, cfg) and "--lr" not in tiny._cli_args(out, cfg)
