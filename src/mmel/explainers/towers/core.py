"""The tower interface shared by timm-trunk and Hugging Face ViTs, and the traced forward over it.

A *tower* adapts one image encoder to the few operations the explainers need; the same records as the native
open_clip tracer (:class:`mmel.explainers.vit.BlockRecord`) come out of every block, and an attention-pooled tower
also records its pool as one more attention whose only query is the pool's learned latent (docs/towers.md):

  * ``embed(images) -> (x [B, T, C], grid, aux)``: tokens entering the first block (``aux``: e.g. the rotary
    position embedding of the grid, handed to every block);
  * ``block(i, x, aux)``: the stock block, used off the graph for blocks before the first traced one;
  * ``attention(i, x, aux, split) -> BlockRecord``: the block's attention half recomputed with q, k (after q/k norm
    and rotary embedding, i.e. what the softmax sees), v, the softmax probabilities, o = Σ_j A_ij v_j (heads
    concatenated, before any output norm / gate / projection) and y (the attention branch's output);
  * ``rest(i, x, y)``: the residual + MLP half (layer scale included);
  * ``readout(x, norm=True) -> (features [B, E], PoolRecord | None)``: final norm (``norm=False`` skips it, as
    legrad-torch's SigLIP path does), pooling (the attention pool recomputed and recorded, or CLS / mean) and
    every head after it;
  * ``encode_text(tokens) -> [K, E]`` and ``score(image_features, text_features) -> [B, K]``.

Tokens: ``prefix`` leading non-patch tokens (CLS / registers; 0 for SigLIP), then the h*w patches. The pool's keys
are ``pool_prefix`` non-patch tokens followed by the patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmel.explainers.base import cosine_scores
from mmel.explainers.vit import BlockRecord


@dataclass
class PoolRecord:
    """An attention pool with one latent query. x_in: [B, N, C] its input tokens (keys/values come from them);
    q: [B, H, 1, d] the latent query (unscaled); k, v: [B, H, N, d]; attn: [B, H, 1, N] softmax probabilities;
    o: [B, 1, C] Σ_j attn_j v_j with heads concatenated (before the pool's output projection); y: [B, 1, C] after
    the projection; out: [B, 1, C] the pool's output (after its MLP residual)."""

    x_in: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    attn: Tensor
    o: Tensor
    y: Tensor
    out: Tensor


@dataclass
class TowerTrace:
    """A traced forward over a tower. features: [B, E]; records: block index -> BlockRecord; pool: the attention
    pool's record (None for CLS / mean pooled towers); tokens: [B, T, C] last block output; grid: patch grid."""

    features: Tensor
    records: dict[int, BlockRecord]
    pool: PoolRecord | None
    tokens: Tensor
    grid: tuple[int, int]


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, split: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """softmax(scale · q kᵀ) and o = A v with heads concatenated: q [B, H, Tq, d], k, v [B, H, T, d] ->
    (attn [B, H, Tq, T], o [B, Tq, H*d], o_first [B, 1, H*d]). With ``split`` the first query row's output is a
    separate graph node (o is then the concatenation of o_first and the other rows)."""
    B, H, Tq, d = q.shape
    attn = ((q * scale) @ k.transpose(-1, -2)).softmax(dim=-1)
    if split and Tq > 1:
        o_first = (attn[:, :, :1] @ v).transpose(1, 2).reshape(B, 1, H * d)
        o_rest = (attn[:, :, 1:] @ v).transpose(1, 2).reshape(B, Tq - 1, H * d)
        return attn, torch.cat([o_first, o_rest], dim=1), o_first
    o = (attn @ v).transpose(1, 2).reshape(B, Tq, H * d)
    return attn, o, o[:, :1]


def block_record(q: Tensor, k: Tensor, v: Tensor, x: Tensor, h: Tensor, out, scale: float, split: bool) -> BlockRecord:
    """Attention of a block from its q, k, v [B, H, T, d] (as the softmax sees them), input x [B, T, C] and
    normalised input h; ``out(o, h_rows)`` maps o -> y (the block's output norm / gate / projection; h_rows for a
    gate). ``split``: the first row's o and y are separate graph nodes (see BlockRecord)."""
    attn, o, o_cls = attend(q, k, v, scale, split)
    if split and o.shape[1] > 1:
        y_cls, y_rest = out(o_cls, h[:, :1]), out(o[:, 1:], h[:, 1:])
        y = torch.cat([y_cls, y_rest], dim=1)
    else:
        y = out(o, h)
        y_cls, y_rest = y[:, :1], y[:, 1:]
    return BlockRecord(x_in=x, q=q, k=k, v=v, attn=attn, o=o, y=y, o_cls=o_cls, y_cls=y_cls, y_rest=y_rest)


class Tower:
    """Base adapter; subclasses set the attributes and implement the methods listed in the module docstring."""

    family = "tower"
    patch: int
    depth: int
    prefix: int  # non-patch tokens in the block sequence
    pool_prefix: int  # non-patch tokens among the pool's keys
    attn_pool: bool  # pooled by a latent-query attention pool (else CLS token / mean)
    token_pooled: bool = False  # the embedding reads the CLS row alone (norm per token, then that row)
    image_size: tuple[int, int]

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # subclasses ------------------------------------------------------------------------------------------
    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int], object]:
        raise NotImplementedError

    def block(self, i: int, x: Tensor, aux) -> Tensor:
        raise NotImplementedError

    def attention(self, i: int, x: Tensor, aux, split: bool = False) -> BlockRecord:
        raise NotImplementedError

    def rest(self, i: int, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def readout(self, x: Tensor, norm: bool = True) -> tuple[Tensor, PoolRecord | None]:
        raise NotImplementedError

    def dense(self, tr: TowerTrace) -> Tensor:
        """Per-patch embeddings [B, N, E] for MaskCLIP (the trace must record the last block on CLS towers)."""
        raise NotImplementedError

    def encode_text(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def encode_image(self, images: Tensor) -> Tensor:
        """The stock image embedding [B, E] (what the tracer must reproduce)."""
        return self.model.encode_image(images)

    # shared ----------------------------------------------------------------------------------------------
    @property
    def logit_bias(self) -> Tensor | None:
        return getattr(self.model, "logit_bias", None)

    def score(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """The model's own image-text score [B, K] (text [K, E] or per image [B, K, E]): SigLIP's sigmoid logit
        exp(logit_scale)·cos + logit_bias when the model has a bias, else the unscaled cosine (the project's CLIP
        score, docs/grad_eclip.md). Zero text rows (padding) give a constant, so a zero gradient."""
        cos = cosine_scores(image_features, text_features)
        bias = self.logit_bias
        if bias is None:
            return cos
        return cos * self.model.logit_scale.exp().reshape(()) + bias.reshape(())

    def check_size(self, images: Tensor) -> None:
        if tuple(images.shape[-2:]) != tuple(self.image_size):
            H, W = self.image_size
            raise ValueError(
                f"images: this {self.family} tower is traced at its native size {H}x{W} only; got "
                f"{images.shape[-2]}x{images.shape[-1]}. Resize to {H}x{W} (the explain program's resize=native)."
            )


def trace(
    tower: Tower, images: Tensor, layers: Sequence[int] = (), *, grad: bool = True, norm: bool = True
) -> TowerTrace:
    """Encode images [B, 3, H, W] through ``tower`` recording the blocks in ``layers`` (non-negative indices) and the
    attention pool. Blocks before the first traced one run stock and off the graph; with ``grad`` the first traced
    block's input (or, with no traced block, the last block's output) is a leaf that requires grad."""
    traced = set(layers)
    first = min(traced) if traced else tower.depth
    x, grid, aux = tower.embed(images)
    with torch.no_grad():
        for i in range(first):
            x = tower.block(i, x, aux)
    records: dict[int, BlockRecord] = {}
    with torch.set_grad_enabled(grad):
        if grad:
            x = x.detach().requires_grad_(True)
        last = tower.depth - 1
        for i in range(first, tower.depth):
            rec = tower.attention(i, x, aux, split=tower.prefix > 0)
            if i in traced:
                records[i] = rec
            if i == last and tower.token_pooled:
                # only the CLS row feeds the embedding: its residual + MLP on the graph, the patches' off it, so a
                # backward pass from the score never runs through the patch rows of the last MLP (as vit.py)
                cls_out = tower.rest(i, x[:, :1], rec.y_cls)
                with torch.no_grad():
                    rows = tower.rest(i, x[:, 1:], rec.y_rest)
                features, pool = tower.readout(cls_out, norm=norm)
                x = torch.cat([cls_out.detach(), rows], dim=1)
                return TowerTrace(features=features, records=records, pool=pool, tokens=x, grid=grid)
            x = tower.rest(i, x, rec.y)
        features, pool = tower.readout(x, norm=norm)
    return TowerTrace(features=features, records=records, pool=pool, tokens=x, grid=grid)


def latent_pool(z: Tensor, latent: Tensor, q_lin, kv, heads: int, proj, rest, q_norm=None, k_norm=None) -> PoolRecord:
    """One-latent attention pool recomputed: z [B, N, C] tokens; latent [1, 1, C_l]; q_lin(latent) -> [.., C];
    kv(z) -> (k, v) each [B, N, C]; proj: o -> y; rest: y -> out (the MLP residual). Returns the PoolRecord."""
    B, N, _ = z.shape
    q = q_lin(latent.expand(B, -1, -1))
    if q.shape[1] != 1:
        raise TypeError(f"attention pools with {q.shape[1]} latent queries are not supported (one latent needed)")
    C = q.shape[-1]
    d = C // heads
    k, v = kv(z)
    q = q.view(B, 1, heads, d).transpose(1, 2)
    k = k.reshape(B, N, heads, d).transpose(1, 2)
    v = v.reshape(B, N, heads, d).transpose(1, 2)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    attn, o, _ = attend(q, k, v, d**-0.5)
    y = proj(o)
    return PoolRecord(x_in=z, q=q, k=k, v=v, attn=attn, o=o, y=y, out=rest(y))


def linear_chunks(weight: Tensor, bias: Tensor | None, n: int):
    """Split a packed projection into n (weight, bias) pairs along the output dimension."""
    ws = weight.chunk(n, dim=0)
    bs = bias.chunk(n, dim=0) if bias is not None else (None,) * n
    return list(zip(ws, bs, strict=True))


def apply(pair, x: Tensor) -> Tensor:
    return F.linear(x, *pair)
