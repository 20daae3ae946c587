"""Forward passes over open_clip's own block parameters that expose q, k, v, attention and outputs per block.

Why not hooks: open_clip 3.3 calls ``nn.MultiheadAttention`` with ``need_weights=False`` (fused SDPA), so the
attention probabilities and the pre-``out_proj`` output o never exist as tensors, and hooks on ``attn.out_proj``
never fire. These functions recompute each block from its parameters (``ln_1``, ``attn.in_proj_*``,
``attn.out_proj``, ``ls_1``, ``ln_2``, ``mlp``, ``ls_2``) and reproduce ``model.encode_image`` /
``model.encode_text`` to float rounding (~1e-6; tests pin it). Nothing is registered on the model.

Efficiency decisions (docs/grad_eclip.md, Batching):
  * blocks before the first traced one run the stock module under ``no_grad`` (no graph is kept for them);
  * in the last vision block only the CLS row feeds the image embedding, so its residual + MLP is computed for
    the CLS row on the graph and, when the patch tokens are wanted, for the patches off the graph. A backward
    pass from the score then never touches the patch rows of the last MLP. In the other traced blocks the CLS
    row and the patch rows go through residual + MLP separately, so that a gradient w.r.t. a block's CLS-row
    attention output (all Grad-ECLIP needs) does not run backward through that block's patch-row MLP;
  * text features for the scores are computed on the tokens up to the longest prompt's EOS only: the causal mask
    makes later positions irrelevant for the EOS feature (exact; tested against ``encode_text``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmel.backbone import check_vit
from mmel.families import attn_pool_problem, text_tower_problem, vit_problem


@dataclass
class BlockRecord:
    """What one traced block computed. Shapes: B batch, H heads, T tokens, d = C / H head width.

    x_in: [B, T, C] block input;  q, k, v: [B, H, T, d] (q unscaled);  attn: [B, H, T, T] softmax probabilities;
    o: [B, T, C] attention output before out_proj (heads concatenated);  y: [B, T, C] = o W_O^T + b_O.
    o_cls, y_cls: [B, 1, C] and y_rest: [B, T-1, C] the first row / the other rows. With ``split`` they are
    separate graph nodes (the block's residual + MLP consume y_cls and y_rest, not y), so a gradient w.r.t.
    y_cls or o_cls never runs backward through the patch rows of this block.
    """

    x_in: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    attn: Tensor
    o: Tensor
    y: Tensor
    o_cls: Tensor
    y_cls: Tensor
    y_rest: Tensor


@dataclass
class Trace:
    """A traced forward. features: [B, E] embedding (unnormalised); records: block index -> BlockRecord;
    tokens: [B, T, C] last block output before the final LayerNorm (only when asked for); grid: patch grid."""

    features: Tensor
    records: dict[int, BlockRecord]
    tokens: Tensor | None = None
    grid: tuple[int, int] | None = None


def block_attention(
    blk: nn.Module, x: Tensor, attn_mask: Tensor | None = None, heads: int | None = None, split: bool = False
) -> BlockRecord:
    """The attention half of an open_clip ``ResidualAttentionBlock`` with every intermediate kept.

    x: [B, T, C]. ``heads`` overrides the block's head count (the official Grad-ECLIP uses 1 head over the full
    width, scale 1/sqrt(C)); None keeps the model's own. ``split``: compute the first (CLS) row of o and y as
    separate graph nodes (see :class:`BlockRecord`).
    """
    mha = blk.attn
    B, T, C = x.shape
    H = heads or mha.num_heads
    d = C // H
    h = blk.ln_1(x)
    qkv = F.linear(h, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.view(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, d]
    logits = (q * d**-0.5) @ k.transpose(-1, -2)
    if attn_mask is not None:
        logits = logits + attn_mask.to(logits.dtype)
    attn = logits.softmax(dim=-1)
    W, b = mha.out_proj.weight, mha.out_proj.bias
    if split:
        o_cls = (attn[:, :, :1] @ v).transpose(1, 2).reshape(B, 1, C)
        o_rest = (attn[:, :, 1:] @ v).transpose(1, 2).reshape(B, T - 1, C)
        y_cls, y_rest = F.linear(o_cls, W, b), F.linear(o_rest, W, b)
        o, y = torch.cat([o_cls, o_rest], dim=1), torch.cat([y_cls, y_rest], dim=1)
    else:
        o = (attn @ v).transpose(1, 2).reshape(B, T, C)
        y = F.linear(o, W, b)
        o_cls, y_cls, y_rest = o[:, :1], y[:, :1], y[:, 1:]
    return BlockRecord(x_in=x, q=q, k=k, v=v, attn=attn, o=o, y=y, o_cls=o_cls, y_cls=y_cls, y_rest=y_rest)


def block_rest(blk: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Residual + MLP half of the block: x [B, T, C] input, y [B, T, C] attention output -> block output."""
    x = x + blk.ls_1(y)
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def resolve_layers(layers: Sequence[int], depth: int, what: str = "layers") -> list[int]:
    """Block indices (negative counts from the end) -> non-negative indices in the given order, clear errors."""
    out: list[int] = []
    for i in layers:
        j = int(i) + depth if int(i) < 0 else int(i)
        if not 0 <= j < depth:
            raise ValueError(f"{what}: block index {i} is out of range for a transformer with {depth} blocks")
        if j in out:
            raise ValueError(f"{what}: block {i} is listed twice (as index {j})")
        out.append(j)
    if not out:
        raise ValueError(f"{what}: at least one block index is needed")
    return out


