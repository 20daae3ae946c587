"""The field's current baselines (LeGrad, CLIP Surgery, ClearCLIP, M2IB): contract, batching, and one property each
paper states, checked against re-computations written here from stock open_clip modules (not the explainers'
own code path)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mmel.explainers import available, build_explainer
from mmel.explainers.base import to_image_maps
from mmel.explainers.clip_surgery import vv_attention
from mmel.explainers.vit import positional_embedding

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]
NEW = ["legrad", "clip_surgery", "clearclip", "m2ib"]


def _images(shape=(2, 3, 32, 48), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _text(clip, prompts):
    with torch.no_grad():
        return F.normalize(clip.model.encode_text(clip.tokenize(prompts)), dim=-1)


def _head(visual, x):
    return visual.ln_post(x) @ visual.proj


def _embed(visual, images):
    """Tokens entering the first block, by hand (positional embedding interpolated as the explainers do)."""
    B, p = images.shape[0], visual.conv1.kernel_size[0]
    patches = visual.conv1(images).flatten(2).transpose(1, 2)
    pe = positional_embedding(visual, (images.shape[-2] // p, images.shape[-1] // p))
    return visual.ln_pre(torch.cat([visual.class_embedding.expand(B, 1, -1), patches], 1) + pe)


def _qk_weights_as(mha, src: int, dst: tuple[int, ...]):
    """A copy of a stock nn.MultiheadAttention whose projections `dst` (0 q, 1 k, 2 v) reuse projection `src`."""
    m = copy.deepcopy(mha)
    C = m.embed_dim
    with torch.no_grad():
        for j in dst:
            m.in_proj_weight[j * C : (j + 1) * C] = mha.in_proj_weight[src * C : (src + 1) * C]
            m.in_proj_bias[j * C : (j + 1) * C] = mha.in_proj_bias[src * C : (src + 1) * C]
    return m


# ------------------------------------------------------------------------------------------------ contract
def test_registered_with_configs():
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf" / "explainer"
    for name in NEW:
        assert name in available()
        assert (conf / f"{name}.yaml").read_text().count(f"name: {name}") == 1


@pytest.mark.parametrize("name", NEW)
def test_shape_range_deterministic_any_patch_multiple(micro_clip, name):
    e = build_explainer(name, micro_clip)
    for shape in ((2, 3, 32, 48), (1, 3, 40, 24)):
        images = _images(shape)
        maps = e(images, PROMPTS)
        assert maps.shape == (shape[0], 3, *shape[-2:]) and maps.dtype == torch.float32
        assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
        assert maps.amax(dim=(-2, -1)).gt(0.5).all()
        assert torch.equal(maps, e(images, PROMPTS))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        e(_images((1, 3, 30, 32)), PROMPTS)


@pytest.mark.parametrize(
    ("name", "cfg"),
    [("legrad", {}), ("legrad", {"pool": "cls", "start_layer": 0}), ("clearclip", {}), ("m2ib", {})]
    + [("clip_surgery", {"surgery": s}) for s in ("empty", "none")],
)
def test_k_prompts_batched_equal_k_single_calls(micro_clip, name, cfg):
    e = build_explainer(name, micro_clip, **cfg)
    images = _images()
    single = torch.cat([e(images, [p]) for p in PROMPTS], dim=1)
    # M2IB: 10 Adam steps (g / sqrt(v) rescales rounding-level gradient differences) -> measured 1.5e-5
    assert (e(images, PROMPTS) - single).abs().max() <= (1e-4 if name == "m2ib" else 1e-5)


def test_bad_options_are_clear_errors(micro_clip):
    with pytest.raises(ValueError, match="legrad: pool"):
        build_explainer("legrad", micro_clip, pool="max")
    with pytest.raises(ValueError, match="legrad.start_layer"):
        build_explainer("legrad", micro_clip, start_layer=5)
    with pytest.raises(ValueError, match="clip_surgery: surgery"):
        build_explainer("clip_surgery", micro_clip, surgery="all")
    with pytest.raises(ValueError, match="m2ib: layer"):
        build_explainer("m2ib", micro_clip, layer=len(micro_clip.model.visual.transformer.resblocks) - 1)


# -------------------------------------------------------------------------------------------------- LeGrad
def _legrad_reference(clip, images, prompt, start, pool):
    """Per layer l, by hand: A^l a leaf, s^l = cos(proj(ln_post(pool(block_l output))), t), ReLU(ds^l/dA^l)
    averaged over heads and query rows, patch columns; summed over layers. Stock blocks before l."""
    visual = clip.visual
    blocks = visual.transformer.resblocks
    t = _text(clip, [prompt])[0]
    B = images.shape[0]
    x0 = _embed(visual, images)
    total = 0
    for layer in range(start, len(blocks)):
        with torch.no_grad():
            x = x0
            for blk in blocks[:layer]:
                x = blk(x)
        blk = blocks[layer]
        mha = blk.attn
        T, C, H = x.shape[1], x.shape[2], mha.num_heads
        d = C // H
        q, k, v = F.linear(blk.ln_1(x), mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.view(B, T, H, d).transpose(1, 2) for z in (q, k, v))
        A = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1).detach().requires_grad_(True)
        with torch.enable_grad():
            z = x + mha.out_proj((A @ v).transpose(1, 2).reshape(B, T, C))
            z = z + blk.mlp(blk.ln_2(z))
            f = _head(visual, z.mean(1) if pool == "mean" else z[:, 0])
            s = (F.normalize(f, dim=-1) @ t).sum()
            (g,) = torch.autograd.grad(s, A)
        total = total + g.clamp(min=0).mean(dim=(1, 2))[:, 1:]
    h, w = images.shape[-2] // 8, images.shape[-1] // 8
    return total.view(B, 1, h, w)


@pytest.mark.parametrize(("start", "pool"), [(-2, "mean"), (0, "mean"), (-1, "cls")])
def test_legrad_equals_per_layer_gradient_average(micro_clip, start, pool):
    """LeGrad's map is the non-negative sum over layers of each layer's own ReLU'd attention gradient."""
    e = build_explainer("legrad", micro_clip, start_layer=start, pool=pool)
    images = _images()
    maps = e(images, PROMPTS)
    depth = len(micro_clip.visual.transformer.resblocks)
    for k, p in enumerate(PROMPTS):
        ref = _legrad_reference(micro_clip, images, p, start % depth, pool)
        assert (ref >= 0).all()
        assert (maps[:, k : k + 1] - to_image_maps(ref, images.shape[-2:])).abs().max() <= 1e-4
    with torch.enable_grad():
        raw = e.raw_maps(images, PROMPTS)
    assert (raw >= 0).all()


