"""Hugging Face SigLIP (``mmel.hf_siglip.HFSiglipCLIP``) as a tower: no CLS token, a multihead attention pooling
head (``vision_model.head``: a learned ``probe`` attends over the patch tokens through an ``nn.MultiheadAttention``,
then ``probe_out + mlp(layernorm(probe_out))``).

Each encoder layer is recomputed from ``layer_norm1``, ``self_attn.q_proj/k_proj/v_proj/out_proj`` (scale
``self_attn.scale``), ``layer_norm2`` and ``mlp``; the head from ``probe``, the attention's packed
``in_proj_weight`` / ``in_proj_bias`` and ``out_proj``, ``layernorm`` and ``mlp``. ``output_attentions`` is never
used. Any image size that is a multiple of the patch size works (position embeddings interpolated by transformers).
"""

from __future__ import annotations

from torch import Tensor, nn

from mmel.explainers.towers.core import Tower, apply, block_record, latent_pool, linear_chunks
from mmel.hf_siglip import HFSiglipCLIP


def is_hf_siglip(model: nn.Module) -> bool:
    return isinstance(model, HFSiglipCLIP)


class HFSiglipTower(Tower):
    """Tower adapter for :class:`mmel.hf_siglip.HFSiglipCLIP` (module docstring)."""

    family = "Hugging Face SigLIP"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if not is_hf_siglip(model):
            raise TypeError("HFSiglipTower needs an mmel.hf_siglip.HFSiglipCLIP")
        self.vm = vm = model.visual.vision_model
        if not getattr(vm, "use_head", True) or getattr(vm, "head", None) is None:
            raise TypeError("this SigLIP vision model has no attention pooling head (vision_use_head=False)")
        self.layers = vm.encoder.layers
        self.patch = int(vm.config.patch_size)
        self.depth = len(self.layers)
        self.prefix = 0
        self.pool_prefix = 0
        self.attn_pool = True
        self.image_size = tuple(model.visual.image_size)

    def embed(self, images: Tensor):
        H, W = images.shape[-2:]
        native = self.image_size == (H, W)
        x = self.vm.embeddings(images, interpolate_pos_encoding=not native)
        return x, (H // self.patch, W // self.patch), None

    def block(self, i: int, x: Tensor, aux) -> Tensor:
        out = self.layers[i](x, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    def attention(self, i: int, x: Tensor, aux, split: bool = False):
        layer = self.layers[i]
        a = layer.self_attn
        h = layer.layer_norm1(x)
        B, T, _ = h.shape
        q, k, v = (p(h).reshape(B, T, a.num_heads, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        return block_record(q, k, v, x, h, lambda o, _h: a.out_proj(o), a.scale, split)

    def rest(self, i: int, x: Tensor, y: Tensor) -> Tensor:
        layer = self.layers[i]
        x = x + y
        return x + layer.mlp(layer.layer_norm2(x))

    def readout(self, x: Tensor, norm: bool = True, pool: str | None = None):
        if pool is not None:
            raise ValueError("a SigLIP tower pools with its attention head; no CLS / mean pooling to choose")
        z = self.vm.post_layernorm(x) if norm else x
        head = self.vm.head
        mha = head.attention
        wq, wk, wv = linear_chunks(mha.in_proj_weight, mha.in_proj_bias, 3)

        def kv(t: Tensor) -> tuple[Tensor, Tensor]:
            return apply(wk, t), apply(wv, t)

        def rest(y: Tensor) -> Tensor:
            return y + head.mlp(head.layernorm(y))

        rec = latent_pool(z, head.probe, lambda t: apply(wq, t), kv, mha.num_heads, mha.out_proj, rest)
        return rec.out[:, 0], rec

    def dense(self, tr) -> Tensor:
        """MaskCLIP's dense embeddings [B, N, E]: the pooling head with each patch's own value in place of the
        probe's attended sum."""
        head = self.vm.head
        mha = head.attention
        _, _, wv = linear_chunks(mha.in_proj_weight, mha.in_proj_bias, 3)
        u = mha.out_proj(apply(wv, self.vm.post_layernorm(tr.tokens)))
        return u + head.mlp(head.layernorm(u))

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens)
