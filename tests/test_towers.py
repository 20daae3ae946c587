"""Explainers on timm-trunk and Hugging Face SigLIP towers (mmel.explainers.towers, docs/towers.md).

Fast run: tiny towers of the real timm architectures (SigLIP ViT with attention pool, EVA02 with rotary embedding,
PE-Core with rotary embedding + attention pool; depth 2, width 64, 32 px) and a tiny HF SiglipModel saved to a
folder and loaded. ``slow``: the open_clip configs ViT-B-16-SigLIP, ViT-B-16-SigLIP2, EVA02-B-16, PE-Core-B-16 and a
SiglipModel of google/siglip-base-patch16-224's shapes, random weights, 224 px.

What is checked: the tracer reproduces ``encode_image``; every tower method gives finite maps in [0, 1] of the
right shape and the others refuse; the score is the model's own logit (SigLIP: exp(scale)·cos + bias, equal to
transformers' ``logits_per_image``); Grad-ECLIP on an attention pool equals the gradient-weighted value sum of
the pool's latent query computed from the stock modules (hooks on ``attn_pool.q/kv/proj``); LeGrad equals
legrad-torch's SigLIP path (Pearson >= 0.999 per map) and, where legrad-torch cannot run (PE-Core, HF), an
independent re-run of its formula on the stock modules.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mmel.explainers import build_explainer
from mmel.explainers.towers import TOWER_METHODS, tower_family, tower_of
from mmel.explainers.towers.core import trace
from tests import _parity as P
from tests import _towers as T

PROMPTS = ["a red circle", "a blue square on grass"]
TINY = ["siglip", "eva02", "pe", "hf"]


def _tiny(kind: str):
    return T.tiny_hf_siglip() if kind == "hf" else T.tiny_timm_clip(kind)


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    bundle = _tiny(request.param)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return request.param, bundle, image


def _text(bundle, prompts=PROMPTS):
    with torch.no_grad():
        return tower_of(bundle.model).encode_text(bundle.tokenize(prompts))


def reproduction_error(bundle, images) -> tuple[float, float]:
    """(max |traced - encode_image|, max |encode_image|)."""
    with torch.no_grad():
        ref = bundle.model.encode_image(images)
    got = trace(tower_of(bundle.model), images, [0]).features.detach()
    return float((got - ref).abs().max()), float(ref.abs().max())


# --------------------------------------------------------------------------------------------------- tracer
def test_tracer_reproduces_encode_image(tiny):
    kind, bundle, image = tiny
    err, scale = reproduction_error(bundle, image)
    assert err <= 1e-5 and err <= 1e-4 * scale, (kind, err, scale)


def test_hf_tracer_off_native_size():
    bundle = T.tiny_hf_siglip()
    image = torch.randn(1, 3, 48, 40)
    err, scale = reproduction_error(bundle, image)
    assert err <= 1e-5 and err <= 1e-4 * scale


def test_timm_tower_refuses_other_sizes():
    bundle = T.tiny_timm_clip("siglip")
    with pytest.raises(ValueError, match="native size 32x32"):
        build_explainer("grad_eclip", bundle)(torch.randn(1, 3, 48, 48), PROMPTS)


def test_families():
    assert tower_family(T.tiny_timm_clip("siglip").model) == "timm-attnpool"
    assert tower_family(T.tiny_timm_clip("pe").model) == "timm-attnpool"
    assert tower_family(T.tiny_timm_clip("eva02").model) == "timm-cls"
    assert tower_family(T.tiny_hf_siglip().model) == "hf-siglip"


# -------------------------------------------------------------------------------------------------- methods
def check_maps(maps: torch.Tensor, shape) -> None:
    assert tuple(maps.shape) == tuple(shape)
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    assert (maps.flatten(2).std(-1) > 0).all(), "a constant map"


@pytest.mark.parametrize("method", TOWER_METHODS)
def test_methods_give_maps(tiny, method):
    kind, bundle, image = tiny
    maps = build_explainer(method, bundle)(image, PROMPTS)
    check_maps(maps, (2, len(PROMPTS), 32, 32))


@pytest.mark.parametrize("method", ["grad_eclip", "legrad", "gradcam"])
def test_explain_batch_matches_single(method):
    bundle = T.tiny_timm_clip("pe")
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    e = build_explainer(method, bundle)
    maps = e.explain_batch(image, [PROMPTS, PROMPTS[:1]])
    for b, m in enumerate(maps):
        assert torch.allclose(m, e(image[b : b + 1], [PROMPTS, PROMPTS[:1]][b])[0], atol=1e-5)


@pytest.mark.parametrize("method", ["clearclip", "m2ib", "mmel", "rollout"])
def test_other_methods_refuse(method):
    """Methods with no tower version refuse, naming the family and the methods that work on it (the tower ones
    and RISE, which needs only encode_image and runs on every family)."""
    with pytest.raises(TypeError, match=f"explainer '{method}' does not support .*timm ViT.*grad_eclip.*rise"):
        build_explainer(method, T.tiny_timm_clip("siglip"))


def test_rise_runs_on_towers_through_encode_image():
    clip = T.tiny_timm_clip("siglip")
    maps = build_explainer("rise", clip, n_masks=8, batch_size=8)(torch.randn(1, 3, 32, 32), PROMPTS)
    assert maps.shape == (1, len(PROMPTS), 32, 32) and torch.isfinite(maps).all() and maps.min() >= 0


def test_refusals_of_options():
    siglip, eva = T.tiny_timm_clip("siglip"), T.tiny_timm_clip("eva02")
    with pytest.raises(ValueError, match="use layers=1"):
        build_explainer("grad_eclip", siglip, layers=2)
    with pytest.raises(ValueError, match="mode='native'"):
        build_explainer("grad_eclip", eva, mode="official")
    assert build_explainer("grad_eclip", eva, layers=2).layers == [0, 1]
    with pytest.raises(NotImplementedError, match="text side"):
        build_explainer("grad_eclip", siglip).explain_text(torch.randn(1, 3, 32, 32), PROMPTS)
    with pytest.raises(ValueError, match="pool=.*expected"):
        build_explainer("legrad", eva, pool="max")


# ---------------------------------------------------------------------------------------------------- score
def test_score_is_the_siglip_logit():
    bundle = T.tiny_hf_siglip()
    tower = tower_of(bundle.model)
    image = torch.randn(2, 3, 32, 32)
    tokens = bundle.tokenize(PROMPTS)
    with torch.no_grad():
        ref = bundle.model.hf(input_ids=tokens, pixel_values=image).logits_per_image
        ours = tower.score(tower.encode_image(image), tower.encode_text(tokens))
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("method", ["grad_eclip", "legrad", "gradcam"])
def test_maps_do_not_depend_on_logit_scale_and_bias(method):
    """SigLIP's logit is a positive affine function of the cosine: the normalised maps are the same (docs)."""
    bundle = T.tiny_timm_clip("siglip")
    image = torch.randn(1, 3, 32, 32)
    other = copy.deepcopy(bundle)
    with torch.no_grad():
        other.model.logit_scale.fill_(4.0)
        other.model.logit_bias.fill_(3.0)
    a = build_explainer(method, bundle)(image, PROMPTS)
    b = build_explainer(method, other)(image, PROMPTS)
    assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------- Grad-ECLIP on a pool
