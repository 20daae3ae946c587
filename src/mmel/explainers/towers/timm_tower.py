"""open_clip image towers with a timm trunk (``open_clip.timm_model.TimmModel``): SigLIP / SigLIP2
(``vit_base_patch16_siglip_*``: timm VisionTransformer, no CLS token, latent-query attention pool), EVA02
(``eva02_*_clip_*``: timm Eva, CLS token, rotary position embedding, SwiGLU, inner attention norm) and PE-Core
(``vit_pe_core_*``: timm Eva with ``AttentionRope``, CLS token, attention pool over CLS + patches).

Each block is recomputed from its own modules (``norm1``, the fused ``qkv`` or separate ``q_proj/k_proj/v_proj``
with EVA's q/v biases, ``q_norm``/``k_norm``, the rotary embedding on the patch rows, ``attn.norm``, the gate,
``proj``, ``ls1``/``gamma_1``, ``norm2``, ``mlp``, ``ls2``/``gamma_2``); the pool from ``attn_pool``'s ``latent``,
``q``, ``kv``, ``proj``, ``norm`` and ``mlp``; then ``fc_norm``, ``head`` and open_clip's own ``head``. Tests pin
the result to ``model.encode_image``. Traced at the trunk's native image size (timm fixes the patch grid and the
rotary table at build time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmel.explainers.towers.core import PoolRecord, Tower, block_record, latent_pool


def _timm_classes():
    from open_clip.timm_model import TimmModel
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat
    from timm.models.eva import Eva, EvaBlock
    from timm.models.vision_transformer import Block, VisionTransformer

    return TimmModel, VisionTransformer, Eva, Block, EvaBlock, apply_rot_embed_cat


def is_timm_tower(model: nn.Module) -> bool:
    """Whether ``model.visual`` is open_clip's TimmModel around a timm VisionTransformer or Eva trunk."""
    TimmModel, VisionTransformer, Eva, *_ = _timm_classes()
    visual = getattr(model, "visual", None)
    return isinstance(visual, TimmModel) and isinstance(getattr(visual, "trunk", None), VisionTransformer | Eva)


