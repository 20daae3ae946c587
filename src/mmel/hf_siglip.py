"""Hugging Face ``SiglipModel`` (transformers) behind the open_clip-like surface the explainers use.

``load_hf_siglip(source) -> (model, preprocess, tokenizer)`` loads a folder saved with ``save_pretrained`` (or a
hub id already in the local Hugging Face cache) and returns

  * model: :class:`HFSiglipCLIP` (frozen, eval) with ``encode_image(images [B, 3, H, W]) -> [B, E]``,
    ``encode_text(tokens [K, L]) -> [K, E]``, ``logit_scale`` and ``logit_bias`` (SigLIP's logit is
    exp(logit_scale)·cos + logit_bias) and ``visual`` (patch size, image size, mean / std);
  * preprocess: PIL image -> normalised tensor [3, S, S] (the folder's processor settings: resize to S x S, the
    mean / std; SigLIP's defaults 0.5 / 0.5 when the folder has no processor file);
  * tokenizer: list[str] -> LongTensor [K, L] padded to ``max_length`` as SigLIP was trained (the folder's
    tokenizer; a folder without one gives a tokenizer that raises a clear error when called).

Nothing here reads attention weights from transformers (``output_attentions`` is never used): the explainers
recompute the vision layers and the pooling head (mmel.explainers.towers.hf_tower).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from mmel.hf_clip import HFTokenizer, is_offline

SIGLIP_DEFAULT_MEAN = (0.5, 0.5, 0.5)
SIGLIP_DEFAULT_STD = (0.5, 0.5, 0.5)


class HFSiglipVisual(nn.Module):
    """The vision side of a SiglipModel: ``forward(images) -> pooler_output`` [B, E]; any image size that is a
    multiple of the patch size (position embeddings interpolated by transformers off the native size)."""

    def __init__(self, vision_model: nn.Module, mean, std) -> None:
        super().__init__()
        self.vision_model = vision_model  # transformers' SiglipVisionTransformer
        cfg = vision_model.config
        self.patch_size = (cfg.patch_size, cfg.patch_size)
        self.image_size = (cfg.image_size, cfg.image_size)
        self.image_mean, self.image_std = tuple(mean), tuple(std)

    def forward(self, images: Tensor) -> Tensor:
        native = tuple(images.shape[-2:]) == self.image_size
        out = self.vision_model(pixel_values=images, interpolate_pos_encoding=not native)
        if out.pooler_output is None:
            raise TypeError("this SigLIP vision model has no pooling head (vision_use_head=False)")
        return out.pooler_output


class HFSiglipCLIP(nn.Module):
    """A transformers ``SiglipModel`` with open_clip's ``encode_image`` / ``encode_text`` / ``logit_scale`` /
    ``logit_bias`` (module docstring). ``hf``: the SiglipModel itself."""

    def __init__(self, hf: nn.Module, mean=SIGLIP_DEFAULT_MEAN, std=SIGLIP_DEFAULT_STD) -> None:
        super().__init__()
        self.hf = hf
        self.visual = HFSiglipVisual(hf.vision_model, mean, std)
        self.context_length = int(hf.config.text_config.max_position_embeddings)

    @property
    def logit_scale(self) -> Tensor:
        return self.hf.logit_scale

    @property
    def logit_bias(self) -> Tensor:
        return self.hf.logit_bias

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        f = self.visual(images)
        return nn.functional.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        f = self.hf.text_model(input_ids=tokens).pooler_output
        return nn.functional.normalize(f, dim=-1) if normalize else f


class MissingTokenizer:
    """Stands in for a folder without tokenizer files: calling it raises an error naming the folder."""

    def __init__(self, source: str, reason: str) -> None:
        self.source, self.reason = source, reason

    def __call__(self, texts: list[str]) -> Tensor:
        raise FileNotFoundError(
            f"{self.source}: no SigLIP tokenizer could be loaded ({self.reason}). Save the tokenizer into the "
            "folder (AutoTokenizer.save_pretrained) or pass a hub id present in the local Hugging Face cache."
        )


def _processor_settings(source: str) -> tuple[tuple, tuple, int | None]:
    """(mean, std, size) from a folder's preprocessor_config.json; SigLIP defaults when absent."""
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        return SIGLIP_DEFAULT_MEAN, SIGLIP_DEFAULT_STD, None
    cfg = json.loads(path.read_text())
    size = cfg.get("size", {})
    side = size.get("height") if isinstance(size, dict) else size
    return tuple(cfg.get("image_mean", SIGLIP_DEFAULT_MEAN)), tuple(cfg.get("image_std", SIGLIP_DEFAULT_STD)), side


def make_preprocess(size: int, mean, std) -> Callable:
    """PIL image -> [3, size, size]: bicubic resize to size x size (SigLIP's processor resizes without a crop),
    RGB, to tensor, normalised."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
            T.Lambda(lambda im: im.convert("RGB")),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def load_hf_siglip(
    source: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[HFSiglipCLIP, Callable, Callable]:
    """(model, preprocess, tokenizer) of a SiglipModel folder (``save_pretrained``) or cached hub id; the model
    frozen and in eval mode. Errors name the source and what was expected."""
    try:
        from transformers import AutoTokenizer, SiglipModel
    except ImportError as e:  # pragma: no cover - transformers is a dependency of the HF path
        raise ImportError("load_hf_siglip needs the transformers package (pip install transformers)") from e
    source = str(source)
    offline = is_offline() or Path(source).expanduser().is_dir()  # a folder, or HF_HUB_OFFLINE: no network tried
    try:
        hf = SiglipModel.from_pretrained(source, local_files_only=offline)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing / wrong folder
        raise ValueError(
            f"{source}: could not load a transformers SiglipModel ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Expected a folder written by SiglipModel.save_pretrained (config.json with model_type 'siglip' and "
            "the weights) or a hub id in the local Hugging Face cache."
        ) from e
    hf.requires_grad_(False).eval().to(device)
    mean, std, side = _processor_settings(source)
    model = HFSiglipCLIP(hf, mean, std).eval()
    try:
        tok = HFTokenizer(AutoTokenizer.from_pretrained(source, local_files_only=offline), model.context_length)
    except Exception as e:  # noqa: BLE001
        tok = MissingTokenizer(source, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return model, make_preprocess(side or model.visual.image_size[0], mean, std), tok


def load(source: str, *, device: str | torch.device = "cpu", precision: str = "fp32"):
    """The loader ``load_clip("hf:<folder or id>")`` calls for a ``siglip`` model (mmel.backbone.HF_LOADERS):
    (model, preprocess, tokenizer, mean, std)."""
    if precision not in ("fp32", "amp"):
        raise ValueError(f"{source}: a Hugging Face SigLIP loads in precision fp32 or amp, got {precision!r}")
    model, preprocess, tokenizer = load_hf_siglip(source, device=device)
    return model, preprocess, tokenizer, tuple(model.visual.image_mean), tuple(model.visual.image_std)
