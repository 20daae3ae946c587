"""Reference computations of the baselines, written from the papers and the authors' published code, for the parity
tests (tests/test_parity.py) and docs/parity.md.

Nothing here imports ``mmel.explainers``: each reference recomputes its method from the stock open_clip modules and
parameters (``blk.ln_1``, ``attn.in_proj_weight``, ``blk.mlp``, ...) the way the authors' code does, so an
explainer is compared with an independent computation, not with itself. LeGrad is compared with its authors'
package (legrad-torch). Randomness that a method draws (RISE's masks, M2IB's noise) is drawn here in the order the
explainer documents, from the same seed: parity then means the same masks / noise give the same map.

``measure`` returns, per (image, prompt) map, the Pearson correlation between the explainer's map and the
reference's (both at image resolution; the reference bilinearly resized when it lives on the patch grid: Pearson
does not see the explainer's min-max normalisation) and whether both peak in the same patch (each map averaged
over patches, then argmax).
"""

from __future__ import annotations

import copy
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor


# ------------------------------------------------------------------------------------------ stock pieces
def text_embeddings(clip, prompts: list[str]) -> Tensor:
    """[K, E] unit-norm ``model.encode_text`` of the prompts."""
    with torch.no_grad():
        return F.normalize(clip.model.encode_text(clip.tokenize(prompts)), dim=-1)


def embed(visual, images: Tensor) -> Tensor:
    """Tokens entering the first block at the model's native size: [B, 1 + N, C]."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    return visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)


def run_blocks(blocks, x: Tensor) -> Tensor:
    for blk in blocks:
        x = blk(x)
    return x


def head(visual, cls_token: Tensor) -> Tensor:
    return visual.ln_post(cls_token) @ visual.proj


def attention_block(blk, x: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """One residual block by hand with ``heads`` heads (the stock weights): (output [B, T, C], probs [B, H, T, T])."""
    B, T, C = x.shape
    d = C // heads
    q, k, v = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (z.reshape(B, T, heads, d).permute(0, 2, 1, 3) for z in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    o = (probs @ v).permute(0, 2, 1, 3).reshape(B, T, C)
    x = x + blk.ls_1(blk.attn.out_proj(o))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x))), probs


def grid_of(visual) -> tuple[int, int]:
    return tuple(visual.grid_size)


# ---------------------------------------------------------------------------------------------- references
def last_attention_ref(clip, images: Tensor, prompts: list[str], single_head: bool) -> Tensor:
    """CLS row of the last block's attention over the patches: [B, K, h, w] (same for every prompt).

    single_head: the Grad-ECLIP paper's baseline (``generate_emap.py``: ``attention_layer(q, k, v, 1)`` in
    ``clip_encode_dense``, then ``attn[0, :1, 1:]``): one head over the full width, scale 1/sqrt(C). Otherwise
    the model's heads, averaged (the usual last-layer attention)."""
    visual = clip.visual
    blocks = visual.transformer.resblocks
    with torch.no_grad():
        x = run_blocks(blocks[:-1], embed(visual, images))
        heads = 1 if single_head else blocks[-1].attn.num_heads
        _, probs = attention_block(blocks[-1], x, heads)
    cls = probs[:, :, 0, 1:].mean(dim=1).unflatten(-1, grid_of(visual))
    return cls[:, None].expand(-1, len(prompts), -1, -1)


def gradcam_ref(clip, images: Tensor, prompts: list[str], single_head: bool) -> Tensor:
    """Grad-CAM on the input of the last block (the paper's ``grad_cam(c, last_input, ...)``): weights = the
    gradient of cos(image, text) averaged over all tokens, map = ReLU(Σ_c w_c x_i,c) over patches. single_head:
    the cosine of the model whose last block is recomputed with one full-width head (``clip_encode_dense``);
    otherwise the stock last block. [B, K, h, w]."""
    visual = clip.visual
    blocks = visual.transformer.resblocks
    text = text_embeddings(clip, prompts)
    with torch.no_grad():
        x_in = run_blocks(blocks[:-1], embed(visual, images))
    out = []
    for k in range(len(prompts)):
        x = x_in.clone().requires_grad_(True)
        with torch.enable_grad():
            z = attention_block(blocks[-1], x, 1)[0] if single_head else blocks[-1](x)
            c = (F.normalize(head(visual, z[:, 0]), dim=-1) @ text[k]).sum()  # images independent: sum = per image
            (g,) = torch.autograd.grad(c, x)
        w = g.mean(dim=1, keepdim=True)  # [B, 1, C]
        out.append((w * x_in[:, 1:]).sum(-1).relu())
    return torch.stack(out, dim=1).unflatten(-1, grid_of(visual))


