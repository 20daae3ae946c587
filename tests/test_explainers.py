"""Explainers: contract (shape/range/finite/deterministic), no side effects on the model, batching, exactness.

Grad-ECLIP is checked against independent re-computations written here from the formulas (docs/grad_eclip.md), not
against its own code path: a hand-built block for dS/do, and per-prompt loops over the stock model for both modes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock

from mmel.explainers import available, build_explainer
from mmel.explainers.base import minmax, to_image_maps
from mmel.explainers.grad_eclip import pull_back_through_out_proj
from mmel.explainers.vit import block_attention, encode_text, positional_embedding, trace_image

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]
FAST = {"rise": {"n_masks": 40, "batch_size": 16}}
GRADIENT_BASED = ["grad_eclip", "gradcam", "game"]


def _images(shape=(2, 3, 32, 48), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _build(name, clip, **cfg):
    return build_explainer(name, clip, **{**FAST.get(name, {}), **cfg})


def test_registry_lists_every_method():
    assert {"grad_eclip", "attention", "rollout", "gradcam", "game", "maskclip", "rise"} <= set(available())
    with pytest.raises(ValueError, match="Unknown explainer 'nope'"):
        build_explainer("nope", None)


@pytest.mark.parametrize("name", sorted(available()))
def test_contract_shape_range_finite_deterministic(micro_clip, name):
    e = _build(name, micro_clip)
    images = _images()
    maps = e(images, PROMPTS)
    assert maps.shape == (2, 3, 32, 48) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    # min-max normalised on the patch grid, then bilinearly resized (which may shave an interior peak)
    assert maps.amax(dim=(-2, -1)).gt(0.5).all() and maps.amin(dim=(-2, -1)).lt(0.2).all()
    assert torch.equal(maps, e(images, PROMPTS))


@pytest.mark.parametrize("name", sorted(available()))
def test_explaining_leaves_the_model_untouched(micro_clip, name):
    model = micro_clip.model
    images = _images((1, 3, 32, 32))
    tokens = micro_clip.tokenize(PROMPTS)
    with torch.no_grad():
        before = model.encode_image(images), model.encode_text(tokens)
    _build(name, micro_clip)(images, PROMPTS)
    with torch.no_grad():
        after = model.encode_image(images), model.encode_text(tokens)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for m in model.modules():  # nothing registered, nothing left behind
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


@pytest.mark.parametrize("name", GRADIENT_BASED + ["maskclip", "rise"])
def test_k_prompts_batched_equal_k_single_calls(micro_clip, name):
    e = _build(name, micro_clip)
    images = _images()
    batched = e(images, PROMPTS)
    single = torch.cat([e(images, [p]) for p in PROMPTS], dim=1)
    assert (batched - single).abs().max() <= 1e-5


@pytest.mark.parametrize(("mode", "layers"), [("native", 1), ("native", 2), ("official", 1), ("official", 2)])
def test_grad_eclip_batched_equals_single_every_mode(micro_clip, mode, layers):
    e = build_explainer("grad_eclip", micro_clip, mode=mode, layers=layers)
    images = _images()
    single = torch.cat([e(images, [p]) for p in PROMPTS], dim=1)
    assert (e(images, PROMPTS) - single).abs().max() <= 1e-5


def test_maps_differ_between_prompts_and_methods(micro_clip):
    """Guards against a method silently ignoring its input (e.g. returning the same map for every prompt)."""
    images = _images()
    ge = build_explainer("grad_eclip", micro_clip)(images, PROMPTS)
    assert (ge[:, 0] - ge[:, 1]).abs().max() > 1e-3
    assert (ge - build_explainer("grad_eclip", micro_clip, mode="official")(images, PROMPTS)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ forward exactness
def test_traced_forward_reproduces_stock_encoders(micro_clip):
    model = micro_clip.model
    images = _images((3, 3, 32, 32))
    with torch.no_grad():
        stock = model.encode_image(images)
    for layers in ([], [1], [0, 1]):
        traced = trace_image(model, images, layers).features
        assert (traced - stock).abs().max() <= 1e-5
    tokens = micro_clip.tokenize(["a", "a much longer prompt with many words", "x y"])
    with torch.no_grad():
        assert (encode_text(model, tokens) - model.encode_text(tokens)).abs().max() <= 1e-5


def test_block_attention_matches_stock_multihead_attention():
    torch.manual_seed(0)
    blk = ResidualAttentionBlock(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        stock = blk(x)
        rec = block_attention(blk, x)
        mine = x + rec.y
        mine = mine + blk.mlp(blk.ln_2(mine))
    assert (stock - mine).abs().max() <= 1e-5
    assert torch.allclose(rec.attn.sum(-1), torch.ones(2, 4, 5))


def test_positional_embedding_native_and_interpolated(micro_clip):
    visual = micro_clip.visual
    assert positional_embedding(visual, (4, 4)) is visual.positional_embedding
    pe = positional_embedding(visual, (4, 6))
    assert pe.shape == (1 + 24, visual.positional_embedding.shape[-1])
    assert torch.equal(pe[0], visual.positional_embedding[0])  # CLS kept
    grid = visual.positional_embedding[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(24, -1)
    assert torch.allclose(pe[1:], ref)


def test_dsdo_via_out_proj_equals_direct_on_hand_built_block():
    """dS/do from y = o W_Oᵀ + b_O as (dS/dy)·W_O equals autograd on o computed by hand, head by head."""
    torch.manual_seed(1)
    C, H, T = 12, 3, 6
    d = C // H
    blk = ResidualAttentionBlock(C, H, batch_first=True).eval()
    x = torch.randn(1, T, C)
    r = torch.randn(C)
    # by hand: explicit per-head attention, o a leaf-like node we can differentiate against
    h = blk.ln_1(x)
    Wq, Wk, Wv = blk.attn.in_proj_weight.chunk(3)
    bq, bk, bv = blk.attn.in_proj_bias.chunk(3)
    q, k, v = h @ Wq.T + bq, h @ Wk.T + bk, h @ Wv.T + bv
    heads = []
    for j in range(H):
        s = slice(j * d, (j + 1) * d)
        heads.append(torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / d**0.5, -1) @ v[..., s])
    o = torch.cat(heads, -1).detach().requires_grad_(True)
    y = o @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    z = x + y
    S = ((z + blk.mlp(blk.ln_2(z)))[0, 0] * r).sum()
    direct = torch.autograd.grad(S, o)[0][0, 0]
    # the explainer's route: gradient at the attention module output, pulled back through out_proj
    xg = x.clone().requires_grad_(True)
    rec = block_attention(blk, xg)
    z2 = xg + rec.y
    S2 = ((z2 + blk.mlp(blk.ln_2(z2)))[0, 0] * r).sum()
    assert torch.allclose(S, S2, atol=1e-6)
    g_y = torch.autograd.grad(S2, rec.y)[0][0, 0]
    via = pull_back_through_out_proj(g_y, blk.attn.out_proj.weight)
    assert torch.allclose(via, direct, atol=1e-6)
    assert (direct - g_y).abs().max() > 1e-3  # the out_proj pull-back is not a no-op


# ------------------------------------------------------------------------- Grad-ECLIP vs independent formulas
def _reference_grad_eclip(clip, image, prompt, *, official: bool):
    """Grad-ECLIP of the last block for ONE image [1,3,H,W] and ONE prompt, written from the formulas."""
    model, visual = clip.model, clip.visual
    p = visual.conv1.kernel_size[0]
    gh, gw = image.shape[-2] // p, image.shape[-1] // p
    with torch.no_grad():
        t = model.encode_text(clip.tokenize([prompt]))[0]
        x = visual.conv1(image).flatten(2).transpose(1, 2)
        pe = visual.positional_embedding
        grid = pe[1:].reshape(1, *visual.grid_size, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        pe = torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
        x = torch.cat([visual.class_embedding.view(1, 1, -1), x], 1) + pe
        x = visual.ln_pre(x)
        for blk in visual.transformer.resblocks[:-1]:
            x = blk(x)
    blk = visual.transformer.resblocks[-1]
    C = x.shape[-1]
    H = 1 if official else blk.attn.num_heads
    d = C // H
    h = blk.ln_1(x)[0]  # [T, C]
    q, k, v = F.linear(h, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
    outs = [
        torch.softmax(q[:, s] @ k[:, s].T / d**0.5, -1) @ v[:, s] for s in (slice(j * d, (j + 1) * d) for j in range(H))
    ]
    o = torch.cat(outs, -1).detach().requires_grad_(True)
    z = x[0] + blk.attn.out_proj(o)
    z = z + blk.mlp(blk.ln_2(z))
    f = visual.ln_post(z[0]) @ visual.proj
    S = F.cosine_similarity(f, t, dim=0)
    w = torch.autograd.grad(S, o)[0][0]  # dS/do at the CLS row
    if official:  # q and k through out_proj (with bias) before the cosine
        q, k = blk.attn.out_proj(q).detach(), blk.attn.out_proj(k).detach()
    emap = torch.zeros(gh * gw)
    for s in (slice(j * d, (j + 1) * d) for j in range(H)):
        cos = F.cosine_similarity(q[0, s][None], k[1:, s], dim=-1)
        lam = (cos - cos.min()) / (cos.max() - cos.min())
        emap += (w[s] * v[1:, s]).sum(-1).detach() * lam
    emap = emap.relu().reshape(gh, gw)
    emap = (emap - emap.min()) / (emap.max() - emap.min())
    return F.interpolate(emap[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]


@pytest.mark.parametrize("mode", ["native", "official"])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_grad_eclip_matches_independent_recomputation(micro_clip, mode, size):
    images = _images((2, 3, *size), seed=3)
    maps = build_explainer("grad_eclip", micro_clip, mode=mode)(images, PROMPTS)
    for b in range(2):
        for k, p in enumerate(PROMPTS):
            ref = _reference_grad_eclip(micro_clip, images[b : b + 1], p, official=mode == "official")
            assert (maps[b, k] - ref).abs().max() <= 1e-4, (b, k)


def test_native_score_is_stock_clip_cosine(micro_clip, monkeypatch):
    import mmel.explainers.grad_eclip as ge

    seen = []
    real = ge.batched_vjp

    def spy(scores, inputs):
        seen.append(scores.detach().clone())
        return real(scores, inputs)

    monkeypatch.setattr(ge, "batched_vjp", spy)
    images = _images((2, 3, 32, 32))
    build_explainer("grad_eclip", micro_clip, layers=2)(images, PROMPTS)
    with torch.no_grad():
        stock = (
            micro_clip.model.encode_image(images, normalize=True)
            @ micro_clip.model.encode_text(micro_clip.tokenize(PROMPTS), normalize=True).T
        )
    assert len(seen) == 1 and seen[0].shape == (2, 3)  # ONE batched VJP for all prompts and images
    assert (seen[0] - stock).abs().max() <= 1e-6


# -------------------------------------------------------------------------------------------- layer evidence
def test_layer_evidence_shapes_and_map_identity(micro_clip):
    e = build_explainer("grad_eclip", micro_clip, layers=2)
    images = _images()
    ev = e.layer_evidence(images, PROMPTS, layers=[-2, -1])
    B, K, L, (h, w), C = 2, 3, 2, (4, 6), micro_clip.visual.transformer.width
    assert ev.evidence.shape == (B, K, L, h, w) and ev.grid == (h, w) and ev.layers == [0, 1]
    assert ev.keys.shape == (B, L, h * w, C) and ev.patch_tokens.shape == (B, h * w, C)
    assert ev.text_features.shape == (K, micro_clip.model.text_projection.shape[1])
    assert (ev.evidence < 0).any() and (ev.evidence > 0).any()  # signed, before ReLU
    expected = to_image_maps(ev.evidence.relu().sum(2), images.shape[-2:])
    assert (e(images, PROMPTS) - expected).abs().max() <= 1e-6
    # keys are the traced block's keys (heads concatenated), tokens the last block's patch outputs
    trace = trace_image(micro_clip.model, images, [0, 1], need_tokens=True)
    assert torch.allclose(ev.keys[:, 1], trace.records[1].k[:, :, 1:].transpose(1, 2).flatten(2))
    assert torch.allclose(ev.patch_tokens, trace.tokens[:, 1:])


def test_layer_evidence_paired_equals_unpaired_diagonal(micro_clip):
    e = build_explainer("grad_eclip", micro_clip)
    images = _images((3, 3, 32, 32))
    full = e.layer_evidence(images, PROMPTS, layers=[0, 1])
    paired = e.layer_evidence(images, PROMPTS, layers=[0, 1], paired=True)
    assert paired.evidence.shape == (3, 1, 2, 4, 4)
    diag = full.evidence[torch.arange(3), torch.arange(3)]
    assert (paired.evidence[:, 0] - diag).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="one prompt per image"):
        e.layer_evidence(images, PROMPTS[:2], layers=[-1], paired=True)


# ----------------------------------------------------------------------------------------------- text side
@pytest.mark.parametrize("mode", ["native", "official"])
def test_text_weights_non_negative_sum_to_one_real_tokens_only(micro_clip, mode):
    prompts = ["a red circle", "two small blue squares", "x"]
    e = build_explainer("grad_eclip", micro_clip, mode=mode, layers=2)
    te = e.explain_text(_images(), prompts)
    tokens = micro_clip.tokenize(prompts)
    eos = tokens.argmax(-1)
    assert te.weights.shape == (2, 3, tokens.shape[1])
    assert (te.weights >= 0).all() and torch.isfinite(te.weights).all()
    assert te.tokens[0] == ["a", "red", "circle"] and te.tokens[1] == ["two", "small", "blue", "squares"]
    for k in range(3):
        assert te.mask[k].sum() == eos[k] - 1 == len(te.tokens[k])
        assert not te.mask[k, 0] and not te.mask[k, eos[k]]
        assert (te.weights[:, k, ~te.mask[k]] == 0).all()  # start, end and padding carry nothing
        total = te.weights[:, k].sum(-1)
        assert torch.allclose(total, torch.ones(2), atol=1e-5) or (total == 0).all()
    # one batched call over images equals per-image calls
    single = torch.cat([e.explain_text(_images()[b : b + 1], prompts).weights for b in range(2)])
    assert (single - te.weights).abs().max() <= 1e-5


# --------------------------------------------------------------------------------------- normalisation / RISE
def test_constant_maps_become_zeros_never_nan():
    raw = torch.stack([torch.full((4, 4), 3.0), torch.full((4, 4), 3.0) + 1e-9 * torch.rand(4, 4), torch.zeros(4, 4)])
    out = to_image_maps(raw[None], (8, 8))
    assert torch.equal(out, torch.zeros(1, 3, 8, 8))
    ramp = torch.arange(16.0).view(4, 4)
    m = minmax(ramp)
    assert m.min() == 0 and m.max() == 1


def test_rise_is_seeded(micro_clip):
    images = _images()
    a = _build("rise", micro_clip)(images, PROMPTS)
    assert torch.equal(a, _build("rise", micro_clip)(images, PROMPTS))
    assert (a - _build("rise", micro_clip, seed=1)(images, PROMPTS)).abs().max() > 1e-3


def test_rollout_start_layer_changes_the_map(micro_clip):
    images = _images()
    a = build_explainer("rollout", micro_clip, start_layer=0)(images, PROMPTS)
    b = build_explainer("rollout", micro_clip, start_layer=-1)(images, PROMPTS)
    last = build_explainer("attention", micro_clip)(images, PROMPTS)
    assert (a - b).abs().max() > 1e-3 and (a - last).abs().max() > 1e-3
    assert torch.equal(a[:, 0], a[:, 1])  # prompt-independent


# --------------------------------------------------------------------------------------------------- errors
def test_bad_inputs_give_clear_errors(micro_clip):
    e = build_explainer("grad_eclip", micro_clip)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        e(torch.randn(1, 3, 30, 32), PROMPTS)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        e(torch.randn(3, 32, 32), PROMPTS)
    with pytest.raises(ValueError, match="empty"):
        e(_images(), [])
    with pytest.raises(ValueError, match="single string"):
        e(_images(), "a red circle")
    with pytest.raises(ValueError, match="mode"):
        build_explainer("grad_eclip", micro_clip, mode="nope")
    with pytest.raises(ValueError, match=r"layers=3.*1\.\.2"):
        build_explainer("grad_eclip", micro_clip, layers=3)
    with pytest.raises(ValueError, match="out of range"):
        e.layer_evidence(_images(), PROMPTS, layers=[5])
    with pytest.raises(RuntimeError, match="inference mode"), torch.inference_mode():
        e(_images(), PROMPTS)
    with pytest.raises(RuntimeError, match="inference mode"), torch.inference_mode():
        e.layer_evidence(_images(), PROMPTS, layers=[-1])
    with pytest.raises(ValueError, match="not a multiple"):
        e.explain_text(torch.randn(1, 3, 30, 30), PROMPTS)


def test_long_prompt_is_truncated_and_logged(micro_clip, caplog, monkeypatch):
    monkeypatch.setattr("mmel.backbone._TOLD_TRUNCATED", set())  # logged once per process: as if first
    e = build_explainer("grad_eclip", micro_clip)
    long = " ".join(["red"] * 40)
    with caplog.at_level("WARNING", logger="mmel.backbone"):
        maps = e(_images(), [long])
    assert "truncated to the text tower's context: 16 of its 42 tokens kept" in caplog.text
    assert torch.isfinite(maps).all()


def test_resnet_clip_is_rejected_clearly():
    from mmel.backbone import load_clip

    rn = load_clip("RN50")
    for name in ("grad_eclip", "attention"):
        with pytest.raises(TypeError, match=r"'RN50' \(family ModifiedResNet.*\['gradcam', 'm2ib', 'rise'\]"):
            build_explainer(name, rn)


# ------------------------------------------------------------------------------------------ other backbones
@pytest.fixture(scope="module")
def tiny_clip():
    """The tiny architecture (64 px, patch 8, 4 blocks, 4 heads) with random weights."""
    from mmel.backbone import load_clip

    torch.manual_seed(0)
    return load_clip("mmel-tiny")


def test_tiny_architecture_exact_and_batched(tiny_clip):
    images = _images((1, 3, 64, 64))
    with torch.no_grad():
        stock = tiny_clip.model.encode_image(images)
    assert (trace_image(tiny_clip.model, images, [0, 3]).features - stock).abs().max() <= 1e-5
    e = build_explainer("grad_eclip", tiny_clip, layers=3)
    single = torch.cat([e(images, [p]) for p in PROMPTS], dim=1)
    assert (e(images, PROMPTS) - single).abs().max() <= 1e-5
    assert e(_images((1, 3, 48, 80)), PROMPTS).shape == (1, 3, 48, 80)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", "ViT-B-16", "ViT-L-14-quickgelu"])
def test_real_architectures_random_weights(name):
    """The open_clip ViT-B/32, B/16 and L/14 architectures (random weights: no downloads)."""
    from mmel.backbone import load_clip

    torch.manual_seed(0)
    clip = load_clip(name)
    images = _images((1, 3, *clip.image_size))
    with torch.no_grad():
        stock = clip.model.encode_image(images)
    e = build_explainer("grad_eclip", clip, layers=2)
    assert (trace_image(clip.model, images, e.layers).features - stock).abs().max() <= 1e-4
    p = clip.patch_size
    maps = e(_images((1, 3, 7 * p, 9 * p)), PROMPTS[:2])
    assert maps.shape == (1, 2, 7 * p, 9 * p) and torch.isfinite(maps).all()
