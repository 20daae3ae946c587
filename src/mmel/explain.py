"""The `explain` program: saliency overlays for one image and a list of prompts.

``python explain.py image=PATH 'prompts=[a red circle, a blue square]' [explainer=...] [resize=model|keep]``
writes into the run directory, for K prompts:
  * ``overlay_<k>.png`` — the heat map over the image (original size), one per prompt;
  * ``grid.png``        — the image and all overlays side by side, titled with prompt and cosine score;
  * ``tokens.png``      — the text-side token weights per prompt (explainers with a text side: Grad-ECLIP);
  * ``metrics.json``    — the files, the per-prompt scores (unscaled cosine at the explained input size), the
                          token weights and ``prompt_tokens`` (tokens kept of the prompt's, when the text tower's
                          context cuts a long prompt; the cut is also logged).
:func:`explain_image` does the same from Python; :func:`explain_maps` only computes (maps, scores, token weights).
A folder, a list of paths or a Hugging Face imagefolder (``images=DIR``, batched, resumable, one results table)
is the folder mode, :mod:`mmel.explain_folder`, which reuses this module's decoding, transform and overlay.

Images are read and transformed by :mod:`mmel.data` — the same decoding (EXIF orientation, every PIL mode),
keep-size rounding and normalisation as the datasets — so a photo gets the same map here as in evaluate.py.
What is this program's own is the choice of input size (``resize``): ``auto`` (default) is ``keep`` for
official-mode Grad-ECLIP (the authors' setting) and ``model`` otherwise; ``model`` resizes the whole image to the
model's native square (no crop, so the map covers every pixel; the aspect ratio is not kept), ``keep`` rounds each
side to the nearest multiple of the patch size (at least one patch; positional embedding interpolated), as the
official Grad-ECLIP code does, after scaling the longer side down to ``max_side`` pixels (default 1024, logged
when applied): attention memory grows with the fourth power of the side, so an uncapped 5000x3000 photo would
need hundreds of GB. The memory a call needs is estimated before anything is allocated and refused with a clear
message when it exceeds what the device has. Maps are resized back to the original image size for the overlays.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from PIL import Image
from torchvision.transforms import InterpolationMode

from mmel.data.base import DECODE_ERRORS, as_displayed
from mmel.data.base import load_image as decode_image
from mmel.data.transforms import BoxTransform, keep_size, normalize
from mmel.explainers.base import check_prompts
from mmel.families import vit_problem
from mmel.metrics import ClipScorer
from mmel.utils.runs import announce, save_metrics
from mmel.utils.task import task

log = logging.getLogger(__name__)
RESIZE_MODES = ("model", "keep", "auto")
DEFAULT_MAX_SIDE = 1024


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file as :mod:`mmel.data` does (EXIF orientation applied, any mode -> 8-bit RGB), with errors
    for a command line: a folder, a missing file and an unreadable one each say so."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(
            f"image: {path} is a directory; explain.py explains one image file (image=PATH/TO/FILE.jpg). To score a "
            "whole dataset use evaluate.py."
        )
    if not path.is_file():
        raise FileNotFoundError(f"image: file not found: {path}")
    try:
        return decode_image(path)
    except DECODE_ERRORS as e:
        raise ValueError(f"image: cannot read {path} as an image ({type(e).__name__}: {e})") from e


def input_size(size_wh: tuple[int, int], clip, resize: str, max_side: int | None = None) -> tuple[int, int]:
    """(H, W) fed to the model for an image of PIL size (W, H) under ``resize`` (model | keep; auto resolved)."""
    if resize == "model":
        return tuple(clip.image_size)
    if resize == "keep":
        w, h = size_wh
        return keep_size((h, w), clip.patch_size, max_side)
    raise ValueError(f"resize={resize!r}: expected one of {RESIZE_MODES}")


def preprocess(img: Image.Image, clip, resize: str, max_side: int | None = None) -> torch.Tensor:
    """PIL RGB -> normalised tensor [3, H, W] at the size chosen by ``resize`` (bicubic).

    ``keep`` is the datasets' keep-size transform itself; ``model`` squeezes the whole image into the model's square.
    """
    if resize == "keep":
        t = BoxTransform("keep", patch_size=clip.patch_size, max_side=max_side, mean=clip.mean, std=clip.std)
        return t.image(img)
    H, W = input_size(img.size, clip, resize)
    return normalize(TF.resize(img, [H, W], interpolation=InterpolationMode.BICUBIC), clip.mean, clip.std)


def estimate_bytes(clip, explainer, size: tuple[int, int], k: int, batch: int = 1) -> int:
    """A deliberately generous estimate of the memory one explainer call needs for ``batch`` images of ``size``
    (H, W) and ``k`` prompts: the traced blocks keep attention logits and weights [B, heads, T, T] (and the batched
    backward one more per prompt), every block keeps a few activations [B, T, width] per pass."""
    visual = clip.model.visual
    if vit_problem(visual):
        # a CNN / timm tower (docs/model_families.md): no token count to square; a generous bound of ~2000 float
        # activations per input pixel per pass, one pass per prompt plus two
        return int(4 * batch * size[0] * size[1] * 2000 * (2 + k))
    blocks = visual.transformer.resblocks
    depth, heads, width = len(blocks), blocks[0].attn.num_heads, visual.transformer.width
    t = (size[0] // clip.patch_size) * (size[1] // clip.patch_size) + 1
    layers = getattr(explainer, "layers", None)
    traced = depth - min(layers) if isinstance(layers, list) and layers else depth
    per_image = traced * heads * t * t * (2 + k) + depth * t * width * (12 + 4 * k)
    return int(4 * batch * per_image)


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (CUDA: free device memory; CPU: MemAvailable), None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(clip, explainer, size: tuple[int, int], k: int, batch: int = 1) -> None:
    """Refuse, before allocating, a call for ``batch`` images whose estimated memory exceeds what the device has
    free."""
    need, free = estimate_bytes(clip, explainer, size, k, batch), available_bytes(clip.device)
    if free is not None and need > free:
        what = f"{batch} images of a" if batch > 1 else "a"
        raise MemoryError(
            f"explaining {what} {size[0]}x{size[1]} input for {k} prompt(s) needs about {need / 2**30:.1f} GiB, but "
            f"{clip.device} has {free / 2**30:.1f} GiB free: lower max_side=, use resize=model, or give fewer prompts"
            + (" or a smaller batch_size=" if batch > 1 else "")
        )


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


def explain_maps(
    img: Image.Image,
    prompts: Sequence[str],
    clip,
    explainer,
    *,
    resize: str = "auto",
    max_side: int | None = DEFAULT_MAX_SIDE,
) -> dict[str, Any]:
    """Explain one displayed RGB image (:func:`load_image`) for K prompts without writing anything (the computing
    half of :func:`explain_image`).

    Returns ``maps`` [K, H0, W0] in [0, 1] at the image's own size, ``scores`` (K unscaled cosines from the CLIP
    itself, at the explained input size), ``input`` the model input [1, 3, H, W], ``resize`` (auto resolved) and,
    for explainers with a text side, ``tokens`` (per prompt, the real tokens) and ``token_weights`` (per prompt).
    ``max_side``: in ``keep`` mode the longer side is first scaled down to at most this many pixels (None: no cap);
    the memory the call needs is estimated first and refused when the device lacks it.
    """
    prompts = check_prompts(prompts)
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: expected one of {RESIZE_MODES}")
    if resize == "auto":
        resize = "keep" if getattr(explainer, "mode", None) == "official" else "model"
    W0, H0 = img.size
    if resize == "keep" and max_side and max(H0, W0) > max_side:
        log.info("image %dx%d: longer side scaled to %d px for keep-size input (max_side=)", W0, H0, max_side)
    check_memory(clip, explainer, input_size(img.size, clip, resize, max_side), len(prompts))
    x = preprocess(img, clip, resize, max_side)[None].to(clip.device)  # [1, 3, H, W]
    maps = explainer(x, prompts)  # [1, K, H, W]
    maps = torch.nn.functional.interpolate(maps, size=(H0, W0), mode="bilinear", align_corners=False).clamp(0, 1)
    scores = ClipScorer(clip, prompts).cosines(x)[0].tolist()  # any explainer: scores come from the CLIP itself
    out = {"maps": maps[0], "scores": scores, "input": x, "resize": resize, "tokens": None, "token_weights": None}
    if hasattr(explainer, "explain_text"):
        te = explainer.explain_text(x, prompts)
        out["tokens"] = te.tokens
        out["token_weights"] = [te.weights[0, k][te.mask[k]].tolist() for k in range(len(prompts))]
    return out


def explain_image(
    image: str | Path | Image.Image,
    prompts: Sequence[str],
    clip,
    explainer,
    *,
    out_dir: str | Path,
    resize: str = "auto",
    alpha: float = 0.5,
    max_side: int | None = DEFAULT_MAX_SIDE,
) -> dict[str, Any]:
    """Explain one image for K prompts and write the overlays into ``out_dir``; returns the metrics dict.

    image: a path or a PIL image; explainer: a built explainer (``explainer(images, prompts) -> [B, K, H, W]``);
    max_side: in ``keep`` mode, the longer side is scaled down to at most this many pixels (None: no cap).
    """
    prompts = check_prompts(prompts)
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: expected one of {RESIZE_MODES}")
    src = str(image) if not isinstance(image, Image.Image) else "<PIL image>"
    img = load_image(image) if not isinstance(image, Image.Image) else as_displayed(image)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = explain_maps(img, prompts, clip, explainer, resize=resize, max_side=max_side)
    maps, scores, x, resize = res["maps"][None], res["scores"], res["input"], res["resize"]
    W0, H0 = img.size
    entries, overlays = [], []
    for k, (p, s) in enumerate(zip(prompts, scores, strict=True)):
        ov = overlay(img, maps[0, k], alpha)
        name = f"overlay_{k}_{_slug(p)}.png"
        ov.save(out / name)
        overlays.append(ov)
        entry = {"prompt": p, "score": s, "overlay": name}
        counts = clip.token_counts(p) if hasattr(clip, "token_counts") else None
        if counts is not None:  # tokens the text tower saw of the prompt's (fewer when its context cut it)
            entry["prompt_tokens"] = {"kept": counts[0], "total": counts[1], "truncated": counts[0] < counts[1]}
        entries.append(entry)
    _grid_figure(img, overlays, prompts, scores, out / "grid.png")
    files = {"grid": "grid.png", "overlays": [e["overlay"] for e in entries]}

    if res["tokens"] is not None:
        tokens, weights = res["tokens"], res["token_weights"]
        _token_figure(tokens, weights, prompts, out / "tokens.png")
        files["tokens"] = "tokens.png"
        for e, toks, ws in zip(entries, tokens, weights, strict=True):
            e["token_weights"] = [[t, w] for t, w in zip(toks, ws, strict=True)]

    return {
        "image": src,
        "image_size": [H0, W0],
        "input_size": list(x.shape[-2:]),
        "resize": resize,
        "max_side": max_side if resize == "keep" else None,
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


@task("explain")
def run(cfg: DictConfig, out: Path) -> tuple[dict, dict]:
    """Hydra entry (``run(cfg)``): build model + explainer from ``cfg``, explain ``cfg.image`` for ``cfg.prompts``."""
    if cfg.get("images") is not None:  # the folder mode lives a layer above (mmel.explain_folder.run dispatches)
        raise ValueError("images= is the folder mode: run it with mmel.explain_folder.run (what explain.py calls)")
    image = _cfg_value(cfg, "image", "image=PATH (or images=DIR for a folder of images)")
    prompts = _cfg_value(cfg, "prompts", "'prompts=[a red circle, a blue square]'")
    if isinstance(prompts, ListConfig):
        prompts = OmegaConf.to_container(prompts)
    elif isinstance(prompts, str):
        prompts = [prompts]  # prompts="a cat" on the command line means one prompt
    clip = instantiate(cfg.model)
    explainer = instantiate(cfg.explainer)(clip=clip)  # keyword: the partial already binds name=
    metrics = explain_image(
        image,
        prompts,
        clip,
        explainer,
        out_dir=out,
        resize=cfg.get("resize", "auto"),
        alpha=cfg.get("alpha", 0.5),
        max_side=cfg.get("max_side", DEFAULT_MAX_SIDE),
    )
    save_metrics(metrics, out, cfg=cfg)
    announce(out)
    return metrics, {"clip": clip, "explainer": explainer}
