"""Tower models for the tests and the benchmark (random weights, nothing downloaded).

* :func:`tiny_timm_clip` — an open_clip ``CustomTextCLIP`` whose visual is open_clip's ``TimmModel`` around a small
  timm trunk of the same timm architecture as the real model (``vit_base_patch16_siglip_224``,
  ``eva02_base_patch16_clip_224``, ``vit_pe_core_base_patch16_224`` with depth 2, width 64, 32 px, patch 8);
* :func:`tiny_hf_siglip` — a random ``SiglipModel`` of a tiny ``SiglipConfig``, saved to a folder and loaded with
  :func:`mmel.hf_siglip.load_hf_siglip`;
* :func:`openclip_tower` — an open_clip config by name (``ViT-B-16-SigLIP``, ...) with random weights;
* :class:`CharTokenizer` — the SigLIP tokenizers live on the Hugging Face hub (offline here): a deterministic
  character tokenizer (ids < vocab size, padded to the context length) stands in for them. Only the test prompts
  go through it; the maps' correctness does not depend on which ids a prompt gets.
"""

from __future__ import annotations

import tempfile

import open_clip
import timm
import torch
from open_clip.timm_model import TimmModel
from torch import nn

from mmel.backbone import ClipBundle, quiet_open_clip

TIMM_NAMES = {
    "siglip": "vit_base_patch16_siglip_224",
    "eva02": "eva02_base_patch16_clip_224",
    "pe": "vit_pe_core_base_patch16_224",
}


class CharTokenizer:
    """list[str] -> LongTensor [K, context_length]: character codes mod (vocab - 2) + 1, EOS id vocab - 1, zeros
    after it (a stand-in for SigLIP's hub tokenizer; see the module docstring)."""

    def __init__(self, vocab_size: int, context_length: int) -> None:
        self.vocab, self.length = vocab_size, context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [ord(c) % (self.vocab - 2) + 1 for c in t][: self.length - 1] + [self.vocab - 1]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def _bundle(model: nn.Module, name: str, tokenizer) -> ClipBundle:
    model.requires_grad_(False).eval()
    return ClipBundle(model=model, preprocess=None, tokenizer=tokenizer, name=name)


def tiny_timm_clip(kind: str, seed: int = 0) -> ClipBundle:
    """A tiny open_clip CLIP with a TimmModel visual of the ``kind`` trunk (siglip | eva02 | pe)."""
    torch.manual_seed(seed)
    siglip = kind == "siglip"
    embed = 64 if siglip else 32
    text = dict(context_length=12, vocab_size=100, width=32, heads=2, layers=1, proj_bias=True)
    if siglip:
        text.update(no_causal_mask=True, pool_type="last")
    with quiet_open_clip(weights_loaded=True):
        model = open_clip.CustomTextCLIP(
            embed_dim=embed,
            vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
            text_cfg=text,
            init_logit_bias=-10.0 if siglip else None,
        )
    visual = TimmModel.__new__(TimmModel)
    nn.Module.__init__(visual)
    visual.image_size = (32, 32)
    visual.trunk = timm.create_model(
        TIMM_NAMES[kind],
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=0 if siglip else embed,
        global_pool="map" if kind != "eva02" else "token",
    )
    visual.head = nn.Sequential()
    for p in visual.trunk.parameters():  # timm zero-inits some biases / the latent's scale: make them count
        if p.ndim == 1:
            p.data.add_(0.02 * torch.randn_like(p))
    model.visual = visual
    return _bundle(model, f"tiny-timm-{kind}", CharTokenizer(100, 12))