def test_legrad_later_layers_do_not_leak_into_earlier_ones(micro_clip):
    """Without the per-block cut, layer l's gradient would also carry the later layers' scores."""
    images = _images()
    both = build_explainer("legrad", micro_clip, start_layer=0)
    last = build_explainer("legrad", micro_clip, start_layer=-1)
    assert (both(images, PROMPTS) - last(images, PROMPTS)).abs().max() > 1e-3


# -------------------------------------------------------------------------------------------- CLIP Surgery
def test_clip_surgery_equal_prompts_give_zero_maps_and_contrast_sums_to_zero(micro_clip):
    """Feature surgery removes what every prompt shares: a set of equal prompts leaves nothing."""
    e = build_explainer("clip_surgery", micro_clip)
    images = _images()
    assert e(images, ["a red circle"] * 3).abs().max() == 0
    with torch.no_grad():
        raw = e.raw_maps(images, PROMPTS)
    assert raw.sum(dim=1).abs().max() <= 1e-5  # Σ_k over the prompt set is 0 at every patch
    assert raw.abs().max() > 1e-3


def test_clip_surgery_prompt_set_is_permutation_equivariant_and_single_prompt_uses_empty(micro_clip):
    e = build_explainer("clip_surgery", micro_clip)
    images = _images()
    maps = e(images, PROMPTS)
    perm = [2, 0, 1]
    assert (e(images, [PROMPTS[i] for i in perm]) - maps[:, perm]).abs().max() <= 1e-5
    empty = build_explainer("clip_surgery", micro_clip, surgery="empty")
    assert torch.allclose(e(images, PROMPTS[:1]), empty(images, PROMPTS[:1]))
    assert (maps[:, :1] - empty(images, PROMPTS[:1])).abs().max() > 1e-3  # the set contrast changes the map