def game_ref(clip, images: Tensor, prompts: list[str], start_layer: int) -> Tensor:
    """Chefer et al. 2021 (Transformer-MM-Explainability, ``CLIP_explainability.ipynb`` ``interpret``): the score is
    CLIP's logit logit_scale.exp() · cos; for blocks l >= start_layer, cam = mean_h ReLU(∂s/∂A_l ⊙ A_l) and R <- R +
    cam R from R = I; map = R[CLS, patches]. [B, K, h, w]."""
    visual = clip.visual
    blocks = visual.transformer.resblocks
    start = start_layer % len(blocks)
    text = text_embeddings(clip, prompts)
    scale = clip.model.logit_scale.detach().exp()
    with torch.no_grad():
        x0 = run_blocks(blocks[:start], embed(visual, images))
    maps = []
    for k in range(len(prompts)):
        with torch.enable_grad():
            x, probs = x0.clone().requires_grad_(True), []  # a leaf: the frozen model's graph starts here
            for blk in blocks[start:]:
                x, a = attention_block(blk, x, blk.attn.num_heads)
                probs.append(a)
            s = (scale * F.normalize(head(visual, x[:, 0]), dim=-1) @ text[k]).sum()
            grads = torch.autograd.grad(s, probs)
        T = x0.shape[1]
        R = torch.eye(T).expand(images.shape[0], T, T)
        for a, g in zip(probs, grads, strict=True):
            cam = (g * a.detach()).clamp(min=0).mean(dim=1)
            R = R + cam @ R
        maps.append(R[:, 0, 1:])
    return torch.stack(maps, dim=1).unflatten(-1, grid_of(visual))


def m2ib_ref(clip, images: Tensor, prompts: list[str], *, beta=0.1, steps=10, lr=1.0, samples=10, seed=0) -> Tensor:
    """M2IB (``scripts/iba.py``): after block ``depth - 3``, t = λ h + (1 − λ) ε with λ = sigmoid(α), α = 5 at the
    start, the features h as they are; capacity KL(N(λh, (1−λ)²) ‖ N(0, 1)); Adam(lr) on β·mean capacity −
    mean cos(image embedding of t, text) over ``samples`` noise draws per step; the map is the last forward's
    capacity summed over channels, CLS dropped. One (image, prompt) at a time, noise [samples, T, C] per step from a
    generator seeded with ``seed`` (mmel's documented draws). [B, K, h, w]."""
    visual = clip.visual
    blocks = visual.transformer.resblocks
    layer = len(blocks) - 3
    text = text_embeddings(clip, prompts)
    with torch.no_grad():
        feats = run_blocks(blocks[: layer + 1], embed(visual, images))
    out = torch.zeros(images.shape[0], len(prompts), feats.shape[1] - 1)
    for b in range(images.shape[0]):
        for k in range(len(prompts)):
            h = feats[b]
            alpha = torch.full_like(h, 5.0).requires_grad_(True)
            opt = torch.optim.Adam([alpha], lr=lr)
            gen = torch.Generator().manual_seed(seed)
            for _ in range(steps):
                opt.zero_grad()
                with torch.enable_grad():
                    lam = torch.sigmoid(alpha)
                    mu, var = lam * h, (1 - lam) ** 2
                    capacity = -0.5 * (1 + torch.log(var) - mu**2 - var)
                    t = mu + (1 - lam) * torch.randn((samples, *h.shape), generator=gen)
                    f = head(visual, run_blocks(blocks[layer + 1 :], t)[:, 0])
                    fit = (F.normalize(f, dim=-1) @ text[k]).mean()
                    (beta * capacity.mean() - fit).backward()
                opt.step()
            out[b, k] = capacity.detach().sum(-1)[1:]
    return out.unflatten(-1, grid_of(visual))


