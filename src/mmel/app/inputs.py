"""The explorer's inputs checked into messages: prompts, uploads, image sizes.

Every user mistake raises :class:`InputError` with a sentence meant for the page; the UI shows it instead of
results, so a bad request never takes the server down.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from mmel.data.base import as_displayed
from mmel.explain import load_image

MAX_SIDE = 1024  # larger uploads are downscaled (with a note): maps are computed at the model's size anyway
MAX_PROMPTS = 16


class InputError(ValueError):
    """A problem with what the user asked for; its message is shown in the page."""


# ---------------------------------------------------------------------------------------------------- inputs


def parse_prompts(text: str | None) -> list[str]:
    """Prompt text, one per line -> list of K non-empty, stripped prompts (1 ≤ K ≤ MAX_PROMPTS)."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise InputError("Prompts: enter at least one prompt, one per line.")
    if len(prompts) > MAX_PROMPTS:
        raise InputError(f"Prompts: {len(prompts)} given; at most {MAX_PROMPTS} per request.")
    return prompts


def read_upload(path: str | os.PathLike | None) -> Image.Image:
    """An uploaded file -> 8-bit RGB PIL image (the library's loader), or InputError naming the file."""
    if path is None or str(path) == "":
        raise InputError("Image: none given; upload an image or load a sample from the shapes world.")
    name = Path(path).name
    try:
        return load_image(path)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"Image: '{name}' is not a readable image ({e}).") from e
    except Image.DecompressionBombError as e:  # Pillow refuses images of more than ~179 Mpx outright
        raise InputError(f"Image: '{name}' is too large to decode safely ({e}).") from e


def fit_image(img: Image.Image, max_side: int = MAX_SIDE) -> tuple[Image.Image, str | None]:
    """RGB image -> (image whose longer side is at most ``max_side``, a note when it had to be downscaled)."""
    img = as_displayed(img)
    w, h = img.size
    if max(w, h) <= max_side:
        return img, None
    s = max_side / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    note = f"The image ({w}×{h}) was downscaled to {size[0]}×{size[1]} (longest side at most {max_side} px)."
    return img.resize(size, Image.Resampling.LANCZOS), note