def test_clip_surgery_vv_path_matches_stock_attention_with_v_as_q_and_k(micro_clip):
    """The new stream = input of block d + Σ_l stock attention (q, k := v) of the original stream; CLS unchanged."""
    e = build_explainer("clip_surgery", micro_clip, layers=1)
    visual = micro_clip.visual
    blocks = visual.transformer.resblocks
    images = _images((1, 3, 32, 32))
    with torch.no_grad():
        patches, cls, _ = e.dense_features(images)
        assert torch.allclose(cls, micro_clip.model.encode_image(images), atol=1e-5)
        x = _embed(visual, images)
        for blk in blocks[:-1]:
            x = blk(x)
        h = blocks[-1].ln_1(x)
        vv = _qk_weights_as(blocks[-1].attn, 2, (0, 1))
        ref = _head(visual, (x + vv(h, h, h, need_weights=False)[0])[:, 1:])
        assert torch.allclose(vv_attention(blocks[-1], h), vv(h, h, h, need_weights=False)[0], atol=1e-5)
    assert torch.allclose(patches, ref, atol=1e-5)


# ----------------------------------------------------------------------------------------------- ClearCLIP
def test_clearclip_dense_features_are_qq_attention_without_residual_or_ffn(micro_clip):
    e = build_explainer("clearclip", micro_clip)
    visual = micro_clip.visual
    blocks = visual.transformer.resblocks
    images = _images((2, 3, 32, 40))
    with torch.no_grad():
        dense, grid = e.dense_features(images)
        x = _embed(visual, images)
        for blk in blocks[:-1]:
            x = blk(x)
        h = blocks[-1].ln_1(x)
        qq = _qk_weights_as(blocks[-1].attn, 0, (1,))  # keys := queries
        ref = _head(visual, qq(h, h, h, need_weights=False)[0][:, 1:])
        maps = e(images, PROMPTS)
    assert grid == (4, 5)
    assert torch.allclose(dense, ref, atol=1e-5)
    sim = (F.normalize(ref, dim=-1) @ _text(micro_clip, PROMPTS).T).transpose(1, 2).unflatten(-1, grid)
    assert (maps - to_image_maps(sim, images.shape[-2:])).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------- M2IB
def test_m2ib_map_is_the_bottleneck_capacity_per_token(micro_clip):
    """With one step the map is the capacity at the start (lambda = sigmoid(5)): the KL of N(lambda h,
    (1 - lambda)^2) to the N(0, 1) prior, summed over channels, per patch token (the paper's capacity; the block's
    output h is not rescaled, as in the authors' bottleneck), computed here from the stock blocks' outputs."""
    e = build_explainer("m2ib", micro_clip, steps=1)
    images = _images((1, 3, 32, 32))
    visual = micro_clip.model.visual
    with torch.no_grad():
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.view(1, 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x)
        for blk in visual.transformer.resblocks[: e.layer + 1]:
            x = blk(x)
    lam = torch.sigmoid(torch.tensor(5.0))
    mu, var = lam * x[0, 1:], (1 - lam) ** 2
    expected = (-0.5 * (1 + torch.log(var) - mu**2 - var)).sum(-1).view(1, 1, *visual.grid_size)
    raw = e.raw_maps(images, PROMPTS[:1])
    torch.testing.assert_close(raw, expected, atol=1e-4, rtol=1e-5)
    # more steps move the map: the fitting term shapes where information is kept
    assert not torch.allclose(build_explainer("m2ib", micro_clip, steps=5).raw_maps(images, PROMPTS[:1]), raw)
