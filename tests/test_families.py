"""Model families: detection by what a tower holds, the explainers' declarations, refusals, CNN towers, and the
capability matrix (README block == generated, every ✓ cell produces maps, every ✗ cell refuses clearly)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmel.backbone import check_vit, load_clip
from mmel.capabilities import markdown, matrix, readme_block
from mmel.explainers import build_explainer
from mmel.explainers.cnn import split_tower, stages
from mmel.explainers.vit import encode_text
from mmel.families import (
    HF_CLIP,
    HF_SIGLIP,
    MODIFIED_RESNET,
    NATIVE_VIT,
    NATIVE_VIT_ATTN_POOL,
    TIMM_CNN,
    TIMM_VIT,
    classify,
    family,
)
from tests._families import CHEAP, SIZE, build, build_full

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square"]
FAMILIES = [NATIVE_VIT, HF_CLIP, NATIVE_VIT_ATTN_POOL, MODIFIED_RESNET, TIMM_CNN, TIMM_VIT, HF_SIGLIP]


@pytest.fixture(scope="module")
def models():
    return {f: build(f) for f in FAMILIES}


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ detection
class OtherAttention(nn.Module):
    """An attention of another class holding nn.MultiheadAttention's parameter names (as open_clip's main branch
    has): packed in_proj_weight / in_proj_bias, out_proj, num_heads; computed with SDPA."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.num_heads = mha.num_heads
        self.in_proj_weight = nn.Parameter(mha.in_proj_weight.detach().clone())
        self.in_proj_bias = nn.Parameter(mha.in_proj_bias.detach().clone())
        self.out_proj = copy.deepcopy(mha.out_proj)
        self.ln_inner = nn.Identity()
        self.head_scale = None

    def forward(self, q, k=None, v=None, need_weights=False, attn_mask=None):
        B, T, C = q.shape
        qkv = F.linear(q, self.in_proj_weight, self.in_proj_bias).view(B, T, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        mask = attn_mask.to(q.dtype) if attn_mask is not None else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, C)
        return self.out_proj(self.ln_inner(x)), None


class OtherBlock(nn.Module):
    """A block of another class with open_clip's parameter names and pre-norm residual computation."""

    def __init__(self, blk: nn.Module) -> None:
        super().__init__()
        self.ln_1, self.ls_1, self.ln_2, self.mlp, self.ls_2 = blk.ln_1, blk.ls_1, blk.ln_2, blk.mlp, blk.ls_2
        self.attn = OtherAttention(blk.attn)

    def get_weight_dtype(self) -> torch.dtype:  # what open_clip's own encode_text asks its blocks
        return self.mlp.c_fc.weight.dtype

    def forward(self, x, attn_mask=None):
        x = x + self.ls_1(self.attn(self.ln_1(x), attn_mask=attn_mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


def _swap_blocks(clip):
    other = copy.deepcopy(clip)
    for blocks in (other.model.visual.transformer.resblocks, other.model.transformer.resblocks):
        for i in range(len(blocks)):
            blocks[i] = OtherBlock(blocks[i])
    return other


def test_blocks_of_another_class_are_recognised_and_give_identical_maps(models):
    clip = models[NATIVE_VIT]
    other = _swap_blocks(clip)
    assert type(other.model.visual.transformer.resblocks[0].attn) is OtherAttention
    assert classify(other) == NATIVE_VIT
    images = _images(32)
    with torch.no_grad():
        assert torch.allclose(other.model.encode_image(images), clip.model.encode_image(images), atol=1e-6)
    for name in ("grad_eclip", "gradcam", "attention"):
        a = build_explainer(name, clip)(images, PROMPTS)
        b = build_explainer(name, other)(images, PROMPTS)
        assert (a - b).abs().max() <= 1e-5, name  # SDPA vs explicit softmax: float32 rounding only
    ta = build_explainer("grad_eclip", clip).explain_text(images[:1], PROMPTS[:1])
    tb = build_explainer("grad_eclip", other).explain_text(images[:1], PROMPTS[:1])
    assert (ta.weights - tb.weights).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda a: setattr(a, "ln_inner", nn.LayerNorm(64)), "ln_inner"),
        (lambda a: setattr(a, "head_scale", nn.Parameter(torch.ones(2, 1, 1))), "head_scale"),
        (lambda a: setattr(a, "in_proj_weight", None), "no packed q/k/v"),
        (lambda a: setattr(a, "num_heads", 3), "num_heads 3 does not divide"),
    ],
)
def test_blocks_that_compute_something_else_are_refused_with_the_reason(models, change, reason):
    other = _swap_blocks(models[NATIVE_VIT])
    change(other.model.visual.transformer.resblocks[1].attn)
    with pytest.raises(TypeError, match=f"micro-vit.*vision block 1.*{reason}"):
        check_vit(other.model, other.name)
    with pytest.raises(ValueError, match="not a supported CLIP family"):
        classify(other)


