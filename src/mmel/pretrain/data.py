"""The caption stream the tiny CLIP learns from: shapes-world images paired with one of their captions.

Item i is rendered from its own generator (seed, "pretrain" stream, i) by the same code that writes the world's
files (:mod:`mmel.data.shapes.world`), JPEG round trip included, so the CLIP sees exactly the distribution it is
later explained on — but never the world's val/test images (different stream).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from mmel.data.shapes.world import CATEGORIES, Scene, caption_text, decode_jpeg, encode_jpeg, image_rng, sample_caption
from mmel.data.shapes.world import sample_scene as _sample_scene


def to_tensor(image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """PIL RGB / uint8 [H, W, 3] -> normalised float [3, H, W]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (arr - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def object_hot(objects) -> torch.Tensor:
    """Multi-hot [C] over the world's categories of the given ShapeObjects."""
    hot = torch.zeros(len(CATEGORIES))
    for o in objects:
        hot[o.category_id - 1] = 1.0
    return hot


def render(seed: int, stream: str, index: int, image_size: int) -> tuple[Scene, np.random.Generator]:
    """Scene ``index`` of ``stream``, as stored (JPEG round trip); returns the generator for its captions."""
    rng = image_rng(seed, stream, index)
    scene = _sample_scene(rng, size=image_size)
    pixels = np.asarray(decode_jpeg(encode_jpeg(scene.pixels)))
    return Scene(pixels=pixels, objects=scene.objects, masks=scene.masks), rng


class ShapesCaptionStream(Dataset):
    """Map-style stream of (image [3,S,S], tokens [L], image objects [C], caption objects [C]); deterministic."""

    def __init__(
        self,
        seed: int,
        length: int,
        tokenizer: Callable[[list[str]], torch.Tensor],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        image_size: int = 64,
        stream: str = "pretrain",
    ) -> None:
        self.seed, self.length, self.tokenizer = seed, length, tokenizer
        self.mean, self.std, self.image_size, self.stream = mean, std, image_size, stream

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scene, rng = render(self.seed, self.stream, index, self.image_size)
        named = sample_caption(rng, scene.objects)
        tokens = self.tokenizer([caption_text(scene.objects, named)])[0]
        return (
            to_tensor(scene.pixels, self.mean, self.std),
            tokens,
            object_hot(scene.objects),
            object_hot([scene.objects[i] for i in named]),
        )