def stock_pool_evidence(bundle, image, text) -> torch.Tensor:
    """Grad-ECLIP's pool evidence [K, N] from the STOCK timm forward: q, k, v read off ``attn_pool.q`` / ``kv``
    outputs, w = dS/do from the input of ``attn_pool.proj`` (one backward per prompt)."""
    pool = bundle.model.visual.trunk.attn_pool
    seen = {}
    hooks = [
        pool.q.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o)),
        pool.kv.register_forward_hook(lambda m, i, o: seen.__setitem__("kv", o)),
        pool.proj.register_forward_pre_hook(lambda m, i: seen.__setitem__("o", i[0])),
    ]
    try:
        out = []
        for t in text:
            image_ = image.clone().requires_grad_(True)
            f = bundle.model.encode_image(image_)
            s = F.cosine_similarity(f, t[None]) * bundle.model.logit_scale.exp() + bundle.model.logit_bias
            (w,) = torch.autograd.grad(s.sum(), [seen["o"]])
            H = pool.num_heads
            q = seen["q"].reshape(1, H, -1)  # [1, H, d]
            k, v = (t_.reshape(t_.shape[0], H, -1).transpose(0, 1) for t_ in seen["kv"][0].chunk(2, dim=-1))
            cos = F.cosine_similarity(q[0][:, None], k, dim=-1)  # [H, N]
            lam = (cos - cos.min(-1, keepdim=True).values) / (
                cos.max(-1, keepdim=True).values - cos.min(-1, True).values
            )
            out.append((lam * (v * w.reshape(H, 1, -1)).sum(-1)).sum(0))
        return torch.stack(out)
    finally:
        for h in hooks:
            h.remove()


