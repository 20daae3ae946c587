"""The shapes world itself: vocabulary, seeded scene sampling, rendering and captions.

Everything that decides what an image or a caption looks like lives here, so the files written by
:mod:`mmel.data.shapes.writer` and the caption stream the tiny CLIP learns from (:mod:`mmel.pretrain`) are one
and the same distribution.

A scene is 1–4 objects, each a (colour, shape) pair, no pair twice in one image (so a caption such as
"a red circle" always names exactly one box). Objects never overlap: their drawing squares keep a gap of
``GAP`` pixels. Backgrounds are desaturated, smooth random fields with a random stripe texture and pixel noise;
the whole image (objects included) gets the pixel noise, so no object is a flat colour.

Boxes are tight boxes of the rendered object (pixels with coverage ≥ 1/2), as continuous pixel coordinates
``[x0, y0, x1, y1]`` with x1/y1 exclusive (a one-pixel object at column 3 spans 3..4) — COCO's ``[x, y, w, h]``
convention, and what the Flickr XML stores as xmin/ymin/xmax/ymax.

Randomness: each image draws from its own ``numpy`` generator seeded by ``(seed, stream, index)``; an image
therefore depends only on the seed, its split and its index — never on how many other images were made.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 80, 225),
    "yellow": (235, 210, 45),
    "purple": (150, 60, 195),
    "cyan": (40, 200, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
# Category ids 1..36, colour-major, as written to COCO (name "<colour> <shape>", supercategory = shape).
CATEGORIES: list[tuple[str, str]] = [(c, s) for c in COLOURS for s in SHAPES]

# Stream codes: the world's splits and the pretraining caption stream never share a generator.
STREAMS = {"train": 1, "val": 2, "test": 3, "pretrain": 11}
GAP = 2  # pixels between the drawing squares of two objects
SUPERSAMPLE = 4  # objects are drawn at 4x and box-filtered down: anti-aliased edges
COLOUR_JITTER = 18  # per-channel jitter of an object's colour
JPEG_KW = {"quality": 95, "subsampling": 0}  # 4:4:4 — chroma subsampling would smear colours at 64 px


@dataclass(frozen=True)
class ShapeObject:
    """One rendered object: category, drawing square and tight box (pixels, xyxy, x1/y1 exclusive)."""

    colour: str
    shape: str
    square: tuple[float, float, float]  # (x0, y0, side) of the drawing square
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def category_id(self) -> int:
        return CATEGORIES.index((self.colour, self.shape)) + 1


@dataclass(frozen=True)
class Scene:
    """A rendered image (uint8 [H, W, 3]) with its objects and the mask of each object (float [n, H, W])."""

    pixels: np.ndarray
    objects: tuple[ShapeObject, ...]
    masks: np.ndarray


def image_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The generator of one image: depends only on (seed, stream, index)."""
    return np.random.default_rng([int(seed), STREAMS[stream], int(index)])


