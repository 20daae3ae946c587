"""The explorer's explanations and renderings without any UI: one explainer's maps for an image and its prompts,
the overlays with their peaks and boxes, and the download of them all.

Everything here takes PIL images / prompt text and returns plain results, so it is unit-tested without a browser;
:mod:`mmel.app.ui` only wires these functions (and those of :mod:`mmel.app.inputs`, :mod:`mmel.app.models`,
:mod:`mmel.app.samples`) to Gradio components. The computing is the library's: :func:`mmel.explain.explain_maps`
(preprocess, maps, CLIP's scores, text side), :func:`mmel.explain.overlay`, :func:`mmel.backbone.load_clip`,
:func:`mmel.explainers.build_explainer` and the functional metrics.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmel.app.models import ModelCache
from mmel.explain import _slug, explain_maps, overlay

DISPLAY_MIN_SIDE = 256  # small images (the shapes world is 64 px) are enlarged for display, pixels kept sharp


# ------------------------------------------------------------------------------------------------ explaining


@dataclass
class Explanation:
    """One explainer's result for one image: maps [K, H, W] in [0, 1] at the image's size, CLIP's cosine per
    prompt, the text side (per prompt [(token, weight)]) when the explainer has one, and the compute time."""

    explainer: str
    prompts: list[str]
    maps: np.ndarray
    scores: list[float]
    tokens: list[list[tuple[str, float]]] | None
    seconds: float
    resize: str


def explain(
    cache: ModelCache, backbone: str, choice: str, img: Image.Image, prompts: list[str], weights: str | None = None
) -> Explanation:
    """Explain ``img`` (RGB) for ``prompts`` with explainer ``choice`` on ``backbone`` (models from ``cache``)."""
    explainer = cache.explainer(backbone, choice, weights)
    clip = cache.clip(backbone, weights)
    with cache.compute_lock(backbone, weights):
        t = time.perf_counter()
        res = explain_maps(img, prompts, clip, explainer)
        seconds = time.perf_counter() - t
    tokens = None
    if res["tokens"] is not None:
        tokens = [list(zip(t, w, strict=True)) for t, w in zip(res["tokens"], res["token_weights"], strict=True)]
    maps = res["maps"].detach().float().cpu().numpy()
    return Explanation(choice, list(prompts), maps, [float(s) for s in res["scores"]], tokens, seconds, res["resize"])


# ------------------------------------------------------------------------------------------------- rendering


def display_factor(size: tuple[int, int], min_side: int = DISPLAY_MIN_SIDE) -> int:
    """The integer factor that brings the shorter side of a (W, H) image to at least ``min_side`` (1 if it is)."""
    return max(1, math.ceil(min_side / max(1, min(size))))


def enlarge(img: Image.Image, min_side: int = DISPLAY_MIN_SIDE) -> Image.Image:
    """``img`` enlarged by :func:`display_factor` with nearest neighbour (pixels stay sharp; display only)."""
    f = display_factor(img.size, min_side)
    return img if f == 1 else img.resize((img.width * f, img.height * f), Image.Resampling.NEAREST)


def peak(heat: np.ndarray) -> tuple[int, int]:
    """(x, y) pixel of the first maximum of a [H, W] map (raster order, like ``torch.argmax``)."""
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(x), int(y)


def render(
    img: Image.Image,
    heat: np.ndarray,
    alpha: float = 0.5,
    boxes: np.ndarray | None = None,
    min_side: int = DISPLAY_MIN_SIDE,
) -> Image.Image:
    """The overlay of a [H, W] map over ``img`` (the library's :func:`~mmel.explain.overlay`), enlarged to at least
    ``min_side`` (nearest neighbour), with the peak marked (white ring, black cross) and ``boxes`` [M, 4] xyxy in
    image pixels drawn in green."""
    ov = overlay(img, torch.from_numpy(np.asarray(heat, dtype=np.float32)), float(alpha))
    f = display_factor(ov.size, min_side)
    ov = enlarge(ov, min_side)
    draw = ImageDraw.Draw(ov)
    lw = max(2, min(ov.size) // 128)
    for b in [] if boxes is None else np.asarray(boxes, dtype=np.float32).reshape(-1, 4):
        draw.rectangle([b[0] * f, b[1] * f, b[2] * f - 1, b[3] * f - 1], outline=(0, 255, 0), width=lw)
    x, y = peak(heat)
    cx, cy, r = (x + 0.5) * f, (y + 0.5) * f, max(5, min(ov.size) // 32)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(255, 255, 255), width=lw)
    draw.line([cx - r, cy, cx + r, cy], fill=(0, 0, 0), width=max(1, lw // 2))
    draw.line([cx, cy - r, cx, cy + r], fill=(0, 0, 0), width=max(1, lw // 2))
    return ov


# ------------------------------------------------------------------------------------------------- downloads


def overlays_zip(
    img: Image.Image,
    results: Sequence[Explanation],
    alpha: float,
    out: str | os.PathLike,
    boxes: dict[str, np.ndarray] | None = None,
    metrics: dict | None = None,
) -> Path:
    """Write every overlay (one PNG per explainer and prompt, at the current opacity) and a ``results.json``
    (scores, token weights, per-item metrics) into the zip file ``out``; returns its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = []
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for r in results:
            slug = _slug(r.explainer)
            for k, p in enumerate(r.prompts):
                buf = io.BytesIO()
                bx = None if boxes is None else boxes.get(p)
                render(img, r.maps[k], alpha, bx).save(buf, format="PNG")
                name = f"{slug}/{k}_{_slug(p)}.png"
                z.writestr(name, buf.getvalue())
                entry = {"explainer": r.explainer, "prompt": p, "score": r.scores[k], "file": name}
                if r.tokens is not None:
                    entry["token_weights"] = [[t, w] for t, w in r.tokens[k]]
                if metrics and (r.explainer, p) in metrics:
                    entry["metrics"] = metrics[(r.explainer, p)]
                summary.append(entry)
        z.writestr("results.json", json.dumps({"opacity": alpha, "results": summary}, indent=2))
    return out