def rise_ref(clip, images: Tensor, prompts: list[str], *, n_masks: int, cells=8, p=0.5, seed=0, batch=32) -> Tensor:
    """RISE (``explanations.py`` ``generate_masks`` / ``forward``): binary cells×cells grids, each upsampled by
    scikit-image ``resize(order=1, mode='reflect', anti_aliasing=False)`` to (cells+1)·ceil(side/cells) — here
    scipy.ndimage.zoom(order=1, mode='mirror', grid_mode=True), the same interpolation — cropped at a random shift;
    sal = Σ_n cos(masked image, text) · mask_n / (N p). Draws: grids, row shifts, column shifts from one generator
    seeded with ``seed`` (the explainer's documented order). [B, K, H, W]."""
    B, _, H, W = images.shape
    ch, cw = math.ceil(H / cells), math.ceil(W / cells)
    gen = torch.Generator().manual_seed(seed)
    grid = (torch.rand(n_masks, cells, cells, generator=gen) < p).double().numpy()
    dy = torch.randint(0, ch, (n_masks,), generator=gen).tolist()
    dx = torch.randint(0, cw, (n_masks,), generator=gen).tolist()
    zoom = ((cells + 1) * ch / cells, (cells + 1) * cw / cells)
    masks = np.stack(
        [
            ndimage.zoom(g, zoom, order=1, mode="mirror", grid_mode=True)[y : y + H, x : x + W]
            for g, y, x in zip(grid, dy, dx, strict=True)
        ]
    )
    masks = torch.from_numpy(masks).float()  # [N, H, W]
    text = text_embeddings(clip, prompts)
    sal = torch.zeros(B, len(prompts), H, W)
    with torch.no_grad():
        for b in range(B):
            for s in range(0, n_masks, batch):
                m = masks[s : s + batch]
                scores = F.normalize(clip.model.encode_image(images[b : b + 1] * m[:, None]), dim=-1) @ text.T
                sal[b] += torch.einsum("nk,nhw->khw", scores, m)
    return sal / (n_masks * p)