def test_classify_each_family(models):
    for fam, clip in models.items():
        assert classify(clip) == fam, clip.name
    assert family(NATIVE_VIT).label == "native ViT"


def test_non_native_text_tower_uses_the_models_own_encode_text(models):
    """A text tower mmel cannot trace (here: pooled at the last token) still feeds image-side maps, through the
    model's own encode_text; text-token explanations refuse it clearly."""
    clip = copy.deepcopy(models[NATIVE_VIT])
    clip.model.text_pool_type = "last"
    tokens = clip.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.equal(encode_text(clip.model, tokens), clip.model.encode_text(tokens))
    e = build_explainer("grad_eclip", clip)
    maps = e(_images(32), PROMPTS)
    assert maps.shape == (2, 2, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    with pytest.raises(TypeError, match="Text-token explanations need.*pools with 'last'.*Image-side maps still"):
        e.explain_text(_images(32, 1), PROMPTS)


# ---------------------------------------------------------------------------------------------- CNN towers
@pytest.mark.parametrize("fam", [MODIFIED_RESNET, TIMM_CNN])
def test_cnn_split_reproduces_encode_image(models, fam):
    clip, images = models[fam], _images(SIZE[fam])
    with torch.no_grad():
        ref = clip.model.encode_image(images)
        for s in range(len(stages(clip.model.visual, fam))):
            front, back = split_tower(clip.model.visual, fam, s)
            assert torch.allclose(back(front(images)), ref, atol=1e-6), s


@pytest.mark.parametrize("fam", [MODIFIED_RESNET, TIMM_CNN])
def test_cnn_gradcam_batched_equals_per_image(models, fam):
    clip, images = models[fam], _images(SIZE[fam])
    e = build_explainer("gradcam", clip)
    maps = e.explain_batch(images, [PROMPTS, PROMPTS[:1]])
    single = [e(images[b : b + 1], ps)[0] for b, ps in enumerate([PROMPTS, PROMPTS[:1]])]
    for m, s in zip(maps, single, strict=True):
        assert torch.allclose(m, s, atol=1e-5)
    assert [tuple(m.shape) for m in maps] == [(2, SIZE[fam], SIZE[fam]), (1, SIZE[fam], SIZE[fam])]


def test_cnn_options_are_checked(models):
    rn = models[MODIFIED_RESNET]
    with pytest.raises(ValueError, match="stage 7 is out of range.*4 stages"):
        build_explainer("gradcam", rn, layer=7)
    with pytest.raises(ValueError, match="a CNN tower takes 'native'"):
        build_explainer("gradcam", rn, variant="grad_eclip_paper")
    with pytest.raises(ValueError, match="at least one stage above"):
        build_explainer("m2ib", rn, layer=3)
    with pytest.raises(ValueError, match="only its native size"):
        build_explainer("gradcam", rn)(_images(96, 1), PROMPTS)


# ---------------------------------------------------------------------------------------------- the matrix
def test_readme_matrix_is_the_generated_one():
    fix = "run: python -m mmel.capabilities --write README.md"
    assert readme_block((ROOT / "README.md").read_text()) == markdown(), fix


def test_every_family_has_supported_and_refused_methods():
    m = matrix()
    for fam in FAMILIES:
        assert any(m[n][fam] is None for n in m), fam
    assert m["rise"][TIMM_VIT] is None and m["grad_eclip"][TIMM_VIT] is None  # the tower version (towers.md)
    assert m["game"][TIMM_VIT] is not None and m["legrad"][HF_SIGLIP] is None and m["mmel"][HF_SIGLIP] is not None
    assert m["gradcam"][MODIFIED_RESNET] is None and m["attention"][TIMM_CNN] is not None


CELLS = [(n, f) for n, row in matrix().items() for f in FAMILIES]


@pytest.mark.parametrize(("name", "fam"), CELLS, ids=[f"{n}-{f}" for n, f in CELLS])
def test_matrix_cell(models, name, fam):
    """A ✓ cell gives finite maps in [0, 1] of the right shape; a ✗ cell refuses, naming the model, the family,
    the reason and the methods that do work."""
    clip, reason = models[fam], matrix()[name][fam]
    if reason is not None:
        working = [n for n, row in matrix().items() if row[fam] is None]
        with pytest.raises(TypeError) as err:
            build_explainer(name, clip, **CHEAP.get(name, {}))
        msg = str(err.value)
        assert clip.name in msg and family(fam).label in msg and reason in msg and str(working) in msg
        return
    size = SIZE[fam]
    maps = build_explainer(name, clip, **CHEAP.get(name, {}))(_images(size), PROMPTS)
    assert maps.shape == (2, 2, size, size)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


FULL = [NATIVE_VIT, HF_CLIP, MODIFIED_RESNET, TIMM_CNN, TIMM_VIT]
FULL_CELLS = [(n, f) for f in FULL for n, row in matrix().items() if row[f] is None]  # grouped by family


@pytest.fixture(scope="module")
def full_models():
    return {}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "fam"), FULL_CELLS, ids=[f"{n}-{f}" for n, f in FULL_CELLS])