class TimmTower(Tower):
    """Tower adapter for a timm VisionTransformer / Eva trunk inside open_clip (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        TimmModel, VisionTransformer, Eva, Block, EvaBlock, self._rot = _timm_classes()
        if not is_timm_tower(model):
            raise TypeError("TimmTower needs an open_clip model whose visual is a TimmModel with a ViT / Eva trunk")
        self.visual = model.visual
        self.trunk = trunk = model.visual.trunk
        self.is_eva = isinstance(trunk, Eva)
        self.family = f"timm {type(trunk).__name__}"
        for i, blk in enumerate(trunk.blocks):
            if type(blk) not in (Block, EvaBlock):
                raise TypeError(
                    f"timm tower block {i} is a {type(blk).__name__}; the tracer supports pre-norm timm Block and "
                    "EvaBlock only"
                )
            if getattr(blk.attn, "num_kv_groups", 1) > 1:
                raise TypeError(f"timm tower block {i}: grouped-query attention is not supported")
        if getattr(trunk, "rope_mixed", False):
            raise TypeError("timm Eva with mixed (per-depth) rotary embedding is not supported")
        pool = getattr(trunk, "attn_pool", None)
        self.attn_pool = pool is not None
        if not self.attn_pool and trunk.global_pool not in ("token", "avg"):
            raise TypeError(f"timm tower pooled by global_pool={trunk.global_pool!r}: expected token, avg or map")
        if self.attn_pool and (getattr(pool, "latent_len", 1) != 1 or pool.pool not in ("token", "avg", "")):
            raise TypeError("timm attention pools with more than one latent query are not supported")
        # token pooling reads row 0 after a per-token norm: the tracer may then keep the patch rows of the last
        # block off the graph (the norms of these trunks are LayerNorms, per token)
        self.token_pooled = not self.attn_pool and trunk.global_pool == "token" and trunk.num_prefix_tokens > 0
        self.patch = int(trunk.patch_embed.patch_size[0])
        self.depth = len(trunk.blocks)
        self.prefix = int(trunk.num_prefix_tokens)
        drops_prefix = not self.is_eva and not getattr(trunk, "pool_include_prefix", False)
        self.pool_prefix = 0 if drops_prefix else self.prefix
        self.image_size = tuple(self.visual.image_size)

    # ------------------------------------------------------------------------------------------- image side
    def embed(self, images: Tensor):
        self.check_size(images)
        t = self.trunk
        x = t.patch_embed(images.to(t.patch_embed.proj.weight.dtype))
        if self.is_eva:
            x, rope = t._pos_embed(x)  # patch dropout is the identity in eval
        else:
            x, rope = t.patch_drop(t._pos_embed(x)), None
        return t.norm_pre(x), tuple(t.patch_embed.grid_size), rope

    def block(self, i: int, x: Tensor, aux) -> Tensor:
        blk = self.trunk.blocks[i]
        return blk(x, rope=aux) if self.is_eva else blk(x)

    def _qkv(self, a: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = h.shape
        H = a.num_heads
        if getattr(a, "qkv", None) is not None:
            bias = a.qkv.bias
            if bias is None and getattr(a, "q_bias", None) is not None:  # EVA: q and v biases, k without
                bias = torch.cat((a.q_bias, a.k_bias, a.v_bias))
            qkv = F.linear(h, a.qkv.weight, bias).reshape(B, T, 3, H, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q, k, v = (p(h).reshape(B, T, H, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        return a.q_norm(q), a.k_norm(k), v

    def _rope(self, a: nn.Module, t: Tensor, rope: Tensor) -> Tensor:
        n = a.num_prefix_tokens
        half = getattr(a, "rotate_half", False)
        return torch.cat([t[:, :, :n], self._rot(t[:, :, n:], rope, half=half)], dim=2).type_as(t)

    def attention(self, i: int, x: Tensor, aux, split: bool = False):
        blk = self.trunk.blocks[i]
        a = blk.attn
        h = blk.norm1(x)
        q, k, v = self._qkv(a, h)
        if aux is not None:
            q, k = self._rope(a, q, aux), self._rope(a, k, aux)
        gate = getattr(a, "gate", None)

        def out(o: Tensor, hr: Tensor) -> Tensor:
            o = a.norm(o)
            if gate is not None:
                o = o * gate(hr).sigmoid()
            return a.proj(o)

        return block_record(q, k, v, x, h, out, a.scale, split)

    def rest(self, i: int, x: Tensor, y: Tensor) -> Tensor:
        blk = self.trunk.blocks[i]
        if self.is_eva:
            x = x + (blk.gamma_1 * y if blk.gamma_1 is not None else y)
            m = blk.mlp(blk.norm2(x))
            return x + (blk.gamma_2 * m if blk.gamma_2 is not None else m)
        x = x + blk.ls1(y)
        return x + blk.ls2(blk.mlp(blk.norm2(x)))

    def _pool(self, z: Tensor) -> PoolRecord:
        p = self.trunk.attn_pool
        z = z[:, self.prefix - self.pool_prefix :]
        if p.pos_embed is not None:
            z = z + p.pos_embed.unsqueeze(0).to(z.dtype)

        def kv(t: Tensor) -> tuple[Tensor, Tensor]:
            return p.kv(t).chunk(2, dim=-1)

        def rest(y: Tensor) -> Tensor:
            return y + p.mlp(p.norm(y)) if p.mlp is not None else y

        return latent_pool(z, p.latent, p.q, kv, p.num_heads, p.proj, rest, p.q_norm, p.k_norm)

    def readout(self, x: Tensor, norm: bool = True, pool: str | None = None):
        t = self.trunk
        z = t.norm(x) if norm else x
        rec = None
        if pool is not None:  # an explainer's own pooling of a CLS / mean tower (LeGrad's intermediate layers)
            pooled = z.mean(dim=1) if pool == "mean" else z[:, 0]
        elif self.attn_pool:
            rec = self._pool(z)
            pooled = rec.out[:, 0]
        else:
            pooled = t.pool(z)
        pooled = t.head(t.head_drop(t.fc_norm(pooled)))
        return self.visual.head(pooled), rec

    def dense(self, tr) -> Tensor:
        """MaskCLIP's dense embeddings [B, N, E] of the patches: the final attention (the pool, or the last block's
        CLS query) replaced by each patch's own value, then everything after it as the model does."""
        t = self.trunk
        if self.attn_pool:
            p = t.attn_pool
            z = t.norm(tr.tokens)[:, self.prefix - self.pool_prefix :]
            if p.pos_embed is not None:
                z = z + p.pos_embed.unsqueeze(0).to(z.dtype)
            u = p.proj(p.kv(z).chunk(2, dim=-1)[1])
            pooled = u + p.mlp(p.norm(u)) if p.mlp is not None else u
            pooled = pooled[:, self.pool_prefix :]
        else:
            i = self.depth - 1
            rec, blk = tr.records[i], t.blocks[i]
            a = blk.attn
            o = a.norm(rec.v.transpose(1, 2).flatten(2))
            if getattr(a, "gate", None) is not None:
                o = o * a.gate(blk.norm1(rec.x_in)).sigmoid()
            pooled = t.norm(self.rest(i, rec.x_in, a.proj(o)))[:, self.prefix :]
        return self.visual.head(t.head(t.head_drop(t.fc_norm(pooled))))

    # -------------------------------------------------------------------------------------------- text side
    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens)
