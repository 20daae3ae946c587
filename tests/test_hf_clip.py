"""Hugging Face CLIP (``load_clip("hf:...")``): the conversion into open_clip's native CLIP is exact.

Everything is random weights saved with ``save_pretrained`` to a temporary folder (no network): the converted
model's embeddings equal the transformers model's, and a native open_clip model exported to a CLIPModel and loaded
back through ``hf:`` gives the same Grad-ECLIP maps as the native model itself.
"""

from __future__ import annotations

import pytest
import torch

from mmel.backbone import load_clip
from mmel.explainers import build_explainer
from mmel.families import HF_CLIP, classify

transformers = pytest.importorskip("transformers")

PROMPTS = ["a red circle", "a blue square next to a green triangle", "nothing"]
# Both sides compute in float32 with different kernels (transformers' SDPA attention vs the packed in_proj and
# nn.MultiheadAttention): they agree to a few float32 ulps of O(1) values, well inside 1e-5.
TOL = 1e-5


def save_tokenizer(folder) -> None:
    """A Hugging Face CLIP tokenizer with open_clip's own BPE vocabulary (the one OpenAI's CLIP uses), padding with
    "!" (id 0) as open_clip does (and LAION's saved tokenizers)."""
    from open_clip.tokenizer import SimpleTokenizer

    st = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    merges = sorted(st.bpe_ranks, key=st.bpe_ranks.get)
    vocab = {rename.get(k, k): v for k, v in st.encoder.items()}
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!")
    tok.save_pretrained(folder)


def hf_config(vision: dict, text: dict, projection_dim: int, act: str = "quick_gelu"):
    return transformers.CLIPConfig(
        vision_config=dict(hidden_act=act, **vision),
        text_config=dict(hidden_act=act, vocab_size=49408, **text),
        projection_dim=projection_dim,
    )


def random_hf_clip(config, seed: int = 0):
    """A CLIPModel with every parameter random (biases and norms too, so that a swapped q/k/v or a missed bias
    would show)."""
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.02 * torch.randn_like(p))
    return model


def to_hf(native, context_length: int, act: str):
    """The inverse of mmel.hf_clip.convert_state_dict: an open_clip native CLIP as a transformers CLIPModel."""
    v, t = native.visual, native
    vb, tb = v.transformer.resblocks, t.transformer.resblocks
    config = hf_config(
        dict(
            hidden_size=v.transformer.width,
            num_hidden_layers=len(vb),
            num_attention_heads=vb[0].attn.num_heads,
            intermediate_size=vb[0].mlp.c_fc.out_features,
            patch_size=v.conv1.kernel_size[0],
            image_size=v.image_size[0],
        ),
        dict(
            hidden_size=t.transformer.width,
            num_hidden_layers=len(tb),
            num_attention_heads=tb[0].attn.num_heads,
            intermediate_size=tb[0].mlp.c_fc.out_features,
            max_position_embeddings=context_length,
            eos_token_id=49407,
        ),
        native.visual.proj.shape[1],
        act,
    )
    sd = {
        "vision_model.embeddings.class_embedding": v.class_embedding,
        "vision_model.embeddings.position_embedding.weight": v.positional_embedding,
        "vision_model.embeddings.patch_embedding.weight": v.conv1.weight,
        "visual_projection.weight": v.proj.T,
        "text_model.embeddings.token_embedding.weight": t.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": t.positional_embedding,
        "text_projection.weight": t.text_projection.T,
        "logit_scale": native.logit_scale.reshape(()),
    }
    for ours, theirs in ((v.ln_pre, "vision_model.pre_layrnorm"), (v.ln_post, "vision_model.post_layernorm"),
                         (t.ln_final, "text_model.final_layer_norm")):  # fmt: skip
        sd[f"{theirs}.weight"], sd[f"{theirs}.bias"] = ours.weight, ours.bias
    for blocks, prefix in ((vb, "vision_model"), (tb, "text_model")):
        for i, blk in enumerate(blocks):
            a = f"{prefix}.encoder.layers.{i}."
            for p, w, b in zip("qkv", blk.attn.in_proj_weight.chunk(3), blk.attn.in_proj_bias.chunk(3), strict=True):
                sd[a + f"self_attn.{p}_proj.weight"], sd[a + f"self_attn.{p}_proj.bias"] = w, b
            pairs = {"self_attn.out_proj": blk.attn.out_proj, "layer_norm1": blk.ln_1, "layer_norm2": blk.ln_2,
                     "mlp.fc1": blk.mlp.c_fc, "mlp.fc2": blk.mlp.c_proj}  # fmt: skip
            for name, mod in pairs.items():
                sd[a + f"{name}.weight"], sd[a + f"{name}.bias"] = mod.weight, mod.bias
    model = transformers.CLIPModel(config).eval()
    model.load_state_dict({k: x.detach().clone() for k, x in sd.items()}, strict=True)
    return model