def tiny_hf_siglip(seed: int = 0, folder: str | None = None) -> ClipBundle:
    """A random tiny SiglipModel saved to ``folder`` (a temporary one by default) and loaded back."""
    from transformers import SiglipConfig, SiglipModel
    from transformers.utils import logging as hf_logging

    from mmel.hf_siglip import load_hf_siglip

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    cfg = SiglipConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
            max_position_embeddings=12, bos_token_id=None, eos_token_id=None, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8,
        ),
    )  # fmt: skip
    hf = SiglipModel(cfg)
    with torch.no_grad():
        hf.logit_scale.fill_(2.3)
        hf.logit_bias.fill_(-5.0)
    folder = folder or tempfile.mkdtemp(prefix="mmel-hf-siglip-")
    hf.save_pretrained(folder)
    model, preprocess, _ = load_hf_siglip(folder)
    bundle = _bundle(model, "hf-siglip-tiny", CharTokenizer(100, 12))
    bundle.preprocess = preprocess
    return bundle


def hf_siglip_b16(seed: int = 0) -> ClipBundle:
    """A random SiglipModel with google/siglip-base-patch16-224's shapes (SiglipConfig's defaults), via a folder."""
    from transformers import SiglipConfig, SiglipModel
    from transformers.utils import logging as hf_logging

    from mmel.hf_siglip import load_hf_siglip

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    folder = tempfile.mkdtemp(prefix="mmel-hf-siglip-b16-")
    SiglipModel(SiglipConfig()).save_pretrained(folder)
    model, _, _ = load_hf_siglip(folder)
    return _bundle(model, "hf-siglip-b16", CharTokenizer(32000, 64))


def openclip_tower(name: str, seed: int = 0) -> ClipBundle:
    """open_clip model ``name`` with random weights and a stand-in tokenizer of its text tower's shape."""
    torch.manual_seed(seed)
    with quiet_open_clip(weights_loaded=False):
        model = open_clip.create_model(name, pretrained=None)
    text = model.text if hasattr(model, "text") else model
    vocab = text.token_embedding.num_embeddings
    return _bundle(model, name, CharTokenizer(vocab, int(model.context_length)))


# ------------------------------------------------------------------------------ LeGrad re-run's own pool code
def is_hf(model: nn.Module) -> bool:
    from mmel.hf_siglip import HFSiglipCLIP

    return isinstance(model, HFSiglipCLIP)


def pool_prefix(model: nn.Module) -> int:
    """Non-patch tokens among the pool's keys: PE-Core's pool sees its CLS token; SigLIP has none."""
    return 0 if is_hf(model) else int(model.visual.trunk.num_prefix_tokens)


def reference_pool(model: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention pool applied to block tokens z [1, N, C] as legrad-torch's hooked pooler does it (attention
    probabilities kept), then the heads into the joint space: (features [1, E], attn [1, H, 1, N]). Written from
    the stock module's parameters, independently of mmel.explainers.towers."""
    B, N, C = z.shape
    if is_hf(model):
        head = model.visual.vision_model.head
        mha = head.attention
        H = mha.num_heads
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        q = (head.probe @ wq.T + bq).reshape(1, 1, H, -1).transpose(1, 2)
        k = (z @ wk.T + bk).reshape(B, N, H, -1).transpose(1, 2)
        v = (z @ wv.T + bv).reshape(B, N, H, -1).transpose(1, 2)
        attn = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        x = mha.out_proj((attn @ v).transpose(1, 2).reshape(B, 1, C))
        x = x + head.mlp(head.layernorm(x))
        return x[:, 0], attn
    trunk = model.visual.trunk
    p = trunk.attn_pool
    H = p.num_heads
    q = p.q(p.latent.expand(B, -1, -1)).reshape(B, 1, H, -1).transpose(1, 2)
    k, v = p.kv(z).reshape(B, N, 2, H, -1).permute(2, 0, 3, 1, 4)
    q, k = p.q_norm(q), p.k_norm(k)
    attn = ((q * p.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    x = p.proj((attn @ v).transpose(1, 2).reshape(B, 1, C))
    x = x + p.mlp(p.norm(x))
    x = trunk.head(trunk.fc_norm(x[:, 0]))
    return model.visual.head(x), attn