def import_legrad():
    """The LeGrad authors' package (legrad-torch), or None when it is not installed.

    Its ``legrad.utils`` imports cv2 for its plotting helpers only (unused here): an empty stand-in module is
    registered when opencv is absent (it is not a dependency of mmel)."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    try:
        import legrad
    except ImportError:
        return None
    return legrad


def legrad_ref(clip, images: Tensor, prompts: list[str], layer_index: int = -2) -> Tensor:
    """LeGrad maps from the authors' package: ``LeWrapper(model, layer_index).compute_legrad_clip(text, image)``,
    one image at a time. [B, K, H, W].

    open_clip >= 2.24 runs its blocks batch-first; legrad-torch 1.1 (written for open_clip <= 2.23) feeds the
    transformer sequence-first and hooks only the blocks from ``layer_index`` on. On a copy of the model, the
    earlier blocks' ``nn.MultiheadAttention`` are switched to sequence-first (``batch_first = False``), which
    restores open_clip 2.23's behaviour (checked: the wrapper's ``encode_image`` then equals the stock one)."""
    legrad = import_legrad()
    model = copy.deepcopy(clip.model)
    for blk in model.visual.transformer.resblocks:
        blk.attn.batch_first = False
    wrapper = legrad.LeWrapper(model, layer_index=layer_index)
    text = text_embeddings(clip, prompts)
    return torch.cat([wrapper.compute_legrad_clip(text, images[b : b + 1]).detach() for b in range(len(images))])


# ------------------------------------------------------------------------------------------------ compare
@dataclass
class Case:
    """One parity check: the explainer (name, options), its reference, and what docs/parity.md says of it."""

    method: str  # the row's name in docs/parity.md
    explainer: str
    options: dict
    reference: Callable[..., Tensor]
    ref_options: dict = field(default_factory=dict)
    paper: str = ""
    code: str = ""  # the authors' repository and file the reference follows
    follows: str = ""  # what mmel follows and what it changes


GRAD_ECLIP_CODE = "Cyang-Zhao/Grad-Eclip, `generate_emap.py`"
CASES: list[Case] = [
    Case(
        "M2IB",
        "m2ib",
        {},
        m2ib_ref,
        {},
        "Wang et al., NeurIPS 2023",
        "YingWANGG/M2IB, `scripts/iba.py`, `scripts/methods.py`",
        "loss β·capacity − fit, features not rescaled, block depth − 3, 10 steps × 10 samples, Adam lr 1; changes: "
        "open_clip tower instead of HF CLIPModel, K prompts optimised together (independent losses), seeded noise",
    ),
    Case(
        "last-layer attention (grad_eclip_paper)",
        "attention",
        {"variant": "grad_eclip_paper"},
        last_attention_ref,
        {"single_head": True},
        "baseline of Zhao et al., ICML 2024 (Grad-ECLIP)",
        GRAD_ECLIP_CODE,
        "last block recomputed with 1 head over the full width, CLS row; changes: none (prompt-independent)",
    ),
    Case(
        "last-layer attention (native)",
        "attention",
        {},
        last_attention_ref,
        {"single_head": False},
        "common baseline",
        "— (the model's own heads)",
        "CLS row averaged over the model's heads",
    ),
    Case(
        "Grad-CAM (grad_eclip_paper)",
        "gradcam",
        {"variant": "grad_eclip_paper"},
        gradcam_ref,
        {"single_head": True},
        "Selvaraju et al. 2017, as in Zhao et al., ICML 2024",
        GRAD_ECLIP_CODE,
        "input of the last block, token-mean gradient of the cosine through the 1-head last block; changes: K "
        "prompts in one batched VJP",
    ),
    Case(
        "Grad-CAM (native)",
        "gradcam",
        {},
        gradcam_ref,
        {"single_head": False},
        "Selvaraju et al. 2017",
        "— (stock open_clip block)",
        "as the paper variant, through the unmodified model; changes: K prompts in one batched VJP",
    ),
    Case(
        "RISE",
        "rise",
        {"n_masks": 64, "batch_size": 32},
        rise_ref,
        {"n_masks": 64},
        "Petsiuk et al., BMVC 2018",
        "eclique/RISE, `explanations.py` (`generate_masks`); Grad-ECLIP's copy",
        "reflect-border linear upsampling, random-shift crop, Σ score·mask / (N p); changes: torch generator "
        "draws (grids, then shifts), batched forwards, all K prompts scored per forward",
    ),
    Case(
        "GAME (all blocks)",
        "game",
        {"start_layer": 0},
        game_ref,
        {"start_layer": 0},
        "Chefer et al., ICCV 2021",
        "hila-chefer/Transformer-MM-Explainability, `CLIP_explainability.ipynb`",
        "score logit_scale·cos, R ← R + mean_h ReLU(∇A ⊙ A) R; changes: K prompts in one batched VJP",
    ),
    Case(
        "LeGrad",
        "legrad",
        {},
        legrad_ref,
        {},
        "Bousselham et al., 2024",
        "legrad-torch 1.1 (PyPI; WalBouss/LeGrad `legrad/wrapper.py`), run as is",
        "per-layer score on the token-mean, ReLU(∂s_l/∂A_l) averaged over heads and rows, last 2 blocks; changes: "
        "cut per block instead of per-layer backward passes, one batched VJP",
    ),
]


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def peak_patch(m: Tensor, patch: int) -> int:
    """Index of the patch with the largest mean value of an image-size map [H, W]."""
    return int(F.avg_pool2d(m[None, None].double(), patch).flatten().argmax())


def measure(case: Case, clip, images: Tensor, prompts: list[str], build) -> tuple[list[float], list[bool]]:
    """(Pearson per map, same peak patch per map) of ``build(case.explainer, clip, **options)`` vs the reference;
    maps in (image, prompt) order."""
    ours = build(case.explainer, clip, **case.options)(images, prompts)  # [B, K, H, W]
    ref = case.reference(clip, images, prompts, **case.ref_options).float()
    if ref.shape[-2:] != ours.shape[-2:]:
        B, K = ref.shape[:2]
        ref = F.interpolate(ref.flatten(0, 1)[:, None], size=ours.shape[-2:], mode="bilinear", align_corners=False)
        ref = ref.view(B, K, *ours.shape[-2:])
    patch = clip.visual.conv1.kernel_size[0]
    r, same = [], []
    for b in range(ours.shape[0]):
        for k in range(ours.shape[1]):
            r.append(pearson(ours[b, k], ref[b, k]))
            same.append(peak_patch(ours[b, k], patch) == peak_patch(ref[b, k], patch))
    return r, same