def _features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _tiny_config():
    return hf_config(
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, patch_size=8,
             image_size=32),
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
             max_position_embeddings=16, eos_token_id=49407),
        32,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_clip")
    model = random_hf_clip(_tiny_config())
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder, model


def check_embeddings(folder, hf_model, size: int) -> tuple[float, float]:
    """Max |difference| of the image and text embeddings, converted vs transformers (the same tokens)."""
    clip = load_clip(f"hf:{folder}")
    assert classify(clip) == HF_CLIP
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = clip.tokenize(PROMPTS)
    with torch.no_grad():
        di = (clip.model.encode_image(images) - _features(hf_model.get_image_features(pixel_values=images))).abs()
        dt = (clip.model.encode_text(tokens) - _features(hf_model.get_text_features(input_ids=tokens))).abs()
    return float(di.max()), float(dt.max())


def test_hf_clip_embeddings_equal_transformers(hf_folder):
    folder, hf_model = hf_folder
    di, dt = check_embeddings(folder, hf_model, 32)
    assert di <= TOL and dt <= TOL, (di, dt)


def test_hf_tokenizer_gives_open_clips_tokens(hf_folder):
    """The saved tokenizer, wrapped to open_clip's call shape: the same ids as open_clip's tokenizer."""
    import open_clip

    clip = load_clip(f"hf:{hf_folder[0]}")
    ours, theirs = clip.tokenize(PROMPTS), open_clip.get_tokenizer("ViT-B-16", context_length=16)(PROMPTS)
    assert ours.shape == (3, 16)
    assert torch.equal(ours, theirs)
    assert clip.token_counts(" ".join(["red"] * 30)) == (16, 32)


def test_hf_roundtrip_gives_native_grad_eclip_maps(micro_clip, tmp_path):
    """mmel-micro (GELU, random) -> transformers CLIPModel -> hf: folder: the same embeddings and Grad-ECLIP maps
    (image side and text tokens) as the native model."""
    hf_model = to_hf(micro_clip.model, 16, act="gelu")
    hf_model.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    clip = load_clip(f"hf:{tmp_path}")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    native = build_explainer("grad_eclip", micro_clip)
    converted = build_explainer("grad_eclip", clip)
    a, b = native(images, PROMPTS), converted(images, PROMPTS)
    assert a.shape == b.shape == (2, 3, 32, 32)
    assert (a - b).abs().max() <= TOL
    ta, tb = native.explain_text(images[:1], PROMPTS[1:2]), converted.explain_text(images[:1], PROMPTS[1:2])
    assert ta.tokens == tb.tokens == [["a", "blue", "square", "next", "to", "a", "green", "triangle"]]
    assert (ta.weights - tb.weights).abs().max() <= TOL


def test_hf_missing_tokenizer_is_a_clear_error(tmp_path):
    random_hf_clip(_tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer files.*save_pretrained"):
        load_clip(f"hf:{tmp_path}")


def test_hf_absent_weights_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"Could not obtain.*HF_HUB_OFFLINE=1"):
        load_clip("hf:no-such-org/no-such-clip")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_clip(f"hf:{tmp_path}/absent")
    with pytest.raises(ValueError, match="leave pretrained null"):
        load_clip("hf:some/model", pretrained="openai")


@pytest.mark.slow
def test_hf_clip_vitb16_shaped(tmp_path):
    """A ViT-B/16-shaped CLIPModel (12 x 768 vision, 224 px; the full 12 x 512 text tower): exact conversion."""
    config = hf_config(
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16,
             image_size=224),
        dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
             max_position_embeddings=77, eos_token_id=49407),
        512,
    )  # fmt: skip
    model = random_hf_clip(config)
    model.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    di, dt = check_embeddings(tmp_path, model, 224)
    assert di <= TOL and dt <= TOL, (di, dt)