def last_layers(n: int, depth: int) -> list[int]:
    """The last n block indices; a clear error when n is not in 1..depth."""
    if not isinstance(n, int) or not 1 <= n <= depth:
        raise ValueError(f"layers={n!r}: expected an integer number of last blocks in 1..{depth}")
    return list(range(depth - n, depth))


# ----------------------------------------------------------------------------------------------- image tower
def check_images(images: Tensor, patch: int) -> tuple[int, int]:
    """Validate images [B, 3, H, W] (H, W multiples of the patch size); returns the patch grid (H/p, W/p)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images: expected a float tensor [B, 3, H, W] (normalised RGB); got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images: expected a floating-point tensor, got dtype {images.dtype}")
    H, W = images.shape[-2:]
    if H % patch or W % patch:
        raise ValueError(
            f"images: size {H}x{W} is not a multiple of the patch size {patch}. Resize so that each side is a "
            f"multiple of {patch} (the explain program's resize=keep rounds each side to the nearest multiple)."
        )
    return H // patch, W // patch


_POS_CACHE: dict[tuple[int, int, int, int], Tensor] = {}


def positional_embedding(visual: nn.Module, grid: tuple[int, int]) -> Tensor:
    """The vision positional embedding [1 + h*w, C] for a patch grid (h, w).

    At the native grid it is the model's own tensor; otherwise the patch part is interpolated bicubically on the
    2-D grid (CLS entry kept), as the official Grad-ECLIP code and common ViT practice do.
    """
    pe = visual.positional_embedding
    native = tuple(visual.grid_size)
    if tuple(grid) == native:
        return pe
    key = (id(visual), pe.data_ptr(), *grid)
    if key not in _POS_CACHE:
        C = pe.shape[-1]
        patch = pe[1:].detach().reshape(1, *native, C).permute(0, 3, 1, 2).float()
        patch = F.interpolate(patch, size=tuple(grid), mode="bicubic", align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(-1, C).to(pe.dtype)
        _POS_CACHE.clear()  # keep one entry per process: sizes rarely change within a run
        _POS_CACHE[key] = torch.cat([pe[:1].detach(), patch], dim=0)
    return _POS_CACHE[key]


def image_embeds(visual: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Tokens entering the first block: [B, 1 + h*w, C] (CLS first) and the patch grid (h, w)."""
    grid = check_images(images, visual.conv1.kernel_size[0])
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + positional_embedding(visual, grid).to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x)), grid


def trace_image(
    model: nn.Module,
    images: Tensor,
    layers: Sequence[int] = (),
    *,
    heads: int | None = None,
    grad: bool = True,
    need_tokens: bool = False,
) -> Trace:
    """Encode images [B, 3, H, W] recording the blocks in ``layers`` (non-negative indices).

    With ``grad`` the input of the first traced block requires grad, so every record (and the features) is on
    the autograd graph; the blocks before it run without a graph. ``heads`` overrides the head count of the
    traced blocks (official Grad-ECLIP: 1). Returns Trace(features [B, E], records, tokens [B, T, C] | None).
    """
    visual = check_vit(model)
    if getattr(visual, "pool_type", "tok") != "tok":
        raise TypeError(f"ViTs pooled with pool_type={visual.pool_type!r} are not supported: the CLS token must pool.")
    blocks = visual.transformer.resblocks
    traced = set(layers)
    first = min(traced) if traced else len(blocks)
    x, grid = image_embeds(visual, images)
    with torch.no_grad():
        for blk in blocks[:first]:
            x = blk(x)
    records: dict[int, BlockRecord] = {}
    tokens = None
    with torch.set_grad_enabled(grad):
        if grad and traced:
            x = x.detach().requires_grad_(True)
        for i in range(first, len(blocks)):
            blk = blocks[i]
            rec = block_attention(blk, x, heads=heads if i in traced else None, split=True)
            if i in traced:
                records[i] = rec
            # CLS row and patch rows separately: the path from the score to rec.y_cls / rec.o_cls of this
            # block then skips this block's patch-row MLP (the first traced block's in particular).
            cls_out = block_rest(blk, x[:, :1], rec.y_cls)
            if i < len(blocks) - 1:
                x = torch.cat([cls_out, block_rest(blk, x[:, 1:], rec.y_rest)], dim=1)
                continue
            # last block: the CLS row alone feeds the embedding; patches only on demand and off the graph
            if need_tokens:
                with torch.no_grad():
                    tokens = torch.cat([cls_out.detach(), block_rest(blk, x[:, 1:], rec.y_rest)], dim=1)
            x = cls_out
        if first == len(blocks) and need_tokens:
            tokens = x
        pooled = visual.ln_post(x[:, 0])
        features = pooled @ visual.proj if visual.proj is not None else pooled
    return Trace(features=features, records=records, tokens=tokens, grid=grid)