def _shape_polygon(shape: str, x0: float, y0: float, s: float) -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` in the square (x0, y0, side s); None for the circle (drawn as an ellipse)."""
    cx, cy, r = x0 + s / 2, y0 + s / 2, s / 2
    if shape == "square":
        return [(x0, y0), (x0 + s, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    if shape == "triangle":
        return [(cx, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    if shape == "diamond":
        return [(cx, y0), (x0 + s, cy), (cx, y0 + s), (x0, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + r * 0.1 + rad * math.sin(a)))
        return pts
    if shape == "cross":
        t = 0.19 * s  # half the arm thickness
        return [
            (cx - t, y0), (cx + t, y0), (cx + t, cy - t), (x0 + s, cy - t), (x0 + s, cy + t), (cx + t, cy + t),
            (cx + t, y0 + s), (cx - t, y0 + s), (cx - t, cy + t), (x0, cy + t), (x0, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    if shape == "circle":
        return None
    raise ValueError(f"Unknown shape '{shape}'; expected one of {SHAPES}.")


def _object_mask(shape: str, square: tuple[float, float, float], size: int) -> np.ndarray:
    """Coverage in [0, 1] of one object, float32 [size, size] (drawn supersampled, then box-filtered)."""
    k = SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, s = (v * k for v in square)
    poly = _shape_polygon(shape, x0, y0, s)
    if poly is None:
        draw.ellipse([x0, y0, x0 + s - 1, y0 + s - 1], fill=255)
    else:
        draw.polygon(poly, fill=255)
    return np.asarray(canvas.reduce(k), dtype=np.float32) / 255.0


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask >= 0.5)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A desaturated textured background, float [size, size, 3] in roughly [40, 210]."""
    grey = rng.uniform(70, 180)
    base = grey + rng.uniform(-14, 14, size=3)
    # low-frequency colour field: a coarse random grid, bilinearly upsampled
    coarse = rng.normal(0.0, 1.0, size=(5, 5))
    field = np.asarray(
        Image.fromarray(coarse.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    )
    tint = rng.normal(0.0, 0.25, size=3) + 1.0  # the field is mostly luminance, a little colour
    img = base + 22.0 * field[..., None] * tint
    # a random stripe texture (orientation, frequency and contrast random; sometimes absent)
    if rng.random() < 0.75:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        theta, period = rng.uniform(0, math.pi), rng.uniform(3.0, 12.0)
        phase = rng.uniform(0, 2 * math.pi)
        stripes = np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period + phase)
        img = img + rng.uniform(4.0, 14.0) * stripes[..., None]
    return img


def _place(
    rng: np.random.Generator, size: int, n: int, size_range: tuple[float, float]
) -> list[tuple[float, float, float]]:
    """Up to ``n`` non-overlapping drawing squares (x0, y0, side) inside the image."""
    squares: list[tuple[float, float, float]] = []
    lo, hi = size_range[0] * size, size_range[1] * size
    for _ in range(n):
        for _try in range(60):
            s = float(round(rng.uniform(lo, hi) * SUPERSAMPLE) / SUPERSAMPLE)
            x0 = float(round(rng.uniform(1, size - 1 - s) * SUPERSAMPLE) / SUPERSAMPLE)
            y0 = float(round(rng.uniform(1, size - 1 - s) * SUPERSAMPLE) / SUPERSAMPLE)
            if all(
                x0 + s + GAP <= a or a + t + GAP <= x0 or y0 + s + GAP <= b or b + t + GAP <= y0 for a, b, t in squares
            ):
                squares.append((x0, y0, s))
                break
    return squares


def sample_scene(
    rng: np.random.Generator,
    size: int = 64,
    max_objects: int = 4,
    size_range: tuple[float, float] = (0.22, 0.40),
    noise: float = 6.0,
) -> Scene:
    """Draw one scene: 1..max_objects objects on a textured background, pixel noise over everything.

    ``size_range`` is the side of an object's drawing square as a fraction of the image side.
    """
    n = int(rng.integers(1, max_objects + 1))
    pairs = rng.choice(len(CATEGORIES), size=n, replace=False)
    squares = _place(rng, size, n, size_range)  # may place fewer than n when the image is crowded
    img = _background(rng, size)
    objects, masks = [], []
    for cat, square in zip(pairs, squares, strict=False):
        colour, shape = CATEGORIES[int(cat)]
        rgb = np.asarray(COLOURS[colour], dtype=np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
        mask = _object_mask(shape, square, size)
        img = img * (1.0 - mask[..., None]) + rgb * mask[..., None]
        objects.append(ShapeObject(colour, shape, square, _tight_box(mask)))
        masks.append(mask)
    img = img + rng.normal(0.0, noise, size=img.shape)
    pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Scene(pixels=pixels, objects=tuple(objects), masks=np.stack(masks))


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """The JPEG bytes every image of the world is stored as (deterministic for a given libjpeg)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="JPEG", **JPEG_KW)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def phrase(obj: ShapeObject) -> str:
    """How a caption names one object: "a red circle"."""
    return f"a {obj.colour} {obj.shape}"


def join_phrases(parts: list[str]) -> str:
    """ "x", "x and y", "x, y and z"."""
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def sample_caption(rng: np.random.Generator, objects: tuple[ShapeObject, ...], max_named: int = 3) -> list[int]:
    """Indices (into ``objects``, in caption order) of the 1..max_named objects one caption names."""
    k = int(rng.integers(1, min(max_named, len(objects)) + 1))
    return [int(i) for i in rng.permutation(len(objects))[:k]]


def caption_text(objects: tuple[ShapeObject, ...], named: list[int]) -> str:
    """Plain caption text for the named objects: "a red circle and a blue square"."""
    return join_phrases([phrase(objects[i]) for i in named])


def flickr_markup(objects: tuple[ShapeObject, ...], named: list[int], entity_ids: list[int]) -> str:
    """The same caption with Flickr30k Entities markup: "[/EN#7/circle a red circle] and [/EN#8/square ...]"."""
    return join_phrases([f"[/EN#{entity_ids[i]}/{objects[i].shape} {phrase(objects[i])}]" for i in named])