def test_grad_eclip_pool_is_the_latent_querys_weighted_value_sum():
    bundle = T.tiny_timm_clip("siglip")
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    text = _text(bundle)
    e = build_explainer("grad_eclip", bundle)
    with torch.enable_grad():
        raw = e.raw_maps_text(image, text)[0].flatten(1)  # [K, N], before normalisation
    ref = stock_pool_evidence(bundle, image, text).relu().detach()
    assert torch.allclose(raw, ref, atol=1e-6 * float(ref.abs().max()) + 1e-12)


# --------------------------------------------------------------------------------------------------- LeGrad
def legrad_torch_siglip(bundle, images, prompts, correction: bool = False) -> torch.Tensor:
    """legrad-torch's ``compute_legrad_siglip``, one image and one prompt at a time (its score sums over the text
    rows). [B, K, H, W]. Its correction embeds "a photo of a" with the hub tokenizer of ViT-B-16-SigLIP (offline
    here): the wrapper's ``empty_embedding`` is set beforehand from the bundle's tokenizer (its code then skips the
    download), the same embedding mmel's ``correction=True`` uses."""
    legrad = P.import_legrad()
    wrapper = legrad.LeWrapper(copy.deepcopy(bundle.model), layer_index=-2)
    text = F.normalize(_text(bundle, prompts), dim=-1)
    wrapper.empty_embedding = F.normalize(_text(bundle, ["a photo of a"]), dim=-1).t()
    rows = []
    for b in range(len(images)):
        maps = [wrapper.compute_legrad_siglip(text[k : k + 1], images[b : b + 1], apply_correction=correction)
                for k in range(len(prompts))]  # fmt: skip
        rows.append(torch.cat([m.detach() for m in maps], dim=1))
    return torch.cat(rows)


def legrad_pool_rerun(bundle, images, text, start: int = -2) -> torch.Tensor:
    """legrad-torch's SigLIP formula re-run on the STOCK modules, for towers its package cannot drive: the block
    outputs come from forward hooks on the stock blocks (one graph, no cut), the pool is applied to each (without
    the final norm, as legrad-torch) with its attention computed here, then the towers' heads into the joint space
    (PE-Core's trunk.head, which legrad-torch omits). One backward per layer and prompt. [B, K, h, w] on the grid."""
    m = bundle.model
    hf = T.is_hf(m)
    blocks = m.visual.vision_model.encoder.layers if hf else m.visual.trunk.blocks
    outs = {}
    hooks = [b.register_forward_hook(lambda mod, i, o, j=j: outs.__setitem__(j, o[0] if isinstance(o, tuple) else o))
             for j, b in enumerate(blocks)]  # fmt: skip
    try:
        result = []
        for b in range(len(images)):
            image = images[b : b + 1].clone().requires_grad_(True)
            m.encode_image(image)
            per_k = []
            for t in F.normalize(text, dim=-1):
                total = 0.0
                for j in range(len(blocks) + start, len(blocks)):
                    f, attn = T.reference_pool(m, outs[j])
                    s = (F.normalize(f, dim=-1) * t).sum()
                    (g,) = torch.autograd.grad(s, [attn], retain_graph=True)
                    total = total + g.clamp(min=0).mean(dim=1)[0, 0]  # heads averaged, the latent's row
                per_k.append(total[T.pool_prefix(m) :])
            result.append(torch.stack(per_k))
        grid = tower_of(m).image_size[0] // tower_of(m).patch
        return torch.stack(result).unflatten(-1, (grid, grid))
    finally:
        for h in hooks:
            h.remove()


def pearsons(ours: torch.Tensor, ref: torch.Tensor) -> list[float]:
    if ref.shape[-2:] != ours.shape[-2:]:
        B, K = ref.shape[:2]
        ref = F.interpolate(ref.flatten(0, 1)[:, None].float(), size=ours.shape[-2:], mode="bilinear")
        ref = ref.view(B, K, *ours.shape[-2:])
    return [P.pearson(ours[b, k], ref[b, k]) for b in range(ours.shape[0]) for k in range(ours.shape[1])]