def encode_image(model: nn.Module, images: Tensor) -> Tensor:
    """``model.encode_image`` for any input size the patch grid allows: [B, 3, H, W] -> [B, E] (no graph).

    A tower that is not a native CLS-pooled ViT (a CNN, a timm trunk) runs its own ``encode_image``."""
    with torch.no_grad():
        visual = getattr(model, "visual", None)
        if vit_problem(visual) or attn_pool_problem(visual):
            return model.encode_image(images)
        if tuple(images.shape[-2:]) == tuple(check_vit(model).image_size):
            return model.encode_image(images)
        return trace_image(model, images, (), grad=False).features


# ------------------------------------------------------------------------------------------------ text tower
def check_text_tower(model: nn.Module) -> None:
    """Text-token tracing reads CLIP's native ``transformer`` (blocks recognised by their parameters, as the
    vision ones), ``token_embedding``, ``ln_final``, ``text_projection``, pooled at the EOS (argmax) token."""
    problem = text_tower_problem(model)
    if problem:
        raise TypeError(
            f"Text-token explanations need open_clip's native causal text transformer pooled at the EOS token: "
            f"{problem}. Image-side maps still work (prompts go through the model's own encode_text)."
        )


def _text_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the text blocks compute in: the first MLP's weight dtype (what open_clip's get_cast_dtype reads,
    without relying on a block method of that name)."""
    blk = model.transformer.resblocks[0]
    fc = blk.mlp[0] if isinstance(blk.mlp, nn.Sequential) else next(iter(blk.mlp.parameters()))
    return getattr(fc, "int8_original_dtype", None) or (fc.weight.dtype if hasattr(fc, "weight") else fc.dtype)


def eos_positions(tokens: Tensor) -> Tensor:
    """[K] index of the EOS token (the highest token id in open_clip's tokenizers) per prompt."""
    return tokens.argmax(dim=-1)


def _text_head(model: nn.Module, x: Tensor, eos: Tensor) -> Tensor:
    x = model.ln_final(x[torch.arange(x.shape[0], device=x.device), eos])
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def encode_text(model: nn.Module, tokens: Tensor) -> Tensor:
    """Text features [K, E] (unnormalised, no graph) equal to ``model.encode_text(tokens)``.

    On open_clip's native text tower it runs only the first max(EOS)+1 positions: with the causal mask, later
    (padding) positions cannot change the EOS feature, and short prompts cost a fraction of the full context. Any
    other text tower (a timm / Hugging Face one) runs the model's own ``encode_text``.
    """
    if text_tower_problem(model):
        with torch.no_grad():
            return model.encode_text(tokens)
    eos = eos_positions(tokens)
    L = int(eos.max()) + 1
    with torch.no_grad():
        dtype = _text_dtype(model)
        x = model.token_embedding(tokens[:, :L]).to(dtype) + model.positional_embedding[:L].to(dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:L, :L])
        return _text_head(model, x, eos)


def trace_text(model: nn.Module, tokens: Tensor, layers: Sequence[int], *, heads: int | None = None) -> Trace:
    """Encode tokens [K, L] over the full context on the autograd graph, recording blocks ``layers``.

    The full context is kept (not cut at EOS) because the text-side λ is min-max normalised over all positions,
    as in the official code. Returns Trace(features [K, E], records).
    """
    check_text_tower(model)
    blocks = model.transformer.resblocks
    traced = set(layers)
    first = min(traced)
    mask = model.attn_mask
    dtype = _text_dtype(model)
    x = model.token_embedding(tokens).to(dtype) + model.positional_embedding.to(dtype)
    with torch.no_grad():
        for blk in blocks[:first]:
            x = blk(x, attn_mask=mask)
    records: dict[int, BlockRecord] = {}
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        for i in range(first, len(blocks)):
            rec = block_attention(blocks[i], x, attn_mask=mask, heads=heads if i in traced else None)
            if i in traced:
                records[i] = rec
            x = block_rest(blocks[i], x, rec.y)
        features = _text_head(model, x, eos_positions(tokens))
    return Trace(features=features, records=records)
