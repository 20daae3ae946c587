"""The `explain` program: saliency overlays for one image and a list of prompts.

``python explain.py image=PATH 'prompts=[a red circle, a blue square]' [explainer=...] [resize=model|keep]``
writes into the run directory, for K prompts:
  * ``overlay_<k>.png`` — the heat map over the image (original size), one per prompt;
  * ``grid.png``        — the image and all overlays side by side, titled with prompt and cosine score;
  * ``tokens.png``      — the text-side token weights per prompt (explainers with a text side: Grad-ECLIP);
  * ``metrics.json``    — the files, the per-prompt scores (unscaled cosine at the explained input size) and the
                          token weights.
:func:`explain_image` does the same from Python.

Input sizes (``resize``): ``auto`` (default) is ``keep`` for official-mode Grad-ECLIP (the authors' setting)
and ``model`` otherwise; ``model`` resizes the whole image to the model's native square (no crop, so the map
covers every pixel; the aspect ratio is not kept), ``keep`` rounds each side to the nearest multiple of the patch
size (at least one patch; positional embedding interpolated), as the official Grad-ECLIP code does. Maps are
resized back to the original image size for the overlays.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from PIL import Image, UnidentifiedImageError

from mmel.explainers.base import check_prompts, cosine_scores, tokenize
from mmel.explainers.vit import encode_image, encode_text
from mmel.utils.runs import announce, output_dir, save_metrics

log = logging.getLogger(__name__)
RESIZE_MODES = ("model", "keep", "auto")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB with clear errors. Grayscale, palette, RGBA/LA (composited on white) and
    16-bit (scaled by 1/257) images are converted."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image: file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            img = im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"image: cannot read {path} as an image ({type(e).__name__}: {e})") from e
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. High-bit-depth single-channel modes are scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit data spans 0..65535; 'I'/'F' images whose values stay within 0..255 are already 8-bit scaled
        scale = 257.0 if img.mode.startswith("I;16") or arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(arr / scale + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def input_size(size_wh: tuple[int, int], clip, resize: str) -> tuple[int, int]:
    """(H, W) fed to the model for an image of PIL size (W, H) under ``resize`` (model | keep; auto resolved)."""
    if resize == "model":
        return tuple(clip.image_size)
    if resize == "keep":
        p = clip.patch_size
        w, h = size_wh
        return max(p, int(h / p + 0.5) * p), max(p, int(w / p + 0.5) * p)
    raise ValueError(f"resize={resize!r}: expected one of {RESIZE_MODES}")


def preprocess(img: Image.Image, clip, resize: str) -> torch.Tensor:
    """PIL RGB -> normalised tensor [3, H, W] at the size chosen by ``resize`` (bicubic)."""
    H, W = input_size(img.size, clip, resize)
    arr = np.asarray(img.resize((W, H), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(clip.mean).view(3, 1, 1)
    std = torch.tensor(clip.std).view(3, 1, 1)
    return (x - mean) / std


def overlay(img: Image.Image, heat: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """Blend a [H, W] map in [0, 1] (jet colours) over an RGB image of the same size."""
    from matplotlib import colormaps

    colours = colormaps["jet"](heat.detach().cpu().numpy())[..., :3] * 255.0
    base = np.asarray(img, dtype=np.float32)
    return Image.fromarray(np.clip(base * (1 - alpha) + colours * alpha, 0, 255).astype(np.uint8))


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "prompt"


def _grid_figure(img, overlays, prompts, scores, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(overlays) + 1
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.4), squeeze=False)
    panels = [(img, "image")] + [(o, f"{p}\ncos={s:.3f}") for o, p, s in zip(overlays, prompts, scores, strict=True)]
    for ax, (im, title) in zip(axes[0], panels, strict=True):
        ax.imshow(im)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _token_figure(tokens: list[list[str]], weights: list[list[float]], prompts, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(prompts), 1, figsize=(max(4, 0.7 * max(map(len, tokens))), 1.8 * len(prompts)))
    axes = np.atleast_1d(axes)
    for ax, toks, ws, p in zip(axes, tokens, weights, prompts, strict=True):
        ax.bar(range(len(ws)), ws, color="tab:red")
        ax.set_xticks(range(len(toks)), toks, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(p, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def explain_image(
    image: str | Path | Image.Image,
    prompts: Sequence[str],
    clip,
    explainer,
    *,
    out_dir: str | Path,
    resize: str = "auto",
    alpha: float = 0.5,
) -> dict[str, Any]:
    """Explain one image for K prompts and write the overlays into ``out_dir``; returns the metrics dict.

    image: a path or a PIL image; explainer: a built explainer (``explainer(images, prompts) -> [B, K, H, W]``).
    """
    prompts = check_prompts(prompts)
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: expected one of {RESIZE_MODES}")
    if resize == "auto":
        resize = "keep" if getattr(explainer, "mode", None) == "official" else "model"
    src = str(image) if not isinstance(image, Image.Image) else "<PIL image>"
    img = load_image(image) if not isinstance(image, Image.Image) else to_rgb(image)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x = preprocess(img, clip, resize)[None].to(clip.device)  # [1, 3, H, W]
    maps = explainer(x, prompts)  # [1, K, H, W]
    W0, H0 = img.size
    maps = torch.nn.functional.interpolate(maps, size=(H0, W0), mode="bilinear", align_corners=False).clamp(0, 1)
    text = encode_text(clip.model, tokenize(clip, prompts))  # any explainer: scores come from the CLIP itself
    scores = cosine_scores(encode_image(clip.model, x), text)[0].tolist()

    entries, overlays = [], []
    for k, (p, s) in enumerate(zip(prompts, scores, strict=True)):
        ov = overlay(img, maps[0, k], alpha)
        name = f"overlay_{k}_{_slug(p)}.png"
        ov.save(out / name)
        overlays.append(ov)
        entries.append({"prompt": p, "score": s, "overlay": name})
    _grid_figure(img, overlays, prompts, scores, out / "grid.png")
    files = {"grid": "grid.png", "overlays": [e["overlay"] for e in entries]}

    if hasattr(explainer, "explain_text"):
        te = explainer.explain_text(x, prompts)
        weights = [te.weights[0, k][te.mask[k]].tolist() for k in range(len(prompts))]
        _token_figure(te.tokens, weights, prompts, out / "tokens.png")
        files["tokens"] = "tokens.png"
        for e, toks, ws in zip(entries, te.tokens, weights, strict=True):
            e["token_weights"] = [[t, w] for t, w in zip(toks, ws, strict=True)]

    return {
        "image": src,
        "image_size": [H0, W0],
        "input_size": list(x.shape[-2:]),
        "resize": resize,
        "explainer": getattr(explainer, "name", type(explainer).__name__),
        "mode": getattr(explainer, "mode", None),
        "model": getattr(clip, "name", None),
        "prompts": entries,
        "files": files,
    }


def _cfg_value(cfg: DictConfig, key: str, hint: str):
    try:
        return cfg[key]
    except MissingMandatoryValue:
        raise ValueError(f"{key}: missing; pass {hint} on the command line") from None


def run(cfg: DictConfig) -> tuple[dict, dict]:
    """Hydra entry: build model + explainer from ``cfg``, explain ``cfg.image`` for ``cfg.prompts``."""
    from hydra.utils import instantiate

    image = _cfg_value(cfg, "image", "image=PATH")
    prompts = _cfg_value(cfg, "prompts", "'prompts=[a red circle, a blue square]'")
    if isinstance(prompts, ListConfig):
        prompts = OmegaConf.to_container(prompts)
    elif isinstance(prompts, str):
        prompts = [prompts]  # prompts="a cat" on the command line means one prompt
    torch.manual_seed(int(cfg.get("seed", 0)))
    clip = instantiate(cfg.model)
    explainer = instantiate(cfg.explainer)(clip=clip)  # keyword: the partial already binds name=
    out = output_dir(cfg)
    metrics = explain_image(
        image, prompts, clip, explainer, out_dir=out, resize=cfg.get("resize", "auto"), alpha=cfg.get("alpha", 0.5)
    )
    save_metrics(metrics, out, cfg=cfg)
    announce(out)
    return metrics, {"clip": clip, "explainer": explainer}