def test_legrad_equals_legrad_torch_siglip():
    if P.import_legrad() is None:
        pytest.skip("legrad-torch is not installed (make install installs it from requirements/test-nodeps.txt)")
    bundle = T.tiny_timm_clip("siglip")
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ours = build_explainer("legrad", bundle)(image, PROMPTS)
    r = pearsons(ours, legrad_torch_siglip(bundle, image, PROMPTS))
    assert min(r) >= 0.999, r


def test_legrad_correction_equals_legrad_torch_siglip():
    if P.import_legrad() is None:
        pytest.skip("legrad-torch is not installed (make install installs it from requirements/test-nodeps.txt)")
    bundle = T.tiny_timm_clip("siglip")
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ours = build_explainer("legrad", bundle, correction=True)(image, PROMPTS)  # threshold 0.8, as legrad-torch
    r = pearsons(ours, legrad_torch_siglip(bundle, image, PROMPTS, correction=True))
    assert min(r) >= 0.999, r
    assert not torch.allclose(ours, build_explainer("legrad", bundle)(image, PROMPTS), atol=1e-3)  # it zeroed some
    with pytest.raises(ValueError, match="correction=True"):
        build_explainer("legrad", T.tiny_timm_clip("eva02"), correction=True)


@pytest.mark.parametrize("kind", ["pe", "hf"])
def test_legrad_equals_the_formula_rerun(kind):
    bundle = _tiny(kind)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ours = build_explainer("legrad", bundle)(image, PROMPTS)
    ref = legrad_pool_rerun(bundle, image, _text(bundle))
    r = pearsons(ours, ref)
    assert min(r) >= 0.999, r
    # stronger than Pearson: the unnormalised relevance itself, times exp(logit_scale) for SigLIP's logit
    tower = tower_of(bundle.model)
    factor = bundle.model.logit_scale.exp() if tower.logit_bias is not None else 1.0
    with torch.enable_grad():
        raw = build_explainer("legrad", bundle).raw_maps_text(image, _text(bundle))
    assert torch.allclose(raw, ref * factor, rtol=1e-4, atol=1e-6 * float(raw.abs().max()))