def test_matrix_cell_full_size(full_models, name, fam):
    """Every ✓ cell at full size (ViT-B/16, its Hugging Face twin, RN50, ConvNeXt-Base, timm ViT-B/16; 224 px)."""
    if fam not in full_models:
        full_models.clear()  # one full-size model in memory at a time (the cells are grouped by family)
        full_models[fam] = build_full(fam)
    clip = full_models[fam]
    assert classify(clip) == fam
    maps = build_explainer(name, clip, **CHEAP.get(name, {}))(_images(224, 1), PROMPTS)
    assert maps.shape == (1, 2, 224, 224)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


@pytest.mark.parametrize("fam", [MODIFIED_RESNET, TIMM_CNN])
def test_model_randomisation_covers_cnn_towers(models, fam):
    """The model-randomisation sanity check has layer groups for CNN towers: head, stages top-down, stem; each
    group's parameters are all redrawn in its step."""
    from mmel.metrics.sanity import randomised_copies, vision_layers

    clip = models[fam]
    names = [n for n, _ in vision_layers(clip.model.visual)]
    assert names == ["head", "stage 3", "stage 2", "stage 1", "stage 0", "embed"]
    covered = {id(p) for _, g in vision_layers(clip.model.visual) for m in g for p in m.parameters()}
    assert covered == {id(p) for p in clip.model.visual.parameters()}
    steps = list(randomised_copies(clip, mode="independent"))
    before = dict(clip.model.visual.named_parameters())
    changed = [n for n, p in steps[1][1].model.visual.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(".3." in n or "layer4" in n or "stages.3" in n for n in changed), changed[:5]


def test_load_clip_reads_a_hugging_face_siglip_folder(tmp_path):
    """`hf:<folder>` of a SiglipModel loads through the SigLIP path (mmel.hf_siglip) into the HF SigLIP family;
    a folder without tokenizer files loads, and the tokenizer says what is missing when called."""
    from tests._towers import tiny_hf_siglip

    tiny_hf_siglip(folder=str(tmp_path / "siglip"))
    clip = load_clip(f"hf:{tmp_path / 'siglip'}")
    assert classify(clip) == HF_SIGLIP and type(clip.model).__name__ == "HFSiglipCLIP"
    with pytest.raises(FileNotFoundError, match="no SigLIP tokenizer could be loaded"):
        clip.tokenize(["a red circle"])
