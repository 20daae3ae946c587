"""One small random-weight CLIP per model family (tests of mmel.families and the capability matrix).

Each is built directly from open_clip's ``CLIP`` (or a transformers ``CLIPModel`` converted by mmel.hf_clip) with
the text tower of mmel-micro, so that the whole set builds in a few seconds on a CPU.
"""

from __future__ import annotations

import open_clip
import torch
from open_clip.model import CLIP

from mmel.backbone import ClipBundle
from mmel.families import (
    HF_CLIP,
    HF_SIGLIP,
    MODIFIED_RESNET,
    NATIVE_VIT,
    NATIVE_VIT_ATTN_POOL,
    TIMM_CNN,
    TIMM_VIT,
)

TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2)
SIZE = {
    NATIVE_VIT: 32,
    HF_CLIP: 32,
    NATIVE_VIT_ATTN_POOL: 32,
    MODIFIED_RESNET: 64,
    TIMM_CNN: 64,
    TIMM_VIT: 32,
    HF_SIGLIP: 32,
}


def bundle(model, name: str, context_length: int = 16) -> ClipBundle:
    """A frozen ClipBundle around ``model`` with open_clip's tokenizer."""
    model.requires_grad_(False).eval()
    tok = open_clip.get_tokenizer("ViT-B-16", context_length=context_length)
    return ClipBundle(model=model, preprocess=None, tokenizer=tok, name=name)


def hf_tiny():
    """A random transformers CLIPModel (ViT 2 x 64, patch 8, 32 px; text 2 x 32)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                           patch_size=8, image_size=32, hidden_act="quick_gelu"),
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                         max_position_embeddings=16, vocab_size=49408, eos_token_id=49407, hidden_act="quick_gelu"),
        projection_dim=32,
    )  # fmt: skip
    return transformers.CLIPModel(config).eval()


def build(family: str) -> ClipBundle:
    """The small model of ``family``."""
    torch.manual_seed(0)
    vit = dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32)
    if family == NATIVE_VIT:
        return bundle(CLIP(32, vision_cfg=vit, text_cfg=TEXT), "micro-vit")
    if family == NATIVE_VIT_ATTN_POOL:
        return bundle(CLIP(32, vision_cfg={**vit, "pool_type": "avg"}, text_cfg=TEXT), "micro-vit-avgpool")
    if family == MODIFIED_RESNET:
        cfg = dict(layers=[1, 1, 1, 1], width=16, image_size=64, head_width=16)
        return bundle(CLIP(32, vision_cfg=cfg, text_cfg=TEXT), "micro-rn")
    if family == TIMM_CNN:
        cfg = dict(timm_model_name="convnext_atto", timm_model_pretrained=False, timm_pool="avg",
                   timm_proj="linear", image_size=64)  # fmt: skip
        return bundle(CLIP(32, vision_cfg=cfg, text_cfg=TEXT), "micro-convnext")
    if family == TIMM_VIT:
        cfg = dict(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False, timm_pool="token",
                   timm_proj="linear", image_size=32)  # fmt: skip
        model = CLIP(32, vision_cfg=cfg, text_cfg=TEXT)
        model.visual.set_input_size(32)  # open_clip builds the timm trunk at its default 224 px
        return bundle(model, "micro-timm-vit")
    if family == HF_SIGLIP:  # a random tiny SiglipModel, saved and loaded back (tests/_towers.py)
        from tests._towers import tiny_hf_siglip

        return tiny_hf_siglip()
    if family == HF_CLIP:
        from mmel.hf_clip import convert

        return bundle(convert(hf_tiny()), "hf:tiny-random")
    raise ValueError(f"no small model for family {family!r}")


# cheap settings: a map in well under a second on the small models
CHEAP = {"rise": dict(n_masks=8, batch_size=8), "m2ib": dict(steps=1, samples=2)}


def build_full(family: str) -> ClipBundle:
    """The full-size model of ``family`` at 224 px, random weights: ViT-B/16, its Hugging Face twin, RN50,
    ConvNeXt-Base, a timm ViT-B/16."""
    from mmel.backbone import load_clip

    torch.manual_seed(0)
    if family == NATIVE_VIT:
        return load_clip("ViT-B-16-quickgelu")
    if family == MODIFIED_RESNET:
        return load_clip("RN50-quickgelu")
    if family == TIMM_CNN:
        return load_clip("convnext_base")
    text = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
    if family == TIMM_VIT:
        cfg = dict(timm_model_name="vit_base_patch16_224", timm_model_pretrained=False, timm_pool="token",
                   timm_proj="linear", image_size=224)  # fmt: skip
        return bundle(CLIP(512, vision_cfg=cfg, text_cfg=text, quick_gelu=True), "timm-vitb16", 77)
    if family == HF_SIGLIP:  # a random tiny SiglipModel, saved and loaded back (tests/_towers.py)
        from tests._towers import tiny_hf_siglip

        return tiny_hf_siglip()
    if family == HF_CLIP:
        import transformers

        from mmel.hf_clip import convert

        config = transformers.CLIPConfig(
            vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                               patch_size=16, image_size=224, hidden_act="quick_gelu"),
            text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                             max_position_embeddings=77, vocab_size=49408, eos_token_id=49407,
                             hidden_act="quick_gelu"),
            projection_dim=512,
        )  # fmt: skip
        return bundle(convert(transformers.CLIPModel(config)), "hf:vitb16-random", 77)
    raise ValueError(f"no full-size model for family {family!r}")