# ----------------------------------------------------------------------------------- B-16 towers at 224 px
B16 = ["ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "EVA02-B-16", "PE-Core-B-16", "hf:siglip-base"]


@pytest.mark.slow
@pytest.mark.parametrize("name", B16)
def test_b16_towers(name):
    """Random-weight B-16 towers, 224 px, 2 images x 2 prompts: the tracer reproduces encode_image, every tower
    method gives valid maps, LeGrad equals legrad-torch (SigLIP, SigLIP2) or the re-run of its formula (PE-Core, HF
    SigLIP; legrad-torch cannot drive them, docs/towers.md). Prints the numbers docs/towers.md reports."""
    bundle = T.hf_siglip_b16() if name.startswith("hf:") else T.openclip_tower(name)
    image = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    err, scale = reproduction_error(bundle, image)
    print(f"\n{name}: family {tower_family(bundle.model)}, max |traced - encode_image| {err:.2e} (max |f| {scale:.2e})")
    assert err <= 1e-5 and err <= 1e-4 * scale  # absolute, and relative (EVA02 / PE-Core embeddings are ~1e-3)
    for method in TOWER_METHODS:
        check_maps(build_explainer(method, bundle)(image, PROMPTS), (2, len(PROMPTS), 224, 224))
    if name == "EVA02-B-16":
        return  # a CLS tower: LeGrad is the native formula (tests/test_parity.py); legrad-torch cannot drive it
    ours = build_explainer("legrad", bundle)(image, PROMPTS)
    if "SigLIP" in name:
        r, what = pearsons(ours, legrad_torch_siglip(bundle, image, PROMPTS)), "legrad-torch"
    else:
        r, what = pearsons(ours, legrad_pool_rerun(bundle, image, _text(bundle))), "formula re-run"
    print(f"{name}: LeGrad vs {what}: Pearson per map {[round(x, 6) for x in r]}")
    assert min(r) >= 0.999, r
    if "SigLIP" in name:
        ours = build_explainer("legrad", bundle, correction=True)(image, PROMPTS)
        r = pearsons(ours, legrad_torch_siglip(bundle, image, PROMPTS, correction=True))
        print(f"{name}: LeGrad correction=True vs legrad-torch apply_correction=True: {[round(x, 6) for x in r]}")
        assert min(r) >= 0.999, r


# ------------------------------------------------------------------------------------------------- MaskCLIP
def test_maskclip_dense_embedding_is_the_readout_of_one_patch(tiny):
    """MaskCLIP's embedding of patch j equals the STOCK readout of a sequence made of copies of token j: every
    attention over identical values returns that value, which is what MaskCLIP substitutes for the query's
    attention (for EVA02 the copies enter the last block, whose CLS row then reads patch j's value)."""
    kind, bundle, image = tiny
    tower = tower_of(bundle.model)
    last = tower.depth - 1
    tr = trace(tower, image[:1], [] if tower.attn_pool else [last], grad=False)
    with torch.no_grad():
        dense = tower.dense(tr)  # [1, N, E]
        for j in (0, 5, dense.shape[1] - 1):
            row = tower.prefix + j
            if kind == "hf":
                vm = bundle.model.visual.vision_model
                x = tr.tokens[:, row : row + 1].expand_as(tr.tokens)
                ref = vm.head(vm.post_layernorm(x))
            else:
                trunk = bundle.model.visual.trunk
                if tower.attn_pool:
                    x = tr.tokens[:, row : row + 1].expand_as(tr.tokens)
                else:
                    x_in = tr.records[last].x_in
                    x = trunk.blocks[last](x_in[:, row : row + 1].expand_as(x_in), rope=tower.embed(image[:1])[2])
                ref = bundle.model.visual.head(trunk.forward_head(trunk.norm(x)))
            assert torch.allclose(dense[:, j], ref, atol=1e-5 * max(1.0, float(ref.abs().max()))), (kind, j)


# ------------------------------------------------------------------------------------------ load_hf_siglip
def test_load_hf_siglip_folder(tmp_path):
    """A saved SiglipModel folder: preprocess from the processor defaults, a tokenizer saved into the folder padded
    to the text context, a clear error for a folder without one and for a folder that is not a SiglipModel."""
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mmel.hf_siglip import load_hf_siglip

    folder = tmp_path / "siglip"
    T.tiny_hf_siglip(folder=str(folder))
    model, preprocess, tokenizer = load_hf_siglip(folder)
    assert tuple(preprocess(Image.new("RGB", (50, 40), (255, 0, 0))).shape) == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="no SigLIP tokenizer"):
        tokenizer(["a cat"])
    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "cat": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    model, _, tokenizer = load_hf_siglip(folder)
    tokens = tokenizer(["a cat", "cat"])
    assert tuple(tokens.shape) == (2, model.context_length) and tokens[0, :2].tolist() == [2, 3]
    assert model.encode_text(tokens).shape == (2, 64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="could not load a transformers SiglipModel"):
        load_hf_siglip(tmp_path / "empty")


def test_eva02_grad_eclip_channel_weights_are_the_stock_gradient():
    """On a CLS tower w = dS/do at the CLS row of the last block: the traced graph (CLS row split, patch rows of the
    last MLP off the graph) gives the gradient the stock forward gives at the input of ``attn.norm``."""
    bundle = T.tiny_timm_clip("eva02")
    tower = tower_of(bundle.model)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    t = _text(bundle)[:1]
    blk = bundle.model.visual.trunk.blocks[-1]
    seen = {}
    hook = blk.attn.norm.register_forward_pre_hook(lambda m, i: seen.__setitem__("o", i[0]))
    try:
        f = bundle.model.encode_image(image.clone().requires_grad_(True))
        (ref,) = torch.autograd.grad(F.cosine_similarity(f, t).sum(), [seen["o"]])
    finally:
        hook.remove()
    tr = trace(tower, image, [tower.depth - 1])
    (ours,) = torch.autograd.grad(tower.score(tr.features, t).sum(), [tr.records[tower.depth - 1].o_cls])
    assert torch.allclose(ours[:, 0], ref[:, 0], atol=1e-6 * float(ref.abs().max()))
    assert ref[:, 1:].abs().max() <= 1e-6 * ref[:, 0].abs().max()  # only the CLS row reaches the embedding
