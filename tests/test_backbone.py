"""load_clip: registered tiny configs, local weight files (open_clip + OpenAI formats), clear errors, hook guard."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mmel.backbone import check_vit, load_clip, uses_quick_gelu
from mmel.families import native_block_problem


def _embed(clip, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(2, 3, *clip.image_size, generator=g)
    tok = clip.tokenize(["a red circle", "two blue squares"])
    with torch.no_grad():
        return clip.model.encode_image(img), clip.model.encode_text(tok)


def test_tiny_registered_config_is_frozen_eval(micro_clip):
    assert micro_clip.patch_size == 8 and micro_clip.image_size == (32, 32)
    assert not micro_clip.model.training
    assert all(not p.requires_grad for p in micro_clip.model.parameters())
    assert micro_clip.tokenize(["x"]).shape == (1, 16)
    img, txt = _embed(micro_clip)
    assert img.shape == (2, 32) and txt.shape == (2, 32)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_saved_and_reloaded_gives_identical_embeddings(micro_clip, tmp_path, suffix):
    path = tmp_path / f"micro{suffix}"
    sd = {k: v.contiguous() for k, v in micro_clip.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}} if suffix == ".bin" else sd, path)
    torch.manual_seed(123)  # a different random init underneath: the file must overwrite all of it
    loaded = load_clip("mmel-micro", pretrained=str(path))
    for a, b in zip(_embed(micro_clip), _embed(loaded), strict=True):
        assert torch.equal(a, b)


def test_openai_format_state_dict_loads(tmp_path):
    torch.manual_seed(1)
    ref = load_clip("mmel-micro-quickgelu")
    assert uses_quick_gelu(ref.model)
    sd = dict(ref.model.state_dict())
    # OpenAI archives carry these scalars beside the weights, and a 0-d logit_scale
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16), vocab_size=torch.tensor(49408))
    sd["logit_scale"] = sd["logit_scale"].reshape(())
    path = tmp_path / "ViT-micro.pt"
    torch.save(sd, path)
    loaded = load_clip("mmel-micro-quickgelu", pretrained=str(path))
    for a, b in zip(_embed(ref), _embed(loaded), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="QuickGELU"):
        load_clip("mmel-micro", pretrained=str(path))


def test_openai_tag_requires_quickgelu_name():
    with pytest.raises(ValueError, match="-quickgelu"):
        load_clip("ViT-B-32", pretrained="openai")


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"Unknown CLIP architecture 'ViT-B-61'.*ViT-B-16"):
        load_clip("ViT-B-61")


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ValueError, match=r"Unknown pretrained tag 'nope'.*openai"):
        load_clip("ViT-B-32-quickgelu", pretrained="nope")


def test_missing_weight_file(tmp_path):
    missing = tmp_path / "nothere.safetensors"
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        load_clip("mmel-micro", pretrained=str(missing))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_weight_file(tmp_path, suffix):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"\x00this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match=f"bad{suffix}.*corrupt"):
        load_clip("mmel-micro", pretrained=str(bad))


def test_truncated_weight_file(micro_clip, tmp_path):
    good = tmp_path / "good.pt"
    torch.save(micro_clip.model.state_dict(), good)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_clip("mmel-micro", pretrained=str(bad))


def test_wrong_architecture_weights(micro_clip, tmp_path):
    path = tmp_path / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in micro_clip.model.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="do not fit architecture 'mmel-micro-quickgelu'|shape mismatch"):
        sd = {k: v.contiguous() for k, v in micro_clip.model.state_dict().items()}
        sd["visual.proj"] = torch.zeros(3, 3)
        save_file(sd, str(path))
        load_clip("mmel-micro-quickgelu", pretrained=str(path))


def test_offline_tag_download_error_says_how_to_supply_file(monkeypatch, tmp_path):
    import open_clip

    def boom(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", boom)
    with pytest.raises(RuntimeError, match=r"pretrained=/path/to.*HF_HUB_OFFLINE"):
        load_clip("ViT-B-32-quickgelu", pretrained="openai", cache_dir=tmp_path)


def test_vit_guard_reads_what_the_blocks_hold(micro_clip):
    """The explainers recompute blocks from their parameters; the guard checks those (not classes), so an open_clip
    upgrade that renames a class still passes and one that changes the parameters fails here
    (tests/test_families.py: a block of another class with the same parameters gives identical maps)."""
    visual = check_vit(micro_clip.model)
    for blk in [*visual.transformer.resblocks, *micro_clip.model.transformer.resblocks]:
        assert native_block_problem(blk) is None
        w = blk.attn.in_proj_weight
        assert w.shape == (3 * w.shape[1], w.shape[1]) and blk.attn.in_proj_bias.shape == (w.shape[0],)
        assert getattr(blk.attn, "batch_first", True)  # open_clip 3.x runs its blocks batch-first
    for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post", "proj"):
        assert getattr(visual, name) is not None, name
    assert visual.attn_pool is None


def test_resnet_clip_is_rejected():
    clip = load_clip("RN50")
    with pytest.raises(TypeError, match="not a ViT CLIP.*ModifiedResNet.*gradcam, m2ib or rise"):
        check_vit(clip.model)


def test_a_hub_tokenizer_out_of_reach_is_a_clear_error(monkeypatch):
    """SigLIP / PE tokenizers live on the Hugging Face hub: offline and uncached, the error says how to provide one
    (instead of transformers' bare OSError)."""
    import open_clip

    from mmel.backbone import load_clip

    def offline(name, *a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    with pytest.raises(OSError, match="mmel-micro: its tokenizer .* is read from the Hugging Face hub.*HF_HOME"):
        load_clip("mmel-micro")
