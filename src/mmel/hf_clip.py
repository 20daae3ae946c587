"""Hugging Face ``CLIPModel`` -> open_clip's native CLIP, exactly, so every explainer runs on it unchanged.

A ``transformers`` CLIPModel and an open_clip ``CLIP`` built with the same configuration compute the same function:
pre-LN transformer blocks with q/k/v projections, a class token and learned positional embeddings, ``ln_post`` on
the class token and a bias-free projection; a causal text transformer pooled at the end-of-text token (the
highest id, which is open_clip's argmax pooling) and a bias-free projection. :func:`convert` builds that open_clip
model (widths, layers, heads, MLP width, patch and image size, QuickGELU or GELU, context length, vocabulary) and
copies the weights: q/k/v into the packed ``in_proj_weight`` / ``in_proj_bias``, the embeddings, the norms, the
projections transposed, ``logit_scale``. Tests pin the image and text embeddings to the Hugging Face model's.
Attention is never read through ``output_attentions``: the explainers recompute it from the converted weights.

The tokenizer is the one saved with the model (``vocab.json`` / ``merges.txt`` or ``tokenizer.json``), wrapped to
open_clip's call shape (:class:`HFTokenizer`). ``HF_HUB_OFFLINE=1`` (or a local folder) loads without the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

_ACT = {"quick_gelu": True, "gelu": False}  # HF hidden_act -> open_clip quick_gelu (nn.GELU is the exact erf GELU)


class HFTokenizer:
    """A Hugging Face tokenizer with open_clip's call shape: ``tok(texts) -> LongTensor [K, context_length]``
    (start and end tokens added, cut to the context with the end token kept, padded); ``encode(text)`` gives the
    ids without start / end (what ``ClipBundle.token_counts`` counts)."""

    def __init__(self, tokenizer, context_length: int) -> None:
        self.tokenizer, self.context_length = tokenizer, int(context_length)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=context_length or self.context_length,
            return_tensors="pt",
        )
        return out["input_ids"].long()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no network (huggingface_hub's own reading of the variable)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def open_clip_config(config) -> dict:
    """open_clip ``CLIP`` keyword arguments for a transformers ``CLIPConfig`` (clear errors for what differs)."""
    v, t = config.vision_config, config.text_config
    for part, c in (("vision", v), ("text", t)):
        if c.hidden_act not in _ACT:
            raise ValueError(f"HF CLIP {part} tower uses hidden_act={c.hidden_act!r}; convertible: {sorted(_ACT)}")
        if abs(float(c.layer_norm_eps) - 1e-5) > 1e-12:
            raise ValueError(f"HF CLIP {part} tower has layer_norm_eps={c.layer_norm_eps}; open_clip's is 1e-5")
    if v.hidden_act != t.hidden_act:
        raise ValueError(f"HF CLIP towers use different activations ({v.hidden_act} / {t.hidden_act})")
    eos = getattr(t, "eos_token_id", None)
    if eos not in (2, t.vocab_size - 1):
        # transformers pools at the first eos_token_id (argmax when the config says 2); open_clip at the highest id
        raise ValueError(
            f"HF CLIP text config: eos_token_id={eos} is not the highest token id ({t.vocab_size - 1}), so "
            "open_clip's argmax pooling would read another token"
        )
    return dict(
        embed_dim=config.projection_dim,
        quick_gelu=_ACT[v.hidden_act],
        vision_cfg=dict(
            layers=v.num_hidden_layers,
            width=v.hidden_size,
            head_width=v.hidden_size // v.num_attention_heads,
            mlp_ratio=v.intermediate_size / v.hidden_size,
            patch_size=v.patch_size,
            image_size=v.image_size,
        ),
        text_cfg=dict(
            context_length=t.max_position_embeddings,
            vocab_size=t.vocab_size,
            width=t.hidden_size,
            heads=t.num_attention_heads,
            layers=t.num_hidden_layers,
            mlp_ratio=t.intermediate_size / t.hidden_size,
        ),
        init_logit_scale=float(getattr(config, "logit_scale_init_value", 2.6592)),
    )


def _blocks(hf: dict[str, Tensor], src: str, dst: str, n: int) -> dict[str, Tensor]:
    out = {}
    for i in range(n):
        a, b = f"{src}.encoder.layers.{i}.", f"{dst}.resblocks.{i}."
        out[b + "attn.in_proj_weight"] = torch.cat([hf[a + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        out[b + "attn.in_proj_bias"] = torch.cat([hf[a + f"self_attn.{p}_proj.bias"] for p in "qkv"])
        pairs = {
            "attn.out_proj": "self_attn.out_proj",
            "ln_1": "layer_norm1",
            "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
        for ours, theirs in pairs.items():
            for p in ("weight", "bias"):
                out[b + f"{ours}.{p}"] = hf[a + f"{theirs}.{p}"]
    return out


def convert_state_dict(hf: dict[str, Tensor], config) -> dict[str, Tensor]:
    """A CLIPModel state dict -> open_clip CLIP keys (see the module docstring)."""
    v, t = "vision_model", "text_model"
    sd = {
        "visual.class_embedding": hf[f"{v}.embeddings.class_embedding"],
        "visual.positional_embedding": hf[f"{v}.embeddings.position_embedding.weight"],
        "visual.conv1.weight": hf[f"{v}.embeddings.patch_embedding.weight"],
        "visual.proj": hf["visual_projection.weight"].T,
        "token_embedding.weight": hf[f"{t}.embeddings.token_embedding.weight"],
        "positional_embedding": hf[f"{t}.embeddings.position_embedding.weight"],
        "text_projection": hf["text_projection.weight"].T,
        "logit_scale": hf["logit_scale"].reshape(()),
    }
    for ours, theirs in (
        ("visual.ln_pre", f"{v}.pre_layrnorm"),
        ("visual.ln_post", f"{v}.post_layernorm"),
        ("ln_final", f"{t}.final_layer_norm"),
    ):
        for p in ("weight", "bias"):
            sd[f"{ours}.{p}"] = hf[f"{theirs}.{p}"]
    sd.update(_blocks(hf, v, "visual.transformer", config.vision_config.num_hidden_layers))
    sd.update(_blocks(hf, t, "transformer", config.text_config.num_hidden_layers))
    return {k: x.detach().clone().float() for k, x in sd.items()}


def convert(hf_model: nn.Module) -> nn.Module:
    """An open_clip ``CLIP`` (fp32, eval) computing what the transformers ``CLIPModel`` computes."""
    from open_clip.model import CLIP

    cfg = open_clip_config(hf_model.config)
    model = CLIP(**cfg)
    sd = convert_state_dict(hf_model.state_dict(), hf_model.config)
    if model.logit_scale.ndim != sd["logit_scale"].ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load(source: str, *, device: str | torch.device = "cpu", precision: str = "fp32"):
    """Load ``source`` (a hub id or a local folder saved with ``save_pretrained``) as a converted open_clip CLIP.

    Returns (model, preprocess, tokenizer, mean, std). The caller (``mmel.backbone.load_clip``) wraps errors."""
    from transformers import AutoTokenizer, CLIPModel

    offline = is_offline() or Path(source).expanduser().is_dir()
    where = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source
    hf_model = CLIPModel.from_pretrained(where, local_files_only=offline)
    model = convert(hf_model)
    ctx = int(hf_model.config.text_config.max_position_embeddings)
    vocab = int(hf_model.config.text_config.vocab_size)
    try:
        tok = AutoTokenizer.from_pretrained(where, local_files_only=offline)
        why = None if vocab // 2 < len(tok) <= vocab else f"its vocabulary has {len(tok)} entries, the model {vocab}"
    except Exception as e:  # noqa: BLE001 — missing files surface as OSError, ValueError or TypeError
        why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
    if why:
        # transformers builds an empty CLIP tokenizer when the files are absent: the vocabulary size tells
        raise FileNotFoundError(
            f"hf:{source}: no tokenizer files next to the model ({why}). Save the tokenizer with it "
            "(CLIPProcessor / CLIPTokenizer.save_pretrained(folder): tokenizer.json, or vocab.json and merges.txt)."
        )
    mean, std = _image_stats(where, offline)
    if precision in ("fp16", "bf16"):
        open_clip.model.convert_weights_to_lp(model, torch.float16 if precision == "fp16" else torch.bfloat16)
    elif precision not in ("fp32", "amp"):
        raise ValueError(f"hf: models load in precision fp32, amp, fp16 or bf16; got {precision!r}")
    model.to(device)
    size = int(hf_model.config.vision_config.image_size)
    preprocess = open_clip.transform.image_transform(size, is_train=False, mean=mean, std=std)
    return model, preprocess, HFTokenizer(tok, ctx), mean, std


def _image_stats(where: str, offline: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image mean / std of the saved image processor (``preprocessor_config.json``), else OpenAI's."""
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(where, local_files_only=offline)
        return tuple(float(x) for x in proc.image_mean), tuple(float(x) for x in proc.image_std)
    except Exception:  # noqa: BLE001 — no processor saved: CLIP's own statistics
        return tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)
